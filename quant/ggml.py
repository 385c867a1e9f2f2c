"""llama.cpp's block types, kept as they are in the GGUF file and dequantized in torch.

A GGUF tensor of type Q4_K (say) is stored in the store as its raw blocks, one row of the
(N, K) weight per row of a uint8 tensor:

    <name>.blocks  uint8  (N, K / block_size * type_size)  the file's own bytes, row-major

so it takes exactly the file's bytes, keeps each type's two-level layout (fp16 super-block
scales, small integer sub-scales, packed values), and `dequantize_rows` gives back exactly the
fp32 values of `gguf.quants.dequantize`: every step below is the same fp32 operation, in the
same order, as gguf-py's numpy code (a product is rounded before a sum is taken; no fused
multiply-add), so the two agree bit for bit.

The scheme names are the lower-cased type names ("q4_k"); `GGUF_SCHEMES` lists them.
"""
from __future__ import annotations

import torch

QK_K = 256  # elements per K-quant super-block

# scheme -> (elements per block, bytes per block), as gguf.constants.GGML_QUANT_SIZES
GGUF_SCHEMES: dict[str, tuple[int, int]] = {
    "q4_0": (32, 18),
    "q4_1": (32, 20),
    "q5_0": (32, 22),
    "q5_1": (32, 24),
    "q8_0": (32, 34),
    "q2_k": (QK_K, 84),
    "q3_k": (QK_K, 110),
    "q4_k": (QK_K, 144),
    "q5_k": (QK_K, 176),
    "q6_k": (QK_K, 210),
}
# bits of information per weight, for ranking variants (what the plan calls a variant's bits)
GGUF_BITS = {"q4_0": 4, "q4_1": 4, "q5_0": 5, "q5_1": 5, "q8_0": 8, "q2_k": 2, "q3_k": 3, "q4_k": 4,
             "q5_k": 5, "q6_k": 6}


def row_bytes(scheme: str, K: int) -> int:
    """Bytes of one K-long row in `scheme`; ValueError when K is not a whole number of blocks."""
    block, size = GGUF_SCHEMES[scheme]
    if K % block:
        raise ValueError(f"{scheme.upper()} needs rows of a multiple of {block} values, got {K}")
    return K // block * size


def dequantize_rows(blocks: torch.Tensor, scheme: str) -> torch.Tensor:
    """(..., row_bytes) uint8 rows of `scheme` blocks -> (..., K) fp32 values."""
    if scheme not in GGUF_SCHEMES:
        raise ValueError(f"unknown GGUF scheme {scheme!r}; expected one of {', '.join(GGUF_SCHEMES)}")
    block, size = GGUF_SCHEMES[scheme]
    lead, nbytes = blocks.shape[:-1], blocks.shape[-1]
    if blocks.dtype != torch.uint8 or nbytes % size:
        raise ValueError(f"{scheme.upper()} rows must be uint8 bytes in whole {size}-byte blocks, "
                         f"got {blocks.dtype} rows of {nbytes}")
    b = blocks.reshape(-1, size)  # (n_blocks, type_size)
    values = _DEQUANTIZE[scheme](b)  # (n_blocks, block)
    return values.reshape(*lead, nbytes // size * block)


# ---------------------------------------------------------------- field readers
def _f16(b: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at byte `start` of each block -> (n_blocks, 1) fp32."""
    return b[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """(n, m) bytes -> (n, m / group, 2, group) low then high nibbles of each `group` bytes."""
    q = qs.reshape(qs.shape[0], -1, 1, group)
    return torch.cat([q & 0x0F, q >> 4], dim=2)


def _bits(b: torch.Tensor, shifts: int, width: int, group: int) -> torch.Tensor:
    """(n, m) bytes -> (n, m / group, shifts, group): field i of each byte is (byte >> i*width) & mask."""
    q = b.reshape(b.shape[0], -1, 1, group)
    s = torch.arange(0, shifts * width, width, dtype=torch.uint8, device=b.device).reshape(1, 1, shifts, 1)
    return (q >> s) & ((1 << width) - 1)


def _u32_bits(qh: torch.Tensor) -> torch.Tensor:
    """(n, 4) bytes, a little-endian uint32 -> (n, 32) its bits, lowest first."""
    return torch.cat([_bits(qh[:, i : i + 1], 8, 1, 1).reshape(-1, 8) for i in range(4)], dim=1)


# ---------------------------------------------------------------- 32-value blocks
def _q4_0(b):
    d = _f16(b, 0)
    q = _nibbles(b[:, 2:], 16).reshape(b.shape[0], 32).to(torch.int8) - 8
    return d * q.float()


def _q4_1(b):
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles(b[:, 4:], 16).reshape(b.shape[0], 32).float()
    return d * q + m


def _q5_0(b):
    d = _f16(b, 0)
    qh = _u32_bits(b[:, 2:6])
    ql = _nibbles(b[:, 6:], 16).reshape(b.shape[0], 32)
    q = (ql | (qh << 4)).to(torch.int8) - 16
    return d * q.float()


def _q5_1(b):
    d, m = _f16(b, 0), _f16(b, 2)
    qh = _u32_bits(b[:, 4:8])
    ql = _nibbles(b[:, 8:], 16).reshape(b.shape[0], 32)
    return d * (ql | (qh << 4)).float() + m


def _q8_0(b):
    d = _f16(b, 0)
    return b[:, 2:].contiguous().view(torch.int8).float() * d


# ---------------------------------------------------------------- K-quants (256-value super-blocks)
def _q2_k(b):
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * (scales & 0xF).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = _bits(qs, 4, 2, 32).reshape(n, 16, 16).float()  # (n, 2 halves, 4 shifts, 32) -> 16 sub-blocks of 16
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b):
    n = b.shape[0]
    hmask, qs, scales = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b, 108)
    lo = _bits(scales[:, :8], 2, 4, 8).reshape(n, 16)
    hi = _bits(scales[:, 8:], 4, 2, 4).reshape(n, 16)
    sc = ((lo | (hi << 4)).to(torch.int8) - 32).float()
    dl = (d * sc).reshape(n, 16, 1)
    ql = _bits(qs, 4, 2, 32).reshape(n, 16, 16)
    qh = _bits(hmask, 8, 1, 32).reshape(n, 16, 16) ^ 1  # the offset of 4 applies where the bit is 0
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _scales_k4(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: fp16 d and dmin times the 12 bytes' eight 6-bit scales and mins -> (n, 8, 1) each."""
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    s = b[:, 4:16].reshape(n, 3, 4)
    lo, hi, both = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([lo & 0x3F, (both & 0x0F) | ((lo >> 2) & 0x30)], dim=-1)  # (n, 8)
    mn = torch.cat([hi & 0x3F, (both >> 4) | ((hi >> 2) & 0x30)], dim=-1)  # (n, 8)
    return (d * sc.float()).reshape(n, 8, 1), (dmin * mn.float()).reshape(n, 8, 1)


def _q4_k(b):
    dl, ml = _scales_k4(b)
    q = _nibbles(b[:, 16:], 32).reshape(b.shape[0], 8, 32).float()
    return (dl * q - ml).reshape(b.shape[0], QK_K)


def _q5_k(b):
    dl, ml = _scales_k4(b)
    ql = _nibbles(b[:, 48:], 32).reshape(b.shape[0], 8, 32)
    qh = _bits(b[:, 16:48], 8, 1, 32).reshape(b.shape[0], 8, 32)
    return (dl * (ql | (qh << 4)).float() - ml).reshape(b.shape[0], QK_K)


def _q6_k(b):
    n = b.shape[0]
    ql, qh, scales = b[:, :128], b[:, 128:192], b[:, 192:208]
    d = _f16(b, 208)
    dl = (d * scales.contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    lo = _nibbles(ql, 64).reshape(n, 8, 32)
    hi = _bits(qh, 4, 2, 32).reshape(n, 8, 32)
    q = ((lo | (hi << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (dl * q).reshape(n, QK_K)


_DEQUANTIZE = {"q4_0": _q4_0, "q4_1": _q4_1, "q5_0": _q5_0, "q5_1": _q5_1, "q8_0": _q8_0,
               "q2_k": _q2_k, "q3_k": _q3_k, "q4_k": _q4_k, "q5_k": _q5_k, "q6_k": _q6_k}
