"""Our Transformer against Hugging Face's LlamaForCausalLM on the same weights, loaded from files.

Tiny random models cover every layout and option; the real default model (SmolLM2-135M-Instruct,
Q4_1 GGUF) is checked against transformers' own GGUF loader, which dequantizes and un-permutes the
file by a separate path.
"""
from __future__ import annotations

import pytest
import torch
import transformers

from model.checkpoints import load_state_dict_into, open_checkpoint
from model.model import Transformer, dequantize_kv, quantize_kv, rope_frequencies
from tiny_checkpoints import VOCAB, tiny_checkpoint


def load_transformer(path, max_len: int = 128) -> Transformer:
    """The way the app loads: build on the meta device, assign the checkpoint's tensors, allocate caches."""
    ckpt = open_checkpoint(path)
    with torch.device("meta"):
        model = Transformer(ckpt.args)
    load_state_dict_into(model, ckpt, dtype=torch.float32)
    model.setup_caches(max_len)
    return model.eval()


def assert_logits_close(ours: torch.Tensor, theirs: torch.Tensor, rel: float = 1e-4):
    """Largest difference relative to the largest logit: elementwise rtol fails on logits near zero."""
    assert ours.shape == theirs.shape
    err = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert err < rel, f"logits differ by {err:.2e} of the largest logit"


@torch.no_grad()
def greedy(model: Transformer, prompt: torch.Tensor, n: int) -> list[int]:
    """Prefill the prompt, then feed back the argmax one token at a time through the KV cache."""
    logits = model(prompt, last_only=True)
    out = []
    for pos in range(prompt.shape[1], prompt.shape[1] + n):
        token = logits[0, -1].argmax()
        out.append(int(token))
        logits = model(token.view(1, 1), start_pos=pos)
    return out


@torch.no_grad()
def hf_greedy(oracle, prompt: torch.Tensor, n: int) -> list[int]:
    oracle.generation_config.eos_token_id = None  # never stop early: we compare exactly n tokens
    out = oracle.generate(prompt, do_sample=False, max_new_tokens=n, pad_token_id=0)
    return out[0, prompt.shape[1]:].tolist()


PROMPT = torch.randint(0, VOCAB, (1, 64), generator=torch.Generator().manual_seed(1234))  # (1, 64) token ids

CASES = {
    "hf-gqa": ("hf", dict(gqa=True)),
    "hf-tied-mha": ("hf", dict(gqa=False, tied=True)),
    "hf-llama31": ("hf", dict(llama31=True)),
    "hf-sharded": ("hf-sharded", dict()),
    "meta-llama31": ("meta", dict(llama31=True)),
    "meta-2shards": ("meta-2shards", dict(gqa=True)),
    "gguf-tied": ("gguf", dict(tied=True)),
    "gguf-llama31": ("gguf", dict(llama31=True)),
    "gguf-q8_0": ("gguf-q8_0", dict()),
    "gguf-q4_0-tied": ("gguf-q4_0", dict(tied=True, gqa=False)),
}


# ---------------------------------------------------------------- tiny models, every layout
@pytest.mark.parametrize("layout, options", CASES.values(), ids=CASES.keys())
@torch.no_grad()
def test_logits_match_hf(tmp_path, layout, options):
    path, oracle = tiny_checkpoint(tmp_path, layout, **options)
    model = load_transformer(path)
    assert_logits_close(model(PROMPT), oracle(PROMPT).logits)


@pytest.mark.parametrize("layout", ["hf", "gguf"])
def test_llama31_rope_frequencies_match_hf(tmp_path, layout):
    """Scaling touches only low frequencies, which a 64-token prompt barely turns: compare them directly."""
    path, oracle = tiny_checkpoint(tmp_path, layout, llama31=True)
    args = open_checkpoint(path).args
    ours = rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling)
    torch.testing.assert_close(ours, oracle.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    assert not torch.allclose(ours, rope_frequencies(args.head_dim, args.rope_theta, None))


def test_tied_output_is_the_embedding(tmp_path):
    model = load_transformer(tiny_checkpoint(tmp_path, "gguf", tied=True)[0])
    assert model.output.weight is model.tok_embeddings.weight


@torch.no_grad()
def test_incremental_decode_equals_full_forward(tmp_path):
    model = load_transformer(tiny_checkpoint(tmp_path, "gguf-q8_0", gqa=True)[0])
    full = model(PROMPT)  # (1, 64, V)
    steps = [model(PROMPT[:, :40])]  # prefill 40 tokens, then one at a time from position 40
    steps += [model(PROMPT[:, pos : pos + 1], start_pos=pos) for pos in range(40, 64)]
    assert_logits_close(torch.cat(steps, dim=1), full, rel=1e-5)


@pytest.mark.parametrize("layout, options", [CASES["hf-gqa"], CASES["meta-llama31"], CASES["gguf-q4_0-tied"]],
                         ids=["hf-gqa", "meta-llama31", "gguf-q4_0-tied"])
def test_greedy_continuation_matches_hf_generate(tmp_path, layout, options):
    path, oracle = tiny_checkpoint(tmp_path, layout, **options)
    model = load_transformer(path)
    assert greedy(model, PROMPT, 32) == hf_greedy(oracle, PROMPT, 32)


# ---------------------------------------------------------------- the int8 KV cache
@pytest.mark.parametrize("layout, options", [CASES["gguf-q8_0"], CASES["hf-tied-mha"], CASES["meta-llama31"]],
                         ids=["gguf-q8_0-gqa", "hf-tied-mha", "meta-llama31"])
@torch.no_grad()
def test_int8_kv_cache_logits_stay_close_to_the_float_cache(tmp_path, layout, options):
    """Measured on these tiny models: 1.0-1.6% of the largest logit (a bf16 cache: 0.4-0.5%).
    Their weights are drawn large (initializer_range 0.1), which spreads errors more than real ones do."""
    model = load_transformer(tiny_checkpoint(tmp_path, layout, **options)[0])
    full = model(PROMPT)  # (1, 64, V)
    model.setup_caches(128, kv_dtype=torch.int8)
    assert model.layers[0].attention.kv_cache.k.dtype == torch.int8
    assert_logits_close(model(PROMPT), full, rel=3e-2)


@torch.no_grad()
def test_int8_kv_cache_incremental_decode_equals_its_full_forward(tmp_path):
    """Prefill and decode read the same quantized keys and values a full forward reads."""
    model = load_transformer(tiny_checkpoint(tmp_path, "gguf-q8_0", gqa=True)[0])
    model.setup_caches(128, kv_dtype=torch.int8)
    full = model(PROMPT)  # (1, 64, V)
    steps = [model(PROMPT[:, :40])]
    steps += [model(PROMPT[:, pos : pos + 1], start_pos=pos) for pos in range(40, 64)]
    assert_logits_close(torch.cat(steps, dim=1), full, rel=1e-5)  # measured 8e-7


@torch.no_grad()
def test_a_bf16_cache_under_fp32_activations_is_read_back_cast(tmp_path):
    model = load_transformer(tiny_checkpoint(tmp_path, "gguf-q8_0", gqa=True)[0])
    full = model(PROMPT)  # (1, 64, V)
    model.setup_caches(128, kv_dtype=torch.bfloat16)
    assert model.layers[0].attention.kv_cache.k.dtype == torch.bfloat16
    logits = model(PROMPT)
    assert logits.dtype == torch.float32
    assert_logits_close(logits, full, rel=1e-2)  # measured 0.45%


def test_quantize_kv_rounds_each_vector_to_its_own_absmax_grid():
    x = torch.tensor([[[[1.0, -2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [-254.0, 127.0, 1.0, 3.0]]]])  # (1, 1, 3, 4)
    q, scale = quantize_kv(x)
    assert q.dtype == torch.int8 and scale.shape == (1, 1, 3, 1)
    assert q[0, 0].tolist() == [[64, -127, 32, 0], [0, 0, 0, 0], [-127, 64, 0, 2]]  # 63.5 rounds to even: 64
    assert scale[0, 0, :, 0].tolist() == pytest.approx([2 / 127, 0.0, 2.0])
    back = dequantize_kv(q, scale, torch.float32)
    assert ((back - x).abs() <= scale / 2 + 1e-6).all()  # within half a step of each vector's grid


# ---------------------------------------------------------------- the real default model
@pytest.fixture(scope="module")
def smollm(default_gguf):
    """(ours, HF's LlamaForCausalLM, HF tokenizer), all read from the default GGUF once.

    transformers reads a GGUF only with accelerate installed; it dequantizes to float32 by default.
    """
    folder, name = default_gguf.parent, default_gguf.name
    oracle = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return load_transformer(default_gguf, max_len=128), oracle, tokenizer


def _smollm_prompt(tokenizer) -> torch.Tensor:
    text = (
        "<|im_start|>user\nWrite a short, cheerful story about a small robot who learns to paint. "
        "Describe the colours it discovers, the first picture it makes, and what its friends say "
        "when they see it hanging on the workshop wall. Keep it under two hundred words, give the robot "
        "a name, and end with a line of dialogue.<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer(text).input_ids
    assert len(ids) >= 64
    return torch.tensor([ids[:64]])  # (1, 64)


@pytest.mark.e2e
@torch.no_grad()
def test_default_model_logits_match_transformers(smollm):
    ours, oracle, tokenizer = smollm
    assert oracle.dtype == torch.float32
    prompt = _smollm_prompt(tokenizer)
    assert_logits_close(ours(prompt), oracle(prompt).logits)


@pytest.mark.e2e
def test_default_model_greedy_matches_transformers(smollm):
    ours, oracle, tokenizer = smollm
    prompt = _smollm_prompt(tokenizer)
    tokens = greedy(ours, prompt, 32)
    assert tokens == hf_greedy(oracle, prompt, 32)
    assert tokenizer.decode(tokens).strip()  # real words, not a run of one token
