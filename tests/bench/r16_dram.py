"""An r16 layer's time when its weights come from DRAM, not cache: `--layers` copies of one shape
(~200-270 MB for six 14336 x 4096 Q4_K layers, past any L3 here), called in turn, best of
`--rounds` passes; what a decode step of a model past ~200 MB sees, where tests/bench/r16_gemm.py
(best of repeated calls on one layer) measures a layer that fits the cache.

    python tests/bench/r16_dram.py [--type Q4_K] [--shape 14336 4096] [--layers 6] [--rows 1 4] [--threads 2]
    LLAMADESK_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 python tests/bench/r16_dram.py   # the AVX2 path

GB/s: the r16 copy's bytes over the time, and the file's (GGUF) bytes over it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from gguf_decode import load_kernels  # noqa: E402
from tiny_checkpoints import random_blocks  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--type", default="Q4_K", choices=["Q4_0", "Q4_1", "Q8_0", "Q4_K"])
    ap.add_argument("--shape", nargs=2, type=int, default=[14336, 4096], metavar=("N", "K"))
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    ext = load_kernels(a.threads)
    n, k = a.shape
    rng = np.random.default_rng(0)
    blocks = [torch.from_numpy(random_blocks(rng, a.type, (n, k))) for _ in range(a.layers)]
    file_bytes = blocks[0].numel()
    layers = [ext.r16_repack(b, a.type.lower(), k) for b in blocks]
    del blocks
    for rows in a.rows:
        x = torch.randn(rows, k)
        best = float("inf")
        for _ in range(a.rounds):
            t0 = time.perf_counter()
            for packed in layers:
                ext.r16_linear(x, packed, a.type.lower(), n)
            best = min(best, (time.perf_counter() - t0) / len(layers))
        print(f"| {a.type} | {n} x {k} | {rows} | {best * 1e6:.0f} | {layers[0].numel() / 1e6:.1f} | "
              f"{layers[0].numel() / best / 1e9:.1f} | {file_bytes / best / 1e9:.1f} |", flush=True)


if __name__ == "__main__":
    print("| type | N x K | rows | us a layer | r16 MB | r16 GB/s | file GB/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    main()
