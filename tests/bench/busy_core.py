"""Decode while another program holds a core: the thread governor (app/threads.py) against a
fixed thread count, in one process, one run.

    LLAMADESK_HOME=... python tests/bench/busy_core.py [MODEL] [--tokens 128] [--rounds 3]

Rows: quiet 1 and N threads; then with a busy loop pinned to the last core (a child process
spinning, `os.sched_setaffinity`): N threads fixed (what `--threads N` did before the governor),
the governor from N threads (what `--threads N` does now: the busy loop starts after the load,
so the load-time rule cannot see it) and the governor from the rule's start. Issue 4/6's goal:
with the busy loop, decode >= half the quiet single-thread figure whatever --threads says.
Each figure is the median of `--rounds` runs of `--tokens` greedy tokens after a 64-token prompt.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

from app.engine import Engine  # noqa: E402
from app.threads import ThreadGovernor  # noqa: E402
from model.generate import decode_one_token, prefill  # noqa: E402

SPIN = "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True: pass"


def decode_rate(engine: Engine, decoder, tokens: int, rounds: int) -> float:
    ids = list(range(1000, 1064))
    rates = []
    for _ in range(rounds):
        token = int(prefill(engine.model, ids).argmax())
        t0 = time.perf_counter()
        for pos in range(len(ids), len(ids) + tokens):
            token = int(decode_one_token(decoder, token, pos).argmax())
        rates.append(tokens / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    a = ap.parse_args()
    n = a.threads
    engine = Engine.load(a.model, ctx=64 + a.tokens + 8, threads=n)
    raw = engine.decoder.inner  # the compiled step without the governor
    rows = []

    def fixed(threads: int) -> float:
        torch.set_num_threads(threads)
        return decode_rate(engine, raw, a.tokens, a.rounds)

    def governed(start: int) -> tuple[float, int]:
        torch.set_num_threads(start)
        gov = ThreadGovernor(raw, n)
        return decode_rate(engine, gov, a.tokens, a.rounds), gov.threads

    quiet_one = fixed(1)
    rows.append(("quiet", "1 thread, fixed", quiet_one, 1))
    rows.append(("quiet", f"{n} threads, fixed", fixed(n), n))
    rate, used = governed(n)
    rows.append(("quiet", f"governor from {n}", rate, used))
    core = max(os.sched_getaffinity(0))
    spin = subprocess.Popen([sys.executable, "-c", SPIN, str(core)])
    try:
        time.sleep(1)
        rows.append((f"core {core} busy", f"{n} threads, fixed (before)", fixed(n), n))
        rate, used = governed(n)
        rows.append((f"core {core} busy", f"governor from {n} (--threads {n})", rate, used))
        rate, used = governed(1)
        rows.append((f"core {core} busy", "governor from 1 (the rule at load)", rate, used))
    finally:
        spin.kill()
    print(f"{engine.entry.ref}, {a.tokens} tokens after 64, median of {a.rounds}; goal: busy >= "
          f"{quiet_one / 2:.1f} tok/s (half the quiet single-thread {quiet_one:.1f})")
    print("| cores | decoder | tok/s | x quiet 1 thread | threads at the end |")
    print("| --- | --- | ---: | ---: | ---: |")
    for cores, what, rate, used in rows:
        print(f"| {cores} | {what} | {rate:.1f} | {rate / quiet_one:.2f} | {used} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
