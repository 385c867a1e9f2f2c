"""Tiny random LLaMAs written to disk in every layout llamadesk reads, each with its HF oracle.

    path, oracle = tiny_checkpoint(tmp_path, "gguf-q8_0", gqa=True, tied=True)

`oracle` is a `transformers.LlamaForCausalLM` holding exactly the weights in the file (for a
quantized GGUF, the weights as the file rounds them). The writers redo what the real converters do
(HF `save_pretrained`, Meta's consolidated.NN.pth, llama.cpp's convert_hf_to_gguf.py) without
using model/checkpoints.py, so the importer is tested on files it did not make.
"""
from __future__ import annotations

import base64
import functools
import json
import math
from pathlib import Path

import gguf
import numpy as np
import torch
from tokenizer_files import add_sentencepiece_vocab, train_llama2_sentencepiece
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM

LAYOUTS = ("hf", "hf-sharded", "meta", "meta-2shards", "gguf", "gguf-f16", "gguf-q8_0", "gguf-q4_0")

DIM, N_LAYERS, N_HEADS, VOCAB = 64, 2, 4, 320
SPM_VOCAB = 512  # 256 byte pieces, <unk> <s> </s>, the characters, and a few merges
MULTIPLE_OF = 32
FFN_DIM = 192  # Meta's rule for dim 64: round int(2 * 4 * 64 / 3) = 170 up to a multiple of 32
LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def tiny_checkpoint(tmp_path: Path, layout: str = "hf", **options) -> tuple[Path, LlamaForCausalLM]:
    """Write a tiny model in `layout` (one of LAYOUTS) under tmp_path; options go to tiny_hf_model.

    sentencepiece=True gives it a Llama 2 vocab (SentencePiece BPE, <unk> <s> </s> = 0 1 2, and
    Llama 2's chat template where the layout has a place for one) instead of Llama 3's kind."""
    model = tiny_hf_model(**options)
    spm = bool(options.get("sentencepiece"))
    if layout == "hf":
        return write_hf(model, tmp_path / "hf", spm=spm), model
    if layout == "hf-sharded":
        return write_hf(model, tmp_path / "hf-sharded", max_shard_size="100KB", spm=spm), model
    if layout == "meta":
        return write_meta(model, tmp_path / "meta", spm=spm), model
    if layout == "meta-2shards":
        return write_meta(model, tmp_path / "meta-2shards", shards=2, style="llama2", spm=spm), model
    if layout.startswith("gguf"):
        qtype = layout.partition("-")[2].upper() or "F32"
        return write_gguf(model, tmp_path / f"tiny-{qtype}.gguf", qtype, spm=spm), model
    raise ValueError(f"unknown layout {layout!r}; pick one of {LAYOUTS}")


def tiny_hf_model(*, gqa: bool = True, tied: bool = False, llama31: bool = False, seed: int = 0,
                  sentencepiece: bool = False, rope: dict | None = None, **extra) -> LlamaForCausalLM:
    """A random 2-layer LLaMA in float32: 4 heads, 2 KV heads with gqa, Llama 3.1 RoPE scaling with llama31
    (or the transformers rope_parameters given as `rope`).

    Further keywords go to LlamaConfig (e.g. attention_bias=True for a model we must refuse).
    """
    config = LlamaConfig(
        hidden_size=DIM, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
        num_key_value_heads=2 if gqa else N_HEADS, intermediate_size=FFN_DIM,
        vocab_size=SPM_VOCAB if sentencepiece else VOCAB,
        rms_norm_eps=1e-5, tie_word_embeddings=tied,
        max_position_embeddings=131072 if llama31 else 2048,
        rope_parameters=dict(rope or (LLAMA31_ROPE if llama31 else {"rope_type": "default", "rope_theta": 100000.0})),
        # Weights this large make logits spread out, so greedy picks never hinge on a near tie.
        initializer_range=0.1,
        bos_token_id=1 if sentencepiece else TOKENS.index("<|begin_of_text|>"),
        eos_token_id=2 if sentencepiece else TOKENS.index("<|end_of_text|>"),
        **extra,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # HF starts norms at 1; random ones catch a swapped norm
                p.uniform_(0.5, 1.5)
    return model


# ---------------------------------------------------------------- the tokenizer every layout carries
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest for chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


BYTE_CHARS = _bytes_to_unicode()  # byte -> its token; in GPT-2's token order ("Ġ" is the space)
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "r e", "Ġ s", "a t", "e n", "o r", "Ġ o", "Ġ w",
          "i s", "n d", "in g", "Ġ h", "e s", "Ġ b", "Ġ c", "i t", "l l", "a n", "Ġ i", "o u", "Ġ f", "Ġ m",
          "Ġ p", "e d", "Ġa nd", "Ġo f"]
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
_NORMAL = list(BYTE_CHARS.values()) + [m.replace(" ", "") for m in MERGES]
# Like Llama 3, the vocabulary is padded to the embedding's rows with reserved special tokens.
TOKENS = _NORMAL + SPECIALS + [f"<|reserved_special_token_{i}|>" for i in range(VOCAB - len(_NORMAL) - len(SPECIALS))]


def write_hf_tokenizer(folder: Path) -> None:
    vocab = {t: i for i, t in enumerate(TOKENS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in MERGES]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(TOKENS[len(_NORMAL):])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast",
              "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


# Llama-2-chat's template, as its tokenizer_config.json holds it.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)


@functools.cache
def llama2_tokenizer_model() -> bytes:
    """A SentencePiece tokenizer.model of SPM_VOCAB pieces, trained with Llama 2's settings."""
    from pydoc_data.topics import topics

    return train_llama2_sentencepiece([line for key in sorted(topics) for line in topics[key].splitlines()
                                       if line.strip()][:4000], SPM_VOCAB)


def write_sentencepiece_files(folder: Path, template: bool = True) -> None:
    (folder / "tokenizer.model").write_bytes(llama2_tokenizer_model())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
              "add_bos_token": True, "add_eos_token": False}
    if template:
        config["chat_template"] = LLAMA2_CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def write_tiktoken_file(path: Path) -> None:
    """Llama 3's tokenizer.model: one `base64(token bytes) rank` line per ordinary token."""
    to_byte = {c: b for b, c in BYTE_CHARS.items()}
    lines = [f"{base64.b64encode(bytes(to_byte[c] for c in t)).decode()} {rank}" for rank, t in enumerate(_NORMAL)]
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- Hugging Face
def write_hf(model: LlamaForCausalLM, folder: Path, max_shard_size: str | None = None, spm: bool = False) -> Path:
    if max_shard_size:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
    else:
        model.save_pretrained(folder)
    if spm:
        write_sentencepiece_files(folder)
    else:
        write_hf_tokenizer(folder)
    return folder


# ---------------------------------------------------------------- Meta
def meta_state_dict(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The weights under Meta's names, wq/wk back in Meta's interleaved-RoPE row order.

    Meta's models have no tied output layer, so a tied model gets a copy of its embedding.
    """
    c, hf = model.config, model.model
    sd = {"tok_embeddings.weight": hf.embed_tokens.weight}
    for i, layer in enumerate(hf.layers):
        attn, mlp = layer.self_attn, layer.mlp
        sd[f"layers.{i}.attention.wq.weight"] = llama_cpp_permute(attn.q_proj.weight, c.num_attention_heads)
        sd[f"layers.{i}.attention.wk.weight"] = llama_cpp_permute(attn.k_proj.weight, c.num_key_value_heads)
        sd[f"layers.{i}.attention.wv.weight"] = attn.v_proj.weight
        sd[f"layers.{i}.attention.wo.weight"] = attn.o_proj.weight
        sd[f"layers.{i}.feed_forward.w1.weight"] = mlp.gate_proj.weight
        sd[f"layers.{i}.feed_forward.w2.weight"] = mlp.down_proj.weight
        sd[f"layers.{i}.feed_forward.w3.weight"] = mlp.up_proj.weight
        sd[f"layers.{i}.attention_norm.weight"] = layer.input_layernorm.weight
        sd[f"layers.{i}.ffn_norm.weight"] = layer.post_attention_layernorm.weight
    sd["norm.weight"] = hf.norm.weight
    sd["output.weight"] = model.lm_head.weight
    return {name: w.detach().clone() for name, w in sd.items()}


# How Meta's model-parallel layers split each weight across shards (norms are replicated).
_SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def write_meta(model: LlamaForCausalLM, folder: Path, shards: int = 1, style: str = "llama3",
               spm: bool = False) -> Path:
    """params.json + consolidated.NN.pth (+ tokenizer.model).

    style "llama3": vocab_size in params.json, the embedding split by rows (VocabParallelEmbedding);
    style "llama2": vocab_size -1, the embedding split by columns (ParallelEmbedding).
    """
    c = model.config
    folder.mkdir(parents=True)
    params = {
        "dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
        "n_kv_heads": c.num_key_value_heads, "vocab_size": c.vocab_size if style == "llama3" else -1,
        "multiple_of": MULTIPLE_OF, "norm_eps": c.rms_norm_eps, "rope_theta": c.rope_parameters["rope_theta"],
        "use_scaled_rope": c.rope_parameters["rope_type"] == "llama3",
    }
    (folder / "params.json").write_text(json.dumps(params, indent=2))
    split = dict(_SPLIT_DIM, tok_embeddings=0 if style == "llama3" else 1)
    sd = meta_state_dict(model)
    for n in range(shards):
        shard = {}
        for name, w in sd.items():
            d = split.get(name.split(".")[-2])
            shard[name] = w if d is None else w.chunk(shards, dim=d)[n].clone()  # clone: save only the slice
        torch.save(shard, folder / f"consolidated.{n:02d}.pth")
    if spm:
        (folder / "tokenizer.model").write_bytes(llama2_tokenizer_model())
    else:
        write_tiktoken_file(folder / "tokenizer.model")
    return folder


def llama_cpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's rotate-half row order -> Meta's interleaved one, as llama.cpp's converter writes it."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------- GGUF
_FILE_TYPES = {"F32": gguf.LlamaFileType.ALL_F32, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
               "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "F16": gguf.LlamaFileType.MOSTLY_F16}


def write_gguf(model: LlamaForCausalLM, path: Path, qtype: str = "F32", spm: bool = False) -> Path:
    """A llama GGUF like convert_hf_to_gguf.py writes; matrices in `qtype`, norms in F32.

    For a quantized type the oracle's weights are replaced by the rounded ones the file holds.
    """
    c = model.config
    n_heads, n_kv_heads = c.num_attention_heads, c.num_key_value_heads
    tied = c.tie_word_embeddings
    ggml_type = gguf.GGMLQuantizationType[qtype]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)

    w = gguf_header(path, c, _FILE_TYPES[qtype], spm)
    for hf_name, param in model.named_parameters():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp leaves out an output matrix equal to the embedding
        data = param.detach().numpy().copy()  # a copy: the oracle's weights may be rounded below
        if data.ndim == 2 and ggml_type != gguf.GGMLQuantizationType.F32:
            # Quantization blocks run along rows, so rounding before or after the row permutation is the same.
            rounded = gguf.quants.dequantize(gguf.quants.quantize(data, ggml_type), ggml_type)
            with torch.no_grad():
                param.copy_(torch.from_numpy(rounded))
        if ".q_proj." in hf_name:
            data = llama_cpp_permute(data, n_heads)
        elif ".k_proj." in hf_name:
            data = llama_cpp_permute(data, n_kv_heads)
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if data.ndim == 2 and ggml_type != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name, gguf.quants.quantize(data, ggml_type), raw_dtype=ggml_type)
        else:
            w.add_tensor(gguf_name, np.ascontiguousarray(data, dtype=np.float32))
    rope = c.rope_parameters
    if rope["rope_type"] == "llama3":
        w.add_tensor("rope_freqs.weight", llama31_rope_factors(c))
        if rope["original_max_position_embeddings"] != 8192:
            w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif rope["rope_type"] in ("linear", "yarn"):  # as convert_hf_to_gguf.py writes them
        w.add_rope_scaling_type(gguf.RopeScalingType(rope["rope_type"]))
        w.add_rope_scaling_factor(rope["factor"])
        if rope["rope_type"] == "yarn":
            w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    return gguf_finish(w, path)


def gguf_header(path: Path, c: LlamaConfig, file_type, spm: bool = False) -> gguf.GGUFWriter:
    """A GGUFWriter with a llama's key/values for config `c` and the tiny tokenizer (byte-level BPE,
    or with `spm` the SentencePiece one of Llama 2), no tensors yet."""
    n_heads, n_kv_heads = c.num_attention_heads, c.num_key_value_heads
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.hidden_size // n_heads)
    w.add_file_type(file_type)
    if spm:
        add_sentencepiece_vocab(w, llama2_tokenizer_model(), c.bos_token_id, c.eos_token_id)
        w.add_chat_template(LLAMA2_CHAT_TEMPLATE)
        return w
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(TOKENS)
    w.add_token_types([gguf.TokenType.NORMAL] * len(_NORMAL) + [gguf.TokenType.CONTROL] * (len(TOKENS) - len(_NORMAL)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    return w


def gguf_finish(w: gguf.GGUFWriter, path: Path) -> Path:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama31_rope_factors(c: LlamaConfig) -> np.ndarray:
    """The per-frequency divisors convert_hf_to_gguf.py stores as rope_freqs.weight for Llama 3.1."""
    rope = c.rope_parameters
    head_dim = c.hidden_size // c.num_attention_heads
    old_len, low, high = rope["original_max_position_embeddings"], rope["low_freq_factor"], rope["high_freq_factor"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * rope["rope_theta"] ** (i / head_dim)
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(rope["factor"])
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


# ---------------------------------------------------------------- GGUF of random blocks
# where each type keeps its fp16 scales (byte offsets in a block), so random bytes can be made finite
FP16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
               "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(rng: np.random.Generator, qtype: str, shape: tuple[int, int], scale: float = 0.01) -> np.ndarray:
    """(N, K) of `qtype` as random bytes, its fp16 scales replaced by finite ones (~`scale`)."""
    t = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[t]
    N, K = shape
    raw = rng.integers(0, 256, size=(N * K // block, size), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        raw[:, off : off + 2] = rng.normal(0, scale, size=N * K // block).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(N, K // block * size)


def write_random_blocks_gguf(path: Path, qtype: str, tied: bool = False, seed: int = 0, split_count: int = 0,
                             table: str | None = None) -> Path:
    """A 256-aligned llama GGUF (dim 256, FFN 512: K-quants need rows of 256) whose every matrix is
    random `qtype` blocks with finite fp16 scales (the token table in `table`'s type if given,
    "F16" included), norms in F32: a file llama.cpp would write for this shape, without its
    quantizer."""
    c = LlamaConfig(hidden_size=256, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=512, vocab_size=VOCAB, rms_norm_eps=1e-5, tie_word_embeddings=tied,
                    max_position_embeddings=2048, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                    bos_token_id=TOKENS.index("<|begin_of_text|>"), eos_token_id=TOKENS.index("<|end_of_text|>"))
    rng = np.random.default_rng(seed)
    w = gguf_header(path, c, gguf.LlamaFileType.GUESSED)
    if split_count:  # what llama-gguf-split writes into each part
        w.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_NO, 0)
        w.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_COUNT, split_count)
    t = gguf.GGMLQuantizationType[qtype]
    D, F, kv = 256, 512, 2 * 64
    mats = {"token_embd.weight": (VOCAB, D), "blk.0.attn_q.weight": (D, D), "blk.0.attn_k.weight": (kv, D),
            "blk.0.attn_v.weight": (kv, D), "blk.0.attn_output.weight": (D, D), "blk.0.ffn_gate.weight": (F, D),
            "blk.0.ffn_up.weight": (F, D), "blk.0.ffn_down.weight": (D, F)}
    if not tied:
        mats["output.weight"] = (VOCAB, D)
    for name, shape in mats.items():
        if name == "token_embd.weight" and table == "F16":  # as some quantized files keep their table
            w.add_tensor(name, rng.normal(0, 0.02, size=shape).astype(np.float16))
        else:
            w.add_tensor(name, random_blocks(rng, table if name == "token_embd.weight" and table else qtype, shape),
                         raw_dtype=gguf.GGMLQuantizationType[table] if name == "token_embd.weight" and table else t)
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        w.add_tensor(name, rng.uniform(0.5, 1.5, size=D).astype(np.float32))
    return gguf_finish(w, path)
