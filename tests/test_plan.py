"""The memory planner over injected device budgets: real Llama shapes as metadata-only entries."""
import pytest
import torch

from app.devices import Device, parse_bytes
from app.plan import (catalog_candidate, estimated_weight_bytes, fits, kv_bytes_per_token, longest_context,
                      margin_bytes, plan_memory, workspace_bytes)
from app.engine import KV_TORCH_DTYPES
from model.args import ModelArgs
from model.model import Transformer

GiB = 1 << 30
SMOLLM2_135M = ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, ffn_dim=1536,
                         tie_embeddings=True, max_seq_len=8192)
LLAMA2_7B = ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000, ffn_dim=11008,
                      max_seq_len=4096)
LLAMA3_8B = ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim=14336,
                      rope_theta=500000.0, max_seq_len=8192)
LLAMA3_70B = ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256, ffn_dim=28672,
                       rope_theta=500000.0, max_seq_len=8192)
ALL = ("source", "int8", "int4", "nf4")
MODELS = {"smollm2-135m": SMOLLM2_135M, "llama2-7b": LLAMA2_7B, "llama3-8b": LLAMA3_8B, "llama3-70b": LLAMA3_70B}


def gpu(gib):
    return Device("cuda", "test GPU", int(gib * GiB), int(gib * GiB), (9, 0))


def cpu(gib):
    return Device("cpu", "test CPU", int(gib * GiB), int(gib * GiB))


def installed(device, spec):
    """spec: {model name: variants}"""
    return [catalog_candidate(name, MODELS[name], v, device) for name, vs in spec.items() for v in vs]


def chosen(device, spec, **fixed):
    r = plan_memory(installed(device, spec), device, **fixed)
    return (r.chosen.ref, r.chosen.ctx) if r.chosen else (None, r.why)


def test_a_long_trained_context_is_not_all_taken_unless_asked():
    """Llama 3.1 (131072 tokens) on an 80 GB GPU: 8192 by default, as much as asked with --ctx."""
    from dataclasses import replace

    dev = gpu(80)
    llama31 = [catalog_candidate("llama3.1-8b", replace(LLAMA3_8B, max_seq_len=131072), v, dev) for v in ALL]
    r = plan_memory(llama31, dev)
    assert (r.chosen.variant, r.chosen.ctx) == ("source", 8192)
    assert r.chosen.bytes["kv_cache"] == 8192 * kv_bytes_per_token(LLAMA3_8B, "bf16")
    assert r.why.endswith("the context is 8192 tokens (up to 131072 would fit: --ctx)")
    assert plan_memory(llama31, dev, ctx=65536).chosen.ctx == 65536


def test_kv_cache_costs_per_token():
    assert kv_bytes_per_token(LLAMA3_8B, "bf16") == 128 * 1024  # GQA: 8 kv heads
    assert kv_bytes_per_token(LLAMA2_7B, "bf16") == 512 * 1024  # 32 kv heads
    assert kv_bytes_per_token(SMOLLM2_135M, "auto", cpu(8)) == 2 * 30 * 3 * 64 * 2  # bf16 on the CPU too
    assert kv_bytes_per_token(SMOLLM2_135M, "fp32", cpu(8)) == 2 * 30 * 3 * 64 * 4
    assert kv_bytes_per_token(LLAMA3_70B, "auto", gpu(80)) == 320 * 1024


def test_margins_follow_llama_cpp_on_a_gpu_and_are_documented_on_the_cpu():
    assert margin_bytes(gpu(8)) == GiB
    assert margin_bytes(gpu(80)) == 8 * GiB
    assert margin_bytes(cpu(2)) == 512 << 20
    assert margin_bytes(cpu(24)) == int(2.4 * GiB)


def test_packed_sizes_are_a_quarter_and_half_of_bf16():
    dev = gpu(80)
    src, int8, int4 = (estimated_weight_bytes(LLAMA3_8B, v, dev) for v in ("source", "int8", "int4"))
    assert 0.52 < int8 / src < 0.54  # 8.5 bits a weight: an fp16 scale per 32, as Q8_0
    assert 0.30 < int4 / src < 0.34  # the int8 head keeps int4 above a quarter


def test_sizes_parse_like_people_write_them():
    assert parse_bytes("8GiB") == 8 * GiB
    assert parse_bytes("6 GB") == 6 * 10**9
    assert parse_bytes("512M") == 512 << 20


@pytest.mark.parametrize("device, spec, fixed, expected", [
    # 1-5: no GPU, the machine's RAM decides; short of the target context, the most bits that
    # reach the target win (source fp32 on 1.5 GiB would hold only ~1000 tokens, int8 all 8192).
    # Scenarios 5, 9 and 21 fix a float KV cache: left to choose, the plan takes int8 there
    # (test_an_int8_kv_cache_is_used_where_float_falls_short)
    # on a CPU a packed variant wins over the float source, which runs slower at the same context
    (cpu(24), {"smollm2-135m": ALL}, {}, ("smollm2-135m:int8", 8192)),
    (cpu(1.5), {"smollm2-135m": ("source", "int8", "int4")}, {}, ("smollm2-135m:int8", 8192)),
    (cpu(24), {"llama3-8b": ALL, "smollm2-135m": ALL}, {}, ("llama3-8b:int8", 8192)),
    (cpu(64), {"llama3-8b": ALL}, {}, ("llama3-8b:int8", 8192)),
    (cpu(8), {"llama3-8b": ALL, "smollm2-135m": ALL}, {"kv_dtype": "fp32"}, ("llama3-8b:int4", 6144)),
    # 6-9: small GPUs
    (gpu(4), {"llama3-8b": ALL, "smollm2-135m": ALL}, {}, ("smollm2-135m:source", 8192)),
    (gpu(8), {"llama3-8b": ALL, "smollm2-135m": ALL}, {}, ("llama3-8b:int4", 8192)),
    (gpu(12), {"llama3-8b": ALL}, {}, ("llama3-8b:int8", 8192)),
    (gpu(6), {"llama2-7b": ALL}, {"kv_dtype": "bf16"}, ("llama2-7b:nf4", 2048)),
    # 10-13: large GPUs prefer the larger model, then the most bits
    (gpu(24), {"llama3-8b": ALL, "llama3-70b": ALL}, {}, ("llama3-8b:source", 8192)),
    (gpu(48), {"llama3-8b": ALL, "llama3-70b": ALL}, {}, ("llama3-70b:nf4", 8192)),
    (gpu(80), {"llama3-8b": ALL, "llama3-70b": ALL}, {}, ("llama3-70b:int4", 8192)),  # int8: 8.5 bits, 75 GB
    (gpu(160), {"llama3-70b": ALL}, {}, ("llama3-70b:source", 8192)),
    # 14-16: the trained context caps the target; Llama 2 stops at 4096
    (gpu(24), {"llama2-7b": ALL}, {}, ("llama2-7b:source", 4096)),
    (gpu(8), {"llama2-7b": ALL}, {}, ("llama2-7b:int4", 4096)),
    (gpu(10), {"llama2-7b": ALL}, {}, ("llama2-7b:int8", 4096)),
    # 17-20: what the user fixed is kept
    (gpu(80), {"llama3-8b": ALL, "llama3-70b": ALL}, {"model": "llama3-8b"}, ("llama3-8b:source", 8192)),
    (gpu(24), {"llama3-8b": ALL}, {"variant": "int4"}, ("llama3-8b:int4", 8192)),
    (gpu(24), {"llama3-8b": ALL}, {"ctx": 4096}, ("llama3-8b:source", 4096)),
    (cpu(24), {"smollm2-135m": ALL}, {"ctx": 2048}, ("smollm2-135m:int8", 2048)),
    # 21-22: the CPU skips NF4, which bitsandbytes runs ~8x slower than int4 there
    (cpu(7), {"llama3-8b": ("int4", "nf4")}, {"kv_dtype": "fp32"}, ("llama3-8b:int4", 2560)),
    (cpu(24), {"llama3-8b": ("nf4",)}, {}, (None, "no installed model can run on cpu")),
])
def test_the_plan_picks(device, spec, fixed, expected):
    got = chosen(device, spec, **fixed)
    assert got[0] == expected[0]
    if expected[0]:
        assert got[1] == expected[1]
    else:
        assert expected[1] in got[1]


def test_every_chosen_plan_fits_and_one_step_more_context_would_not():
    for dev in (cpu(8), gpu(6), gpu(10), gpu(48)):
        r = plan_memory(installed(dev, {"llama3-8b": ALL, "llama2-7b": ALL, "llama3-70b": ALL}), dev)
        c = r.chosen
        assert c.total_bytes <= dev.free_bytes
        cand = next(x for x in installed(dev, {c.model: (c.variant,)}))
        if c.ctx < cand.max_ctx:
            assert not fits(cand, c.ctx + 256, dev, c.kv_dtype)


def test_nothing_fits_is_explained():
    r = plan_memory(installed(gpu(2), {"llama3-8b": ALL}), gpu(2))
    assert r.chosen is None
    assert "nothing installed fits in 2.00 GiB of cuda memory" in r.why


def test_a_fixed_context_that_cannot_fit_says_what_would():
    dev = gpu(8)
    r = plan_memory(installed(dev, {"llama3-8b": ALL}), dev, variant="int8", ctx=8192)
    assert r.chosen is None
    assert "nothing installed fits a 8192-token context" in r.why
    assert "would fit" in r.why


def test_a_context_beyond_the_trained_one_is_refused():
    r = plan_memory(installed(gpu(80), {"llama2-7b": ALL}), gpu(80), ctx=8192)
    assert r.chosen is None and "trained for at most 4096 tokens" in r.why


def test_longest_context_is_a_multiple_of_256_and_the_json_shape():
    dev = cpu(8)
    cand = installed(dev, {"llama3-8b": ("int4",)})[0]
    assert longest_context(cand, dev) % 256 == 0
    d = plan_memory([cand], dev).to_dict()
    assert set(d) == {"device", "chosen", "candidates", "why"}
    assert set(d["chosen"]) == {"model", "variant", "device", "ctx", "kv_dtype", "bytes", "why"}
    assert set(d["chosen"]["bytes"]) == {"weights", "kv_cache", "workspace", "overhead", "margin"}


# ---------------------------------------------------------------- the int8 KV cache
def test_an_int8_kv_cache_costs_a_byte_per_element_and_a_scale_per_vector():
    assert kv_bytes_per_token(LLAMA3_8B, "int8") == 2 * 32 * 8 * (128 + 4)  # 66 KiB instead of bf16's 128
    assert kv_bytes_per_token(LLAMA2_7B, "int8") == 2 * 32 * 32 * (128 + 4)
    assert kv_bytes_per_token(SMOLLM2_135M, "int8") == 2 * 30 * 3 * (64 + 4)
    with pytest.raises(ValueError, match="unknown KV cache dtype 'int4'"):
        kv_bytes_per_token(LLAMA3_8B, "int4")


def planned(device, spec, **fixed):
    r = plan_memory(installed(device, spec), device, **fixed)
    return (r.chosen.ref, r.chosen.ctx, r.chosen.kv_dtype) if r.chosen else None


@pytest.mark.parametrize("device, spec, fixed, expected", [
    # a longer context: the bf16 cache stops int4 at 4608 tokens, int8 reaches 8192
    (cpu(7), {"llama3-8b": ("int4", "nf4")}, {}, ("llama3-8b:int4", 8192, "int8")),
    (cpu(6.5), {"llama3-8b": ("int4",)}, {}, ("llama3-8b:int4", 2304, "int8")),  # bf16: 1280
    (gpu(6), {"llama2-7b": ALL}, {}, ("llama2-7b:nf4", 3840, "int8")),  # bf16: 2048
    (gpu(44), {"llama3-8b": ALL, "llama3-70b": ALL}, {}, ("llama3-70b:nf4", 8192, "int8")),  # bf16: 6400
    # a larger model: with bf16 keys and values the 7B and 70B stay below 2048 tokens
    (gpu(5.5), {"llama2-7b": ALL, "smollm2-135m": ALL}, {}, ("llama2-7b:nf4", 2048, "int8")),
    (gpu(42), {"llama3-8b": ALL, "llama3-70b": ALL}, {}, ("llama3-70b:nf4", 2304, "int8")),
    # an asked context that only an int8 cache holds
    (gpu(6.5), {"llama2-7b": ALL}, {"ctx": 4096}, ("llama2-7b:int4", 4096, "int8")),
    # not needed: the largest model reaches its target with a bf16 cache (fp32 would not: 6400)
    (cpu(8), {"llama3-8b": ALL, "smollm2-135m": ALL}, {}, ("llama3-8b:int4", 8192, "bf16")),
    (gpu(48), {"llama3-8b": ALL, "llama3-70b": ALL}, {}, ("llama3-70b:nf4", 8192, "bf16")),
    (cpu(24), {"smollm2-135m": ALL}, {}, ("smollm2-135m:int8", 8192, "bf16")),
    # what the user fixed is kept, either way
    (cpu(24), {"smollm2-135m": ALL}, {"kv_dtype": "int8"}, ("smollm2-135m:int8", 8192, "int8")),
    (gpu(24), {"llama3-8b": ALL}, {"kv_dtype": "int8", "ctx": 4096}, ("llama3-8b:source", 4096, "int8")),
    (gpu(5.5), {"llama2-7b": ALL, "smollm2-135m": ALL}, {"kv_dtype": "bf16"}, ("smollm2-135m:source", 8192, "bf16")),
    (cpu(24), {"smollm2-135m": ALL}, {"kv_dtype": "fp16"}, ("smollm2-135m:int8", 8192, "fp16")),
])
def test_an_int8_kv_cache_is_used_where_float_falls_short(device, spec, fixed, expected):
    assert planned(device, spec, **fixed) == expected


def test_why_and_the_table_say_when_the_kv_cache_is_int8():
    dev = cpu(7)
    r = plan_memory(installed(dev, {"llama3-8b": ("int4",)}), dev)
    assert r.chosen.kv_dtype == "int8"
    assert r.why.endswith("; an int8 KV cache lets it reach 8192 tokens, where bf16 would allow only 4608")
    assert r.candidates[0].kv_dtype == "int8"
    assert r.candidates[0].kv_bytes_per_token == kv_bytes_per_token(LLAMA3_8B, "int8")
    assert r.candidates[0].verdict == "fits up to 8192 tokens with an int8 KV cache (4608 with bf16)"
    assert r.chosen.bytes["kv_cache"] == 8192 * kv_bytes_per_token(LLAMA3_8B, "int8")
    assert r.to_dict()["chosen"]["kv_dtype"] == "int8"

    r = plan_memory(installed(gpu(5.5), {"llama2-7b": ("nf4",)}), gpu(5.5))
    assert r.why.endswith("; it fits only with an int8 KV cache (bf16 would allow 1280 tokens)")

    r = plan_memory(installed(cpu(24), {"smollm2-135m": ("source",)}), cpu(24), kv_dtype="int8")
    assert r.why.endswith("; the KV cache is int8, as asked")


def test_a_fixed_float_kv_cache_that_cannot_fit_says_int8_would():
    dev = cpu(8)
    r = plan_memory(installed(dev, {"llama3-8b": ALL}), dev, variant="int4", ctx=8192, kv_dtype="fp32")
    assert r.chosen is None
    assert r.why == ("nothing installed fits a 8192-token context with the KV cache in fp32 in 8.00 GiB of cpu "
                     "memory; llama3-8b:int4 would fit with up to 6144 tokens; with --kv-dtype int8, "
                     "llama3-8b:int4 would fit with up to 8192 tokens")


def test_a_fixed_int8_kv_cache_that_cannot_fit_says_what_would():
    dev = cpu(8)
    r = plan_memory(installed(dev, {"llama3-8b": ALL}), dev, variant="int8", kv_dtype="int8")
    assert r.chosen is None
    assert "with the KV cache in int8" in r.why
    assert r.why.endswith("; llama3-8b:int4 would fit with up to 8192 tokens")


def test_a_cache_read_back_converted_counts_one_layer_of_workspace():
    dev = cpu(8)
    fp32, bf16, int8 = (workspace_bytes(LLAMA3_8B, 8192, dev, kv) for kv in ("fp32", "bf16", "int8"))
    assert int8 - fp32 == bf16 - fp32 == 2 * 8192 * 8 * 128 * 4  # one layer's keys and values as fp32
    assert workspace_bytes(LLAMA3_8B, 8192, dev, "auto") == bf16  # the CPU's cache is bf16
    assert workspace_bytes(LLAMA3_8B, 8192, gpu(24), "auto") == workspace_bytes(LLAMA3_8B, 8192, gpu(24), "bf16")


@pytest.mark.parametrize("kv_dtype", ["fp32", "bf16", "fp16", "int8"])
@pytest.mark.parametrize("name", ["smollm2-135m", "llama3-8b"])
def test_the_plan_counts_the_bytes_a_real_cache_holds(name, kv_dtype):
    """Caches allocated for 64 tokens on a model with no weights (built on the meta device)."""
    args = MODELS[name]
    with torch.device("meta"):
        model = Transformer(args)
    model.setup_caches(64, dtype=torch.float32, device="cpu", kv_dtype=KV_TORCH_DTYPES[kv_dtype])
    held = sum(b.nbytes for layer in model.layers for b in layer.attention.kv_cache.buffers())
    assert held == 64 * kv_bytes_per_token(args, kv_dtype)


# ---------------------------------------------------------------- a source imported from a quantized GGUF
def _manifest(types: dict[str, str] | None = None, scheme: str | None = None, sqnr: float | None = None) -> dict:
    names = ["layers.0.attention.wq", "layers.0.feed_forward.w2"]
    m = {"source": {"types": {**{f"{n}.weight": t for n, t in (types or {}).items()},
                              "layers.0.attention_norm.weight": "F32"}}}
    if scheme:
        m["quant"] = {"scheme": scheme, "report": {"tensors": [{"name": n, "sqnr_db": sqnr} for n in names]}}
    return m


def test_a_source_holds_the_bits_of_its_gguf_blocks():
    from app.plan import source_bits, variant_bits

    q4_1 = {"layers.0.attention.wq": "Q4_1", "layers.0.feed_forward.w2": "Q4_1"}
    assert source_bits(_manifest(q4_1)) == 4  # norms stay F32 and do not count
    assert source_bits(_manifest({"layers.0.attention.wq": "Q4_1", "layers.0.feed_forward.w2": "Q6_K"})) == 6
    assert source_bits(_manifest({"layers.0.attention.wq": "BF16"})) == 16
    assert source_bits({"source": {"format": "hf"}}) == 16  # nothing recorded: full precision
    assert variant_bits(_manifest(scheme="int4", sqnr=float("inf")), 4) == 4  # the Q4_1 grid, exact
    assert variant_bits(_manifest(scheme="int8", sqnr=41.4), 4) == 3.5  # re-gridded: less than the source
    assert variant_bits(_manifest(scheme="nf4", sqnr=20.0), 4) == 3.5
    assert variant_bits(_manifest(scheme="int8", sqnr=41.4), 16) == 8  # of a bf16 source: as before
    assert variant_bits({"quant": {"scheme": "int4"}}, 4) == 3.5  # no report: not known to be exact


def test_an_exact_repack_of_a_4_bit_source_wins_over_the_source():
    from app.plan import Candidate

    dev = cpu(16)
    weights = {"source": 513 << 20, "int8": 186 << 20, "int4": 148 << 20}
    bits = {"source": 4, "int8": 3.5, "int4": 4}
    pool = [Candidate("smollm2", v, SMOLLM2_135M, weights[v], bits[v]) for v in ("source", "int8", "int4")]
    r = plan_memory(pool, dev)
    assert (r.chosen.ref, r.chosen.ctx) == ("smollm2:int4", 8192)
    assert r.why.endswith("it holds the source's own 4-bit values in 29% of the source's bytes")
    without_int4 = [c for c in pool if c.variant != "int4"]
    assert plan_memory(without_int4, gpu(16)).chosen.ref == "smollm2:source"  # int8 of a 4-bit source lost some
    r = plan_memory(without_int4, dev)  # but on a CPU the source runs much slower: packed first
    assert r.chosen.ref == "smollm2:int8" and "(source runs slower on the cpu)" in r.why


def test_on_a_cpu_a_gguf_source_of_native_blocks_is_chosen_as_downloaded():
    """A Q4_K_M file kept as its blocks (Q4_K, Q6_K: 6 bits by its best layers, ~4.9 bits a weight
    read per token) runs natively in the CPU step: it is not slow, so it ranks by its bits and
    wins over the int8 made from it (which re-grids its values: 5.5) and its int4 (4). A file of
    types without a native kernel (Q3_K) still runs slower than a packed variant."""
    from app.plan import Candidate

    dev = cpu(16)
    weights = {"source": 105 << 20, "int8": 186 << 20, "int4": 148 << 20}
    bits = {"source": 6, "int8": 5.5, "int4": 4}
    pool = [Candidate("smollm2", v, SMOLLM2_135M, weights[v], bits[v], native_blocks=v == "source")
            for v in ("source", "int8", "int4")]
    r = plan_memory(pool, dev)
    assert r.chosen.ref == "smollm2:source" and "slower" not in r.why
    slow = [Candidate(c.model, c.variant, c.args, c.weight_bytes, c.bits) for c in pool]  # Q3_K blocks
    r = plan_memory(slow, dev)
    assert r.chosen.ref == "smollm2:int8" and "(source runs slower on the cpu)" in r.why


def test_native_gguf_blocks_are_those_the_step_runs():
    from app.plan import NATIVE_GGUF_SCHEMES, R16_SCHEMES, native_gguf_blocks
    from quant import linear

    assert NATIVE_GGUF_SCHEMES == linear.NATIVE_GGUF_SCHEMES
    assert R16_SCHEMES == linear.R16_SCHEMES
    q4_k_m = {"layers.0.attention.wq": {"scheme": "q4_k"}, "layers.0.attention.wv": {"scheme": "q6_k"},
              "output": {"scheme": "q6_k"}, "tok_embeddings": {"scheme": "q3_k"}}  # a table is only looked up
    assert native_gguf_blocks({"quant": {"scheme": "gguf", "exact": True, "layout": q4_k_m}})
    q3_k = dict(q4_k_m, **{"layers.0.feed_forward.w2": {"scheme": "q3_k"}})
    assert not native_gguf_blocks({"quant": {"scheme": "gguf", "exact": True, "layout": q3_k}})
    assert not native_gguf_blocks({"quant": {"scheme": "int4", "layout": {"output": {"scheme": "int4"}}}})
    assert not native_gguf_blocks({"source": {"format": "hf"}})


def test_on_a_cpu_a_packed_variant_wins_over_the_float_source_and_says_why():
    dev = cpu(64)
    both = [catalog_candidate("llama3-8b", LLAMA3_8B, v, dev) for v in ("source", "int8")]
    r = plan_memory(both, dev)
    assert r.chosen.ref == "llama3-8b:int8"
    assert "(source runs slower on the cpu)" in r.why
    assert plan_memory(both[:1], dev).chosen.ref == "llama3-8b:source"  # alone, the source still runs
    assert plan_memory(both, gpu(40)).chosen.ref == "llama3-8b:source"  # a GPU keeps the most bits


def test_parallel_requests_are_planned_with_every_slot_full():
    """`serve --parallel 4` (plan --parallel 4): four KV-cache rows of the chosen context must fit
    at once, so the context shrinks where memory bounds it, and the plan says how many rows it holds."""
    from dataclasses import replace

    dev = cpu(8)
    one = plan_memory(installed(dev, {"llama3-8b": ("int4",)}), dev).chosen
    four = plan_memory([replace(c, slots=4) for c in installed(dev, {"llama3-8b": ("int4",)})], dev).chosen
    assert four.bytes["kv_cache"] == 4 * four.ctx * kv_bytes_per_token(LLAMA3_8B, four.kv_dtype, dev)
    assert four.total_bytes <= dev.free_bytes
    assert four.ctx < one.ctx or four.kv_dtype != one.kv_dtype
    assert "4 parallel requests" in four.why and "parallel" not in one.why
    cand = replace(installed(dev, {"llama3-8b": ("int4",)})[0], slots=4)
    assert not fits(cand, four.ctx + 256, dev, four.kv_dtype)


def test_why_names_the_model_then_its_variant():
    dev = cpu(16)
    r = plan_memory(installed(dev, {"smollm2-135m": ("source", "int8", "int4")}), dev)
    assert r.why.startswith("smollm2-135m is the only model installed and fits in 16.00 GiB of cpu memory, "
                            "int8 its most precise variant")
    r = plan_memory(installed(dev, {"smollm2-135m": ALL, "llama3-8b": ("int4",)}), dev)
    assert r.why.startswith("llama3-8b is the largest of the 2 installed models and fits in 16.00 GiB of cpu memory, "
                            "int4 its only variant that runs here")
    r = plan_memory(installed(dev, {"smollm2-135m": ALL, "llama3-8b": ("int4",)}), dev, model="smollm2-135m")
    assert r.why.startswith("smollm2-135m, as asked, fits in 16.00 GiB of cpu memory")


def test_when_nothing_fits_the_plan_says_how_much_memory_would():
    dev = cpu(1)
    pool = installed(dev, {"smollm2-135m": ("int8", "int4")})
    r = plan_memory(pool, dev)
    assert r.chosen is None and "; the least it takes is smollm2-135m:int4 with 2048 tokens of context" in r.why
    need = parse_bytes(r.why.rsplit(": ", 1)[1].removesuffix(" free"))
    # what it names is enough, and not much more than enough (it is shown to 0.01 GiB)
    enough = Device("cpu", "test CPU", need + (6 << 20), need + (6 << 20))
    assert plan_memory(installed(enough, {"smollm2-135m": ("int8", "int4")}), enough).chosen.ctx >= 2048
    short = Device("cpu", "test CPU", need - (32 << 20), need - (32 << 20))
    assert plan_memory(installed(short, {"smollm2-135m": ("int8", "int4")}), short).chosen is None


def test_when_only_a_short_context_fits_the_plan_says_which():
    dev = gpu(6)  # llama3-8b:int4's weights fit, with room for less than 2048 tokens beside them
    r = plan_memory(installed(dev, {"llama3-8b": ("int4",)}), dev, ctx=4096, kv_dtype="bf16")
    assert r.chosen is None
    shorter = int(r.why.rsplit("--ctx ", 1)[1])
    assert r.why.endswith(f"; llama3-8b:int4 would run with --ctx {shorter}") and shorter < 4096
    assert plan_memory(installed(dev, {"llama3-8b": ("int4",)}), dev, ctx=shorter, kv_dtype="bf16").chosen.ctx == shorter


def test_a_pull_packs_the_catalog_variants_this_device_runs_before_the_source(default_home, monkeypatch):
    """The default model's source as installed (its Q4_1 blocks): a CPU runs it from fewer bytes
    than int4 with the same values, so a CPU's pull makes no int4; an Ampere GPU's int4 kernel
    runs them, a Turing GPU has no int4 kernel. A float source is slow on a CPU: int8 is made."""
    from app.plan import installed_candidates, variants_worth_packing

    monkeypatch.setenv("LLAMADESK_HOME", str(default_home))
    turing = Device("cuda", "test GPU", 16 * GiB, 16 * GiB, (7, 5))
    for device, expected in ((cpu(16), []), (gpu(16), ["int4"]), (turing, [])):
        both = {c.variant: c for c in installed_candidates(device)
                if c.model == "smollm2-135m-instruct" and c.variant in ("source", "int4")}
        assert variants_worth_packing(both["source"], ["int4"], device) == expected, device
        if device.int4_ok:  # with the fixture's int4 installed too, the plan runs what the pull would make
            assert plan_memory(list(both.values()), device).chosen.variant == (expected or ["source"])[0]
    for device, expected in ((cpu(64), ["int8", "int4"]), (gpu(40), [])):  # a bf16 source: slow only on a CPU
        bf16 = catalog_candidate("llama3-8b", LLAMA3_8B, "source", device)
        assert variants_worth_packing(bf16, ["int8", "int4"], device) == expected


def test_a_variant_is_judged_by_what_it_holds_not_by_its_name():
    """`quantize --scheme nf4 --out fast`: on a CPU it is bitsandbytes' slow NF4 whatever its name,
    and an int8 variant named after a scheme the CPU cannot run is still int8."""
    from dataclasses import replace

    from app.plan import variant_kind

    assert variant_kind("fast", {"quant": {"scheme": "nf4"}}) == "nf4"
    assert variant_kind("source", {"quant": {"scheme": "gguf", "exact": True}}) == "source"
    assert variant_kind("float", {}) == "float"
    dev = cpu(24)
    int8 = catalog_candidate("llama3-8b", LLAMA3_8B, "int8", dev)
    fast = replace(catalog_candidate("llama3-8b", LLAMA3_8B, "nf4", dev), variant="fast")
    r = plan_memory([int8, fast], dev)
    assert r.chosen.ref == "llama3-8b:int8"
    assert any("fast (nf4) does not run well on cpu" in row.verdict for row in r.candidates), r.candidates
    named_nf4 = replace(int8, variant="nf4", kind="int8")
    assert plan_memory([named_nf4], dev).chosen.ref == "llama3-8b:nf4"


def test_a_named_model_is_planned_alone_and_no_other_model_is_offered():
    dev = cpu(24)
    candidates = installed(dev, {"llama2-7b": ["int8"], "llama3-8b": ["int8"]})
    r = plan_memory(candidates, dev, model="llama2-7b")
    assert r.chosen.model == "llama2-7b" and {row.model for row in r.candidates} == {"llama2-7b"}
    r = plan_memory(candidates, dev, model="llama2-7b", ctx=8192)
    assert r.chosen is None and r.why.startswith("llama2-7b was trained for at most 4096 tokens, not 8192")
    assert "llama3-8b" not in r.why
