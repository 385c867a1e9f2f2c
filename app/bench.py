"""`llamadesk bench`: time to first token, prefill and decode speed, memory and achieved bandwidth.

Each figure is the median of several runs after a warm-up run, measured on the same prompt ids.
`--vs-llamacpp GGUF` runs llama-cpp-python (an optional extra) in the same process on the same
prompt and thread count, so the two are compared side by side on a machine in the same state.
"""
from __future__ import annotations

import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from model.generate import decode_one_token, prefill

from . import store
from .engine import choose_decoder, load_model, use_activation_bits
from .errors import UserError
from .plan import float_kv_dtype, stored_weight_bytes
from .threads import ThreadGovernor
from .devices import probe


@dataclass
class BenchResult:
    model: str
    variant: str
    device: str
    threads: int
    ttft_s: float
    prefill_tok_s: float
    decode_tok_s: float
    peak_mem_bytes: int
    gb_s: float
    isa: str = ""  # the compiled CPU step's path (avx512, avx2, generic); "" where it did not run
    activation_bits: int | None = None  # what the r16 kernels rounded x to (8, 15); None: none ran
    cpu_flags: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def prompt_ids(n: int, vocab: int) -> list[int]:
    """A fixed, ordinary-looking prompt: the same ids for every variant and engine."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(100, min(vocab, 30000), (n,), generator=g).tolist()


def bench_variant(entry: store.ModelEntry, prompt_tokens: int, gen_tokens: int, runs: int,
                  device: str = "cpu", precise: bool = False, progress=lambda done, total: None,
                  bits: int = 15) -> BenchResult:
    """Load `entry`, then runs + 1 rounds of prefill and decode (the first warms up and is
    dropped); medians of the rest. `progress(done, total)` is told after the load and each round;
    `bits`: what prompts and the decode step round activations to (Engine.set_activation_bits)."""
    ctx = prompt_tokens + gen_tokens + 1
    # the KV cache the plan gives an unconstrained load, so the figures are the app's
    model = load_model(entry, ctx, device, precise=precise, kv_dtype=float_kv_dtype(probe(device)))
    decoder = choose_decoder(model)
    took = use_activation_bits(model, decoder, bits)
    if device == "cpu":  # as chat, ask and serve decode: under the thread governor
        decoder = ThreadGovernor(decoder, torch.get_num_threads())
    ids = prompt_ids(prompt_tokens, model.args.vocab_size)
    ttfts, decodes = [], []
    progress(0, runs + 1)
    for run in range(runs + 1):  # the first run warms up caches and kernels, and is dropped
        t0 = time.perf_counter()
        logits = prefill(model, ids, decoder=decoder)
        token = int(logits.argmax())
        t1 = time.perf_counter()
        for pos in range(prompt_tokens, prompt_tokens + gen_tokens):
            token = int(decode_one_token(decoder, token, pos).argmax())
        t2 = time.perf_counter()
        if run:
            ttfts.append(t1 - t0)
            decodes.append(gen_tokens / (t2 - t1))
        progress(run + 1, runs + 1)
    ttft = statistics.median(ttfts)
    decode = statistics.median(decodes)
    dev = probe(device)
    weights = stored_weight_bytes(entry, dev)  # this variant's alone: another one damaged does not matter
    threads = decoder.threads if isinstance(decoder, ThreadGovernor) else torch.get_num_threads()
    return BenchResult(entry.name, entry.variant, device, threads, ttft, prompt_tokens / ttft,
                       decode, peak_rss(), weights * decode / 1e9, _isa(decoder), bits if took else None, dev.features)


def _isa(decoder) -> str:
    from quant.decode_cpu import CpuStepDecoder
    from quant.extension import loaded_extension

    decoder = getattr(decoder, "inner", decoder)  # under the thread governor
    return loaded_extension().isa() if isinstance(decoder, CpuStepDecoder) else ""


def stream_read_gb_s(n_bytes: int = 1 << 30, rounds: int = 5) -> float:
    """This machine's DRAM read bandwidth as the bench's threads see it (GB/s): the best of
    `rounds` sums over an fp32 buffer far larger than any cache. Decode reads every weight once
    a token, so this is the ceiling its GB/s column is measured against."""
    buf = torch.ones(n_bytes // 4)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return n_bytes / best / 1e9


def bench_llamacpp(gguf: str, prompt_tokens: int, gen_tokens: int, runs: int) -> BenchResult:
    try:
        from llama_cpp import Llama
    except ImportError:
        raise UserError("llama-cpp-python is not installed (pip install llama-cpp-python; it compiles for "
                        "several minutes)") from None
    threads = torch.get_num_threads()
    llm = Llama(model_path=gguf, n_ctx=prompt_tokens + gen_tokens + 8, n_threads=threads, n_threads_batch=threads,
                n_batch=512, verbose=False)
    ids = prompt_ids(prompt_tokens, llm.n_vocab())
    ttfts, decodes = [], []
    for run in range(runs + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        token = ids[-1]  # a decode step costs the same whatever the token
        for _ in range(gen_tokens):
            llm.eval([token])
        t2 = time.perf_counter()
        if run:
            ttfts.append(t1 - t0)
            decodes.append(gen_tokens / (t2 - t1))
    ttft = statistics.median(ttfts)
    size = os.path.getsize(gguf)
    decode = statistics.median(decodes)
    return BenchResult(os.path.basename(gguf), "llama.cpp", "cpu", threads, ttft, prompt_tokens / ttft, decode,
                       peak_rss(), size * decode / 1e9, "", 8, probe("cpu").features)  # its dot products take x as Q8


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench_all(refs: list[str], prompt_tokens: int, gen_tokens: int, runs: int, precise: bool = False,
              progress=lambda i, n, ref: None, bits: int = 15) -> tuple[list[BenchResult], list[tuple[str, str]]]:
    """Each variant in a child process of its own, so peak memory is that variant's alone.
    `progress(i, n, ref)` is told before each. Returns the results and, for each variant whose
    run failed (it does not fit, a file is damaged), (ref, the child's last error line): one
    variant's failure does not lose the others' figures."""
    import json
    import subprocess
    import sys

    results, failed = [], []
    for i, ref in enumerate(refs):
        progress(i, len(refs), ref)
        cmd = [sys.executable, "-m", "app.cli", "bench", ref, "--json", "--prompt-tokens", str(prompt_tokens),
               "--gen-tokens", str(gen_tokens), "--runs", str(runs), "--threads", str(torch.get_num_threads()),
               "--activation-bits", str(bits)]
        if precise:
            cmd.append("--precise")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            failed.append((ref, "failed: " + last.removeprefix("llamadesk: error: ")))
            continue
        results.extend(BenchResult(**d) for d in json.loads(proc.stdout)["results"])
    return results, failed
