"""Where one decode step's time goes: prefill and decode tok/s, then a torch.profiler table.

    LLAMADESK_HOME=... python tests/bench/profile_decode.py smollm2-135m-instruct:int4 [--profile] [--breakdown]

--breakdown splits a token at 512 keys by timing its parts alone (best of 7 rounds): the whole
token (decode_one_token: token table, blocks and head in one compiled call), the compiled step over
every block at 512 keys and at 16 (the difference is attention's), each kind of the blocks' layers
alone through the extension's kernel for it (r16, GGUF, int4), and the head.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from app import store  # noqa: E402
from app.engine import choose_decoder, load_model  # noqa: E402
from model.generate import decode_one_token, prefill  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ref")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--breakdown", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model = load_model(store.find(a.ref), 1024)
    decoder = choose_decoder(model)
    ids = list(range(100, 612))
    t = time.perf_counter()
    prefill(model, ids)
    print(f"prefill 512: {512 / (time.perf_counter() - t):.1f} tok/s")
    prefill(model, ids[:16])
    t = time.perf_counter()
    for i in range(128):
        decode_one_token(decoder, 5, 16 + i)
    print(f"decode: {128 / (time.perf_counter() - t):.1f} tok/s")
    if a.breakdown:
        breakdown(model, decoder)
    if a.profile:
        from torch.profiler import profile

        with profile() as p:
            for i in range(32):
                decode_one_token(decoder, 5, 200 + i)
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def best(fn, n: int = 30, rounds: int = 7) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t) / n)
    return min(times)


def layer_call(ext, w, x: torch.Tensor):
    """One linear layer through the extension's kernel for its prepared weights (as the step runs
    it, less the step's own buffers); None for kinds that run torch's kernels there."""
    if w.kind == "r16":
        return lambda: ext.r16_linear(x, w.weight, w.scheme, w.out_features)
    if w.kind == "gguf":
        return lambda: ext.gguf_linear(x, w.weight, w.scheme)
    if w.kind == "int4":
        return lambda: ext.int4_linear(x, w.weight, w.scales, w.group_size, w.out_features)
    if w.kind == "rows":
        calls = [layer_call(ext, part, x) for part in w.parts]
        return None if None in calls else (lambda: [c() for c in calls])
    return None


@torch.inference_mode()
def breakdown(model, decoder) -> None:
    from quant import extension
    from quant.linear import prepared_weights

    prefill(model, list(range(100, 612)))  # 512 keys in the cache
    h = torch.randn(1, 1, model.args.dim)
    ext = extension.loaded_extension()
    layers: dict[str, list] = {}  # the blocks' layers by name, each a call of its kernel
    for block in model.layers:
        for name, mod in (("wqkv", block.attention.wqkv), ("wo", block.attention.wo),
                          ("w13", block.feed_forward.w13), ("w2", block.feed_forward.w2)):
            w = prepared_weights(mod)
            layers.setdefault(f"{name} ({w.kind} {w.scheme})".replace(" )", ")"), []).append(
                layer_call(ext, w, torch.randn(1, w.in_features)))
    head = prepared_weights(model.output)
    head_call = layer_call(ext, head, torch.randn(1, head.in_features)) or (lambda: model.output(h))
    parts = {
        "whole token (decode_one_token at 512 keys)": lambda: decode_one_token(decoder, 5, 511),
        "compiled step, every block, 512 keys": lambda: decoder.blocks.step(h, 511),
        "compiled step, every block, 16 keys": lambda: decoder.blocks.step(h, 15),
    }
    for name, calls in layers.items():
        if None not in calls:
            parts[f"{name} x {len(calls)} alone"] = lambda calls=calls: [c() for c in calls]
    parts[f"output head ({head.kind} {head.scheme}) alone"] = head_call
    ms = {k: best(f) * 1e3 for k, f in parts.items()}
    for k, v in ms.items():
        print(f"{k:45s} {v:7.3f} ms")
    whole, at512, at16 = (ms[k] for k in list(parts)[:3])
    kernels = sum(v for k, v in ms.items() if k.endswith(" alone") and not k.startswith("output"))
    print(f"{'attention over 512 keys (step 512 - step 16)':45s} {at512 - at16:7.3f} ms")
    print(f"{'rest of the step (norms, rope, torch layers)':45s} {at16 - kernels:7.3f} ms")
    print(f"{'outside the blocks (token table, head, Python)':45s} {whole - at512:7.3f} ms")
    print("(a layer alone reads a weight the previous call left in the caches: the sum of the layers"
          " is the compute, not the memory traffic, of a step)")


if __name__ == "__main__":
    main()
