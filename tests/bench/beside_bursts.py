"""Decode tok/s beside bursts of Python on another thread (what the chat app's screen does while
a reply streams), with the model loaded and decoding on one thread or on different ones.

    LLAMADESK_HOME=... python tests/bench/beside_bursts.py [MODEL] --threads 2 --busy-ms 0 5

Each process loads the model once; `--where one` loads it and writes every reply on one thread
(the chat app since backend.ModelThread), `--where split` loads it on the main thread and writes
each reply on a new thread (the chat app before). A burst holds the GIL in a Python loop for
`--busy-ms` every 33 ms, a frame's pace. Each reply is the same 400-token greedy story from the
same empty cache; the table gives every reply's tok/s (`engine.last`) and the governor's thread
count at the end (it starts at `--threads`).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper, in paragraphs."}]


def bursts(busy_s: float, stop: threading.Event, period_s: float = 1 / 30) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < busy_s:
            sum(range(200))
        time.sleep(max(0.0, period_s - busy_s))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="smollm2-135m-instruct:source")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--busy-ms", type=float, nargs="+", default=[0.0, 5.0])
    ap.add_argument("--where", choices=["one", "split"], default="one")
    ap.add_argument("--replies", type=int, default=3)
    a = ap.parse_args()

    import torch

    from app.engine import Engine
    from app.history import ChatSettings
    from app.threads import settle_after_load
    from app.tui.backend import ModelThread

    params = dataclasses.replace(ChatSettings().sampling_params(), temperature=0.0)
    own = ModelThread()

    def load():
        engine = Engine.load(a.model, threads=a.threads, say=lambda *_: None)
        settle_after_load()
        return engine

    engine = own.call(load) if a.where == "one" else load()

    def reply() -> tuple[float, int]:
        engine._cached = []
        for _ in engine.stream(PROMPT, params, 400, threading.Event()):
            pass
        return engine.last.tokens_per_s, torch.get_num_threads()

    for busy_ms in a.busy_ms:
        rates, counts = [], []
        for _ in range(a.replies):
            stop = threading.Event()
            burster = threading.Thread(target=bursts, args=(busy_ms / 1e3, stop), daemon=True)
            burster.start()
            if a.where == "one":
                rate, n = own.call(reply)
            else:
                box = []
                writer = threading.Thread(target=lambda: box.append(reply()))
                writer.start()
                writer.join()
                rate, n = box[0]
            stop.set()
            burster.join()
            rates.append(rate)
            counts.append(n)
        print(f"| {a.where} | {a.threads} | {busy_ms:g} ms / 33 ms | {', '.join(f'{r:.0f}' for r in rates)} "
              f"| {counts[-1]} |", flush=True)


if __name__ == "__main__":
    main()
