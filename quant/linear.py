"""Packed layers, swapped into a model by one function, then repacked for a device at load time.

Loading a packed checkpoint, as in gpt-fast:

    with torch.device("meta"):
        model = Transformer(args)
    swap_linears(model, {"layers.0.attention.wq": "int4", "tok_embeddings": "int8", ...})
    model.load_state_dict(state_dict, assign=True)  # the portable tensors of quant.formats
    repack_for_device(model, "cpu")                  # portable layout -> this device's kernels

`prepare(device)` is one way: it replaces the portable tensors with the kernel's own layout, which
only that device's kernel reads. So checkpoints are written from `quant.formats.Packed`, never
from a prepared model's state_dict, and a prepared model is not moved with `.to()`: prepare it for
the device it will run on.

Kernels, measured on a 2-core CPU (torch 2.13): the CPU int8 and int4 kernels are 10-20x faster with
bf16 activations than fp32, so the layers cast activations to bf16 for the kernel and back to
the input's dtype. Grouped int8 (one scale per 32, the quantizer's default, and a GGUF Q8_0
table) runs the extension's own kernel (csrc/gguf_gemv.h), fp32. The CPU int8 kernel gives
wrong results or crashes for K % 16 != 0 when more than one row comes in, so such per-row weights
run as a dense fp32 weight on CPU: exact, but 4x the memory of int8. The CPU int4
kernel needs N % 16 == 0 (CUDA: N % 8 == 0); other N are padded with zero rows.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .formats import INT4_GROUP_SIZES, Packed, choose_int4_group, nf4_quant_state, unpack_int8, unpack_nibbles
from .ggml import GGUF_SCHEMES, dequantize_rows, row_bytes

FLOAT_SCHEMES = ("fp32", "bf16")  # names a precision map may use for "leave it as it is"
_NOT_PREPARED = "{} is not prepared: call repack_for_device(model, device) after loading"


def split_bf16(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t ~ hi + lo with both in bf16: 16 bits of mantissa instead of 8.

    The fast CPU kernels take bf16 activations and bf16 scales. `precise` layers run them on both
    halves (hi*hi + hi*lo + lo*hi), three calls instead of one, which brings a packed layer to
    within fp32 rounding of its unpacked weight: the greedy tokens then match the fp32 source.
    """
    hi = t.to(torch.bfloat16)
    return hi, (t.float() - hi.float()).to(torch.bfloat16)


# ---------------------------------------------------------------- int8
# rows of x an r16 call takes with each row independent of the others: any number (a bound
# for callers that batch by it)
R16_ROWS = 1 << 16
R16_GROUP = 16  # the weight rows that csrc/r16_gemm.h's layout interleaves


def repack_r16(weights: torch.Tensor, scheme: str, in_features: int,
               scales: torch.Tensor | None = None) -> torch.Tensor | None:
    """`weights` (GGUF q4_0/q4_1/q8_0 blocks, or grouped int8 codes with their fp32 `scales`) in
    csrc/r16_gemm.h's r16 layout: a copy of the same bytes, 16 rows interleaved. None while the
    compiled extension is not loaded."""
    from .extension import loaded_extension

    ext = loaded_extension()
    return None if ext is None else ext.r16_repack(weights, scheme, in_features, scales)


def release_file_pages(t: torch.Tensor) -> bool:
    """Drop the whole pages of `t` from this process's resident memory when `t` lies in a
    read-only use of a file mapping (a store file safetensors mapped): touching them again maps
    them back from the page cache, values unchanged. A tensor in anonymous memory is left alone
    (MADV_DONTNEED would zero it). For a layer that keeps a repacked copy, so that the file's
    pages the repack read are not counted twice. Linux only; True when pages were dropped."""
    import sys

    if not sys.platform.startswith("linux") or t.device.type != "cpu" or t.numel() == 0:
        return False
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                lo, hi = (int(a, 16) for a in fields[0].split("-"))
                if lo <= start and end <= hi:
                    if len(fields) < 6 or not fields[5].strip().startswith("/"):
                        return False  # anonymous memory
                    break
            else:
                return False
    except OSError:
        return False
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last <= first:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED) == 0


class Int8Linear(nn.Module):
    """y = x W^T with W = qweight * scales, int8 per output row (or per group of K)."""

    activation_bits = 15  # what the r16 kernel rounds x to: set_activation_bits

    def __init__(self, in_features: int, out_features: int, group_size: int | None = None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size = group_size or in_features
        if in_features % self.group_size:
            raise ValueError(f"int8 group_size={self.group_size} does not divide in_features={in_features}")
        n_groups = in_features // self.group_size
        N, K = out_features, in_features
        self.register_buffer("qweight", torch.empty(N, K, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(N, n_groups, dtype=torch.float32, device=device))
        self.kernel = ""  # set by prepare: "int8pack" | "int8group" | "dense" | "dequant"

    def prepare(self, device, precise: bool = False) -> None:
        if self.kernel:
            raise RuntimeError(f"Int8Linear is already prepared ({self.kernel}); prepare is one way")
        self.precise = precise
        device = torch.device(device)
        qweight, scales = self.qweight.to(device), self.scales.to(device)
        self.qweight = self.scales = None
        if device.type == "cpu" and scales.shape[1] == 1 and self.in_features % 16 == 0:
            self.kernel = "int8pack"
            # the kernel segfaults on a weight that is not 64-byte aligned (safetensors' mmap
            # places tensors at any offset) once more than a few rows come in: own an aligned copy
            self.qweight = qweight if qweight.data_ptr() % 64 == 0 else qweight.clone()
            hi, lo = split_bf16(scales[:, 0].contiguous())  # (N,)
            self.register_buffer("kernel_scales", hi, persistent=False)
            self.register_buffer("kernel_scales_lo", lo, persistent=False)
        elif device.type == "cpu" and self.group_size == 32:
            # a GGUF Q8_0 grid (the head of a tied Q8_0 table): kept packed, run by the compiled
            # kernel (quant/csrc) once loaded, else dequantized a block of rows at a time
            self.kernel = "int8group"
            self.qweight, self.scales = qweight.contiguous(), scales.float().contiguous()
            self.r16: torch.Tensor | None = None
        elif device.type == "cpu":
            self.kernel = "dense"
            shape = (self.out_features, self.in_features)
            packed = Packed("int8", shape, self.group_size, {"qweight": qweight, "scales": scales})
            self.register_buffer("dense_weight", unpack_int8(packed), persistent=False)
        elif device.type == "cuda":
            self.kernel = "dequant"
            self.qweight, self.scales = qweight, scales
        else:
            raise ValueError(f"Int8Linear has no kernel for {device.type}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (B*T, K)
        if self.kernel == "int8pack":
            mm = lambda a, s: torch.ops.aten._weight_int8pack_mm(a.contiguous(), self.qweight, s)
            if self.precise:
                xh, xl = split_bf16(x2)
                y = (mm(xh, self.kernel_scales).float() + mm(xh, self.kernel_scales_lo).float()
                     + mm(xl, self.kernel_scales).float())
            else:
                y = mm(x2.to(torch.bfloat16), self.kernel_scales)
        elif self.kernel == "int8group":
            y = self._grouped(x2.float())
        elif self.kernel == "dense":
            y = F.linear(x2.to(self.dense_weight.dtype), self.dense_weight)
        elif self.kernel == "dequant":
            y = int8_dequant_linear(x2, self.qweight, self.scales)
        else:
            raise RuntimeError(_NOT_PREPARED.format("Int8Linear"))
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def r16_weights(self) -> torch.Tensor | None:
        """Grouped int8 in csrc/r16_gemm.h's r16 layout (x as 15-bit integers), repacked on the first
        call that can; None where that kernel does not run (precise, other kernels)."""
        if self.kernel == "int8group" and self.r16 is None and not self.precise:
            self.r16 = repack_r16(self.qweight, "int8_group", self.in_features, self.scales)
            if self.r16 is not None:  # the copy replaces them
                self.qweight = self.scales = None
        return getattr(self, "r16", None)

    @property
    def invariant_rows(self) -> int:
        """Rows one call takes with each row's values independent of the others (decode batches):
        any number for the r16 kernel, 8 for the compiled grouped one; 1 for torch's kernels,
        whose blocking may depend on rows."""
        if self.kernel != "int8group":
            return 1
        from .extension import loaded_extension

        if loaded_extension() is None:
            return 1
        return R16_ROWS if self.r16_weights() is not None else 8

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        from .extension import loaded_extension

        if self.r16_weights() is not None:
            return loaded_extension().r16_linear(x, self.r16, "int8_group", self.out_features,
                                                 x8=self.activation_bits == 8)
        ext = loaded_extension()
        if ext is not None and x.shape[0] <= 8:  # decode and last-token prefill: one weight read
            return ext.int8_group_linear(x, self.qweight, self.scales)
        # many rows (perplexity over a window): fp32 GEMM on blocks of dequantized rows
        return int8_dequant_linear(x, self.qweight, self.scales, block_bytes=8 << 20)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group_size={self.group_size}"


def int8_dequant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                        block_bytes: int = 64 << 20) -> torch.Tensor:
    """x (M, K) @ (qweight * scales)^T in x's dtype: the CUDA int8 path, plain torch ops."""
    N, K = qweight.shape
    G = scales.shape[1]
    if x.shape[0] == 1 and torch.compiler.is_compiling():
        # one token, compiled (the GPU's decode step): as a product and a sum, the compiler reads
        # the int8 weight once and converts it in registers, where a matmul would first write the
        # whole weight in x's dtype and read it back (5 bytes moved per weight instead of 1)
        w = qweight.view(N, G, K // G).to(x.dtype) * scales.to(x.dtype)[..., None]  # (N, G, K/G)
        return (x.view(1, 1, G, K // G) * w).sum((-2, -1))  # (1, N)
    rows = max(1, block_bytes // (K * x.element_size()))
    if N > rows:  # a weight in x's dtype, a block of rows at a time (a 128k-row head is 1 GiB)
        return torch.cat([int8_dequant_linear(x, qweight[i : i + rows], scales[i : i + rows], block_bytes)
                          for i in range(0, N, rows)], dim=1)
    if G == 1:
        return F.linear(x, qweight.to(x.dtype)) * scales[:, 0].to(x.dtype)
    w = qweight.to(x.dtype).view(N, G, K // G) * scales.to(x.dtype)[..., None]  # (N, G, g)
    return F.linear(x, w.view(N, K))


class Int8Embedding(nn.Module):
    """Token embeddings stored as int8 rows (one scale per row, or per group along the row)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group_size: int | None = None,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.group_size = group_size or embedding_dim
        if embedding_dim % self.group_size:
            raise ValueError(f"int8 group_size={self.group_size} does not divide dim={embedding_dim}")
        self.dtype = dtype  # the activations' dtype downstream starts here
        n_groups = embedding_dim // self.group_size
        V, D = num_embeddings, embedding_dim
        self.register_buffer("qweight", torch.empty(V, D, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(V, n_groups, dtype=torch.float32, device=device))

    def prepare(self, device, precise: bool = False) -> None:
        self.qweight, self.scales = self.qweight.to(device), self.scales.to(device)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        G = self.scales.shape[1]
        rows = F.embedding(tokens, self.qweight).view(*tokens.shape, G, self.group_size)  # (B, T, G, g)
        scales = F.embedding(tokens, self.scales).float()[..., None]  # (B, T, G, 1)
        return (rows.float() * scales).view(*tokens.shape, self.embedding_dim).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, group_size={self.group_size}, {self.dtype}"


# ---------------------------------------------------------------- int4
class Int4Linear(nn.Module):
    """y = x W^T with W = q * scale + min, 4-bit q in groups of `group_size` along K."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 32, device=None):
        super().__init__()
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
        if in_features % group_size:
            raise ValueError(f"int4 group_size={group_size} does not divide in_features={in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        n_groups = in_features // group_size
        N, K = out_features, in_features
        self.register_buffer("qweight", torch.empty(N, K // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(N, n_groups, dtype=torch.float16, device=device))
        self.register_buffer("mins", torch.empty(N, n_groups, dtype=torch.float16, device=device))
        self.kernel = ""  # set by prepare: "cpu" | "cuda"

    def prepare(self, device, precise: bool = False) -> None:
        if self.kernel:
            raise RuntimeError(f"Int4Linear is already prepared ({self.kernel}); prepare is one way")
        self.precise = precise
        device = torch.device(device)
        qweight, scales, mins = (t.to(device) for t in (self.qweight, self.scales, self.mins))
        self.qweight = self.scales = self.mins = None
        if precise:
            sz = _int4_scales_and_zeros(scales, mins, 0, exact=True)  # (G, N, 2) fp32
            n_pad = (-self.out_features) % 16 if device.type == "cpu" else (-self.out_features) % 8
            hi, lo = split_bf16(F.pad(sz, (0, 0, 0, n_pad)))
            self.register_buffer("scales_and_zeros_lo", lo.contiguous(), persistent=False)
        if device.type == "cpu":
            q, scales_and_zeros = int4_cpu_layout(qweight, scales, mins)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)  # inner_k_tiles: unused on CPU
        elif device.type == "cuda":
            q, scales_and_zeros, inner_k_tiles = int4_cuda_layout(qweight, scales, mins)
            packed = torch.ops.aten._convert_weight_to_int4pack(q, inner_k_tiles)
        else:
            raise ValueError(f"Int4Linear has no kernel for {device.type}")
        self.kernel = device.type
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales_and_zeros", hi.contiguous() if precise else scales_and_zeros, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.kernel:
            raise RuntimeError(_NOT_PREPARED.format("Int4Linear"))
        x2 = x.reshape(-1, self.in_features)  # (B*T, K)
        op = (torch.ops.aten._weight_int4pack_mm_for_cpu if self.kernel == "cpu"
              else torch.ops.aten._weight_int4pack_mm)
        mm = lambda a, sz: op(a.contiguous(), self.packed, self.group_size, sz)
        if self.precise:
            xh, xl = split_bf16(x2)
            hi, lo = self.scales_and_zeros, self.scales_and_zeros_lo
            y = mm(xh, hi).float() + mm(xh, lo).float() + mm(xl, hi).float()
        else:
            y = mm(x2.to(torch.bfloat16), self.scales_and_zeros)
        if y.shape[1] != self.out_features:
            y = y[:, : self.out_features]  # drop the rows padded in for the kernel
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group_size={self.group_size}"


def _int4_scales_and_zeros(scales: torch.Tensor, mins: torch.Tensor, n_pad: int, exact: bool = False) -> torch.Tensor:
    """(N, G) scale and min -> (G, N + n_pad, 2) bf16 [scale, zero] for the int4 kernels.

    The kernels compute (q - 8) * scale + zero, so zero = min + 8 * scale; it is taken from the
    bf16-rounded scale so that only the zero's own rounding separates the kernel from unpack_int4.
    """
    s = scales.float() if exact else scales.to(torch.bfloat16).float()
    sz = torch.stack([s, mins.float() + 8 * s], dim=-1)  # (N, G, 2)
    if exact:  # fp32, for split_bf16
        return F.pad(sz, (0, 0, 0, 0, 0, n_pad)).transpose(0, 1).contiguous()
    sz = F.pad(sz, (0, 0, 0, 0, 0, n_pad))  # (N_pad, G, 2), zero scale and zero for padded rows
    return sz.transpose(0, 1).contiguous().to(torch.bfloat16)  # (G, N_pad, 2)


def int4_cpu_layout(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor):
    """Portable int4 -> what `_convert_weight_to_int4pack_for_cpu` and its matmul take.

    Returns (q int32 (N_pad, K) with values 0..15, scales_and_zeros (G, N_pad, 2) bf16), N padded
    to a multiple of 16 (the CPU converter refuses anything else).
    """
    q = unpack_nibbles(qweight).to(torch.int32)  # (N, K)
    n_pad = -q.shape[0] % 16
    return F.pad(q, (0, 0, 0, n_pad)), _int4_scales_and_zeros(scales, mins, n_pad)


def int4_cuda_layout(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor):
    """Portable int4 -> what `_convert_weight_to_int4pack` (CUDA) and its matmul take.

    Returns (uint8 (N_pad, K / 2) with even k in the HIGH nibble, the reverse of the on-disk
    order; scales_and_zeros (G, N_pad, 2) bf16; inner_k_tiles), N padded to a multiple of 8.
    """
    N, half_k = qweight.shape
    K = 2 * half_k
    inner_k_tiles = next((t for t in (8, 4, 2) if K % (t * 16) == 0), None)
    if inner_k_tiles is None:
        raise ValueError(f"the CUDA int4 kernel needs K divisible by 32, got K={K}")
    n_pad = -N % 8
    swapped = ((qweight & 0x0F) << 4) | (qweight >> 4)
    swapped = F.pad(swapped, (0, 0, 0, n_pad)).contiguous()  # (N_pad, K/2)
    return swapped, _int4_scales_and_zeros(scales, mins, n_pad), inner_k_tiles


# ---------------------------------------------------------------- nf4
class NF4Linear(nn.Module):
    """bitsandbytes NF4 weight; reads its QuantState from the state dict without dequantizing."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        n_bytes = (in_features * out_features + 1) // 2
        self.register_buffer("qweight", torch.empty(n_bytes, 1, dtype=torch.uint8, device=device))
        self.quant_state = None
        self.kernel = ""  # set by prepare: "bnb"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # the QuantState's tensors vary with blocksize and double quantization, so they are read
        # here rather than declared as buffers; tensors are taken as they are (assign semantics)
        mine = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if "qweight" not in mine:
            missing_keys.append(prefix + "qweight")
            return
        try:
            state = nf4_quant_state(mine)
        except (ValueError, KeyError, AssertionError) as e:
            error_msgs.append(f"{prefix}: cannot read the NF4 QuantState: {e}")
            return
        expected = (self.out_features, self.in_features)
        if tuple(state.shape) != expected:
            error_msgs.append(f"{prefix}: NF4 weight has shape {tuple(state.shape)}, expected {expected}")
            return
        self.qweight, self.quant_state = mine["qweight"], state

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.quant_state is not None:
            destination[prefix + "qweight"] = self.qweight
            for k, v in self.quant_state.as_dict(packed=True).items():
                destination[prefix + k] = v

    def prepare(self, device, precise: bool = False) -> None:
        device = torch.device(device)
        if self.quant_state is None:
            raise RuntimeError("NF4Linear has no weight: load a state dict first")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"NF4Linear has no kernel for {device.type}")
        self.qweight = self.qweight.to(device)
        self.quant_state.to(device)
        self.kernel = "bnb"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .formats import bitsandbytes_functional

        bitsandbytes_functional()  # quietly and offline, the first time
        import bitsandbytes as bnb

        if self.kernel != "bnb":
            raise RuntimeError(_NOT_PREPARED.format("NF4Linear"))
        x2 = x.reshape(-1, self.in_features)  # (B*T, K)
        y = bnb.matmul_4bit(x2, self.qweight.t(), quant_state=self.quant_state)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}"


# ---------------------------------------------------------------- fp16
class Fp16Linear(nn.Module):
    """A half-precision weight (the output head of a GGUF Q8_0 source: d * q needs ~18 bits, fp16
    keeps them to 2^-11, int8 per row loses 1%). On this CPU fp16 matmul is ~5x faster than fp32."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.float16, device=device),
                                   requires_grad=False)

    def prepare(self, device, precise: bool = False) -> None:
        self.precise = precise
        self.weight = nn.Parameter(self.weight.to(device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.precise:
            hi = x.to(torch.float16)
            lo = (x.float() - hi.float()).to(torch.float16)
            return (F.linear(hi, self.weight).float() + F.linear(lo, self.weight).float()).to(x.dtype)
        return F.linear(x.to(torch.float16), self.weight).to(x.dtype)


# ---------------------------------------------------------------- what runtimes outside Python read
@dataclass(frozen=True)
class PreparedWeights:
    """A linear layer's weights as its kernel holds them, for the compiled CPU step
    (csrc/decode_cpu.cpp reads these fields by name). y = W x, x (in_features,).

    kind:
      "dense"  weight fp32 (N, K)
      "fp16"   weight fp16 (N, K)
      "int4"   weight uint8 torch's CPU int4 packing (N_pad, K/2), scales bf16 (K/group_size, N_pad, 2)
               (scale, zero) pairs, as _weight_int4pack_mm_for_cpu takes them; N_pad >= N
      "int8"   weight int8 (N, K), scales bf16 (N,) one per row, as _weight_int8pack_mm takes them
      "gguf"   weight uint8 (N, row bytes): a GGUF file's blocks of `scheme` (quant.ggml), one of
               NATIVE_GGUF_SCHEMES
      "r16"    weight uint8, `scheme`'s weights (q4_0, q4_1, q8_0 blocks or int8_group) in
               csrc/r16_gemm.h's r16 layout: 16 rows interleaved, x taken as 15-bit integers
               (8-bit after the decode step's set_activation_bits(8))
      "rows"   weight None; `parts`, records whose outputs follow one another (wqkv of a GGUF
               file whose wv is another block type than wq, wk)
    """

    kind: str
    weight: torch.Tensor | None
    scales: torch.Tensor | None
    group_size: int
    out_features: int
    in_features: int
    scheme: str = ""
    parts: tuple["PreparedWeights", ...] = ()


def prepared_weights(mod: nn.Module) -> PreparedWeights:
    """The record of a prepared linear layer. Raises ValueError (why) for a layer that runs only
    in Python: precise layers, NF4, a kernel prepared for another device, a non-fp32 dense weight."""
    N, K = mod.out_features, mod.in_features
    if getattr(mod, "precise", False):
        raise ValueError("precise layers run in Python")
    if isinstance(mod, Int4Linear):
        if mod.kernel != "cpu":
            raise ValueError(f"int4 prepared for {mod.kernel or 'nothing'}")
        return PreparedWeights("int4", mod.packed, mod.scales_and_zeros, mod.group_size, N, K)
    if isinstance(mod, Int8Linear):
        if mod.kernel == "int8pack":
            return PreparedWeights("int8", mod.qweight, mod.kernel_scales, mod.group_size, N, K)
        if mod.kernel == "dense":
            return PreparedWeights("dense", mod.dense_weight.float().contiguous(), None, K, N, K)
        if mod.kernel == "int8group":
            if mod.r16_weights() is None:
                raise ValueError("grouped int8 runs in Python until the extension is loaded")
            return PreparedWeights("r16", mod.r16, None, 32, N, K, "int8_group")
        raise ValueError(f"int8 kernel {mod.kernel or 'unprepared'}")
    if isinstance(mod, GGUFLinear):
        if mod.r16_weights() is not None:
            return PreparedWeights("r16", mod.r16, None, 32, N, K, mod.scheme)
        if mod.scheme not in NATIVE_GGUF_SCHEMES or mod.blocks.device.type != "cpu":
            raise ValueError(f"{mod.scheme} blocks run in Python (no native kernel)")
        return PreparedWeights("gguf", mod.blocks, None, GGUF_SCHEMES[mod.scheme][0], N, K, mod.scheme)
    if isinstance(mod, StackedRows):
        if mod.r16_weights() is not None:  # merged: one layer
            return PreparedWeights("r16", mod.r16, None, 32, N, K, mod.parts[0].scheme)
        return PreparedWeights("rows", None, None, K, N, K, parts=tuple(prepared_weights(m) for m in mod.parts))
    if isinstance(mod, Fp16Linear):
        return PreparedWeights("fp16", mod.weight.detach().contiguous(), None, K, N, K)
    if type(mod) is nn.Linear:
        if mod.weight.dtype != torch.float32:
            raise ValueError(f"dense weight in {mod.weight.dtype}")
        return PreparedWeights("dense", mod.weight.detach().contiguous(), None, K, N, K)
    raise ValueError(f"{type(mod).__name__} has no fused kernel")


@dataclass(frozen=True)
class PreparedEmbedding:
    """A token table as its module holds it, for the compiled CPU step (csrc/decode_cpu.cpp reads
    these fields by name): row t is token t's fp32 embedding (dim,).

    kind:
      "dense"       table fp32 (V, dim)
      "int8_group"  table int8 (V, dim), scales fp32 (V, dim / group_size): Int8Embedding's
      "gguf"        table uint8 (V, row bytes): a GGUF file's blocks of `scheme`, one of
                    NATIVE_GGUF_SCHEMES
    """

    kind: str
    table: torch.Tensor
    scales: torch.Tensor | None
    group_size: int
    dim: int
    scheme: str = ""


def prepared_embedding(mod: nn.Module) -> PreparedEmbedding:
    """The record of a token table whose rows the compiled step can read as the module would give
    them (fp32 activations). Raises ValueError (why) for a table that is looked up only in Python."""
    if getattr(mod, "dtype", torch.float32) != torch.float32:
        raise ValueError(f"embeddings in {mod.dtype}")
    if isinstance(mod, Int8Embedding):
        if mod.qweight.device.type != "cpu":
            raise ValueError("the table is not on the CPU")
        return PreparedEmbedding("int8_group", mod.qweight, mod.scales.float().contiguous(), mod.group_size,
                                 mod.embedding_dim)
    if isinstance(mod, GGUFEmbedding):
        if mod.scheme not in NATIVE_GGUF_SCHEMES or mod.blocks.device.type != "cpu":
            raise ValueError(f"{mod.scheme} rows are dequantized in Python")
        return PreparedEmbedding("gguf", mod.blocks, None, GGUF_SCHEMES[mod.scheme][0], mod.embedding_dim, mod.scheme)
    if type(mod) is nn.Embedding:
        if mod.weight.dtype != torch.float32 or mod.weight.device.type != "cpu":
            raise ValueError(f"a table in {mod.weight.dtype} on {mod.weight.device}")
        return PreparedEmbedding("dense", mod.weight.detach(), None, mod.embedding_dim, mod.embedding_dim)
    raise ValueError(f"{type(mod).__name__} has no compiled lookup")


# ---------------------------------------------------------------- GGUF block types
# the block types the compiled step multiplies natively (csrc/gguf_gemv.h): those of Q4_K_M,
# Q6_K, Q8_0 and Q4_0/Q4_1/Q5_0 files; the others dequantize a block of rows at a time
NATIVE_GGUF_SCHEMES = ("q4_0", "q4_1", "q5_0", "q8_0", "q4_k", "q6_k")
# those also run as 16-row groups times x as 15-bit integers (csrc/r16_gemm.h), unless precise
R16_SCHEMES = ("q4_0", "q4_1", "q8_0", "q4_k")


class GGUFLinear(nn.Module):
    """y = x W^T with W kept as a GGUF file's own blocks (quant.ggml: "q4_k", "q6_k", ...).

    Q4_0, Q4_1 and Q8_0 with the compiled extension loaded, not precise: the blocks are repacked once
    (on first use, the same bytes with 16 rows interleaved: `r16`) and any number of rows of x
    becomes 15-bit integers per 32 values (two int8 halves) multiplied in integers
    (csrc/r16_gemm.h; llama.cpp rounds x to 8 bits). Otherwise up to 8 rows of x (decode, the last token of a prefill) with a
    native type: the extension's GEMV over the blocks, fp32 (csrc/gguf_gemv.h), Q6_K's with x as
    15-bit integers unless precise (csrc/q6_k_x15.h, as the decode step runs it); and the rest
    (prefill, the other types, no compiler): the weight is dequantized a block of rows at a time
    into the activations' dtype (fp32 when precise) and multiplied, so memory stays one block
    of rows.
    """

    activation_bits = 15  # what the r16 kernel rounds x to: set_activation_bits

    ROW_BLOCK_BYTES = 16 << 20  # the dequantized rows held at once
    NATIVE_ROWS = 8  # past this many rows, dequantized tiles and a matmul beat a weight pass per 4 rows
    # ... unless the layer's fp32 weight outgrows one tile: its tiles then go out to DRAM and back
    # (8 bytes per weight, Q4_0 reads 0.56), and a short prompt's rows run faster through the
    # native kernel, NATIVE_ROWS at a time, up to this many. Measured (docs/BENCHMARKS.md, 2
    # cores): a 1.2B Q4_0 model's 35-token prefill 1.8 s in tiles, 0.63 s native, even at ~100
    # rows; the 135M default's layers fit a tile and stay faster dequantized past 16 rows.
    NATIVE_PREFILL_ROWS = 64

    def __init__(self, in_features: int, out_features: int, scheme: str, device=None):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.register_buffer("blocks", torch.empty(out_features, row_bytes(scheme, in_features),
                                                   dtype=torch.uint8, device=device))
        self.kernel = ""  # set by prepare: "dequant"
        self.r16: torch.Tensor | None = None  # the blocks in the r16 layout, once repacked

    def prepare(self, device, precise: bool = False) -> None:
        self.precise = precise
        self.blocks = self.blocks.to(device)
        self.kernel = "dequant"
        self.r16: torch.Tensor | None = None

    def r16_weights(self) -> torch.Tensor | None:
        """The blocks in csrc/r16_gemm.h's r16 layout, repacked on the first call that can (the
        extension may finish building after load); None where that kernel does not run."""
        if self.r16 is None and self.kernel and not self.precise and self.scheme in R16_SCHEMES \
                and self.blocks.device.type == "cpu":
            self.r16 = repack_r16(self.blocks, self.scheme, self.in_features)
            if self.r16 is not None:  # the copy replaces them (a tied table keeps its own reference)
                release_file_pages(self.blocks)
                self.blocks = None
        return self.r16

    @property
    def invariant_rows(self) -> int:
        """Rows one call takes with each row's values independent of the others (decode batches):
        any number for the r16 kernel, the native GEMV's NATIVE_ROWS; 1 where a matmul runs (its
        blocking may depend on rows)."""
        if self.r16_weights() is not None:
            return R16_ROWS
        native = self.scheme in NATIVE_GGUF_SCHEMES and self.blocks.device.type == "cpu"
        if native:
            from .extension import loaded_extension

            native = loaded_extension() is not None
        return self.NATIVE_ROWS if native else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.kernel:
            raise RuntimeError(_NOT_PREPARED.format("GGUFLinear"))
        x2 = x.reshape(-1, self.in_features)  # (B*T, K)
        r16 = self.r16_weights() if x2.device.type == "cpu" else None
        if r16 is not None:
            return _r16_forward(x, r16, self.scheme, self.out_features, self.activation_bits)
        ext = None
        if self.scheme in NATIVE_GGUF_SCHEMES and x2.device.type == "cpu":
            from .extension import loaded_extension

            ext = loaded_extension()
        if ext is not None and (x2.shape[0] <= self.NATIVE_ROWS or self._native_prefill(x2.shape[0])):
            x2 = x2.float()
            # Q6_K takes x as 15-bit integers as the decode step does, unless precise, and then
            # any number of rows in one pass over the weights (each weight row meets them all)
            x15 = self.scheme == "q6_k" and not self.precise
            rows = x2.shape[0] if x15 else self.NATIVE_ROWS
            y = torch.cat([ext.gguf_linear(x2[i : i + rows], self.blocks, self.scheme, x15=x15)
                           for i in range(0, x2.shape[0], rows)])  # (B*T, N)
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        if self.precise:
            x2 = x2.float()
        if ext is not None:  # the same values as dequantize_rows, ~20x faster than its torch ops
            tile = lambda b: ext.gguf_dequantize_rows(b, self.scheme, self.in_features)
        else:
            tile = lambda b: dequantize_rows(b, self.scheme)
        rows = max(1, self.ROW_BLOCK_BYTES // (self.in_features * 4))
        parts = [F.linear(x2, tile(self.blocks[i : i + rows]).to(x2.dtype))
                 for i in range(0, self.out_features, rows)]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (B*T, N)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _native_prefill(self, rows: int) -> bool:
        tiled = self.out_features * self.in_features * 4 > self.ROW_BLOCK_BYTES
        return 0 < self.NATIVE_ROWS and rows <= self.NATIVE_PREFILL_ROWS and tiled

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, scheme={self.scheme}"


class StackedRows(nn.Module):
    """Layers with the same input whose outputs follow one another: y = cat(part(x) for part).

    fuse_projections makes one of GGUF q, k, v (or w1, w3), which keep their own blocks (each
    in its type: a Q4_K_M file holds some layers' wv in Q6_K) where the store's file mapped
    them, so that the block still runs one fused call without a copy of the weights."""

    activation_bits = 15  # what the r16 kernel rounds x to: set_activation_bits

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)
        self.r16: torch.Tensor | None = None

    def r16_weights(self) -> torch.Tensor | None:
        """The parts' r16 bytes as one buffer, when every part runs r16 in one scheme and each but
        the last fills whole groups of 16 rows (a part's bytes then end where the next one's groups
        start): the stack runs as one layer, x rounded once and one pass of the threads where each
        part was a call of its own (a decode step's small layers pay most for the calls). The parts
        keep views into it, so memory stays one copy; None otherwise."""
        if self.r16 is None and self._mergeable():
            buffers = [p.r16_weights() for p in self.parts]
            if all(b is not None for b in buffers):
                self.r16 = torch.cat(buffers)
                at = 0
                for part, b in zip(self.parts, buffers):
                    part.r16, at = self.r16[at : at + b.numel()], at + b.numel()
        return self.r16

    def _mergeable(self) -> bool:
        return (all(isinstance(p, GGUFLinear) for p in self.parts) and len({p.scheme for p in self.parts}) == 1
                and all(p.out_features % R16_GROUP == 0 for p in self.parts[:-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r16 = self.r16_weights() if x.device.type == "cpu" else None
        if r16 is not None:
            return _r16_forward(x, r16, self.parts[0].scheme, self.out_features, self.activation_bits)
        return torch.cat([p(x) for p in self.parts], dim=-1)


def _r16_forward(x: torch.Tensor, r16: torch.Tensor, scheme: str, n_out: int, bits: int) -> torch.Tensor:
    """y = x W^T (..., K) -> (..., n_out) in x's dtype, W in r16 bytes: the extension's kernel in fp32,
    x rounded to `bits` (15 or 8) per 32 values."""
    from .extension import loaded_extension

    x2 = x.reshape(-1, x.shape[-1])  # (B*T, K)
    y = loaded_extension().r16_linear(x2.float(), r16, scheme, n_out, x8=bits == 8)
    return y.to(x.dtype).reshape(*x.shape[:-1], n_out)


class GGUFEmbedding(nn.Module):
    """Token embeddings kept as GGUF blocks: a lookup dequantizes only the rows it reads."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: str,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.scheme = num_embeddings, embedding_dim, scheme
        self.dtype = dtype  # the activations' dtype downstream starts here
        self.register_buffer("blocks", torch.empty(num_embeddings, row_bytes(scheme, embedding_dim),
                                                   dtype=torch.uint8, device=device))

    def prepare(self, device, precise: bool = False) -> None:
        self.blocks = self.blocks.to(device)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.blocks[tokens]  # (B, T, row_bytes)
        return dequantize_rows(rows, self.scheme).to(self.dtype)  # (B, T, D)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.scheme}, {self.dtype}"


def _gguf_module(name: str, scheme: str, old: nn.Module, embedding_dtype: torch.dtype) -> nn.Module:
    if isinstance(old, nn.Embedding):
        return GGUFEmbedding(old.num_embeddings, old.embedding_dim, scheme, embedding_dtype, device="meta")
    if not isinstance(old, nn.Linear) or old.bias is not None:
        raise ValueError(f"{name}: {scheme} blocks stand for an nn.Linear without bias or an nn.Embedding")
    return GGUFLinear(old.in_features, old.out_features, scheme, device="meta")


def tie_output(state: dict[str, torch.Tensor]) -> None:
    """A tied model stored without its head: the head reads the embedding's own tensors
    (`output.blocks` is `tok_embeddings.blocks`, or `.weight` for a float table)."""
    if not any(k.startswith("output.") for k in state):
        table = "tok_embeddings."
        state.update({"output." + k[len(table):]: v for k, v in list(state.items()) if k.startswith(table)})


# ---------------------------------------------------------------- swapping
PACKED_MODULES = (Int8Linear, Int4Linear, NF4Linear, Int8Embedding, Fp16Linear, GGUFLinear, GGUFEmbedding)


def swap_linears(
    model: nn.Module,
    precision_map: Mapping[str, str],
    group_size: int | Mapping[str, int] = 32,
    embedding_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Replace each module named in `precision_map` with an empty packed module on `meta`.

    `precision_map` maps module names ("layers.0.attention.wq", "output", "tok_embeddings") to
    "int8", "int4", "nf4", a GGUF block type of quant.ggml ("q4_k", ...), or a float name in
    FLOAT_SCHEMES (left alone). nn.Linear (no bias)
    takes any packed scheme; nn.Embedding only "int8". A tied output head is a separate module,
    so it is swapped (and stored) on its own whether or not the embedding is.

    `group_size` as an int: int4 layers use choose_int4_group(K, group_size) and int8 layers one
    scale per row. As a mapping: the layers it names use exactly that group (int8 and int4; for
    int8 a group of K means per row), the others are treated as for the int 32.
    `embedding_dtype` is what an Int8Embedding hands the first layer (activations start there).
    Returns the model, changed in place; fill it with load_state_dict(sd, assign=True).
    """
    for name, scheme in precision_map.items():
        if scheme in FLOAT_SCHEMES:
            continue
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, attr)
        except AttributeError:
            raise ValueError(f"the model has no module {name!r}") from None
        setattr(parent, attr, _packed_module(name, scheme, old, group_size, embedding_dtype))
    return model


def _packed_module(name, scheme, old, group_size, embedding_dtype) -> nn.Module:
    if scheme in GGUF_SCHEMES:
        return _gguf_module(name, scheme, old, embedding_dtype)
    exact = group_size.get(name) if isinstance(group_size, Mapping) else None
    wanted = group_size if isinstance(group_size, int) else 32
    if isinstance(old, nn.Embedding):
        if scheme != "int8":
            raise ValueError(f"{name}: embeddings pack only as int8, not {scheme!r}")
        return Int8Embedding(old.num_embeddings, old.embedding_dim, exact, embedding_dtype, device="meta")
    if not isinstance(old, nn.Linear):
        raise ValueError(f"{name} is a {type(old).__name__}, not an nn.Linear or nn.Embedding")
    if old.bias is not None:
        raise ValueError(f"{name}: packed layers have no bias")
    K, N = old.in_features, old.out_features
    if scheme == "int8":
        return Int8Linear(K, N, exact, device="meta")
    if scheme == "int4":
        g = exact or choose_int4_group(K, wanted)
        if g is None:
            raise ValueError(f"{name}: no int4 group <= {wanted} divides K={K}; map it to int8")
        return Int4Linear(K, N, g, device="meta")
    if scheme == "nf4":
        return NF4Linear(K, N, device="meta")
    if scheme == "fp16":
        return Fp16Linear(K, N, device="meta")
    raise ValueError(f"{name}: unknown scheme {scheme!r}; expected int8, int4, nf4 or one of {FLOAT_SCHEMES}")


def set_activation_bits(model: nn.Module, bits: int) -> int:
    """What the r16 layers of `model` round x to in the model's own forward (prompts, and decode
    where no compiled step runs): 15 (two int8 halves per 32 values; logits within ~0.03 of exact
    fp32 arithmetic) or 8 (llama.cpp's Q8_0 rounding: one integer product a weight, prompts
    1.2-1.35x faster on AVX-512, 1.0-1.35x on AVX2, whose 15-bit prompt kernel widens the weights
    once; KL ~0.01 nats a token on SmolLM2, docs/BENCHMARKS.md). The compiled decode
    step has a setter of its own (quant.decode_cpu). Returns how many layers take it."""
    if bits not in (8, 15):
        raise ValueError(f"activations are rounded to 8 or 15 bits, not {bits}")
    taken = 0
    for module in model.modules():
        if isinstance(module, (Int8Linear, GGUFLinear, StackedRows)):
            module.activation_bits = bits
            taken += module.r16_weights() is not None  # repacks now what the first prompt would
    return taken


def repack_for_device(model: nn.Module, device, precise: bool = False,
                      elsewhere: Mapping[str, str] | None = None) -> nn.Module:
    """Turn every packed module's portable tensors into `device`'s kernel layout (after loading).

    `precise` trades ~3x the matmul time for fp32-level arithmetic (see split_bf16).
    `elsewhere` names modules prepared for another device ({"tok_embeddings": "cpu"})."""
    elsewhere = elsewhere or {}
    for name, module in model.named_modules():
        if isinstance(module, PACKED_MODULES):
            module.prepare(elsewhere.get(name, device), precise)
    return model


# ---------------------------------------------------------------- fusing
def fuse_projections(model: nn.Module) -> nn.Module:
    """Merge each block's wq/wk/wv into `wqkv` and w1/w3 into `w13`, before repack_for_device.

    One matmul over the concatenated rows instead of three (or two): fewer kernel calls, the
    main cost of a decode step on a small model. Only modules of the same kind and group are
    merged; NF4 keeps its separate QuantStates; GGUF blocks are stacked, not copied (StackedRows:
    the compiled step runs the parts in one call).
    """
    for layer in model.layers:
        attn, ffn = layer.attention, layer.feed_forward
        fused = _concat_rows([attn.wq, attn.wk, attn.wv])
        if fused is not None:
            attn.wqkv, attn.wq, attn.wk, attn.wv = fused, None, None, None
        fused = _concat_rows([ffn.w1, ffn.w3])
        if fused is not None:
            ffn.w13, ffn.w1, ffn.w3 = fused, None, None
    return model


def _concat_rows(mods: list[nn.Module]) -> nn.Module | None:
    kind = type(mods[0])
    if any(type(m) is not kind for m in mods) or len({m.in_features for m in mods}) != 1:
        return None
    K, N = mods[0].in_features, sum(m.out_features for m in mods)
    if kind is nn.Linear:
        out = nn.Linear(K, N, bias=False, device="meta")
        out.weight = nn.Parameter(torch.cat([m.weight for m in mods]), requires_grad=False)
        return out
    if kind in (Int8Linear, Int4Linear):
        if len({m.group_size for m in mods}) != 1 or any(m.kernel for m in mods):
            return None
        out = kind(K, N, mods[0].group_size, device="meta")
        for name in ("qweight", "scales", "mins"):
            if hasattr(mods[0], name) and getattr(mods[0], name) is not None:
                setattr(out, name, torch.cat([getattr(m, name) for m in mods]))
        return out
    if kind is GGUFLinear:
        if any(m.kernel for m in mods):
            return None
        # the blocks stay where they were loaded (the store file's mapping, read in place):
        # concatenated, they would be a copy beside the mapped pages already read to make it
        return StackedRows(mods)
    return None
