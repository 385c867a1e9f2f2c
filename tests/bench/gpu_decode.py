"""Decode speed and memory of Llama-3-8B-shaped variants on a GPU: bf16, int8, int4 and NF4, one run.

Each variant gets random weights in its own packed format (made on the GPU, no download, no files),
handed on the CPU to the app's build_model as a loaded file's tensors would be: the same layers,
kernels, decode step and memory path as `llamadesk chat` on that variant. Then, at batch 1:

- memory: the plan's estimate (app/plan.py) against torch.cuda.max_memory_allocated over build,
  a 512-token prefill and decoding;
- decode tokens/s three ways: eager blocks, the static step as a CUDA graph, and that graph with
  its blocks compiled (the app's default); achieved GB/s = weight bytes read per token x tokens/s;
- with --cap: the int4 variant under set_per_process_memory_fraction at the context the plan
  says fits, prefilled at the far end of that context.

    python tests/bench/gpu_decode.py --out gpu.json
    python tests/bench/gpu_decode.py --device cpu --small        # the same logic, tiny, on a CPU
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from app.devices import Device, probe_cuda  # noqa: E402
from app.engine import build_model, choose_decoder  # noqa: E402
from app.plan import breakdown, catalog_candidate, longest_context  # noqa: E402
from model.args import ModelArgs  # noqa: E402
from model.generate import EagerDecoder, decode_one_token, prefill  # noqa: E402
from model.static_decode import StaticDecode  # noqa: E402
from quant.formats import pack_nf4  # noqa: E402
from quant.linear import PACKED_MODULES  # noqa: E402
from quant.quantize import QuantOptions, precision_map  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_llama3_8b_variants import LLAMA3_8B, random_packed, shapes  # noqa: E402

SMALL = ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=1024, ffn_dim=512, max_seq_len=2048)
H100_BW = 3.35e12  # bytes/s, the H100 SXM's HBM3


def random_state(args: ModelArgs, variant: str, device: str, group: int) -> tuple[dict | None, dict]:
    """(layout, state dict on the CPU) of a random variant: "bf16", "int8", "int4" or "nf4"."""
    g = torch.Generator(device).manual_seed(0)
    state, layout = {}, None
    if variant != "bf16":
        pmap = precision_map(args, QuantOptions("int4" if variant == "nf4" else variant, group_size=group, head="int8"))
        layout = {}
    for module, (n, k) in shapes(args).items():
        if layout is None:
            w = torch.randn(n, k, generator=g, device=device, dtype=torch.bfloat16) * 0.02
            state[f"{module}.weight"] = w.cpu()
            continue
        scheme = pmap[module]
        if variant == "nf4" and scheme == "int4":
            packed, _ = pack_nf4(torch.randn(n, k, generator=g, device=device) * 0.02)
            tensors, scheme, grp = packed.tensors, "nf4", 64
        else:
            grp = group if scheme == "int4" else k
            tensors = random_packed(scheme, n, k, grp, g)
        state.update({f"{module}.{s}": t.cpu() for s, t in tensors.items()})
        layout[module] = {"scheme": scheme, "group_size": grp}
    for i in range(args.n_layers):
        state[f"layers.{i}.attention_norm.weight"] = torch.ones(args.dim)
        state[f"layers.{i}.ffn_norm.weight"] = torch.ones(args.dim)
    state["norm.weight"] = torch.ones(args.dim)
    return layout, state


def device_weight_bytes(model: torch.nn.Module, device: torch.device) -> int:
    """Bytes of weights resident on `device` (KV caches excluded): what a decode step reads."""
    seen, total = set(), 0
    for module in model.modules():
        tensors = list(module._parameters.values()) + list(module._buffers.values())
        if isinstance(module, PACKED_MODULES) and getattr(module, "quant_state", None) is not None:
            qs = module.quant_state
            tensors += [qs.absmax] + ([qs.state2.absmax, qs.state2.code] if qs.nested else [])
        for t in tensors:
            if t is None or t.device.type != device.type or t.data_ptr() in seen:
                continue
            if any(t is getattr(layer.attention.kv_cache, n, None) for layer in model.layers
                   for n in ("k", "v", "k_scale", "v_scale")):
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def time_decode(model, decoder, prompt: list[int], gen: int, runs: int) -> tuple[float, list[int]]:
    """Median decode tokens/s over `runs` (after one warm-up), and the greedy tokens of the last."""
    speeds = []
    for run in range(runs + 1):
        token = int(prefill(model, prompt).argmax())
        sync(model.norm.weight.device)
        t0 = time.perf_counter()
        tokens = []
        for pos in range(len(prompt), len(prompt) + gen):
            token = int(decode_one_token(decoder, token, pos).argmax())
            tokens.append(token)
        if run:
            speeds.append(gen / (time.perf_counter() - t0))
    return statistics.median(speeds), tokens


def bench_variant(args, variant, device, group, prompt_len, gen, runs, eager_gen, deadline) -> dict:
    dev = torch.device(device)
    t0 = time.perf_counter()
    layout, state = random_state(args, variant, device, group)
    t_make = time.perf_counter() - t0
    ctx = prompt_len + gen + 8
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    model = build_model(args, layout, state, ctx, device, kv_dtype="bf16" if dev.type == "cuda" else None)
    decoder = choose_decoder(model, "now", say=lambda m: print("  ", m, flush=True))
    sync(dev)
    t_build = time.perf_counter() - t0
    prompt = torch.randint(100, args.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    row = {"variant": variant, "group": group if variant == "int4" else None, "make_s": round(t_make, 1),
           "build_and_compile_s": round(t_build, 1), "graph": type(decoder).__name__,
           "compiled": getattr(decoder, "compiled", False)}
    tok_s, compiled_tokens = time_decode(model, decoder, prompt, gen, runs)
    row["decode_tok_s_compiled_graph"] = round(tok_s, 1)
    weights = device_weight_bytes(model, dev)
    row["weight_bytes_on_device"] = weights
    row["gb_s"] = round(weights * tok_s / 1e9, 1)
    row["fraction_of_h100_bw"] = round(weights * tok_s / H100_BW, 3)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
        gpu = probe_cuda()[0]
        name = {"bf16": "source"}.get(variant, variant)
        est = breakdown(catalog_candidate("llama3-8b", args, name, gpu, group), ctx, gpu, "bf16")
        row["plan_weights"] = est["weights"]
        row["plan_estimate"] = est["weights"] + est["kv_cache"] + est["workspace"] + est["overhead"]
        row["measured_peak_allocated"] = peak
        row["peak_vs_estimate_pct"] = round((peak / row["plan_estimate"] - 1) * 100, 1)
    if time.perf_counter() < deadline:
        graph = StaticDecode(model, compile=False) if dev.type == "cuda" else EagerDecoder(model)
        row["decode_tok_s_graph"] = round(time_decode(model, graph, prompt, gen, runs)[0], 1)
        tok_s, eager_tokens = time_decode(model, EagerDecoder(model), prompt, eager_gen, 1)
        row["decode_tok_s_eager"] = round(tok_s, 1)
        n = min(len(eager_tokens), len(compiled_tokens))
        row["greedy_equal_eager"] = f"{sum(a == b for a, b in zip(eager_tokens, compiled_tokens[:n]))}/{n}"
        sync(dev)
        t0 = time.perf_counter()
        prefill(model, prompt)
        sync(dev)
        row["prefill_tok_s"] = round(prompt_len / (time.perf_counter() - t0), 1)
    del model
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


def under_cap(args, device, group, cap_gib: float) -> dict:
    """int4 at the context the plan allows under a `cap_gib` process cap, prefilled at its far end."""
    total = torch.cuda.get_device_properties(0).total_memory
    cap = int(cap_gib * 2**30)
    torch.cuda.empty_cache()
    left = torch.cuda.memory_allocated()  # what earlier variants left behind, if anything
    gpu = Device("cuda", "capped", cap, cap - left, torch.cuda.get_device_capability())
    c = catalog_candidate("llama3-8b", args, "int4", gpu, group)
    ctx = longest_context(c, gpu, "bf16")
    row = {"cap_gib": cap_gib, "plan_ctx": ctx, "allocated_before": left}
    if not ctx:
        return row
    torch.cuda.set_per_process_memory_fraction(cap / total)
    torch.cuda.reset_peak_memory_stats()
    try:
        layout, state = random_state(args, "int4", device, group)
        model = build_model(args, layout, state, ctx, device, kv_dtype="bf16")
        with torch.inference_mode():
            model(torch.zeros((1, 512), dtype=torch.long), ctx - 512 - 1, last_only=True)
            model(torch.zeros((1, 1), dtype=torch.long), ctx - 1)
        torch.cuda.synchronize()
        row["ok"] = True
    except torch.OutOfMemoryError as e:
        row["ok"] = False
        row["error"] = str(e).splitlines()[0][:200]
    row["peak_allocated"] = torch.cuda.max_memory_allocated()
    est = breakdown(c, ctx, gpu, "bf16")
    row["plan_total_without_margin"] = sum(v for k, v in est.items() if k != "margin")
    torch.cuda.set_per_process_memory_fraction(1.0)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="a tiny model of the same structure (logic checks)")
    ap.add_argument("--variants", default="int4,bf16,int8,nf4")
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--eager-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cap", type=float, default=0, help="also run int4 under this many GiB (0: skip)")
    ap.add_argument("--budget-s", type=float, default=420, help="skip optional steps after this long")
    ap.add_argument("--out", help="write the rows here as JSON (rewritten after each variant)")
    a = ap.parse_args()
    deadline = time.perf_counter() + a.budget_s
    args = SMALL if a.small else LLAMA3_8B
    rows = []
    if a.device.startswith("cuda"):
        rows.append({"device": torch.cuda.get_device_name(), "torch": torch.__version__})
    for variant in a.variants.split(","):
        if time.perf_counter() > deadline:
            rows.append({"variant": variant, "skipped": "budget"})
            continue
        print(f"== {variant}", flush=True)
        try:
            rows.append(bench_variant(args, variant, a.device, a.group, a.prompt_tokens, a.gen_tokens, a.runs,
                                      a.eager_tokens, deadline))
        except Exception as e:  # one variant's failure must not cost the others' figures
            import traceback

            traceback.print_exc()
            rows.append({"variant": variant, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            gc.collect()
        print(json.dumps(rows[-1]), flush=True)
        if a.out:
            Path(a.out).write_text(json.dumps(rows, indent=1))
    if a.cap and a.device.startswith("cuda") and time.perf_counter() < deadline:
        try:
            rows.append(under_cap(args, a.device, a.group, a.cap))
        except Exception as e:
            rows.append({"cap": a.cap, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        print(json.dumps(rows[-1]), flush=True)
        if a.out:
            Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
