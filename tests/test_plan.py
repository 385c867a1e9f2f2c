"""The memory planner over injected device budgets: real Llama shapes as metadata-only entries."""
import pytest

from app.devices import Device, parse_bytes
from app.plan import (catalog_candidate, estimated_weight_bytes, fits, kv_bytes_per_token, longest_context,
                      margin_bytes, plan_memory)
from model.args import ModelArgs

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


def test_kv_cache_costs_per_token():
    assert kv_bytes_per_token(LLAMA3_8B, "bf16") == 128 * 1024  # GQA: 8 kv heads
    assert kv_bytes_per_token(LLAMA2_7B, "bf16") == 512 * 1024  # 32 kv heads
    assert kv_bytes_per_token(SMOLLM2_135M, "auto", cpu(8)) == 2 * 30 * 3 * 64 * 4  # fp32 on the CPU
    assert kv_bytes_per_token(LLAMA3_70B, "auto", gpu(80)) == 320 * 1024


def test_margins_follow_llama_cpp_on_a_gpu_and_are_documented_on_the_cpu():
    assert margin_bytes(gpu(8)) == GiB
    assert margin_bytes(gpu(80)) == 8 * GiB
    assert margin_bytes(cpu(2)) == 512 << 20
    assert margin_bytes(cpu(24)) == int(2.4 * GiB)


def test_packed_sizes_are_a_quarter_and_half_of_bf16():
    dev = gpu(80)
    src, int8, int4 = (estimated_weight_bytes(LLAMA3_8B, v, dev) for v in ("source", "int8", "int4"))
    assert 0.49 < int8 / src < 0.52
    assert 0.30 < int4 / src < 0.34  # the int8 head keeps int4 above a quarter


def test_sizes_parse_like_people_write_them():
    assert parse_bytes("8GiB") == 8 * GiB
    assert parse_bytes("6 GB") == 6 * 10**9
    assert parse_bytes("512M") == 512 << 20


@pytest.mark.parametrize("device, spec, fixed, expected", [
    # 1-5: no GPU, the machine's RAM decides; short of the target context, the most bits that
    # reach the target win (source fp32 on 1.5 GiB would hold only ~1000 tokens, int8 all 8192)
    (cpu(24), {"smollm2-135m": ALL}, {}, ("smollm2-135m:source", 8192)),
    (cpu(1.5), {"smollm2-135m": ("source", "int8", "int4")}, {}, ("smollm2-135m:int8", 8192)),
    (cpu(24), {"llama3-8b": ALL, "smollm2-135m": ALL}, {}, ("llama3-8b:int8", 8192)),
    (cpu(64), {"llama3-8b": ALL}, {}, ("llama3-8b:source", 8192)),
    (cpu(8), {"llama3-8b": ALL, "smollm2-135m": ALL}, {}, ("llama3-8b:int4", 6400)),
    # 6-9: small GPUs
    (gpu(4), {"llama3-8b": ALL, "smollm2-135m": ALL}, {}, ("smollm2-135m:source", 8192)),
    (gpu(8), {"llama3-8b": ALL, "smollm2-135m": ALL}, {}, ("llama3-8b:int4", 8192)),
    (gpu(12), {"llama3-8b": ALL}, {}, ("llama3-8b:int8", 8192)),
    (gpu(6), {"llama2-7b": ALL}, {}, ("llama2-7b:nf4", 2048)),
    # 10-13: large GPUs prefer the larger model, then the most bits
    (gpu(24), {"llama3-8b": ALL, "llama3-70b": ALL}, {}, ("llama3-8b:source", 8192)),
    (gpu(48), {"llama3-8b": ALL, "llama3-70b": ALL}, {}, ("llama3-70b:nf4", 8192)),
    (gpu(80), {"llama3-8b": ALL, "llama3-70b": ALL}, {}, ("llama3-70b:int8", 8192)),
    (gpu(160), {"llama3-70b": ALL}, {}, ("llama3-70b:source", 8192)),
    # 14-16: the trained context caps the target; Llama 2 stops at 4096
    (gpu(24), {"llama2-7b": ALL}, {}, ("llama2-7b:source", 4096)),
    (gpu(8), {"llama2-7b": ALL}, {}, ("llama2-7b:int4", 4096)),
    (gpu(10), {"llama2-7b": ALL}, {}, ("llama2-7b:int8", 4096)),
    # 17-20: what the user fixed is kept
    (gpu(80), {"llama3-8b": ALL, "llama3-70b": ALL}, {"model": "llama3-8b"}, ("llama3-8b:source", 8192)),
    (gpu(24), {"llama3-8b": ALL}, {"variant": "int4"}, ("llama3-8b:int4", 8192)),
    (gpu(24), {"llama3-8b": ALL}, {"ctx": 4096}, ("llama3-8b:source", 4096)),
    (cpu(24), {"smollm2-135m": ALL}, {"ctx": 2048}, ("smollm2-135m:source", 2048)),
    # 21-22: the CPU skips NF4, which bitsandbytes runs ~8x slower than int4 there
    (cpu(7), {"llama3-8b": ("int4", "nf4")}, {}, ("llama3-8b:int4", 2816)),
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
            assert not fits(cand, c.ctx + 256, dev)


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
