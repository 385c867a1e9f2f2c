"""Packed formats: round-trip error, exact GGUF repacks, nf4 through a real safetensors file."""
import math

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from safetensors.torch import load_file, save_file

from quant.formats import (
    Packed,
    choose_int4_group,
    int4_from_gguf,
    int8_from_gguf,
    pack_error,
    pack_int4,
    pack_int8,
    pack_nf4,
    sqnr_db,
    unpack,
    unpack_int4,
)


def weight(N, K, seed=0):
    """Gaussian weights at a LLaMA-like scale, with one outlier and one constant row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.02
    w[1, 5] = 0.4
    w[2] = 0.01
    return w


# ---------------------------------------------------------------- error stats
def test_sqnr_of_a_known_noise_is_20_db():
    ref = torch.ones(100)
    assert sqnr_db(ref, ref + 0.1) == pytest.approx(20.0)
    assert sqnr_db(ref, ref) == math.inf


def test_pack_error_is_measured_against_the_input():
    w = weight(64, 128)
    p, err = pack_int8(w)
    again = pack_error(w, unpack(p))
    assert err == again
    assert err.max_abs == pytest.approx((w - unpack(p)).abs().max().item())


# ---------------------------------------------------------------- int8
def test_int8_per_row_round_trip():
    w = weight(192, 576)
    p, err = pack_int8(w)
    assert p.scheme == "int8" and p.shape == (192, 576) and p.group_size == 576
    assert p.tensors["qweight"].dtype == torch.int8 and p.tensors["qweight"].shape == (192, 576)
    assert p.tensors["scales"].dtype == torch.float32 and p.tensors["scales"].shape == (192, 1)
    assert err.rel_err < 0.01
    assert err.sqnr_db > 40
    # rounding to the nearest step: no weight is off by more than half its row's step
    assert ((w - unpack(p)).abs() <= p.tensors["scales"] * 0.5 * (1 + 1e-5)).all()
    # the row max lands exactly on +-127
    assert p.tensors["qweight"][1, 5].item() == 127


def test_int8_grouped_is_at_least_as_good_as_per_row():
    w = weight(64, 256)
    _, per_row = pack_int8(w)
    p, grouped = pack_int8(w, group_size=32)
    assert p.tensors["scales"].shape == (64, 8) and p.tensors["scales"].dtype == torch.float16  # as Q8_0
    assert grouped.sqnr_db > per_row.sqnr_db
    # codes are taken against the stored fp16 scale: each weight is within half a step of it
    step = p.tensors["scales"].float().repeat_interleave(32, 1)
    assert ((w - unpack(p)).abs() <= step * 0.5 * (1 + 1e-5)).all()


# ---------------------------------------------------------------- int4
def test_int4_on_disk_layout_puts_even_k_in_the_low_nibble():
    row = torch.arange(16, dtype=torch.float32).repeat(2)  # one group: min 0, max 15, scale 1
    p, err = pack_int4(row[None, :], group_size=32)
    assert p.tensors["qweight"][0, :4].tolist() == [
        0x10,  # k=0 -> 0 low, k=1 -> 1 high
        0x32,  # 2, 3
        0x54,  # 4, 5
        0x76,  # 6, 7
    ]
    assert p.tensors["scales"].item() == 1.0 and p.tensors["mins"].item() == 0.0
    assert err.max_abs == 0.0


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_round_trip_within_half_a_step(group_size):
    w = weight(192, 768)
    p, err = pack_int4(w, group_size)
    G = 768 // group_size
    assert p.tensors["qweight"].shape == (192, 384) and p.tensors["qweight"].dtype == torch.uint8
    assert p.tensors["scales"].shape == (192, G) and p.tensors["mins"].shape == (192, G)
    step = p.tensors["scales"].float().repeat_interleave(group_size, dim=1)  # (N, K)
    # half a step, plus the fp16 rounding of scale and min (all of it in the constant row 2)
    assert ((w - unpack_int4(p)).abs() <= 0.52 * step + 2**-11 * w.abs()).all()
    # measured on these weights: 0.079, 0.090, 0.100 (GGUF Q4_1, also g32: 0.079)
    assert err.rel_err < {32: 0.085, 64: 0.095, 128: 0.105}[group_size]


def test_int4_smaller_groups_are_more_accurate():
    w = weight(192, 768)
    sqnr = {g: pack_int4(w, g)[1].sqnr_db for g in (32, 64, 128)}
    assert sqnr[32] > sqnr[64] > sqnr[128]
    assert sqnr[32] > 21  # ~22 dB for Gaussian weights, like GGUF Q4_1


def test_choose_int4_group_falls_back_to_smaller_groups_then_none():
    assert choose_int4_group(576, 128) == 64  # 576 = 4.5 * 128
    assert choose_int4_group(576, 32) == 32
    assert choose_int4_group(1536, 128) == 128
    assert choose_int4_group(96, 128) == 32
    assert choose_int4_group(80, 32) is None  # the caller then packs int8
    with pytest.raises(ValueError, match="must be one of"):
        choose_int4_group(576, 48)


# ---------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_clear_value_errors():
    with pytest.raises(ValueError, match="does not divide K=80"):
        pack_int4(torch.randn(16, 80), 32)
    with pytest.raises(ValueError, match="must be one of"):
        pack_int4(torch.randn(16, 96), 48)
    with pytest.raises(ValueError, match="does not divide K=100"):
        pack_int8(torch.randn(16, 100), group_size=32)
    with pytest.raises(ValueError, match="floating-point"):
        pack_int8(torch.randint(0, 5, (16, 64)))
    with pytest.raises(ValueError, match="2-D"):
        pack_int4(torch.randn(64), 32)
    with pytest.raises(ValueError, match="inf or nan"):
        pack_int8(torch.tensor([[1.0, float("nan")]]))
    raw = gguf.quants.quantize(np.zeros((4, 64), np.float32), T.Q4_0)
    with pytest.raises(ValueError, match="needs 144 bytes"):
        int4_from_gguf(raw[:, :-1], T.Q4_0, (4, 64))
    with pytest.raises(ValueError, match="Q4_0 or Q4_1, got Q8_0"):
        int4_from_gguf(raw, T.Q8_0, (4, 64))
    with pytest.raises(ValueError, match="takes Q8_0, got Q4_0"):
        int8_from_gguf(raw, T.Q4_0, (4, 64))
    with pytest.raises(ValueError, match="uint8"):
        int4_from_gguf(torch.zeros(144, dtype=torch.int32), T.Q4_0, (4, 64))
    with pytest.raises(ValueError, match="divisible by 32"):
        int8_from_gguf(raw, T.Q8_0, (8, 36))
    p, _ = pack_int8(torch.randn(16, 64))
    with pytest.raises(ValueError, match="w.scales is missing for an int8 weight"):
        Packed.from_state_dict("w", {"w.qweight": p.tensors["qweight"]}, "int8")


# ---------------------------------------------------------------- GGUF repacks
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0])
def test_gguf_repack_reproduces_gguf_dequantize_exactly(qtype):
    w = weight(96, 576, seed=int(qtype))
    w[3] = 0.0  # an all-zero block: d = 0
    raw = gguf.quants.quantize(w.numpy(), qtype)  # (N, K / 32 * block bytes) uint8
    expected = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    repack = int8_from_gguf if qtype == T.Q8_0 else int4_from_gguf
    p = repack(raw, qtype, (96, 576))
    assert p.shape == (96, 576) and p.group_size == 32
    assert p.tensors["scales"].shape == (96, 18)
    assert torch.equal(unpack(p), expected)


def test_gguf_q4_repack_keeps_fp16_scales_and_the_portable_nibble_order():
    w = weight(16, 64)
    raw = gguf.quants.quantize(w.numpy(), T.Q4_1)
    p = int4_from_gguf(raw, T.Q4_1, (16, 64))
    assert p.tensors["scales"].dtype == torch.float16 and p.tensors["mins"].dtype == torch.float16
    # the same float weight packed here from the GGUF values lands on the same codes
    again, err = pack_int4(unpack(p), 32)
    assert err.max_abs < 1e-6
    assert torch.equal(again.tensors["qweight"], p.tensors["qweight"])


def test_symmetric_int4_lands_on_the_q4_0_grid_of_gguf_values():
    w = weight(16, 64)
    w[3] = 0.0  # an all-zero block: d = 0
    raw = gguf.quants.quantize(w.numpy(), T.Q4_0)
    values = torch.from_numpy(gguf.quants.dequantize(raw, T.Q4_0))  # d * (q - 8), d of either sign
    gguf_grid = int4_from_gguf(raw, T.Q4_0, (16, 64))
    # Q4_0 rarely uses its top code q = 15, so the asymmetric grid (min to max) misses it
    assert pack_int4(values, 32)[1].sqnr_db < 30
    p, err = pack_int4(values, 32, symmetric=True)
    assert err.sqnr_db == math.inf and torch.equal(unpack(p), values)
    assert torch.equal(p.tensors["scales"], gguf_grid.tensors["scales"])  # the same fp16 d, sign included
    assert torch.equal(p.tensors["mins"], gguf_grid.tensors["mins"])  # -8d
    nonzero = [i for i in range(16) if i != 3]  # a zero block's code is free: GGUF says 8, we say 0
    assert torch.equal(p.tensors["qweight"][nonzero], gguf_grid.tensors["qweight"][nonzero])


# ---------------------------------------------------------------- through safetensors
@pytest.mark.parametrize("compress_statistics", [True, False])
def test_nf4_round_trips_exactly_through_a_safetensors_file(tmp_path, compress_statistics):
    w = weight(192, 576)
    p, err = pack_nf4(w, blocksize=64, compress_statistics=compress_statistics)
    assert 15 < err.sqnr_db < 25 and err.rel_err < 0.15
    name = "layers.0.attention.wq"
    path = tmp_path / "nf4.safetensors"
    save_file(p.state_dict(name), str(path))
    sd = load_file(str(path))
    assert f"{name}.qweight" in sd and f"{name}.quant_state.bitsandbytes__nf4" in sd
    assert (f"{name}.nested_absmax" in sd) == compress_statistics
    back = Packed.from_state_dict(name, sd, "nf4")
    assert back.shape == (192, 576) and back.group_size == 64
    assert torch.equal(unpack(back), unpack(p))


def test_nf4_packs_without_a_word_on_stderr_and_asks_no_hub_for_kernels(tmp_path):
    """bitsandbytes' CPU backend, on AVX512-BF16 CPUs, imports `kernels` to fetch a kernel from the
    Hugging Face Hub, and logged a warning on every nf4 run where that package is missing."""
    import os
    import subprocess
    import sys

    fake = tmp_path / "kernels.py"  # were it imported, it would say so
    fake.write_text("import sys\nprint('kernels imported', file=sys.stderr)\n")
    code = ("import sys, torch\nfrom quant.formats import pack_nf4\npack_nf4(torch.randn(64, 64))\n"
            "assert 'kernels' not in sys.modules\nprint('packed')")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.getcwd()]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert (r.returncode, r.stdout.strip(), r.stderr) == (0, "packed", "")


@pytest.mark.parametrize("pack", [lambda w: pack_int8(w), lambda w: pack_int4(w, 64)])
def test_int_formats_round_trip_through_a_safetensors_file(tmp_path, pack):
    w = weight(48, 192)
    p, _ = pack(w)
    path = tmp_path / "packed.safetensors"
    save_file(p.state_dict("output"), str(path))
    back = Packed.from_state_dict("output", load_file(str(path)), p.scheme)
    assert (back.scheme, back.shape, back.group_size) == (p.scheme, p.shape, p.group_size)
    assert torch.equal(unpack(back), unpack(p))
    assert back.metadata() == {"scheme": p.scheme, "group_size": p.group_size, "shape": [48, 192]}
