"""The r16 kernels (csrc/r16_gemm.h: 16 interleaved rows, x as 15-bit integers) against the fp32
GGUF kernels they replace (csrc/gguf_gemv.h), one layer at a time, same process, same blocks.

    python tests/bench/r16_gemm.py [--threads 1] [--types Q4_0 Q4_1 Q8_0] [--rows 1 4 64]
    LLAMADESK_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 python tests/bench/r16_gemm.py   # the AVX2 path

Shapes: the 1.2B model's w13 (16384 x 2048) and w2 (2048 x 8192), SmolLM2's head (49152 x 576).
Each figure is the best of `--rounds` calls (robust to a shared machine's load); rows = 1 is a
decode step, 4 a server's batch, 64 a prefill chunk. GB/s: the layer's bytes over the time.
The last column runs the same rows through the narrow kernel (AVX2 builds widen 4-bit blocks to
int16 from 16 rows of x: r16_gemm.h's r16_gemm_avx2_wide).

    python tests/bench/r16_gemm.py --types Q6_K --threads 2 --rounds 10

Q6_K has no r16 layout: its integer kernel (csrc/q6_k_x15.h, `gguf_linear(..., x15=True)`) reads
the file's rows, here on an 8B Llama's ffn_down (4096 x 14336) and attn_v (1024 x 4096), the Q6_K
layers of a Q4_K_M file; its last column is the same rows in calls of 8 (what GGUFLinear made of a
prompt's rows before).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from gguf_decode import best_of, load_kernels  # noqa: E402
from tiny_checkpoints import random_blocks  # noqa: E402

SHAPES = [(16384, 2048), (2048, 8192), (49152, 576)]
Q6_K_SHAPES = [(4096, 14336), (1024, 4096)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--types", nargs="+", default=["Q4_0", "Q4_1", "Q8_0"])
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 4, 64])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--x8", action="store_true", help="a last column: the r16 kernel with x as 8-bit integers "
                    "(`llamadesk serve`'s default), and its speed-up over 15-bit x")
    a = ap.parse_args()
    ext = load_kernels(a.threads)
    x8_head = (" r16 x8 us (x over r16) |", " ---: |") if a.x8 else ("", "")
    print("| type | N x K | rows | fp32 kernel us | r16 us | x | r16 GB/s | r16 narrow us (AVX2: wide x) |" + x8_head[0])
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |" + x8_head[1])
    rng = np.random.default_rng(0)
    for qtype in a.types:
        for n, k in Q6_K_SHAPES if qtype == "Q6_K" else SHAPES:
            if qtype in ("Q4_K", "Q6_K") and k % 256:
                continue  # K-quant rows hold whole 256-value super-blocks
            blocks = torch.from_numpy(random_blocks(rng, qtype, (n, k)))
            packed = ext.r16_repack(blocks, qtype.lower(), k) if qtype != "Q6_K" else None
            for m in a.rows:
                x = torch.randn(m, k)
                rounds = a.rounds if m <= 4 else max(3, a.rounds // 4)
                # the fp32 kernel takes 8 rows a call in GGUFLinear
                t_fp32 = best_of(lambda: [ext.gguf_linear(x[i : i + 8], blocks, qtype.lower()) for i in range(0, m, 8)],
                                 rounds)
                if qtype == "Q6_K":
                    t_r16 = best_of(lambda: ext.gguf_linear(x, blocks, "q6_k", x15=True), rounds)
                    t_narrow = best_of(lambda: [ext.gguf_linear(x[i : i + 8], blocks, "q6_k", x15=True)
                                                for i in range(0, m, 8)], rounds)
                else:
                    t_r16 = best_of(lambda: ext.r16_linear(x, packed, qtype.lower(), n), rounds)
                    # the same rows through the narrow kernel (AVX2 builds widen 4-bit blocks from 16 rows)
                    wide = ext.set_r16_wide_rows(1 << 40)
                    t_narrow = best_of(lambda: ext.r16_linear(x, packed, qtype.lower(), n), rounds)
                    ext.set_r16_wide_rows(wide)
                x8 = ""
                if a.x8 and qtype != "Q6_K":
                    t_x8 = best_of(lambda: ext.r16_linear(x, packed, qtype.lower(), n, False, True), rounds)
                    x8 = f" {t_x8 * 1e6:.0f} ({t_r16 / t_x8:.2f}) |"
                print(f"| {qtype} | {n} x {k} | {m} | {t_fp32 * 1e6:.0f} | {t_r16 * 1e6:.0f} | {t_fp32 / t_r16:.2f} "
                      f"| {blocks.numel() / t_r16 / 1e9:.1f} | {t_narrow * 1e6:.0f} ({t_narrow / t_r16:.2f}) |{x8}", flush=True)


if __name__ == "__main__":
    main()
