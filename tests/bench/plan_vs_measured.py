"""The memory plan's estimate against the RSS a loaded, warmed-up model really adds.

    python tests/bench/plan_vs_measured.py
    python tests/bench/plan_vs_measured.py --variants int4 --contexts 8192

For each variant and context, a fresh child process runs what `llamadesk ask -v` runs:
`Engine.load(ref, ctx=..., device="cpu", verify=True)`, which loads the planned model, warms it up
with one prefill chunk at the far end of the context and measures the RSS growth since loading
began. The plan's weights + kv_cache + workspace is compared with that growth (the issue's bound:
within 15%). To tell which term is off, the child then splits the growth: the weights' pages in
RAM, pages of the mapped weight files that no tensor uses any more, the KV cache buffers, and the
rest; a separate child measures the one-time costs inside that rest (tokenizer, first model built
on the meta device).

To measure another checkout (e.g. the last commit beside uncommitted work), put it first on the
path: `git archive HEAD | tar -x -C /tmp/head; PYTHONPATH=/tmp/head python tests/bench/plan_vs_measured.py`.
The `code:` line under the table says which one was measured.

The default model is read from a copy of the per-machine test home (never written to).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from child_rss import bench_parser, StepResult, child_main, code_line, machine, machine_line, mib, proc_status, run_step

DEFAULT = "smollm2-135m-instruct"
BOUND = 0.15


# ---------------------------------------------------------------- the steps, run in a child
def load_step(ref: str, ctx: int) -> dict:
    """Engine.load with verify=True, then where the RSS growth sits.

    weights_resident: the pages of the loaded model's weights that this process has in RAM (a
    weight used in place from a memory-mapped file counts only its touched pages: an embedding
    table is read a row at a time). stale_file: pages of the mapped safetensors that no live tensor views any
    more, such as a portable weight that was repacked into a kernel layout at load: they stay in
    RAM as long as any tensor of the same file keeps the mapping alive. other_anon: anonymous
    growth beyond the weights and the KV cache (the tokenizer, the meta-device machinery, the
    warm-up's activations the allocator keeps)."""
    from app.engine import Engine
    from model.model import KVCache

    before = proc_status()
    engine = Engine.load(ref, ctx=ctx, device="cpu", verify=True)
    after = proc_status()
    model = engine.model
    kv = {id(m) for m in model.modules() if isinstance(m, KVCache)}
    weights, cache, seen = [], 0, set()
    for module in model.modules():
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if t is None:
                continue
            s = t.untyped_storage()
            if s.data_ptr() in seen:
                continue  # a tied head shares the embedding's storage
            seen.add(s.data_ptr())
            if id(module) in kv:
                cache += s.nbytes()
            else:
                weights.append((s.data_ptr(), s.nbytes()))
    mapped = _mapped_safetensors()
    in_file = [(p, n) for p, n in weights if any(a <= p < b for a, b, _ in mapped)]
    anon_weights = sum(n for p, n in weights) - sum(n for p, n in in_file)
    live_pages = _resident_pages(in_file)
    mapped_resident = sum(rss for _, _, rss in mapped)
    grown_anon = after["RssAnon"] - before["RssAnon"]
    return {"ref": engine.plan.ref, "ctx": engine.ctx, "plan": engine.plan.bytes,
            "measured": engine.measured_bytes, "report": engine.memory_report(),
            "weights": sum(n for _, n in weights), "kv_cache": cache,
            "weights_resident": anon_weights + live_pages, "stale_file": mapped_resident - live_pages,
            "other_anon": grown_anon - anon_weights - cache,
            "growth_anon": grown_anon, "growth_file": after["RssFile"] - before["RssFile"],
            "peak_growth": after["VmHWM"] - before["VmRSS"],
            "kernels": sorted({getattr(m, "kernel", "") for m in model.modules() if getattr(m, "kernel", "")})}


def _mapped_safetensors() -> list[tuple[int, int, int]]:
    """(start, end, resident bytes) of each mapping of a .safetensors file in this process."""
    out, current = [], None
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                start, end = (int(x, 16) for x in head[0].split("-"))
                current = (start, end) if len(head) > 5 and head[5].endswith(".safetensors") else None
            elif current and head[0] == "Rss:":
                out.append((*current, int(head[1]) * 1024))
    return out


def _resident_pages(ranges: list[tuple[int, int]]) -> int:
    """Bytes of the distinct pages under the given (address, length) ranges that this process has
    in RAM (the present bit of /proc/self/pagemap: mincore would also count pages that are only in
    the page cache)."""
    page = os.sysconf("SC_PAGE_SIZE")
    present = set()
    with open("/proc/self/pagemap", "rb") as f:
        for ptr, n in ranges:
            first = ptr // page
            count = (ptr + n + page - 1) // page - first
            f.seek(first * 8)
            entries = memoryview(f.read(count * 8)).cast("Q")
            present.update(first + i for i, e in enumerate(entries) if e >> 63)
    return len(present) * page


def fixed_costs_step(ref: str) -> dict:
    """One-time costs inside Engine.load's measurement that the plan books under `overhead`: the
    tokenizer with its chat format, and the first model built on the meta device (torch imports
    its meta-device machinery then)."""
    import torch

    from app import store
    from model.args import ModelArgs
    from model.chat_format import ChatFormat
    from model.model import Transformer
    from model.tokenizer import load_tokenizer

    entry = store.find(ref)
    before = proc_status()["VmRSS"]
    tokenizer = load_tokenizer(entry.path)
    ChatFormat.for_tokenizer(tokenizer, tokenizer.chat_template)
    middle = proc_status()["VmRSS"]
    modules = len(sys.modules)
    with torch.device("meta"):
        Transformer(ModelArgs.from_dict(entry.manifest["args"]))
    return {"tokenizer": middle - before, "meta_model": proc_status()["VmRSS"] - middle,
            "meta_model_modules": len(sys.modules) - modules}


STEPS = {"load": load_step, "fixed-costs": fixed_costs_step}
PRELOAD = {"load": ("app.engine",), "fixed-costs": ("app.engine",)}


# ---------------------------------------------------------------- the parent
def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--variants", default="source,int8,int4", help="default: source,int8,int4")
    parser.add_argument("--contexts", default="2048,8192", help="default: 2048,8192")
    parser.add_argument("--default-home", type=Path,
                        help="the store holding smollm2-135m-instruct (default: the per-machine test home); "
                             "copied first")
    parser.add_argument("--json", type=Path, help="also write every result here")
    args = parser.parse_args(argv)
    if args.child:
        child_main(STEPS, args.child, preload=PRELOAD[args.child[0]])
        return 0

    from app import pull, store  # light: no torch

    source_home = args.default_home or pull.cache_dir() / f"test-home-v{store.FORMAT_VERSION}"
    variants = args.variants.split(",")
    missing = [v for v in variants if not (source_home / "models" / DEFAULT / v).is_dir()]
    if missing:
        raise SystemExit(f"{source_home} lacks {DEFAULT}:{','.join(missing)}; "
                         f"run the e2e tests once or pass --default-home")
    results: list[tuple[str, int, StepResult]] = []
    with tempfile.TemporaryDirectory(prefix="llamadesk-planbench-") as tmp:
        home = Path(tmp)
        for v in variants:
            shutil.copytree(source_home / "models" / DEFAULT / v, home / "models" / DEFAULT / v)
        for v in variants:
            for ctx in map(int, args.contexts.split(",")):
                r = run_step(__file__, "load", {"ref": f"{DEFAULT}:{v}", "ctx": ctx}, {"LLAMADESK_HOME": str(home)})
                print(r.data["report"], file=sys.stderr)
                results.append((v, ctx, r))
        fixed = run_step(__file__, "fixed-costs", {"ref": f"{DEFAULT}:{variants[0]}"}, {"LLAMADESK_HOME": str(home)})
    report(results, fixed.data, args)
    return 0


def report(results: list[tuple[str, int, StepResult]], fixed: dict, args) -> None:
    print(f"\nmachine: {machine_line(machine())}\ncode: {code_line()}\n")
    print("| variant | ctx | planned: weights + KV + workspace = total (MiB) | measured RSS growth (MiB) "
          "| difference | within 15% | load before run |")
    print("| --- | ---: | --- | ---: | ---: | --- | --- |")
    for v, ctx, r in results:
        b, measured = r.data["plan"], r.data["measured"]
        total = b["weights"] + b["kv_cache"] + b["workspace"]
        diff = measured / total - 1
        print(f"| {v} | {ctx} | {mib(b['weights'])} + {mib(b['kv_cache'])} + {mib(b['workspace'])} = {mib(total)} "
              f"| {mib(measured)} | {diff * 100:+.1f}% | {'yes' if abs(diff) <= BOUND else 'NO'} | {r.load_before} |")
    print("\nterm by term (MiB): the plan against where the measured growth sits\n")
    print("| variant | ctx | weights: planned / tensors / resident | stale file pages | KV: planned / held "
          "| workspace planned | rest of growth | peak growth | kernels |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for v, ctx, r in results:
        b, d = r.data["plan"], r.data
        rest = d["measured"] - d["weights_resident"] - d["stale_file"] - d["kv_cache"]
        print(f"| {v} | {ctx} | {mib(b['weights'])} / {mib(d['weights'])} / {mib(d['weights_resident'])} "
              f"| {mib(d['stale_file'])} | {mib(b['kv_cache'])} / {mib(d['kv_cache'])} | {mib(b['workspace'])} "
              f"| {mib(rest)} | {mib(d['peak_growth'])} | {', '.join(d['kernels']) or 'float'} |")
    print(f"\nresident: the weights' pages this process has in RAM (pagemap). stale file pages: pages of the "
          f"mapped safetensors that no live tensor views (weights copied or repacked at load), kept while any "
          f"tensor of the file lives. rest: measured - resident - stale - KV; it holds one-time costs measured "
          f"alone in a fresh child: the tokenizer and chat format {mib(fixed['tokenizer'])} MiB, the first "
          f"model built on the meta device {mib(fixed['meta_model'])} MiB ({fixed['meta_model_modules']} modules "
          f"imported); what is left is the warm-up's activations and allocator slack")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "code": code_line(), "fixed_costs": fixed,
                                         "results": [{"variant": v, "ctx": ctx, "load_before": r.load_before,
                                                      "wall_s": r.wall_s, **r.data}
                                                     for v, ctx, r in results]}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
