"""Packed weight formats: pure tensor functions that pack a float weight and report their own error.

Every weight is a 2-D (N out, K in) matrix, as in `nn.Linear.weight` (or an embedding's (V, D)
table, packed the same way). A packed weight is a `Packed`: its scheme, the float shape it stands
for, its group size and a few named tensors. Those tensors are portable: they are what goes on
disk, the same on every machine; `quant.linear` turns them into a device's kernel layout at load.

Safetensors keys, for a weight whose module is `<name>` (e.g. `layers.0.attention.wq`):

    int8  <name>.qweight  int8    (N, K)      w = qweight * scale of its group
          <name>.scales   fp32    (N, K / g)  g = K (one scale per output row) when packed here,
                          fp16                g = 32 when repacked from a GGUF Q8_0 tensor
    int4  <name>.qweight  uint8   (N, K / 2)  two 4-bit values q in 0..15 per byte:
                                              low nibble = even k, high nibble = odd k
          <name>.scales   fp16    (N, K / g)  w = q * scale + min, asymmetric, g in 32/64/128
          <name>.mins     fp16    (N, K / g)  (fp32 only if a GGUF Q4_0 -8*d overflows fp16)
    nf4   <name>.qweight  uint8   (N * K / 2, 1)  bitsandbytes' packed NF4 codes
          <name>.<key>    the tensors of bitsandbytes `QuantState.as_dict(packed=True)`, under its
                          own key names: absmax, quant_map, nested_absmax, nested_quant_map and
                          quant_state.bitsandbytes__nf4 (its non-tensor fields as a uint8 blob)

GGUF block types (q4_0 ... q6_k, see quant.ggml) are kept as the file's own bytes:

    q4_k  <name>.blocks   uint8   (N, K / 256 * 144)  and likewise for each type in GGUF_SCHEMES

The group size and shape follow from the tensors' shapes (int8, int4) or from the QuantState
(nf4); the scheme itself is not guessed from keys or dtypes: the writer records
`Packed.metadata()` per weight in the file's metadata, with `FORMAT_VERSION`.

GGUF tensors are repacked exactly: the int4 / int8 tensors made by `int4_from_gguf` and
`int8_from_gguf` unpack to exactly the fp32 values of `gguf.quants.dequantize`
(Q4_1 d*q + m -> scale d, min m; Q4_0 d*(q - 8) -> scale d, min -8d, exact in fp32 because
d is an fp16; Q8_0 d*q -> int8 with one fp16 scale per group of 32). Packing the dequantized
fp32 values lands on the same grids: `pack_int4` on Q4_1's, `pack_int4(symmetric=True)` on
Q4_0's and `pack_int8` with group 32 on Q8_0's (the quantizer picks these by the source's types).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType

from .ggml import GGUF_SCHEMES, dequantize_rows

# 2: GGUF block types kept as they are (quant.ggml); version 1 files hold a subset and still load
FORMAT_VERSION = 2
SCHEMES = ("int8", "int4", "nf4")
INT4_GROUP_SIZES = (32, 64, 128)
GGUF_BLOCK = 32  # elements per Q4_0 / Q4_1 / Q8_0 block


@dataclass
class Packed:
    """One packed weight: tensors by key suffix, plus what is needed to read them back."""

    scheme: str  # "int8" | "int4" | "nf4"
    shape: tuple[int, int]  # (N, K) of the float weight
    group_size: int  # weights per scale along K (int8: K when per row); nf4: bitsandbytes blocksize
    tensors: dict[str, torch.Tensor]

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors under safetensors keys `<name>.<suffix>`."""
        return {f"{name}.{suffix}": t for suffix, t in self.tensors.items()}

    def metadata(self) -> dict:
        """What a file must record about this weight to load it (plain JSON values)."""
        return {"scheme": self.scheme, "group_size": self.group_size, "shape": list(self.shape)}

    @classmethod
    def from_state_dict(cls, name: str, sd: dict[str, torch.Tensor], scheme: str) -> "Packed":
        """Collect `<name>.*` from a loaded state dict; shape and group come from the tensors."""
        prefix = name + "."
        tensors = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        needed = {"int8": ("qweight", "scales"), "int4": ("qweight", "scales", "mins")}
        for suffix in needed.get(scheme, ("blocks",) if scheme in GGUF_SCHEMES else ("qweight",)):
            if suffix not in tensors:
                raise ValueError(f"{prefix}{suffix} is missing for an {scheme} weight")
        qweight = tensors.get("qweight", tensors.get("blocks"))
        if scheme == "int8":
            N, K = qweight.shape
            return cls("int8", (N, K), K // tensors["scales"].shape[1], tensors)
        if scheme == "int4":
            N, K = qweight.shape[0], qweight.shape[1] * 2
            return cls("int4", (N, K), K // tensors["scales"].shape[1], tensors)
        if scheme == "nf4":
            state = nf4_quant_state(tensors)
            return cls("nf4", tuple(state.shape), state.blocksize, tensors)
        if scheme in GGUF_SCHEMES:
            block, size = GGUF_SCHEMES[scheme]
            return cls(scheme, (qweight.shape[0], qweight.shape[1] // size * block), block, tensors)
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEMES}")


@dataclass(frozen=True)
class PackError:
    """How far a packed weight is from the float weight it was made from."""

    max_abs: float  # largest |w - unpack(packed)|
    sqnr_db: float  # 10 log10(sum w^2 / sum (w - w_hat)^2); inf when exact
    rel_err: float  # ||w - w_hat|| / ||w|| (Frobenius)


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of `approx` against `ref`, in dB (inf when equal)."""
    return pack_error(ref, approx).sqnr_db


def pack_error(ref: torch.Tensor, approx: torch.Tensor) -> PackError:
    # fp32 differences, fp64 sums: exact enough, and half the memory of fp64 on a 49152-row head
    ref = ref.float()
    diff = ref - approx.float()
    noise = diff.pow(2).sum(dtype=torch.float64).item()
    signal = ref.pow(2).sum(dtype=torch.float64).item()
    if noise == 0:
        sqnr, rel = math.inf, 0.0
    elif signal == 0:
        sqnr, rel = -math.inf, math.inf
    else:
        sqnr, rel = 10 * math.log10(signal / noise), math.sqrt(noise / signal)
    return PackError(max_abs=diff.abs().max().item() if diff.numel() else 0.0, sqnr_db=sqnr, rel_err=rel)


def unpack(p: Packed) -> torch.Tensor:
    """The fp32 (N, K) weight a packed weight stands for."""
    if p.scheme == "int8":
        return unpack_int8(p)
    if p.scheme == "int4":
        return unpack_int4(p)
    if p.scheme == "nf4":
        return unpack_nf4(p)
    if p.scheme in GGUF_SCHEMES:
        return dequantize_rows(p.tensors["blocks"], p.scheme)
    raise ValueError(f"unknown scheme {p.scheme!r}; expected one of {SCHEMES}")


def _check_weight(w: torch.Tensor) -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor weight, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D (out, in) weight, got shape {tuple(w.shape)}")
    if not w.dtype.is_floating_point:
        raise ValueError(f"expected a floating-point weight, got {w.dtype}")
    if w.device.type == "meta":
        raise ValueError("cannot pack a weight on the meta device")
    if not torch.isfinite(w).all():
        raise ValueError("weight holds inf or nan values")
    return w


# ---------------------------------------------------------------- int8
def pack_int8(w: torch.Tensor, group_size: int | None = None) -> tuple[Packed, PackError]:
    """Symmetric int8: one fp32 scale per output row, or one fp16 scale per `group_size` weights
    along K (llama.cpp's Q8_0 with 32: 8.5 bits a weight). A group's codes are taken against its
    scale as stored (fp16-rounded), so they come back as the nearest values on that grid."""
    w = _check_weight(w)
    N, K = w.shape
    g = K if group_size is None else group_size
    if g <= 0 or K % g:
        raise ValueError(f"int8 group_size={g} does not divide K={K}")
    wf = w.float().reshape(N, K // g, g)  # (N, G, g)
    scales = wf.abs().amax(-1) / 127  # (N, G)
    if group_size is not None:
        scales = scales.to(torch.float16)
    safe = torch.where(scales > 0, scales.float(), 1.0)
    q = torch.round(wf / safe[..., None]).clamp(-127, 127).to(torch.int8).reshape(N, K)
    p = Packed("int8", (N, K), g, {"qweight": q, "scales": scales.contiguous()})
    return p, pack_error(w, unpack_int8(p))


def unpack_int8(p: Packed) -> torch.Tensor:
    q, scales = p.tensors["qweight"], p.tensors["scales"]
    N, K = q.shape
    G = scales.shape[1]
    w = q.float().reshape(N, G, K // G) * scales.float()[..., None]  # (N, G, g)
    return w.reshape(N, K)


# ---------------------------------------------------------------- int4
def choose_int4_group(K: int, wanted: int = 32) -> int | None:
    """The largest allowed group <= `wanted` that divides K, or None (the caller then uses int8)."""
    if wanted not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {wanted}")
    for g in sorted(INT4_GROUP_SIZES, reverse=True):
        if g <= wanted and K % g == 0:
            return g
    return None


def pack_int4(w: torch.Tensor, group_size: int = 32, symmetric: bool = False) -> tuple[Packed, PackError]:
    """4-bit, groups of `group_size` along K: w ~ q * scale + min, q in 0..15.

    Asymmetric by default: min and scale span the group's range, GGUF Q4_1's grid. `symmetric`
    fixes the zero point at 8 as GGUF Q4_0 does: scale d = -(the group's largest-magnitude value)/8,
    min = -8d, so that value is q = 0 and a Q4_0 tensor's values come back exactly (d may be
    negative, as in Q4_0; min is kept in fp32 in the rare case -8d overflows fp16).
    """
    w = _check_weight(w)
    N, K = w.shape
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if K % group_size:
        raise ValueError(
            f"int4 group_size={group_size} does not divide K={K}; "
            f"choose_int4_group(K, {group_size}) gives {choose_int4_group(K, group_size)}"
        )
    g = group_size
    wf = w.float().reshape(N, K // g, g)  # (N, G, g)
    # round scale and min to their stored dtype first, so q is chosen against what is stored
    if symmetric:
        peak = wf.gather(-1, wf.abs().argmax(-1, keepdim=True))[..., 0]  # (N, G), sign kept
        scales = (-peak / 8).to(torch.float16)
        mins = -8 * scales.float()
        if torch.equal(mins.half().float(), mins):
            mins = mins.half()
    else:
        lo, hi = wf.amin(-1), wf.amax(-1)
        scales = ((hi - lo) / 15).to(torch.float16)
        mins = lo.to(torch.float16)
    if not (torch.isfinite(scales).all() and torch.isfinite(mins).all()):
        raise ValueError("weight range overflows the fp16 int4 scales")
    s = scales.float()[..., None]
    safe = torch.where(s != 0, s, 1.0)
    q = torch.round((wf - mins.float()[..., None]) / safe).clamp(0, 15).to(torch.uint8)
    p = Packed("int4", (N, K), g, {"qweight": _pack_nibbles(q.reshape(N, K)), "scales": scales, "mins": mins})
    return p, pack_error(w, unpack_int4(p))


def unpack_int4(p: Packed) -> torch.Tensor:
    scales, mins = p.tensors["scales"], p.tensors["mins"]
    q = unpack_nibbles(p.tensors["qweight"])  # (N, K) uint8
    N, K = q.shape
    G = scales.shape[1]
    # multiply then add, in fp32, as gguf.quants does: GGUF repacks come back exactly
    w = q.float().reshape(N, G, K // G) * scales.float()[..., None] + mins.float()[..., None]
    return w.reshape(N, K)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> (N, K / 2) uint8, even k in the low nibble."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_nibbles(qweight: torch.Tensor) -> torch.Tensor:
    """(N, K / 2) uint8 -> (N, K) uint8 values 0..15 (inverse of the on-disk int4 packing)."""
    N = qweight.shape[0]
    return torch.stack([qweight & 0x0F, qweight >> 4], dim=-1).reshape(N, -1)  # (N, K/2, 2) -> (N, K)


# ---------------------------------------------------------------- GGUF repacks
def _gguf_blocks(raw, shape: tuple[int, int], block_bytes: int, type_name: str) -> torch.Tensor:
    """Raw GGUF bytes -> (n_blocks, block_bytes) uint8, after checking they fit `shape`."""
    if len(shape) != 2:
        raise ValueError(f"expected a 2-D (N, K) shape, got {tuple(shape)}")
    N, K = (int(d) for d in shape)
    if K % GGUF_BLOCK:
        raise ValueError(f"{type_name} needs K divisible by {GGUF_BLOCK}, got shape {(N, K)}")
    t = raw if isinstance(raw, torch.Tensor) else torch.from_numpy(np.array(raw, copy=True))
    if t.dtype != torch.uint8:
        raise ValueError(f"expected raw {type_name} blocks as uint8 bytes, got {t.dtype}")
    n_blocks = N * K // GGUF_BLOCK
    if t.numel() != n_blocks * block_bytes:
        raise ValueError(
            f"{type_name} shape {(N, K)} needs {n_blocks * block_bytes} bytes, got {t.numel()}"
        )
    return t.reshape(n_blocks, block_bytes)


def _fp16_field(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The little-endian fp16 at byte `start` of each block -> (n_blocks, 1) float16."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16)


def int4_from_gguf(raw, ggml_type, shape: tuple[int, int]) -> Packed:
    """Exact int4 g32 repack of a GGUF Q4_0 or Q4_1 tensor; `shape` is (N, K) in torch order."""
    if ggml_type == GGMLQuantizationType.Q4_0:
        blocks = _gguf_blocks(raw, shape, 18, "Q4_0")
        d, qs = _fp16_field(blocks, 0), blocks[:, 2:]
        mins = -8 * d.float()
        if torch.equal(mins.half().float(), mins):  # exact unless -8d overflows fp16
            mins = mins.half()
    elif ggml_type == GGMLQuantizationType.Q4_1:
        blocks = _gguf_blocks(raw, shape, 20, "Q4_1")
        d, mins, qs = _fp16_field(blocks, 0), _fp16_field(blocks, 2), blocks[:, 4:]
    else:
        raise ValueError(f"int4_from_gguf takes Q4_0 or Q4_1, got {getattr(ggml_type, 'name', ggml_type)}")
    N, K = (int(x) for x in shape)
    # a GGUF block keeps elements 0..15 in the low nibbles and 16..31 in the high ones
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1).reshape(N, K)  # (n_blocks, 32) -> (N, K)
    tensors = {
        "qweight": _pack_nibbles(q),
        "scales": d.reshape(N, K // GGUF_BLOCK),
        "mins": mins.reshape(N, K // GGUF_BLOCK),
    }
    return Packed("int4", (N, K), GGUF_BLOCK, tensors)


def int8_from_gguf(raw, ggml_type, shape: tuple[int, int]) -> Packed:
    """Exact int8 repack of a GGUF Q8_0 tensor: one fp16 scale per group of 32 along K."""
    if ggml_type != GGMLQuantizationType.Q8_0:
        raise ValueError(f"int8_from_gguf takes Q8_0, got {getattr(ggml_type, 'name', ggml_type)}")
    blocks = _gguf_blocks(raw, shape, 34, "Q8_0")
    N, K = (int(x) for x in shape)
    d = _fp16_field(blocks, 0).reshape(N, K // GGUF_BLOCK)
    q = blocks[:, 2:].contiguous().view(torch.int8).reshape(N, K)
    return Packed("int8", (N, K), GGUF_BLOCK, {"qweight": q, "scales": d})


# ---------------------------------------------------------------- nf4 (bitsandbytes)
@functools.cache  # once: NF4Linear.forward asks at every call
def bitsandbytes_functional():
    """bitsandbytes.functional, imported on first use (~1.5 s), quietly and offline. On a CPU with
    AVX512-BF16 its CPU backend asks the `kernels` package for a kernel from the Hugging Face Hub
    (a download, where that package is installed) and logs a warning on every run where it is not;
    it falls back to its own kernel either way, which is what runs here."""
    import logging
    import sys

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    hidden = "kernels" not in sys.modules
    if hidden:
        sys.modules["kernels"] = None  # `from kernels import ...` raises ImportError: nothing leaves the machine
    try:
        import bitsandbytes.functional as bnbf
    finally:
        if hidden:
            del sys.modules["kernels"]
    return bnbf


def pack_nf4(
    w: torch.Tensor, blocksize: int = 64, compress_statistics: bool = True
) -> tuple[Packed, PackError]:
    """bitsandbytes NF4, its QuantState flattened into plain tensors that safetensors can hold."""
    bnbf = bitsandbytes_functional()

    w = _check_weight(w)
    q, state = bnbf.quantize_4bit(
        w.contiguous(), blocksize=blocksize, compress_statistics=compress_statistics, quant_type="nf4"
    )
    # clone: safetensors refuses tensors that share storage or are views
    tensors = {"qweight": q.clone()}
    tensors.update({k: v.clone() for k, v in state.as_dict(packed=True).items()})
    p = Packed("nf4", tuple(w.shape), blocksize, tensors)
    return p, pack_error(w, unpack_nf4(p))


def nf4_quant_state(tensors: dict[str, torch.Tensor]):
    """Rebuild a bitsandbytes QuantState from the tensors beside `qweight` (no dequantizing)."""
    QuantState = bitsandbytes_functional().QuantState

    parts = {k: v for k, v in tensors.items() if k != "qweight"}  # from_dict pops from its argument
    return QuantState.from_dict(parts, device=tensors["qweight"].device)


def unpack_nf4(p: Packed) -> torch.Tensor:
    bnbf = bitsandbytes_functional()

    return bnbf.dequantize_4bit(p.tensors["qweight"], nf4_quant_state(p.tensors)).float()
