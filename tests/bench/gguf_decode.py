"""Decode tok/s through the compiled CPU step of one random 256-aligned model in GGUF block types
against its `:int4` (the int4 packing of the same Q4_0 values), and the types without a native
kernel through their per-layer dequantize path.

    python tests/bench/gguf_decode.py [DIM [LAYERS [TOKENS [TYPES]]]]   (defaults 1024 8 32 all)

TYPES: a comma-separated subset of int4,q4_0,q4_1,q5_0,q8_0,q4_k,q6_k,q2_k,q3_k,q5_1,q5_k.

The model: DIM wide, FFN 2.75 DIM rounded to 256, DIM/64 heads of 64, a quarter as many KV
heads, a 4096-token vocabulary (a small head, so the layers decide), weights random blocks with
finite fp16 scales (tests/tiny_checkpoints.random_blocks). The table and head are Q8_0 for the
GGUF variants and grouped int8 for int4 (the same kernel). First one (4096 x 4096) layer's GEMV
alone, best of 30 calls; then the model. Each figure: TOKENS decode steps after
an 8-token prefill, the best of 5 runs; GB/s is the layers' bytes read per second.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402
import torch  # noqa: E402

from app import pull  # noqa: E402
from app.engine import choose_decoder  # noqa: E402
from model.args import ModelArgs  # noqa: E402
from model.generate import EagerDecoder, decode_one_token, prefill  # noqa: E402
from model.model import Transformer  # noqa: E402
from quant import extension  # noqa: E402
from quant.formats import pack_int4, pack_int8  # noqa: E402
from quant.ggml import dequantize_rows  # noqa: E402
from quant.linear import fuse_projections, repack_for_device, swap_linears  # noqa: E402
from tiny_checkpoints import random_blocks  # noqa: E402

# fp16 scales that keep random weights near 0.05 (see tests/test_gguf_kernels.py)
TYPE_SCALE = {"Q4_0": 0.006, "Q4_1": 0.004, "Q5_0": 0.003, "Q5_1": 0.002, "Q8_0": 4e-4, "Q2_K": 5e-3,
              "Q3_K": 5e-4, "Q4_K": 1e-4, "Q5_K": 5e-5, "Q6_K": 1.5e-5}
LINEAR = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w3",
          "feed_forward.w2")


def build(args: ModelArgs, scheme: str) -> tuple[Transformer, int]:
    """The model with every linear layer in `scheme` (a GGUF type, or "int4" of Q4_0 values);
    returns it and the layers' bytes."""
    rng = np.random.default_rng(0)
    with torch.device("meta"):
        model = Transformer(args)
    shapes = {n[: -len(".weight")]: tuple(t.shape) for n, t in model.state_dict().items() if t.dim() == 2}
    state = {n: torch.ones(t.shape) for n, t in model.state_dict().items() if t.dim() == 1}
    precision, layer_bytes = {}, 0
    for name, shape in shapes.items():
        if name in ("tok_embeddings", "output"):
            blocks = torch.from_numpy(random_blocks(rng, "Q8_0", shape, 4e-4))
            if scheme == "int4":
                precision[name] = "int8"
                state.update(pack_int8(dequantize_rows(blocks, "q8_0"), 32)[0].state_dict(name))
            else:
                precision[name] = "q8_0"
                state[f"{name}.blocks"] = blocks
            continue
        qtype = "Q4_0" if scheme == "int4" else scheme
        blocks = torch.from_numpy(random_blocks(rng, qtype, shape, TYPE_SCALE[qtype]))
        if scheme == "int4":
            precision[name] = "int4"
            packed = pack_int4(dequantize_rows(blocks, "q4_0"), 32, symmetric=True)[0]
            state.update(packed.state_dict(name))
            layer_bytes += sum(t.numel() * t.element_size() for t in packed.tensors.values())
        else:
            precision[name] = qtype.lower()
            state[f"{name}.blocks"] = blocks
            layer_bytes += blocks.numel()
    swap_linears(model, precision, group_size={n: 32 for n, s in precision.items() if s in ("int4", "int8")})
    model.load_state_dict(state, assign=True)
    fuse_projections(model)
    repack_for_device(model, "cpu")
    model.setup_caches(256)
    return model.eval(), layer_bytes


def load_kernels(threads: int):
    """The compiled extension with torch at `threads` threads, its path printed (kernel benches)."""
    ext = extension.load_extension(pull.cache_dir())
    if ext is None:
        raise SystemExit("the kernels did not compile here")
    torch.set_num_threads(threads)
    print(f"path {ext.isa()}, {threads} thread(s)\n")
    return ext


def best_of(fn, rounds: int) -> float:
    """The fastest of `rounds` calls of `fn` after one warm-up, in seconds: robust to a shared
    machine's load, which only ever slows a call."""
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@torch.inference_mode()
def gemv_table(n: int, k: int, rounds: int = 30) -> None:
    """One layer's GEMV, (n, k), best of `rounds` calls (robust to a shared machine's load):
    int4 in torch's packing through the step's own kernel, against each native GGUF type."""
    ext = extension.loaded_extension()
    rng = np.random.default_rng(1)
    x = torch.randn(1, k)
    print(f"\n| GEMV ({n} x {k}, 1 row) | us | GB/s |")
    print("| --- | --- | --- |")
    best = lambda fn: best_of(fn, rounds)  # noqa: E731

    q4 = torch.from_numpy(random_blocks(rng, "Q4_0", (n, k), TYPE_SCALE["Q4_0"]))
    packed = pack_int4(dequantize_rows(q4, "q4_0"), 32, symmetric=True)[0]
    from quant.linear import Int4Linear

    layer = Int4Linear(k, n, 32, device="meta")
    layer.load_state_dict({key.lstrip("."): v for key, v in packed.state_dict("").items()}, assign=True)
    layer.prepare("cpu")
    nbytes = sum(t.numel() * t.element_size() for t in packed.tensors.values())
    t = best(lambda: ext.int4_linear(x, layer.packed, layer.scales_and_zeros, 32, n))
    print(f"| int4 (step's kernel) | {t * 1e6:.0f} | {nbytes / t / 1e9:.1f} |", flush=True)
    for qtype in ("Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q6_K"):
        blocks = torch.from_numpy(random_blocks(rng, qtype, (n, k), TYPE_SCALE[qtype]))
        t = best(lambda: ext.gguf_linear(x, blocks, qtype.lower()))
        print(f"| {qtype.lower()} | {t * 1e6:.0f} | {blocks.numel() / t / 1e9:.1f} |", flush=True)


@torch.inference_mode()
def tok_per_s(model: Transformer, decoder, tokens: int) -> float:
    best = 0.0
    for _ in range(5):
        prompt = list(range(1, 9))
        prefill(model, prompt)
        t, start = 9, time.perf_counter()
        for i in range(tokens):
            decode_one_token(decoder, t, len(prompt) + i)
        best = max(best, tokens / (time.perf_counter() - start))
    return best


def main() -> None:
    dim = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    layers = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 32
    wanted = sys.argv[4].lower().split(",") if len(sys.argv) > 4 else None
    ffn = (int(dim * 2.75) + 255) // 256 * 256
    args = ModelArgs(dim=dim, n_layers=layers, n_heads=dim // 64, n_kv_heads=max(1, dim // 256), vocab_size=4096,
                     ffn_dim=ffn)
    extension.load_extension(pull.cache_dir())
    print(f"dim {dim}, {layers} layers, ffn {ffn}, {args.n_params / 1e6:.0f}M parameters; isa "
          f"{extension.chosen_isa()}, {torch.get_num_threads()} threads")
    gemv_table(4096, 4096)
    print("\n| layers | path | decode tok/s | layers' MB | GB/s |")
    print("| --- | --- | --- | --- | --- |")
    for scheme in ("int4", "Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q6_K", "Q2_K", "Q3_K", "Q5_1", "Q5_K"):
        if wanted and scheme.lower() not in wanted:
            continue
        model, nbytes = build(args, scheme)
        decoder = choose_decoder(model, "now")
        native = not isinstance(decoder, EagerDecoder)
        speed = tok_per_s(model, decoder, tokens if native else max(4, tokens // 8))
        path = "C++ step" if native else "eager, dequantized per layer"
        print(f"| {scheme.lower()} | {path} | {speed:.1f} | {nbytes / 1e6:.0f} | {speed * nbytes / 1e9:.1f} |",
              flush=True)
        del model, decoder


if __name__ == "__main__":
    main()
