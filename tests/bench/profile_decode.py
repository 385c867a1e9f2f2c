"""Where one decode step's time goes: prefill and decode tok/s, then a torch.profiler table.

    LLAMADESK_HOME=... python tests/bench/profile_decode.py smollm2-135m-instruct:int4 [--profile] [--breakdown]

--breakdown splits a token at 512 keys by timing its parts alone (best of 7 rounds): the whole
token (decode_one_token), the compiled step over every block at 512 keys and at 16 (the
difference is attention's), the int4 layers alone through the step's kernel, and the head.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from app import store  # noqa: E402
from app.engine import choose_decoder, load_model  # noqa: E402
from model.generate import decode_one_token, prefill  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ref")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--breakdown", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model = load_model(store.find(a.ref), 1024)
    decoder = choose_decoder(model)
    ids = list(range(100, 612))
    t = time.perf_counter()
    prefill(model, ids)
    print(f"prefill 512: {512 / (time.perf_counter() - t):.1f} tok/s")
    prefill(model, ids[:16])
    t = time.perf_counter()
    for i in range(128):
        decode_one_token(decoder, 5, 16 + i)
    print(f"decode: {128 / (time.perf_counter() - t):.1f} tok/s")
    if a.breakdown:
        breakdown(model, decoder)
    if a.profile:
        from torch.profiler import profile

        with profile() as p:
            for i in range(32):
                decode_one_token(decoder, 5, 200 + i)
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def best(fn, n: int = 30, rounds: int = 7) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t) / n)
    return min(times)


@torch.inference_mode()
def breakdown(model, decoder) -> None:
    from quant import extension
    from quant.linear import Int4Linear

    prefill(model, list(range(100, 612)))  # 512 keys in the cache
    h = torch.randn(1, 1, model.args.dim)
    ext = extension.loaded_extension()
    int4 = [m for m in model.modules() if isinstance(m, Int4Linear)]
    xs = {m: torch.randn(1, m.in_features) for m in int4}
    hn = torch.randn(1, 1, model.args.dim)
    parts = {
        "whole token (decode_one_token at 512 keys)": lambda: decode_one_token(decoder, 5, 511),
        "compiled step, every block, 512 keys": lambda: decoder.blocks.step(h, 511),
        "compiled step, every block, 16 keys": lambda: decoder.blocks.step(h, 15),
        f"int4 layers alone ({len(int4)} calls)": lambda: [ext.int4_linear(xs[m], m.packed, m.scales_and_zeros,
                                                                          m.group_size, m.out_features) for m in int4],
        "output head (norm + linear)": lambda: model.output(model.norm(hn)),
    }
    ms = {k: best(f) * 1e3 for k, f in parts.items()}
    for k, v in ms.items():
        print(f"{k:45s} {v:7.3f} ms")
    keys = list(ms)
    print(f"{'attention over 512 keys (step 512 - step 16)':45s} {ms[keys[1]] - ms[keys[2]]:7.3f} ms")
    print(f"{'rest of the step (norms, rope, int8 layers, adds)':45s} {ms[keys[2]] - ms[keys[3]]:7.3f} ms")
    print(f"{'outside the step and head (embedding, Python)':45s} {ms[keys[0]] - ms[keys[1]] - ms[keys[4]]:7.3f} ms")


if __name__ == "__main__":
    main()
