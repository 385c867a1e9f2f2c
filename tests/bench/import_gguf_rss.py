"""Time and peak memory of `llamadesk import` on an 8B-shaped Q4_K_M-like GGUF of random blocks.

    python tests/bench/import_gguf_rss.py                  # Llama-3-8B's shape: a ~4.6 GB file
    python tests/bench/import_gguf_rss.py --layers 4       # the same tables, 4 of the 32 layers

The file has Llama 3 8B's shape (hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate
14336, vocab 128256) and llama.cpp's Q4_K_M mix: Q4_K matrices, Q6_K for attn_v, ffn_down and
the output head, F32 norms; every block is random bytes with finite fp16 scales. It is written
one tensor at a time (GGUFWriter's header, then each tensor's data), so the writer holds one
tensor, and imported in a child process (see child_rss.py) whose peak RSS and wall time are
printed beside the issue's bounds: under 3 minutes and 1.5 GB for the whole 8B.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from child_rss import REPO, StepResult, bench_parser, child_main, code_line, machine, machine_line, mib, run_step

BOUND_BYTES, BOUND_S = 1_500_000_000, 180
DIM, FFN, HEADS, KV_HEADS, VOCAB = 4096, 14336, 32, 8, 128256


def tensor_plan(layers: int) -> dict[str, tuple[str, tuple[int, int] | tuple[int]]]:
    """GGUF name -> (type, torch shape (N, K) or (D,)), in llama.cpp's order."""
    kv = KV_HEADS * DIM // HEADS
    plan = {"token_embd.weight": ("Q4_K", (VOCAB, DIM))}
    for i in range(layers):
        p = f"blk.{i}."
        plan.update({p + "attn_norm.weight": ("F32", (DIM,)), p + "attn_q.weight": ("Q4_K", (DIM, DIM)),
                     p + "attn_k.weight": ("Q4_K", (kv, DIM)), p + "attn_v.weight": ("Q6_K", (kv, DIM)),
                     p + "attn_output.weight": ("Q4_K", (DIM, DIM)), p + "ffn_norm.weight": ("F32", (DIM,)),
                     p + "ffn_gate.weight": ("Q4_K", (FFN, DIM)), p + "ffn_up.weight": ("Q4_K", (FFN, DIM)),
                     p + "ffn_down.weight": ("Q6_K", (DIM, FFN))})
    plan["output_norm.weight"] = ("F32", (DIM,))
    plan["output.weight"] = ("Q6_K", (VOCAB, DIM))
    return plan


# ---------------------------------------------------------------- the steps, each run in a child
def write_gguf(path: str, layers: int, seed: int = 0) -> dict:
    import gguf
    import numpy as np
    from transformers import LlamaConfig

    sys.path.insert(0, str(REPO / "tests"))
    from tiny_checkpoints import TOKENS, gguf_header, random_blocks

    c = LlamaConfig(hidden_size=DIM, num_hidden_layers=layers, num_attention_heads=HEADS,
                    num_key_value_heads=KV_HEADS, intermediate_size=FFN, vocab_size=VOCAB,
                    rms_norm_eps=1e-5, max_position_embeddings=8192,
                    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                    bos_token_id=TOKENS.index("<|begin_of_text|>"), eos_token_id=TOKENS.index("<|end_of_text|>"))
    out = Path(path)
    w = gguf_header(out, c, gguf.LlamaFileType.MOSTLY_Q4_K_M)
    # (the tiny tokenizer's 320 tokens name the first rows of the 128256-row table)
    plan = tensor_plan(layers)
    rng = np.random.default_rng(seed)
    for name, (qtype, shape) in plan.items():
        t = gguf.GGMLQuantizationType[qtype]
        if qtype == "F32":
            w.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4)
        else:
            block, size = gguf.GGML_QUANT_SIZES[t]
            nbytes = shape[0] * shape[1] // block * size
            w.add_tensor_info(name, (shape[0], shape[1] // block * size), np.dtype(np.uint8), nbytes, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, (qtype, shape) in plan.items():
        if qtype == "F32":
            w.write_tensor_data(rng.uniform(0.5, 1.5, size=shape).astype(np.float32))
        else:
            w.write_tensor_data(random_blocks(rng, qtype, shape))
    w.close()
    return {"size": out.stat().st_size}


def import_step(path: str, name: str) -> dict:
    from app.importer import import_checkpoint

    done = {"last": 0.0}

    def progress(i: int, total: int, what: str) -> None:
        if time.monotonic() - done["last"] > 10 or i == total:
            print(f"  importing {i}/{total} {what}", file=sys.stderr, flush=True)
            done["last"] = time.monotonic()

    entry = import_checkpoint(Path(path), name=name, replace=True, progress=progress)
    return {"ref": entry.ref, "files": len(entry.manifest["weights"]), "size": entry.size_bytes}


STEPS = {"write-gguf": write_gguf, "import": import_step}
PRELOAD = {"write-gguf": ("gguf",), "import": ("app.importer",)}


# ---------------------------------------------------------------- the parent
def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--layers", type=int, default=32, help="transformer layers (default 32, the 8B's)")
    parser.add_argument("--workdir", type=Path, help="where the file and the store go (default: a new temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir")
    args = parser.parse_args(argv)
    if args.child:
        child_main(STEPS, args.child, preload=PRELOAD[args.child[0]])
        return 0
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="llamadesk-gguf-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"random-llama3-8b-{args.layers}layers.Q4_K_M.gguf"
    try:
        write = run_step(__file__, "write-gguf", {"path": str(path), "layers": args.layers})
        imported = run_step(__file__, "import", {"path": str(path), "name": "random-8b"},
                            {"LLAMADESK_HOME": str(workdir / "home")})
        report(args.layers, write, imported)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def report(layers: int, write: StepResult, imported: StepResult) -> None:
    print(f"\nmachine: {machine_line(machine())}\ncode: {code_line()}")
    file_size, store_size = write.data["size"], imported.data["size"]
    print(f"8B-shaped Q4_K_M-like GGUF, {layers} of 32 layers: file {file_size / 1e9:.2f} GB, "
          f"store entry {store_size / 1e9:.2f} GB ({store_size / file_size:.3f}x)")
    print("| step | peak RSS (MiB) | wall (s) | load before | bound |")
    print("| --- | ---: | ---: | --- | --- |")
    for step, r in (("write the file", write), ("import", imported)):
        bound = ""
        if r is imported:
            ok = r.peak_rss < BOUND_BYTES and (layers < 32 or r.wall_s < BOUND_S)
            bound = f"< {mib(BOUND_BYTES)} MiB{' and 180 s' if layers == 32 else ''}: {'holds' if ok else 'EXCEEDED'}"
        print(f"| {step} | {mib(r.peak_rss)} | {r.wall_s:.0f} | {r.load_before} | {bound} |")


if __name__ == "__main__":
    sys.exit(main())
