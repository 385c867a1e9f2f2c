"""The static decode step (model/static_decode.py, the GPU's CUDA-graph path) against the eager blocks.

On the CPU it runs without a graph, compiled or not: the same position-as-data cache writes,
masked attention, real-valued RoPE and compiled int8 reduction that the GPU replays.
"""
import pytest
import torch

from agreement import assert_agree, forced_logits, greedy_answer
from app.engine import build_model
from model.args import ModelArgs
from model.static_decode import StaticDecode
from quant.formats import pack_int4, pack_int8

ARGS = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=320, ffn_dim=192, max_seq_len=512)


def random_variant(variant: str, seed: int = 0) -> tuple[dict | None, dict]:
    """(layout, state) of a random tiny model, its linear layers packed as `variant` says."""
    g = torch.Generator().manual_seed(seed)
    a = ARGS
    shapes = {"tok_embeddings": (a.vocab_size, a.dim), "output": (a.vocab_size, a.dim)}
    for i in range(a.n_layers):
        p = f"layers.{i}."
        shapes.update({p + "attention.wq": (a.dim, a.dim), p + "attention.wk": (a.n_kv_heads * a.head_dim, a.dim),
                       p + "attention.wv": (a.n_kv_heads * a.head_dim, a.dim), p + "attention.wo": (a.dim, a.dim),
                       p + "feed_forward.w1": (a.ffn_dim, a.dim), p + "feed_forward.w2": (a.dim, a.ffn_dim),
                       p + "feed_forward.w3": (a.ffn_dim, a.dim)})
    state, layout = {}, ({} if variant != "fp32" else None)
    for name, shape in shapes.items():
        w = torch.randn(*shape, generator=g) * 0.3
        if layout is None or name == "tok_embeddings":
            state[f"{name}.weight"] = w
            continue
        packed = pack_int4(w, 32)[0] if variant == "int4" and name != "output" else pack_int8(w)[0]
        state.update(packed.state_dict(name))
        layout[name] = {"scheme": packed.scheme, "group_size": packed.group_size}
    for i in range(a.n_layers):
        state[f"layers.{i}.attention_norm.weight"] = 1 + 0.1 * torch.randn(a.dim, generator=g)
        state[f"layers.{i}.ffn_norm.weight"] = 1 + 0.1 * torch.randn(a.dim, generator=g)
    state["norm.weight"] = torch.ones(a.dim)
    return layout, state


PROMPT = list(range(5, 45, 3))


@pytest.mark.parametrize("variant,kv_dtype", [("fp32", None), ("fp32", "bf16"), ("int8", "int8"), ("int4", None)])
def test_static_step_follows_the_eager_blocks(variant, kv_dtype):
    """By tests/agreement.py's rule over 64 greedy tokens: the same arithmetic, other kernels."""
    layout, state = random_variant(variant)
    model = build_model(ARGS, layout, state, 128, kv_dtype=kv_dtype, fuse=True)
    answer = greedy_answer(model, PROMPT, 64)
    eager = forced_logits(model, PROMPT, answer)
    decoder = StaticDecode(model, compile=False)
    assert decoder.graph is None  # no graph on the CPU
    assert_agree(eager, forced_logits(model, PROMPT, answer, decoder), 1e-3)
    assert len(set(answer)) > 3  # the comparison is over varied tokens, not one repeated


def test_compiled_static_step_follows_the_eager_blocks():
    layout, state = random_variant("fp32", seed=1)
    model = build_model(ARGS, layout, state, 128, fuse=True)
    answer = greedy_answer(model, PROMPT, 64)
    eager = forced_logits(model, PROMPT, answer)
    assert_agree(eager, forced_logits(model, PROMPT, answer, StaticDecode(model, compile=True)), 1e-3)


def test_static_step_refuses_a_position_past_the_cache_or_another_row():
    layout, state = random_variant("fp32")
    model = build_model(ARGS, layout, state, 32)
    decoder = StaticDecode(model, compile=False)
    with pytest.raises(ValueError, match="cache"):
        decoder.decode(torch.tensor([1]), torch.tensor([32]), torch.tensor([0]))
    with pytest.raises(ValueError, match="row 0"):
        decoder.decode(torch.tensor([1]), torch.tensor([3]), torch.tensor([1]))


def test_compiled_int8_gemv_equals_the_matmul():
    from quant.linear import int8_dequant_linear

    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (48, 128), dtype=torch.int8, generator=g)
    x = torch.randn(1, 128, generator=g)
    compiled = torch.compile(int8_dequant_linear, dynamic=False)
    for groups in (1, 4):
        s = torch.rand(48, groups, generator=g) * 0.01
        torch.testing.assert_close(compiled(x, q, s), int8_dequant_linear(x, q, s), rtol=1e-5, atol=1e-5)


def test_a_packed_model_runs_its_float_head_and_norms_in_the_activations_dtype():
    """A variant whose head the quantizer left in float (`--head fp32`), run in bf16 as on a GPU."""
    layout, state = random_variant("int8")
    del layout["output"]
    for key in [k for k in state if k.startswith("output.")]:
        del state[key]
    state["output.weight"] = torch.randn(ARGS.vocab_size, ARGS.dim) * 0.3
    model = build_model(ARGS, layout, state, 64, dtype=torch.bfloat16, fuse=False)
    assert model.output.weight.dtype == model.norm.weight.dtype == torch.bfloat16
    with torch.inference_mode():
        assert model(torch.tensor([PROMPT]), 0).dtype == torch.bfloat16
