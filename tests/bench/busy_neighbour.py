"""What a neighbour busy part of the time costs a decode at a fixed thread count: the chat app's
screen (a Python thread of the same process, holding the GIL while it works) against a program of
its own on another core, in one process, one run.

    LLAMADESK_HOME=... python tests/bench/busy_neighbour.py [MODEL] [--duty 0.15 0.3] [--rounds 3]

The neighbour spins in pure Python (no memory traffic to speak of) for 8 ms at a time, then sleeps
so that it is busy `duty` of the time: as a thread of this process ("thread": what the chat app's
screen does while a reply streams, at the app's GIL switch interval, threads.settle_after_load),
or as a child process pinned to the last core ("process": another program; it shares no GIL). The
decode runs the compiled step without the thread governor (app/threads.py) at 1 and at all threads.
Each figure is the median of `--rounds` runs of `--tokens` greedy tokens after a 64-token prompt;
rows alternate within a round, since this VM's pace moves between minutes.

What the rows tell apart: on cores of their own a process neighbour costs a one-thread decode
nothing (if it does, the "cores" share one core's units: SMT); a thread neighbour costs it the GIL's
hand-overs; with every core decoding, either neighbour parks one of the step's threads behind it now
and then, and the step's barriers wait for it.
"""
import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

from app.engine import Engine  # noqa: E402
from app.threads import settle_after_load  # noqa: E402
from model.generate import decode_one_token, prefill  # noqa: E402

BURST_S = 0.008
SPIN = """import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
duty, burst = float(sys.argv[2]), float(sys.argv[3])
while True:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < burst:
        sum(range(200))
    time.sleep(burst / duty - burst)
"""


def spin_thread(duty: float, stop: threading.Event) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < BURST_S:
            sum(range(200))
        time.sleep(BURST_S / duty - BURST_S)


def decode_rate(engine: Engine, decoder, tokens: int) -> float:
    ids = list(range(1000, 1064))
    token = int(prefill(engine.model, ids).argmax())
    t0 = time.perf_counter()
    for pos in range(len(ids), len(ids) + tokens):
        token = int(decode_one_token(decoder, token, pos).argmax())
    return tokens / (time.perf_counter() - t0)


def beside(neighbour: str, duty: float, run):
    """run() with the neighbour busy `duty` of the time ("none", "thread" or "process")."""
    if neighbour == "none":
        return run()
    if neighbour == "thread":
        stop = threading.Event()
        t = threading.Thread(target=spin_thread, args=(duty, stop), daemon=True)
        t.start()
        try:
            return run()
        finally:
            stop.set()
            t.join()
    core = max(os.sched_getaffinity(0))
    child = subprocess.Popen([sys.executable, "-c", SPIN, str(core), str(duty), str(BURST_S)])
    try:
        time.sleep(0.2)
        return run()
    finally:
        child.kill()
        child.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--duty", type=float, nargs="+", default=[0.15, 0.3])
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    a = ap.parse_args()
    if not all(0 < d < 1 for d in a.duty):
        ap.error("--duty takes fractions between 0 and 1")
    engine = Engine.load(a.model, ctx=64 + a.tokens + 8, threads=a.threads)
    settle_after_load()  # the chat app's and the server's GIL switch interval
    raw = engine.decoder.inner  # the compiled step without the governor
    counts = sorted({1, a.threads})
    cases = [("none", 0.0)] + [(n, d) for d in a.duty for n in ("thread", "process")]
    rates: dict[tuple[str, float, int], list[float]] = {}
    torch.set_num_threads(counts[-1])
    decode_rate(engine, raw, 16)  # warm: the first steps page the weights in and start the threads
    for _ in range(a.rounds):
        for neighbour, duty in cases:
            for n in counts:
                torch.set_num_threads(n)
                rate = beside(neighbour, duty, lambda: decode_rate(engine, raw, a.tokens))
                rates.setdefault((neighbour, duty, n), []).append(rate)
    print(f"{engine.entry.ref}, {a.tokens} tokens after 64, median of {a.rounds}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; GIL switch interval "
          f"{sys.getswitchinterval() * 1e6:.0f} us")
    print("| neighbour | busy | " + " | ".join(f"{n} thread{'s' * (n > 1)} tok/s | x quiet" for n in counts) + " |")
    print("| --- | ---: | " + " | ".join("---: | ---:" for _ in counts) + " |")
    for neighbour, duty in cases:
        cells = []
        for n in counts:
            r, q = statistics.median(rates[(neighbour, duty, n)]), statistics.median(rates[("none", 0.0, n)])
            cells.append(f"{r:.1f} | {r / q:.2f}")
        print(f"| {neighbour} | {duty:.0%} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
