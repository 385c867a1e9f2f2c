"""Decode steps of B rows at once through the engine's decoder (what `serve --parallel` runs):
aggregate tokens/s for B = 1, 2, 4, 8 on one loaded model, in one process.

    LLAMADESK_HOME=... python tests/bench/batch_decode.py [MODEL] [--keys 128] [--steps 64] [--threads N]

Each row holds `--keys` random-prompt tokens in its own KV-cache row; a round times `--steps`
steps of every batch size, alternating the order; the table gives the median round. The head and
the token table run as in a reply (logits for every row), sampling does not.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

from app.engine import Engine  # noqa: E402
from model.generate import prefill  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--keys", type=int, default=128, help="prompt tokens in each row before timing")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--sizes", default="1,2,4,8")
    ap.add_argument("--bits", default="15", help="activation bits of the CPU step, e.g. 15,8: each in turn "
                    "every round (Engine.set_activation_bits)")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    bits = [int(b) for b in a.bits.split(",")]
    engine = Engine.load(a.model, ctx=max(512, a.keys + a.rounds * a.steps * 2 + 16), threads=a.threads,
                         say=lambda m: print(m, file=sys.stderr))
    engine.use_cache_rows(max(sizes))
    model, decoder = engine.model, engine.decoder
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for r in range(max(sizes)):
            prefill(model, torch.randint(100, 10000, (a.keys,), generator=gen).tolist(), 0, cache_row=r)
        times = {(x, b): [] for x in bits for b in sizes}
        for rnd in range(a.rounds):
            for x in (bits if rnd % 2 == 0 else bits[::-1]):
                engine.set_activation_bits(x)
                for b in (sizes if rnd % 2 == 0 else sizes[::-1]):
                    tokens = torch.randint(100, 10000, (b,), generator=gen)
                    rows = torch.arange(b)
                    t0 = time.perf_counter()
                    for s in range(a.steps):  # every round writes the same positions again
                        decoder.decode(tokens, torch.full((b,), a.keys + s), rows)
                    times[(x, b)].append(time.perf_counter() - t0)
    print(f"{type(decoder).__name__}, {torch.get_num_threads()} threads, {a.keys} keys a row, {a.steps} steps")
    print("| activation bits | rows | step ms | aggregate tok/s | vs 1 row |")
    print("| --- | --- | --- | --- | --- |")
    for x in bits:
        base = None
        for b in sizes:
            t = statistics.median(times[(x, b)]) / a.steps
            base = base or b / t
            print(f"| {x} | {b} | {t * 1e3:.2f} | {b / t:.1f} | x{b / t / base:.2f} |")


if __name__ == "__main__":
    main()
