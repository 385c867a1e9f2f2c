"""Real K-quant files made by llama.cpp's own quantizer, run as the plan runs them, against their
exact values; llama.cpp's own figure beside. Not in CI (needs llama-cpp-python).

    PYTHONPATH=/path/to/llama-cpp-python python tests/bench/real_gguf_check.py \
        [--gguf SOURCE.gguf] [--types Q4_K_M Q6_K Q8_0 Q2_K] [--tokens 2048] [--window 512]

For each type: llama.cpp quantizes an F32 GGUF of the source (the default model's Q4_1 file
widened by llama.cpp itself unless --gguf names another) to the type, and widens that file back
to F32 ("exact": the file's own dequantized values). Both are imported into a temporary home;
the plan picks a variant of the quantized model; its perplexity, KL and top-1 are measured
against the exact model's on the same tokens (quant.quality.compare), and llama.cpp's
perplexity of the quantized file on the same windows is printed beside. The issue's bounds:
perplexity within 0.2%, KL within 0.001 nats, top-1 at least 99.9%.
"""
from __future__ import annotations

import argparse
import ctypes
import math
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

DEFAULT_GGUF = Path.home() / ".cache" / "llamadesk" / "test-gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def llamacpp_quantize(src: Path, dst: Path, ftype_name: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{'ALL_F32' if ftype_name == 'F32' else 'MOSTLY_' + ftype_name}")
    params.allow_requantize = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama.cpp could not quantize {src} to {ftype_name} (rc {rc})")


def llamacpp_perplexity(gguf: Path, ids: list[int], window: int) -> float:
    """llama.cpp's perplexity over the same windows (each from position 0, every token scored but
    the first), as quant.quality.perplexity scores ours."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=window, n_batch=window, logits_all=True, n_threads=2, verbose=False)
    nll, n = 0.0, 0
    for s in range(0, len(ids) - 1, window):
        chunk = ids[s : s + window]
        if len(chunk) < 2:
            continue
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[: len(chunk) - 1], dtype=np.float64)  # (T-1, V)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= logp[np.arange(len(chunk) - 1), chunk[1:]].sum()
        n += len(chunk) - 1
    return math.exp(nll / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=DEFAULT_GGUF, help="the source GGUF (widened to F32 first)")
    ap.add_argument("--types", nargs="+", default=["Q4_K_M", "Q6_K", "Q8_0", "Q2_K"])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=512)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="real-gguf-"))
    os.environ["LLAMADESK_HOME"] = str(work / "home")

    import torch

    from app import store
    from app.cli import import_model
    from app.engine import load_model
    from app.plan import plan_installed
    from app.variants import text_ids
    from quant.quality import compare

    f32 = work / "source-f32.gguf"
    llamacpp_quantize(args.gguf, f32, "F32")
    print(f"{'type':8} {'plan runs':14} {'ppl exact':>10} {'ppl plan':>10} {'change':>8} {'KL nats':>9} "
          f"{'top-1':>7} {'llama.cpp ppl':>14} {'change':>8}")
    for t in args.types:
        q, exact = work / f"{t}.gguf", work / f"{t}-exact.gguf"
        llamacpp_quantize(f32, q, t)
        llamacpp_quantize(q, exact, "F32")
        name = t.lower().replace("_", "-")
        import_model(q, f"m-{name}")  # as `llamadesk import` does it
        import_model(exact, f"m-{name}-exact")
        plan = plan_installed(f"m-{name}").chosen
        ref_entry = store.find(f"m-{name}-exact:source")
        ids = text_ids(ref_entry, None, args.tokens)
        with torch.inference_mode():
            c = compare(load_model(ref_entry, args.window), load_model(store.find(plan.ref), args.window), ids,
                        args.window)
        lc = llamacpp_perplexity(q, ids, args.window)
        print(f"{t:8} {plan.variant:14} {c.ppl_reference:10.4f} {c.ppl_candidate:10.4f} {c.ppl_change:+8.3%} "
              f"{c.kl_mean:9.5f} {c.top1_agreement:7.2%} {lc:14.4f} {lc / c.ppl_reference - 1:+8.3%}", flush=True)


if __name__ == "__main__":
    main()
