"""Where one decode step's time goes: prefill and decode tok/s, then a torch.profiler table.

    LLAMADESK_HOME=... python tests/bench/profile_decode.py smollm2-135m-instruct:int4 [--profile]
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from app import store  # noqa: E402
from app.engine import load_model  # noqa: E402
from model.generate import decode_one_token, prefill  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ref")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--threads", type=int)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model = load_model(store.find(a.ref), 1024)
    ids = list(range(100, 612))
    t = time.perf_counter()
    prefill(model, ids)
    print(f"prefill 512: {512 / (time.perf_counter() - t):.1f} tok/s")
    prefill(model, ids[:16])
    t = time.perf_counter()
    for i in range(128):
        decode_one_token(model, 5, 16 + i)
    print(f"decode: {128 / (time.perf_counter() - t):.1f} tok/s")
    if a.profile:
        from torch.profiler import profile

        with profile() as p:
            for i in range(32):
                decode_one_token(model, 5, 200 + i)
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
