"""Our grouped int8 against llama.cpp's own Q8_0 of the same source, scored alike.

    PYTHONPATH=/work/llamacpp-avx2 LLAMADESK_HOME=/tmp/somewhere \
        python tests/bench/int8_vs_q8_0.py SOURCE.gguf [TOKENS]

SOURCE.gguf (the default model's Q4_1 file, an F16 or F32 GGUF) is imported as the source of
a model "int8-vs-q8" in LLAMADESK_HOME (use a scratch one). llama.cpp's quantizer
(`llama_cpp.llama_model_quantize`, Q8_0, requantizing: it dequantizes a quantized source's
blocks to fp32 first, so both start from the same values) writes a Q8_0 file of the source's
GGUF; that file is imported as it is (its blocks, exactly) and `quantize --scheme int8` makes our
int8 from the source. Both are then scored as `llamadesk eval` scores (quant.quality: fp32
logits over 512-token windows of the same tokens of Python's English reference text) against the
source: perplexity, KL and top-1 agreement. The issue's bound: int8 no worse than Q8_0 by more
than 0.1 point of top-1 or 0.1% of perplexity.
"""
import ctypes
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from app.engine import load_model  # noqa: E402
from app.importer import import_checkpoint  # noqa: E402
from app.variants import quantize_variant, text_ids  # noqa: E402
from quant.quality import compare_all  # noqa: E402
from quant.quantize import QuantOptions  # noqa: E402

LLAMA_FTYPE_MOSTLY_Q8_0 = 7  # llama.h's enum llama_ftype


def llamacpp_q8_0(src: Path, dst: Path) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True  # a quantized source: dequantized to fp32, then Q8_0
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc})")


def main() -> None:
    gguf_path = Path(sys.argv[1])
    tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
    name = "int8-vs-q8"
    source = import_checkpoint(gguf_path, name, replace=True)
    with tempfile.TemporaryDirectory() as tmp:
        q8_path = Path(tmp) / "q8_0.gguf"
        t0 = time.perf_counter()
        llamacpp_q8_0(gguf_path, q8_path)
        q8 = import_checkpoint(q8_path, f"{name}-llamacpp", replace=True)
        print(f"llama.cpp Q8_0: {q8_path.stat().st_size / 1e6:.1f} MB, imported as {q8.ref} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    int8 = quantize_variant(name, QuantOptions("int8"), replace=True, report_tokens=0)
    ids = text_ids(source, None, tokens)
    print(f"scoring {len(ids)} tokens in 512-token windows", flush=True)
    reference = load_model(source, 512)
    ours, theirs = load_model(int8, 512), load_model(q8, 512)
    ours_c, theirs_c = compare_all(reference, [ours, theirs], ids, 512)
    print("| variant | perplexity | vs source | KL (nats) | top-1 agreement |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| source | {ours_c.ppl_reference:.4f} | | | |")
    for label, c in (("int8 (ours, fp16 scale per 32)", ours_c), ("llama.cpp Q8_0", theirs_c)):
        print(f"| {label} | {c.ppl_candidate:.4f} | {c.ppl_change:+.3%} | {c.kl_mean:.5f} | {c.top1_agreement:.2%} |")
    dppl = ours_c.ppl_candidate / theirs_c.ppl_candidate - 1
    dtop = (ours_c.top1_agreement - theirs_c.top1_agreement) * 100
    ok = dppl <= 0.001 and dtop >= -0.1
    print(f"int8 vs Q8_0: perplexity {dppl:+.3%}, top-1 {dtop:+.2f} points: "
          f"{'within' if ok else 'OUTSIDE'} the bound (0.1%, 0.1 point)")


if __name__ == "__main__":
    main()
