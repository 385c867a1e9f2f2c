"""Where a decode step's and a prefill chunk's time goes, by function, from `perf` samples.

    LLAMADESK_HOME=... python tests/bench/perf_profile.py llama-8b-q4_0:source [--seconds 20] [--threads 2] [--prompt 64]
    python tests/bench/perf_profile.py smollm2-135m-instruct:source --rows 4 --bits 8   # a server's batched step

Loads the variant as `bench` does (the compiled CPU step under the thread governor), warms up,
then for each phase (decode steps after a 64-token prompt; prefill of one 64-row chunk, the
chunk an 8B-shaped model gets; --prompt 128 is two chunks of the 1.2B's 64, or one of 128) runs it in a loop while `perf record -e cpu-clock` samples this
process (cpu-clock: a VM without hardware counters still has it), and prints the phase's time per
call, the weight bytes it reads per second against `bench`'s stream-read probe, and perf's
self-time table by symbol. Inlined kernels count toward the function they are inlined into.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from app import store  # noqa: E402
from app.bench import prompt_ids, stream_read_gb_s  # noqa: E402
from app.engine import choose_decoder, load_model, use_activation_bits  # noqa: E402
from app.plan import stored_weight_bytes  # noqa: E402
from app.devices import probe  # noqa: E402
from model.generate import decode_one_token, prefill  # noqa: E402

PROMPT = 64


def perf_phase(name: str, fn, seconds: float, weight_bytes: int, out: Path, rows: int = 25) -> None:
    """Run `fn` in a loop for `seconds` under `perf record`, then print its table."""
    data = out / f"{name}.data"
    perf = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "499", "-p", str(os.getpid()),
                             "-o", str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # perf attaches before the loop starts
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    per_call = (time.perf_counter() - t0) / n
    perf.send_signal(2)
    perf.wait()
    print(f"\n== {name}: {n} calls, {per_call * 1e3:.1f} ms each, weights read at {weight_bytes / per_call / 1e9:.1f} GB/s")
    report = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", "dso,symbol",
                             "--percent-limit", "0.5"], capture_output=True, text=True).stdout
    lines = [ln for ln in report.splitlines() if ln.strip() and not ln.startswith("#")]
    print("\n".join(ln[:160] for ln in lines[:rows]))  # template names run to 400 characters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ref")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=PROMPT, help="prefill tokens (the decode phase follows PROMPT)")
    ap.add_argument("--out", type=Path, help="where perf's data goes (default: a temp folder)")
    ap.add_argument("--rows", type=int, default=1, help="decode steps of this many rows at once (a server's "
                    "batch: each row its own KV-cache row and position)")
    ap.add_argument("--bits", type=int, default=15, choices=(8, 15), help="activation bits of the CPU step and of the prefill chunk's r16 layers")
    ap.add_argument("--kv", default="bf16", choices=("fp32", "bf16", "int8"),
                    help="KV-cache dtype (bf16: what the plan picks on a CPU)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    entry = store.find(a.ref)
    model = load_model(entry, max(PROMPT + 512, a.prompt + 1), kv_dtype=a.kv)
    if a.rows > 1:  # as Engine.use_cache_rows
        cache = model.layers[0].attention.kv_cache
        model.setup_caches(cache.k.shape[2], batch=a.rows, dtype=model.norm.weight.dtype, device=cache.k.device,
                           kv_dtype=cache.k.dtype)
    decoder = choose_decoder(model)
    use_activation_bits(model, decoder, a.bits)  # the step and the prefill chunk's r16 layers
    weights = stored_weight_bytes(entry, probe("cpu"))
    print(f"{entry.ref}: {weights / 1e9:.2f} GB of weights, {a.threads} threads; "
          f"stream-read probe {stream_read_gb_s():.1f} GB/s")
    ids = prompt_ids(PROMPT, model.args.vocab_size)
    for r in range(a.rows):
        prefill(model, ids, 0, cache_row=r)  # warm-up: kernels, page cache
    pos = [PROMPT]

    def decode() -> None:
        if a.rows == 1:
            decode_one_token(decoder, 5, pos[0])
        else:
            decoder.decode(torch.full((a.rows,), 5), torch.full((a.rows,), pos[0]), torch.arange(a.rows))
        pos[0] = PROMPT + (pos[0] - PROMPT + 1) % 256  # stay inside the cache

    decode()
    out = a.out or Path(tempfile.mkdtemp(prefix="llamadesk-perf-"))
    out.mkdir(parents=True, exist_ok=True)
    perf_phase(f"decode step ({a.rows} row{'s' * (a.rows > 1)}, {a.bits}-bit x)", decode, a.seconds, weights, out)
    long_ids = prompt_ids(a.prompt, model.args.vocab_size)
    perf_phase(f"prefill ({a.prompt} tokens)", lambda: prefill(model, long_ids), a.seconds, weights, out)


if __name__ == "__main__":
    main()
