"""A prompt's prefill with activations rounded to 15 and to 8 bits (quant.linear.set_activation_bits),
alternated in one process, so the machine's pace moves both alike.

    LLAMADESK_HOME=... python tests/bench/prefill_bits.py llama-1b:source [--tokens 128] [--rounds 8] [--threads 2]
    LLAMADESK_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 python tests/bench/prefill_bits.py ...   # the AVX2 path

Prints each setting's prefill times (ms, the first round a warm-up, left out of the median), its
median tokens/s, and 15-bit time over 8-bit time.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

from app import store  # noqa: E402
from app.bench import prompt_ids  # noqa: E402
from app.engine import choose_decoder, load_model  # noqa: E402
from model.generate import prefill  # noqa: E402
from quant.linear import set_activation_bits  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(store.find(a.model), a.tokens + 8)
    choose_decoder(model)  # loads the compiled kernels the r16 layers run on
    ids = prompt_ids(a.tokens, model.args.vocab_size)
    times: dict[int, list[float]] = {15: [], 8: []}
    for r in range(a.rounds):
        for bits in (15, 8) if r % 2 == 0 else (8, 15):
            if set_activation_bits(model, bits) == 0:
                sys.exit(f"{a.model} has no r16 layer here: nothing rounds activations")
            t0 = time.perf_counter()
            prefill(model, ids)
            times[bits].append(time.perf_counter() - t0)
    median = {b: statistics.median(t[1:]) for b, t in times.items()}
    for b in (15, 8):
        print(f"{b:2d} bits: {a.tokens / median[b]:.1f} tok/s (median of {a.rounds - 1}); ms: "
              + " ".join(f"{t * 1000:.0f}" for t in times[b]))
    print(f"15-bit time / 8-bit time: {median[15] / median[8]:.2f}")


if __name__ == "__main__":
    main()
