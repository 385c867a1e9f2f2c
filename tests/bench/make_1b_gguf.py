"""A 1.2B- or 8B-shaped Llama as a GGUF of random blocks, with SmolLM2's real tokenizer: the models
issue 4/6 measures decode, prefill and cold start on against llama.cpp.

    python tests/bench/make_1b_gguf.py OUT.gguf [--shape 1b|8b] [--layers N] [--type Q4_0|Q4_K_M]

Shapes (issue 4/6), both with a separate output head and rope theta 500000:
- 1b: hidden 2048, 16 layers, 32 heads, 8 KV heads, FFN 8192 (about 0.7 GB as Q4_0).
- 8b: Llama-3-8B's body: hidden 4096, 32 layers, 32 heads, 8 KV heads, FFN 14336 (about 4.4 GB as
  Q4_0, 4.8 GB as Q4_K_M). Its vocabulary is not Llama 3's 128256 but SmolLM2's 49152, so the token
  table and head are 38% of Llama 3's: the body, where decode spends its time, is exact.
Both use SmolLM2's vocabulary, tokenizer and chat template, copied from the default model's GGUF.

Types:
- Q4_0: every matrix Q4_0; each block random nibbles under an fp16 scale of about 0.0043.
- Q4_K_M: llama.cpp's mix (llama-quant.cpp): Q4_K everywhere but the head (Q6_K) and attn_v and
  ffn_down in the layers `use_more_bits` picks (the first and last eighth, and every third between:
  16 of 32 layers), which get Q6_K. Blocks are random bytes whose fp16 scales are replaced by finite
  ones sized so a weight's spread is about 0.02, N(0, 0.02)'s, as a fresh Llama's.
Norms are ones. Blocks are written as bytes, one tensor at a time, so no float copy of the weights
is ever held; the 8B takes about a minute to write, not the hours `gguf.quants.quantize` would.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np

SHAPES = {  # (hidden, FFN, layers): both 32 heads and 8 KV heads of 128
    "1b": (2048, 8192, 16),
    "8b": (4096, 14336, 32),
}
HEADS, KV_HEADS, VOCAB = 32, 8, 49152
SOURCE = Path.home() / ".cache" / "llamadesk" / "test-gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
COPIED = ("tokenizer.", "general.languages")
FILE_TYPES = {"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_K_M": gguf.LlamaFileType.MOSTLY_Q4_K_M}


def copy_tokenizer(w: gguf.GGUFWriter, src: Path) -> None:
    """The default model's tokenizer fields (its real vocabulary, merges and chat template)."""
    r = gguf.GGUFReader(src)
    for key, field in r.fields.items():
        if not key.startswith(COPIED):
            continue
        kind = field.types[0]
        value = field.contents()
        if kind == gguf.GGUFValueType.ARRAY:
            w.add_array(key, value)
        elif kind == gguf.GGUFValueType.STRING:
            w.add_string(key, value)
        elif kind == gguf.GGUFValueType.BOOL:
            w.add_bool(key, value)
        elif kind == gguf.GGUFValueType.UINT32:
            w.add_uint32(key, value)


# ---------------------------------------------------------------- random blocks, by type
def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    """(..., ) float -> (..., 2) uint8 of fp16 little-endian."""
    return values.astype(np.float16).view(np.uint8).reshape(*values.shape, 2)


def random_blocks(rng: np.random.Generator, qtype: str, n: int, k: int) -> np.ndarray:
    """(n, k / block * bytes) uint8 of `qtype` blocks: random codes under finite fp16 scales.

    Scales (gguf.quants' layouts): Q4_0 [d | 16 B nibbles], w = d (q - 8), q std 4.6: d 0.0043.
    Q4_K [d | dmin | 12 B of 6-bit sub-scales and mins | 128 B nibbles], w = d sc q - dmin m with
    sc, m uniform in 0..63 and q in 0..15: d 7.7e-5 gives a spread near 0.02, dmin = 7.5 d centres it.
    Q6_K [128 B low | 64 B high bits | 16 int8 sub-scales | d], w = d sc (q - 32), sc's rms 74,
    (q - 32)'s std 18.5: d 1.5e-5 (an fp16 subnormal, still finite).
    """
    t = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[t]
    blocks = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    jitter = 1 + 0.1 * rng.standard_normal((n, k // block))
    if qtype == "Q4_0":
        blocks[..., 0:2] = _fp16_bytes(0.0043 * jitter)
    elif qtype == "Q4_K":
        blocks[..., 0:2] = _fp16_bytes(7.7e-5 * jitter)
        blocks[..., 2:4] = _fp16_bytes(7.5 * 7.7e-5 * jitter)
    elif qtype == "Q6_K":
        blocks[..., 208:210] = _fp16_bytes(1.5e-5 * jitter)
    else:
        raise ValueError(f"no random blocks for {qtype}")
    return blocks.reshape(n, -1)


# ---------------------------------------------------------------- which tensor gets which type
def _use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's rule for Q4_K_M's Q6_K layers (llama-quant.cpp's `use_more_bits`)."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def tensor_plan(shape: str, layers: int, ftype: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """GGUF name -> (type, shape (N, K) or (D,)), in llama.cpp's order."""
    dim, ffn, _ = SHAPES[shape]
    kv = KV_HEADS * dim // HEADS
    base, more = ("Q4_0", "Q4_0") if ftype == "Q4_0" else ("Q4_K", "Q6_K")
    plan: dict[str, tuple[str, tuple[int, ...]]] = {"token_embd.weight": (base, (VOCAB, dim))}
    for i in range(layers):
        p, wide = f"blk.{i}.", more if _use_more_bits(i, layers) else base
        plan.update({p + "attn_norm.weight": ("F32", (dim,)), p + "attn_q.weight": (base, (dim, dim)),
                     p + "attn_k.weight": (base, (kv, dim)), p + "attn_v.weight": (wide, (kv, dim)),
                     p + "attn_output.weight": (base, (dim, dim)), p + "ffn_norm.weight": ("F32", (dim,)),
                     p + "ffn_gate.weight": (base, (ffn, dim)), p + "ffn_up.weight": (base, (ffn, dim)),
                     p + "ffn_down.weight": (wide, (dim, ffn))})
    plan["output_norm.weight"] = ("F32", (dim,))
    plan["output.weight"] = (more, (VOCAB, dim))
    return plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--layers", type=int, help="transformer layers (default: the shape's)")
    ap.add_argument("--type", choices=sorted(FILE_TYPES), default="Q4_0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-from", type=Path, default=SOURCE, help="a GGUF whose tokenizer is copied")
    a = ap.parse_args()
    dim, ffn, layers = SHAPES[a.shape]
    layers = a.layers or layers
    rng = np.random.default_rng(a.seed)
    tmp = a.out.with_name(a.out.name + ".part")
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name(f"llama-{a.shape} random")
    w.add_context_length(8192)
    w.add_embedding_length(dim)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    w.add_rope_dimension_count(dim // HEADS)
    w.add_file_type(FILE_TYPES[a.type])
    copy_tokenizer(w, a.tokenizer_from)
    plan = tensor_plan(a.shape, layers, a.type)
    for name, (qtype, shape) in plan.items():
        if qtype == "F32":
            w.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4, gguf.GGMLQuantizationType.F32)
        else:
            t = gguf.GGMLQuantizationType[qtype]
            block, size = gguf.GGML_QUANT_SIZES[t]
            n, k = shape
            w.add_tensor_info(name, (n, k // block * size), np.dtype(np.uint8), n * k // block * size, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, (qtype, shape) in plan.items():
        data = np.ones(shape, np.float32) if qtype == "F32" else random_blocks(rng, qtype, *shape)
        w.write_tensor_data(data)
    w.close()
    tmp.replace(a.out)
    kinds = sorted({q for q, _ in plan.values()})
    print(f"{a.out}: {a.out.stat().st_size / 1e6:.0f} MB, {a.shape} shape, {layers} layers, {'/'.join(kinds)}")


if __name__ == "__main__":
    main()
