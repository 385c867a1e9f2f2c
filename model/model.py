"""The LLaMA: Transformer -> TransformerBlock -> Attention -> FeedForward -> RMSNorm -> rope.

Meta's module names and Meta's interleaved RoPE (pairs (x0, x1), (x2, x3), ...): GGUF and Meta
checkpoints load as they are; Hugging Face weights are un-permuted by the importer.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .args import ModelArgs


class KVCache(nn.Module):
    """Preallocated keys and values; attention reads only the filled prefix.

    `kv_dtype` int8 keeps each key and value vector as int8 codes and one fp32 scale (symmetric
    absmax over head_dim), a quarter of fp32's bytes plus 4 per vector; attention reads the filled
    prefix dequantized to the activations' dtype. Any other `kv_dtype` than the activations' (a
    bf16 cache under fp32 activations) is read through a cast of the prefix.
    """

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device=None,
                 kv_dtype=None):
        super().__init__()
        kv_dtype = kv_dtype or dtype
        shape = (batch, n_kv_heads, max_len, head_dim)  # (B, nkv, S, hd)
        self.register_buffer("k", torch.zeros(shape, dtype=kv_dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=kv_dtype, device=device), persistent=False)
        scale = (batch, n_kv_heads, max_len, 1)  # (B, nkv, S, 1)
        quantized = kv_dtype == torch.int8
        for name in ("k_scale", "v_scale"):
            buf = torch.zeros(scale, dtype=torch.float32, device=device) if quantized else None
            self.register_buffer(name, buf, persistent=False)

    def update(self, start, k: torch.Tensor, v: torch.Tensor, row: int | None = None):
        """Write k, v (B, nkv, T, hd) at positions start..; return the filled prefix in their dtype.

        `row` picks one row (slot) of the cache for a single sequence (B == 1): each request a
        server decodes has its own. None: rows 0..B-1.
        `start` as a tensor of T positions is a static step (model/static_decode.py): the same
        shapes and addresses every token, as a CUDA graph needs. It returns the whole cache, and
        attention masks the positions past it.
        """
        if isinstance(start, torch.Tensor):
            return self._update_static(start, k, v)
        end = start + k.shape[2]
        b = slice(0, k.shape[0]) if row is None else slice(row, row + 1)
        if self.k_scale is not None:
            self.k[b, :, start:end], self.k_scale[b, :, start:end] = quantize_kv(k)
            self.v[b, :, start:end], self.v_scale[b, :, start:end] = quantize_kv(v)
            return (dequantize_kv(self.k[b, :, :end], self.k_scale[b, :, :end], k.dtype),
                    dequantize_kv(self.v[b, :, :end], self.v_scale[b, :, :end], v.dtype))
        self.k[b, :, start:end] = k
        self.v[b, :, start:end] = v
        if self.k.dtype != k.dtype:
            return self.k[b, :, :end].to(k.dtype), self.v[b, :, :end].to(v.dtype)
        return self.k[b, :, :end], self.v[b, :, :end]

    def _update_static(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        if self.k_scale is not None:
            for codes, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
                q, s = quantize_kv(x)
                codes.index_copy_(2, pos, q)
                scales.index_copy_(2, pos, s)
            return dequantize_kv(self.k, self.k_scale, k.dtype), dequantize_kv(self.v, self.v_scale, v.dtype)
        self.k.index_copy_(2, pos, k.to(self.k.dtype))
        self.v.index_copy_(2, pos, v.to(self.v.dtype))
        return self.k.to(k.dtype), self.v.to(v.dtype)


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, nkv, T, hd) -> int8 codes (B, nkv, T, hd) and fp32 scales (B, nkv, T, 1), absmax per vector."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True) / 127  # (B, nkv, T, 1)
    # an all-zero vector has scale 0: any positive divisor gives it zero codes
    q = torch.round(x / scale.clamp_min(torch.finfo(torch.float32).tiny)).clamp_(-127, 127)
    return q.to(torch.int8), scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype) -> torch.Tensor:
    """int8 codes (B, nkv, L, hd) and scales (B, nkv, L, 1) -> values (B, nkv, L, hd) in `dtype`."""
    return q.to(dtype) * scale.to(dtype)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # nn.Embedding's own N(0, 1) init on the meta device (where every load builds the model)
        # runs a Python decomposition that imports torch._dynamo: ~1 s and 75 MiB at each start
        # for values the checkpoint replaces. A real table gets the same init here.
        table = torch.empty(args.vocab_size, args.dim)
        if table.device.type != "meta":
            nn.init.normal_(table)
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, _weight=table)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.max_cache_len = 0
        # a plain attribute, not a buffer: it stays fp32 whatever dtype the weights are cast to
        self.rope: torch.Tensor | None = None

    def setup_caches(self, max_len: int, batch: int = 1, dtype=None, device=None, kv_dtype=None):
        """Allocate the KV cache and RoPE table for `batch` rows of up to `max_len` tokens each.

        `dtype` is the activations'; `kv_dtype` the cache's storage (torch.int8: the quantized
        cache), by default the activations' own. Decoders bound to the old caches (see
        model/generate.py's Decoder) must be built again."""
        a = self.args
        # the final norm is never packed: its weight tells the activations' dtype and device
        ref = self.norm.weight
        dtype = dtype or ref.dtype
        device = device or (ref.device if ref.device.type != "meta" else "cpu")
        self.max_cache_len = max_len
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch, a.n_kv_heads, max_len, a.head_dim, dtype, device, kv_dtype)
        self.rope = rope_table(a.head_dim, max_len, a.rope_theta, a.rope_scaling).to(device)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, last_only: bool = False,
                cache_row: int | None = None) -> torch.Tensor:
        """tokens (B, T) at positions start_pos.. -> logits (B, T, V), or (B, 1, V) if last_only.

        They read and extend KV-cache rows 0..B-1, or row `cache_row` alone (B == 1)."""
        T = tokens.shape[1]
        if start_pos + T > self.max_cache_len:
            raise ValueError(f"{start_pos + T} tokens exceed the cache of {self.max_cache_len}")
        rope = self.rope[start_pos : start_pos + T]
        # query i sits at start_pos + i and may see keys 0..start_pos + i (one row of Trues for a
        # single token: one code path for prompts and decode steps)
        q_pos = torch.arange(start_pos, start_pos + T, device=rope.device)[:, None]
        k_pos = torch.arange(start_pos + T, device=rope.device)[None, :]
        mask = k_pos <= q_pos  # (T, start_pos + T)
        # the table may stay in CPU RAM while the blocks run on a GPU: look up there, then move
        table_device = next(iter(self.tok_embeddings.buffers()), None)
        table_device = (table_device if table_device is not None else self.tok_embeddings.weight).device
        h = self.tok_embeddings(tokens.to(table_device)).to(self.norm.weight.device)
        for layer in self.layers:
            h = layer(h, start_pos, rope, mask, cache_row)
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, start_pos, rope, mask, cache_row=None):
        h = x + self.attention(self.attention_norm(x), start_pos, rope, mask, cache_row)
        return h + self.feed_forward(self.ffn_norm(h))


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        # wq, wk and wv as one matmul, made at load time (one kernel call instead of three)
        self.wqkv: nn.Module | None = None
        self.kv_cache: KVCache | None = None

    def forward(self, x, start_pos, rope, mask, cache_row=None):
        B, T, _ = x.shape
        hd, nh, nkv = self.head_dim, self.n_heads, self.n_kv_heads
        if self.wqkv is not None:
            qkv = self.wqkv(x)
        else:
            qkv = torch.cat([self.wq(x), self.wk(x), self.wv(x)], dim=-1)
        qk, v = qkv.split([(nh + nkv) * hd, nkv * hd], dim=-1)
        # queries and keys rotate by the same angles: one rope call for both
        qk = apply_rope(qk.view(B, T, nh + nkv, hd), rope).transpose(1, 2)  # (B, nh + nkv, T, hd)
        q, k = qk.split([nh, nkv], dim=1)  # (B, nh, T, hd), (B, nkv, T, hd)
        v = v.view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        k, v = self.kv_cache.update(start_pos, k, v, cache_row)  # (B, nkv, start_pos + T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=nh != nkv)
        y = y.transpose(1, 2).reshape(B, T, nh * hd)  # (B, T, nh * hd)
        return self.wo(y)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w13: nn.Module | None = None  # w1 and w3 as one matmul, made at load time

    def forward(self, x):
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.w2(F.silu(gate) * up)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 whatever the activation dtype, as Meta and HF do; one fused op
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


# ---------------------------------------------------------------- rope
def rope_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """(head_dim / 2,) rotation per position of each pair, scaled as ModelArgs.rope_scaling says."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    freqs = 1.0 / (theta ** exponents)
    kind = scaling.get("rope_type", "llama3") if scaling else None
    if kind == "llama3":
        freqs = _llama31_scale(freqs, scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"],
                               scaling["original_max_position_embeddings"])
    elif kind == "linear":  # positions squeezed by `factor`
        freqs = freqs / scaling["factor"]
    elif kind == "yarn":
        freqs = _yarn_scale(theta ** exponents, head_dim, theta, scaling)
    return freqs


def rope_magnitude(scaling: dict | None) -> float:
    """YaRN scales cos and sin (so queries and keys) by its attention factor; others by 1."""
    return float(scaling.get("attention_factor", 1.0)) if scaling and scaling.get("rope_type") == "yarn" else 1.0


def _yarn_scale(pos_freqs, head_dim, theta, scaling):
    """YaRN: high frequencies kept, low ones divided by `factor`, a linear ramp between the
    dimensions that turn beta_fast and beta_slow times over the original context."""
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]

    def dim_for(rotations):
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_for(scaling["beta_fast"]), dim_for(scaling["beta_slow"])
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (divide by factor)
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def _llama31_scale(freqs, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
    """Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between."""
    old_len = original_max_position_embeddings
    low_wavelen = old_len / low_freq_factor
    high_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > low_wavelen, freqs / factor, freqs)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def rope_table(head_dim: int, max_len: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """(max_len, head_dim / 2) complex: e^(i * angle) of each position for each pair."""
    freqs = rope_frequencies(head_dim, theta, scaling)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), freqs)  # (S, hd/2)
    return torch.polar(torch.full_like(angles, rope_magnitude(scaling)), angles)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0 + i x1) of x (B, T, H, hd) by rope (T, hd/2), as Meta does.

    `rope` may also be the table's (T, hd/2, 2) cos, sin view: real arithmetic, which
    torch.compile fuses (its code generators have no complex numbers).
    """
    if not rope.is_complex():
        x0, x1 = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)  # (B, T, H, hd/2) each
        cos, sin = rope[None, :, None, :, 0], rope[None, :, None, :, 1]
        return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(3).type_as(x)
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, T, H, hd/2)
    out = torch.view_as_real(xc * rope[None, :, None, :])  # (B, T, H, hd/2, 2)
    return out.flatten(3).type_as(x)  # (B, T, H, hd)
