"""A 1.2B-shaped Llama as a Q4_0 GGUF of random blocks, with SmolLM2's real tokenizer: the model
issue 4/6 measures decode, prefill and cold start on against llama.cpp.

    python tests/bench/make_1b_gguf.py OUT.gguf [--layers 16] [--type Q4_0]

Shape (issue 4/6): hidden 2048, 16 layers, 32 heads, 8 KV heads, FFN 8192, SmolLM2's vocabulary
(49152, its tokenizer and chat template copied from the default model's GGUF), rope theta 500000,
a separate output head. Every Q4_0 block is random nibbles under an fp16 scale of 0.0043, so a
weight's spread is about 0.02 (N(0, 0.02)'s, as a fresh Llama's); norms are ones. Blocks are
written as bytes, so no float copy of the 1.2B weights is ever held; one tensor at a time.
The file is about 0.7 GB; writing it takes seconds, not the minutes `gguf.quants.quantize` would.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np

DIM, FFN, HEADS, KV_HEADS, VOCAB = 2048, 8192, 32, 8, 49152
SOURCE = Path.home() / ".cache" / "llamadesk" / "test-gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
COPIED = ("tokenizer.", "general.languages")


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


def q4_0_blocks(rng: np.random.Generator, n: int, k: int, scale: float = 0.0043) -> np.ndarray:
    """(n, k/32*18) uint8: each block an fp16 scale then 16 bytes of random nibbles."""
    blocks = np.empty((n, k // 32, 18), np.uint8)
    d = (scale * (1 + 0.1 * rng.standard_normal((n, k // 32)))).astype(np.float16)
    blocks[..., :2] = d.view(np.uint8).reshape(n, k // 32, 2)
    blocks[..., 2:] = rng.integers(0, 256, (n, k // 32, 16), dtype=np.uint8)
    return blocks.reshape(n, -1)


def tensor_plan(layers: int) -> dict[str, tuple[int, ...]]:
    kv = KV_HEADS * DIM // HEADS
    plan: dict[str, tuple[int, ...]] = {"token_embd.weight": (VOCAB, DIM)}
    for i in range(layers):
        p = f"blk.{i}."
        plan.update({p + "attn_norm.weight": (DIM,), p + "attn_q.weight": (DIM, DIM),
                     p + "attn_k.weight": (kv, DIM), p + "attn_v.weight": (kv, DIM),
                     p + "attn_output.weight": (DIM, DIM), p + "ffn_norm.weight": (DIM,),
                     p + "ffn_gate.weight": (FFN, DIM), p + "ffn_up.weight": (FFN, DIM),
                     p + "ffn_down.weight": (DIM, FFN)})
    plan["output_norm.weight"] = (DIM,)
    plan["output.weight"] = (VOCAB, DIM)
    return plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-from", type=Path, default=SOURCE, help="a GGUF whose tokenizer is copied")
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    tmp = a.out.with_name(a.out.name + ".part")
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name("llama-1b random")
    w.add_context_length(8192)
    w.add_embedding_length(DIM)
    w.add_block_count(a.layers)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    w.add_rope_dimension_count(DIM // HEADS)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    copy_tokenizer(w, a.tokenizer_from)
    plan = tensor_plan(a.layers)
    q4 = gguf.GGMLQuantizationType.Q4_0
    for name, shape in plan.items():
        if len(shape) == 1:
            w.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4, gguf.GGMLQuantizationType.F32)
        else:
            n, k = shape
            w.add_tensor_info(name, (n, k // 32 * 18), np.dtype(np.uint8), n * k // 32 * 18, q4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape in plan.items():
        data = np.ones(shape, np.float32) if len(shape) == 1 else q4_0_blocks(rng, *shape)
        w.write_tensor_data(data)
    w.close()
    tmp.replace(a.out)
    print(f"{a.out}: {a.out.stat().st_size / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
