"""`llamadesk` subcommands. Each parses its flags and calls one typed function.

Diagnostics go to stderr, answers to stdout; every error a user can cause ends as one line
`llamadesk: error: ...` and a non-zero exit status, never a traceback.
"""
from __future__ import annotations

import argparse
import re
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from model.chat_format import BUILT_IN

from . import pull, store
from .errors import UserError
from .plan import KV_DTYPES

if TYPE_CHECKING:
    from model.generate import SamplingParams


def _console(stderr: bool = False, **options) -> Console:
    """A rich console that honours NO_COLOR (https://no-color.org) as no styling at all: rich
    alone drops only the colours and keeps bold and underline escapes. Off a terminal, tables
    are 160 columns wide rather than rich's 80."""
    if os.environ.get("NO_COLOR"):
        options["color_system"] = None
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, highlight=False, width=None if stream.isatty() else 160, **options)


err = _console(stderr=True, soft_wrap=True)
# the errors a user's input or files cause, by module: torch, textual and rich.progress are
# imported only by the commands that need them (`--help`, `list` and `plan` answer in a blink),
# and an error class whose module was never imported cannot have been raised
USER_ERRORS = {"model.args": "ConfigError", "model.chat_format": "ChatTemplateError",
               "model.checkpoints": "CheckpointError", "model.tokenizer": "TokenizerError"}


def _user_errors() -> tuple[type[BaseException], ...]:
    loaded = (getattr(sys.modules[m], name) for m, name in USER_ERRORS.items() if m in sys.modules)
    return (UserError, *loaded)


def _progress():
    """A transient progress bar on stderr: description, bar, done/total, elapsed (see _Steps for
    what a long command shows off a terminal)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # the description names files and models: data, never markup
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=err, transient=True)


def say(msg: str) -> None:
    err.print(msg, markup=False)


class _Steps:
    """A long command's steps on stderr. Each step is said once, on its own line. On a terminal a
    transient bar under the lines shows the running step's progress and its elapsed time, so a step
    without progress (compiling) still shows that it is running; off a terminal (a log, a pipe) a
    long step adds a line with done/total every LINE_EVERY_S seconds, and nothing is redrawn."""

    LINE_EVERY_S = 10.0

    def __init__(self) -> None:
        import time

        self.bar = _progress() if err.is_terminal else None
        self.task = None
        self._clock = time.monotonic
        self._step_start = self._last_line = self._clock()

    def __enter__(self) -> "_Steps":
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def say(self, line: str) -> None:
        """A new step (or a result): said once; the bar restarts under it, with its own clock."""
        say(line)
        self._step_start = self._last_line = self._clock()
        if self.bar is not None:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task(line[:48], total=None)

    def progress(self, done: int, total: int, what: str) -> None:
        if self.bar is None:
            now = self._clock()
            if now - self._last_line >= self.LINE_EVERY_S:
                self._last_line = now
                say(f"  {what[:60]} {done}/{total} [{now - self._step_start:.0f} s]")
            return
        if self.task is None:
            self.task = self.bar.add_task(what[:48], total=None)
        self.bar.update(self.task, completed=done, total=total, description=what[:48])


def _loading(ref: str | None):
    """A transient "Loading REF" spinner on a terminal's stderr while a model loads (seconds on a
    large one); nothing off a terminal, where `ask`'s stderr stays for errors."""
    import contextlib

    from rich.text import Text

    return err.status(Text(f"Loading {ref}" if ref else "Loading the model"), spinner="dots") if err.is_terminal else contextlib.nullcontext()


# ---------------------------------------------------------------- pull / import / list / rm
def import_model(path: Path, name: str | None, replace: bool = False, keep_float: bool = False) -> store.ModelEntry:
    """`llamadesk import`: the source, then what makes it ready to chat (packed variants of a
    float source), a float copy of a GGUF's blocks if asked, and one quality line."""
    from .importer import import_checkpoint

    with _Steps() as steps:
        said = False

        def converting(done: int, total: int, what: str) -> None:
            # said once the file has opened as a checkpoint: a refused one gets its error line alone
            nonlocal said
            if not said:
                said = True
                steps.say(f"Converting {path.name}")
            steps.progress(done, total, f"Converting {what}")

        source = import_checkpoint(path, name=name, replace=replace, progress=converting, say=steps.say)
        steps.say(f"Installed {source.ref} in {source.path} ({source.size_bytes / 1e6:.0f} MB)")
        return ready_to_chat(source, steps, replace, keep_float)


def ready_to_chat(source: store.ModelEntry, steps: _Steps, replace: bool = False,
                  keep_float: bool = False) -> store.ModelEntry:
    """After an import or a Hub pull: packed variants of a float source (or a float copy of a
    GGUF's blocks if asked), and one quality line."""
    from .variants import make_chat_variants, quick_quality, write_float_copy

    if keep_float and source.manifest.get("quant"):
        steps.say(f"Writing {source.name}:float (the file's values as fp32)")
        steps.say(f"Installed {write_float_copy(source, replace=replace, progress=steps.progress).ref}")
    if source.manifest.get("quant"):  # a GGUF's blocks: packed already, and exactly the file's values
        return source
    made = make_chat_variants(source, replace=replace, say=steps.say,
                              progress=lambda d, t, w: steps.progress(d, t, f"Packing {w}"))
    for entry in made:
        say(f"Packed {entry.ref} ({entry.size_bytes / 1e6:.0f} MB)")
    if made:  # block by block (app.blockwise): one block in memory, tokens bounded by the size
        steps.say(f"Measuring {made[-1].ref} against {source.ref}")
        q = quick_quality(source, made[-1], progress=lambda d, t, w: steps.progress(d, t, f"Measuring {w}"))
        say(f"{made[-1].ref} against {source.ref} on {q['tokens']} tokens: perplexity {q['ppl_reference']:.3f} -> "
            f"{q['ppl_candidate']:.3f} ({q['ppl_change'] * 100:+.2f}%), top-1 agreement {q['top1_agreement'] * 100:.1f}%")
    return source


def pull_model(name: str | None = None, replace: bool = False) -> store.ModelEntry:
    """`llamadesk pull`: a catalog model (app.pull.pull_model), or a Hub repo (app.hub) made
    ready to chat as an import is; each step said on stderr (and, on a terminal, its progress and
    elapsed time)."""
    from .hub import parse_hub_ref, pull_from_hub

    ref = parse_hub_ref(name) if name else None
    with _Steps() as steps:
        if ref is None:
            return pull.pull_model(name, replace, say=steps.say, progress=steps.progress)
        source = pull_from_hub(ref, replace, say=steps.say, progress=steps.progress)
        steps.say(f"Installed {source.ref} in {source.path} ({source.size_bytes / 1e6:.0f} MB); "
                  f"`--model {ref.alias}` names it")
        return ready_to_chat(source, steps, replace)


def ensure_model(ref: str | None) -> str | None:
    """The model asked for; None lets the plan choose among what is installed. With nothing
    installed, the default model is pulled first."""
    if ref:
        store.find(ref)  # a name that is not installed says so now, not after a first compile (~30 s)
        return ref
    if store.list_entries():
        return None
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
        source = e.manifest.get("source", {})
        pulled = f" ({source['hub']['alias']})" if "hub" in source else ""  # what --model also takes
        print(f"{e.ref:40} {e.size_bytes / 1e6:7.0f}MB  {n / 1e6:6.0f}M  {source.get('format', '?')}{pulled}")


# ---------------------------------------------------------------- quantize / eval
def quantize(ref: str, scheme: str, group_size: int, out: str | None, head: str, embeddings: str,
             replace: bool, report: bool = True) -> int:
    from quant.quantize import QuantOptions

    from .variants import REPORT_TOKENS, quantize_variant

    try:
        opts = QuantOptions(scheme, group_size=group_size, head=head, embeddings=embeddings)
    except ValueError as e:
        raise UserError(str(e)) from None
    report_tokens = REPORT_TOKENS if report else 0
    name, variant = store.parse_ref(ref)
    store.find(f"{name}:{variant or store.SOURCE}")  # a name that is not installed: its error line alone
    with _Steps() as steps:
        steps.say(f"Packing {ref} to {scheme}")
        measuring = {"said": False}

        def progress(done: int, total: int, what: str) -> None:
            # the packing's last call says "done"; the quality report's calls come after it
            if what == "done" and report_tokens and not measuring["said"]:
                measuring["said"] = True
                steps.say(f"Measuring quality on {report_tokens} tokens of Python's reference text")
            elif what != "done":
                steps.progress(done, total, f"{'Scoring' if measuring['said'] else 'Packing'} {what}")

        entry = quantize_variant(ref, opts, out, replace=replace, progress=progress, report_tokens=report_tokens)
    report = entry.manifest["quant"]["report"]
    rows = report["tensors"]
    worst = min(rows, key=lambda r: r["sqnr_db"])
    lossy = [r["sqnr_db"] for r in rows if r["sqnr_db"] != float("inf")]
    exact = f"{len(rows) - len(lossy)} exact" if len(lossy) < len(rows) else ""
    if not lossy:  # a GGUF's own blocks repacked: every value kept
        say(f"Packed {len(rows)} weights, every one exact (the source's own values)")
    else:
        say(f"Packed {len(rows)} weights: SQNR {min(lossy):.1f} to {max(lossy):.1f} dB" + (f", {exact}" if exact else "")
            + f" (worst: {worst['name']}, relative error {worst['rel_err']:.4f})")
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

    with _Steps() as steps:  # a bar on a terminal; off one, a line every 10 s of a long run
        steps.progress(0, 0, f"Loading {ref}")  # on a terminal only: the bar shows while it loads
        entry, n, ppl = eval_model(ref, text, tokens, window, progress=lambda done, total, what: steps.progress(
            done, total, f"Scoring tokens ({what})"))
    print(f"{entry.ref}: perplexity {ppl:.4f} over {n} tokens ({window}-token windows)")
    return 0


# ---------------------------------------------------------------- bench
def bench(ref: str | None, prompt_tokens: int, gen_tokens: int, runs: int, threads: int | None, as_json: bool,
          vs_llamacpp: str | None, precise: bool, activation_bits: int = 15) -> int:
    import contextlib
    import json

    import torch
    from rich.table import Table
    from rich.text import Text

    from . import bench as b
    from .devices import inference_threads

    torch.set_num_threads(inference_threads(threads))  # the rule chat, ask and serve use
    skipped: list[tuple[str, str]] = []
    if ref and ":" in ref:
        entry = store.find(ref)
        # as bench_all's child (--json) no bar: the parent shows the progress
        with contextlib.nullcontext() if as_json else _progress() as bar:
            task = bar.add_task(f"Loading {entry.ref}", total=runs + 1) if bar else None

            def progress(done: int, total: int) -> None:
                if bar:
                    bar.update(task, completed=done, description=f"Benchmarking {entry.ref} (a warm-up round, then {runs})")

            results = [b.bench_variant(entry, prompt_tokens, gen_tokens, runs, precise=precise, progress=progress,
                                       bits=activation_bits)]
    else:
        name = store.parse_ref(ref)[0] if ref else None
        refs = [e.ref for e in store.list_entries() if name is None or e.name == name]
        if not refs:
            raise UserError("no model installed to benchmark; run `llamadesk pull`")
        runnable = [r for r in refs if not r.endswith(":nf4")] or refs
        skipped = [(r, "nf4 runs through bitsandbytes on the CPU, ~8x slower than int4: name it to bench it")
                   for r in refs if r not in runnable]
        with _progress() as bar:
            task = bar.add_task("Benchmarking", total=len(runnable))

            def progress(i: int, n: int, r: str) -> None:
                bar.update(task, completed=i, description=f"Benchmarking {r}")

            results, failed = b.bench_all(runnable, prompt_tokens, gen_tokens, runs, precise, progress, activation_bits)
        skipped += failed
        if not results:
            raise UserError("every variant failed to run: " + "; ".join(f"{r} {why}" for r, why in failed))
    if vs_llamacpp:
        say(f"Benchmarking llama.cpp on {Path(vs_llamacpp).name}")
        results.append(b.bench_llamacpp(vs_llamacpp, prompt_tokens, gen_tokens, runs))
    bandwidth = b.stream_read_gb_s() if vs_llamacpp else None
    if as_json:
        out = {"results": [r.to_dict() for r in results], "skipped": [{"ref": r, "why": w} for r, w in skipped]}
        if bandwidth:
            out["dram_read_gb_s"] = round(bandwidth, 1)
        print(json.dumps(out, indent=2))
        return 0
    table = Table("model:variant", "device", "path", "x bits", "threads", "TTFT", "prefill tok/s", "decode tok/s", "peak RSS",
                  "GB/s")
    for r in results:
        table.add_row(Text(f"{r.model}:{r.variant}"), r.device, r.isa or "-", str(r.activation_bits or "-"), str(r.threads), f"{r.ttft_s * 1000:.0f} ms",
                      f"{r.prefill_tok_s:.1f}", f"{r.decode_tok_s:.1f}", f"{r.peak_mem_bytes / 2**20:.0f} MiB",
                      f"{r.gb_s:.2f}")
    blank = [""] * (len(table.columns) - 1)
    for r, why in skipped:  # a child's error line names files: text, never markup
        table.add_row(Text(r), *blank, end_section=False)
        table.add_row(Text(f"  skipped: {why}"), *blank)
    _console().print(table)
    if vs_llamacpp and len(results) > 1:
        ref_r = results[-1]
        say(f"DRAM read bandwidth measured here: {bandwidth:.1f} GB/s ({ref_r.threads} threads)")
        for r in results[:-1]:
            say(f"{r.model}:{r.variant} vs llama.cpp: decode x{r.decode_tok_s / ref_r.decode_tok_s:.2f}, "
                f"prefill x{r.prefill_tok_s / ref_r.prefill_tok_s:.2f}; decode reads {r.gb_s:.1f} GB/s, "
                f"{r.gb_s / bandwidth * 100:.0f}% of it")
    return 0


# ---------------------------------------------------------------- plan
def show_plan(ref: str | None, ctx: int | None, device_kind: str | None, vram: int | None, ram: int | None,
              as_json: bool, kv_dtype: str = "auto", parallel: int = 1) -> int:
    """`llamadesk plan`; `vram`, `ram`: bytes to plan for instead of what is free (_size parsed them)."""
    import json

    from rich.table import Table

    from .devices import format_bytes, probe
    from .plan import plan_installed

    if device_kind == "cpu" and vram is not None:
        raise UserError("--vram plans for a GPU; with --device cpu, --ram sets the memory to plan for")
    device = probe(device_kind, vram, ram)
    result = plan_installed(ref, ctx, kv_dtype, device=device, slots=parallel)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0 if result.chosen else 1
    out = _console()
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
        kv_dtype: str = "auto", parse_special: bool = False, chat_format: str | None = None,
        docs: list[str] = (), file: Path | None = None, activation_bits: int = 15) -> int:
    """Answer `prompt` on stdout; with `docs` (collections) or `file`, from their passages, and
    then a `Sources:` block. `activation_bits` 8: llama.cpp's rounding of x (Engine.set_activation_bits)."""
    from .docs.attach import Grounds, untagged_line
    from .engine import Engine

    grounds, prompt = Grounds.pick(prompt, docs, file, notice=lambda tags: say(untagged_line(tags)))
    ref = ensure_model(model)
    pull.compile_decode_step(say)
    with _loading(ref):
        engine = Engine.load(ref, ctx=ctx, verify=verbose, say=say if verbose else None, precise=precise,
                             threads=threads, kv_dtype=kv_dtype, chat_format=chat_format)
    engine.parse_special = parse_special
    if activation_bits != 15 and engine.set_activation_bits(activation_bits) is None:
        say(engine.activation_bits_unused(activation_bits))
    _say_guessed_format(engine)
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
    if engine.last.prompt_tokens + engine.last.new_tokens >= engine.ctx and engine.last.new_tokens < max_tokens:
        more = "--ctx raises it" if engine.ctx < engine.max_ctx else "the model was trained for no longer one"
        say(f"(the reply was cut: the {engine.ctx}-token context is full; {more})")
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


def ask_remote(url: str, prompt: str, model: str | None, system: str | None, max_tokens: int,
               sampling: dict, key_file: Path | None, verbose: bool = False, docs: list[str] = (),
               file: Path | None = None, send_docs: bool = False) -> int:
    """`ask` through an OpenAI-compatible server (--remote URL or LLAMADESK_REMOTE); `sampling`
    holds OpenAI fields (temperature, top_p, seed). Passages of
    the user's documents go to the server only with `send_docs` (--send-docs): they leave the machine."""
    from .docs.attach import Grounds, untagged_line
    from .remote import ASSUMED_CTX, Remote, estimate_tokens, read_key

    key = read_key(key_file)
    grounds, prompt = Grounds.pick(prompt, docs, file, notice=lambda tags: say(untagged_line(tags)))
    remote = Remote.connect(url, key)  # after the checks above: nothing to close when they refuse
    if grounds and not send_docs:
        remote.close()
        raise UserError(f"answering from {grounds.describe()} through --remote would send passages of your "
                        f"documents to {remote.where()}; add --send-docs to allow it")
    passages = None
    try:
        name = remote.pick_model(model)
        if grounds:
            from .docs.retrieve import passage_budget

            ctx = remote.context_length(name) or ASSUMED_CTX
            prompt, passages = grounds.apply(prompt, passage_budget(ctx, max_tokens),
                                             lambda text: estimate_tokens([{"content": text}]))
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        for piece in remote.stream(messages, name, max_tokens, sampling):
            sys.stdout.write(piece)
            sys.stdout.flush()
    finally:
        remote.close()
    sys.stdout.write("\n")
    if passages is not None:
        from .docs.retrieve import sources_block

        sys.stdout.write("\n" + sources_block(passages) + "\n")
    sys.stdout.flush()
    if verbose:
        r = remote.last
        counts = (f"prompt {r.prompt_tokens} tokens, {r.completion_tokens} tokens" if r.completion_tokens is not None
                  else "the server reported no token counts")
        say(f"{r.model} on {remote.where()} (remote): {counts}, finish {r.finish_reason or 'unknown'}")
    return 0


def chat_plain(model: str | None, system: str | None, params: SamplingParams, ctx: int | None,
               kv_dtype: str = "auto", chat_format: str | None = None) -> int:
    """A line-by-line chat for terminals where the full-screen app cannot run (see app.plain_chat)."""
    from .engine import Engine
    from .history import History
    from .plain_chat import PlainChat, terminal_lines

    ref = ensure_model(model)
    pull.compile_decode_step(say)
    interactive = sys.stdin.isatty()
    loaded: list[str] = []  # `/set parameter num_ctx` reloads the model the plan chose first

    def load(n: int | None):
        with _loading(loaded[0] if loaded else ref):
            engine = Engine.load(loaded[0] if loaded else ref, ctx=n, kv_dtype=kv_dtype, chat_format=chat_format)
        if not loaded:
            _say_guessed_format(engine)
        loaded[:] = [engine.entry.ref]
        return engine

    chat = PlainChat(load, params, system, history=History(), say=say, interactive=interactive, ctx=ctx)
    if interactive:
        say(f"Chatting with {chat.engine.entry.ref} ({chat.engine.ctx}-token context). "
            f"Send a message (/? for help, /bye or Ctrl-D quits, Ctrl-C stops a reply).")
    return chat.run(terminal_lines(interactive))


# ---------------------------------------------------------------- tokenize / show
def tokenize_text(ref: str, text: str, as_json: bool = False, parse_special: bool = False) -> int:
    """The ids of `text` alone (no BOS, no template, nothing trimmed); special-token text stays
    text unless `parse_special`."""
    import json

    from model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(store.find(ref).path)
    ids = tokenizer.encode(text, allowed_special="all" if parse_special else set())
    if as_json:
        print(json.dumps({"ids": ids, "pieces": [tokenizer.id_to_piece(i) for i in ids]}, ensure_ascii=False))
    else:
        print(" ".join(map(str, ids)))
    return 0


def show_model(ref: str, as_json: bool = False) -> int:
    import json

    from .model_info import format_model_info, model_info

    info = model_info(ref)
    print(json.dumps(info, indent=2, ensure_ascii=False) if as_json else format_model_info(info))
    return 0


def _read_exact_text(arg: str | None) -> str:
    """TEXT as given, or stdin's bytes decoded as UTF-8 exactly (newlines kept, may be empty)."""
    if arg is not None and arg != "-":
        return arg
    if sys.stdin is None or sys.stdin.isatty():
        raise UserError("give the text, e.g. llamadesk tokenize NAME \"Hello\", or pipe it on stdin")
    try:
        return sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"stdin is not UTF-8 text ({e})") from None


def _say_guessed_format(engine) -> None:
    """A chat format the model's files did not name is said once, with how to choose another."""
    where = engine.chat_format_source
    if "guessed" in where or where.startswith("none"):
        say(f"Chat format: {where}; `llamadesk set {engine.entry.name} chat-format NAME` picks one "
            f"({', '.join(BUILT_IN)})")


def set_model_setting(name: str, key: str, value: str) -> int:
    """`llamadesk set NAME chat-format X`: kept for every variant of NAME; "auto" clears it."""
    if key == "chat-format" and value not in (*BUILT_IN, "auto"):
        raise UserError(f"unknown chat format {value!r}; built in are {', '.join(BUILT_IN)} (or auto)")
    store.save_setting(name, key, None if value == "auto" else value)
    say(f"{store.parse_ref(name)[0]}: {key} {value}")
    return 0


# ---------------------------------------------------------------- serve
def serve(args: argparse.Namespace) -> int:
    """`llamadesk serve`: the flags onto ServeOptions; the server itself lives in app/serve."""
    from .serve import ServeOptions, check_options, serve as run_server

    opts = ServeOptions(host=args.host, port=args.port, model=args.model, parallel=args.parallel,
                        queue=args.queue, ctx=args.ctx, kv_dtype=args.kv_dtype, threads=args.threads,
                        api_key_file=args.api_key_file, cors_origins=args.cors_origin or [],
                        tls_cert=args.tls_cert, tls_key=args.tls_key, keep_alive_s=args.keep_alive,
                        docs=args.docs, activation_bits=args.activation_bits)
    check_options(opts)  # a bind that must not start refuses before any download or load
    opts.model = ensure_model(opts.model)
    pull.compile_decode_step(say)
    return run_server(opts, say)


def _serve_parser(sub) -> None:
    from .serve import DEFAULT_PORT

    # no abbreviations: `--api-key SECRET` must be refused, not read as --api-key-file's path
    p = sub.add_parser("serve", help="serve the model over OpenAI- and Ollama-compatible HTTP APIs",
                       allow_abbrev=False)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; any other needs an API key)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    p.add_argument("--model", "-m", type=_model_ref,
                   help="installed model, NAME or NAME:VARIANT (default: the plan's choice)")
    p.add_argument("--parallel", type=_count, default=4, help="requests decoded at once (default 4)")
    p.add_argument("--queue", type=_number_in(lambda v: v >= 0, "0 or more", whole=True), default=16,
                   help="requests waiting beyond those; more get 429 (default 16)")
    p.add_argument("--ctx", type=_context, help="context length in tokens")
    _kv_dtype_flag(p)
    p.add_argument("--threads", type=_count, help="CPU threads (default: the cores other programs leave idle)")
    _activation_bits_flag(p, None, "8 (default; llama.cpp's rounding, as Ollama and LM Studio serve: one "
                          "product a weight, so prompts and requests decoded together cost less) or 15 (the "
                          "chat's accuracy: answers as `llamadesk ask` gives them)")
    p.add_argument("--api-key-file", type=Path, help="file whose first line is the API key "
                   "(or set LLAMADESK_API_KEY; keys are never taken from the command line)")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="allow browser pages from ORIGIN (repeatable; default: CORS off)")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate for HTTPS")
    p.add_argument("--tls-key", type=Path, help="PEM private key for HTTPS")
    p.add_argument("--keep-alive", type=_duration, default=300.0, metavar="DURATION",
                   help="unload the model after this long idle, e.g. 30s, 5m, 1h; -1 never (default 5m); "
                        "the next request loads it again")
    p.add_argument("--docs", action="append", default=[], metavar="NAME",
                   help="answer chat requests from this document collection (repeatable; default: none, "
                        "no client reaches your documents)")


def server_ps(url: str | None, key_file: Path | None) -> int:
    """`llamadesk ps`: what a running server (this machine's, unless --remote) holds."""
    from .remote import Remote, Unreachable, read_key
    from .serve import DEFAULT_PORT

    try:
        remote = Remote.connect(url or f"http://127.0.0.1:{DEFAULT_PORT}", read_key(key_file))
        try:
            models = remote.ollama_ps()
        finally:
            remote.close()
    except Unreachable:
        if url:
            raise
        raise UserError(f"no `llamadesk serve` is running on this machine (nothing answers at 127.0.0.1:"
                        f"{DEFAULT_PORT}); `llamadesk serve` starts one, `--remote URL` asks another") from None
    if not models:
        print(f"The server at {remote.where()} holds no model (it loads one on the next request).")
        return 0
    print(f"{'NAME':40} {'CONTEXT':>8} {'SIZE':>9}  UNTIL")
    for m in models:
        print(f"{str(m.get('model'))[:40]:40} {m.get('context_length', '?'):>8} "
              f"{(m.get('size') or 0) / 1e6:7.0f}MB  {m.get('expires_at', '?')}")
    return 0


def _duration(text: str) -> float | None:
    from .serve.params import parse_duration

    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ---------------------------------------------------------------- argument parsing
def _sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", type=_model_ref,
                   help="installed model, NAME or NAME:VARIANT (default: the default model)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--temperature", type=_number_in(lambda v: v >= 0, "0 or more"),
                   help="randomness; below 0.0001 = greedy (default: the model's own, else 0.7)")
    p.add_argument("--top-p", type=_number_in(lambda v: 0 < v <= 1, "more than 0 and at most 1"),
                   help="sample from the smallest set of tokens holding this much probability (default: the "
                   "model's own, else 0.9)")
    p.add_argument("--top-k", type=_number_in(lambda v: v >= 0, "0 (all) or more", whole=True),
                   help="sample from the K most likely tokens, 0 = all (default: the model's own, else 40)")
    p.add_argument("--repeat-penalty", type=_number_in(lambda v: v > 0, "more than 0"),
                   help="penalize tokens seen in the last --repeat-last-n (default: the model's own, else 1.1; "
                   "1.0 at a greedy temperature)")
    p.add_argument("--repeat-last-n", type=_number_in(lambda v: v >= -1, "-1 (all), 0 (none) or a count", whole=True),
                   help="how many recent tokens the penalty looks at, -1 = all, 0 = none (default 64)")
    p.add_argument("--seed", type=_number_in(lambda v: 0 <= v < 2**63, "from 0 to 2**63 - 1", whole=True),
                   help="the same seed gives the same text")
    p.add_argument("--ctx", type=_context, help="context length in tokens (default: what the memory plan chooses)")
    _kv_dtype_flag(p)
    p.add_argument("--precise", action="store_true",
                   help="run packed layers at fp32-level accuracy (~3x slower matmuls)")
    p.add_argument("--threads", type=_count, help="CPU threads (default: the cores other programs leave idle)")
    p.add_argument("--chat-format", choices=BUILT_IN,
                   help="write the conversation in this format for this run instead of the model's own")


def _finite_float(text: str) -> float:
    """A number flag: 'nan' and 'inf' parse as floats in Python, never as a setting here (usage, exit 2)."""
    import math

    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


_finite_float.__name__ = "number"  # argparse says "invalid number value: 'nan'"


def _number_in(test, says: str, whole: bool = False):
    """A number flag whose value must pass `test`, else a usage error (one line, exit 2) saying it
    must be `says`: caught when parsed, not deep inside a load or a reply."""
    def parse(text: str):
        value = int(text) if whole else _finite_float(text)
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {says}, not {text}")
        return value

    parse.__name__ = "whole number" if whole else "number"  # argparse: "invalid number value: 'x'"
    return parse


# counts (--ctx, --threads, --max-tokens, ...): a negative size failed in the KV cache's allocation
_count = _number_in(lambda v: v >= 1, "a whole number of at least 1", whole=True)
_count.__name__ = "count"
# as chat --plain's num_ctx: a context shorter than a chat template's own tokens holds no reply
_context = _number_in(lambda v: v >= 16, "a whole number of at least 16 tokens", whole=True)
_context.__name__ = "context"


def _model_ref(text: str) -> str:
    if not text.strip():  # `-m ""` read as no model given took the default one silently
        raise argparse.ArgumentTypeError("give a model, NAME or NAME:VARIANT (`llamadesk list` shows them)")
    return text


def _size(text: str) -> int:
    """A memory size flag (--ram, --vram) in bytes, parsed once here (a bad one: usage, exit 2)."""
    from .devices import parse_bytes

    if re.fullmatch(r"\s*[0-9]*\.?[0-9]+\s*", text):  # `--ram 16` meant 16 GiB, not 16 bytes
        raise argparse.ArgumentTypeError(f"{text.strip()} needs a unit: {text.strip()}GiB, {text.strip()}GB "
                                         f"or {text.strip()}MiB")
    try:
        size = parse_bytes(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"must be at least a byte, not {text} (examples: 8GiB, 512MiB)")
    return size


def _activation_bits_flag(p, default: int | None, choices_help: str) -> None:
    p.add_argument("--activation-bits", type=int, choices=(8, 15), default=default,
                   help="integer bits the CPU kernels round activations to, per 32 values: " + choices_help)


def _kv_dtype_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-dtype", choices=KV_DTYPES, default="auto",
                   help="KV cache dtype (default auto: the activations' own, int8 where that lets a larger "
                        "model or a longer context fit)")


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, as every other error here (`llamadesk ask: error:
    ...`, exit 2), with where to look instead of the whole usage block. Subcommands' parsers are
    made of this class too (add_subparsers takes its parser's own type)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llamadesk", description="A private, offline AI assistant. With no "
                                     "command: the chat app (`llamadesk chat`).")
    parser.add_argument("--version", action="version", version=f"llamadesk {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("chat", help="chat in the terminal (the default command)")
    _sampling_flags(p)
    p.add_argument("--plain", action="store_true", help="line-by-line chat instead of the full-screen app")
    _remote_flags(p, "chat with a model on an OpenAI-compatible server (llamadesk, llama.cpp, Ollama, vLLM) "
                  "instead of a local one (default: $LLAMADESK_REMOTE)")

    p = sub.add_parser("ask", help="answer one prompt on stdout (reads stdin when PROMPT is absent or -)")
    p.add_argument("prompt", nargs="?", default=None, help="the question (default, or -: read stdin)")
    _sampling_flags(p)
    p.add_argument("--max-tokens", type=_count, default=512, help="the longest reply in tokens (default 512)")
    p.add_argument("--verbose", "-v", action="store_true", help="print timings to stderr")
    p.add_argument("--parse-special", action="store_true",
                   help="let special-token text in the prompt (e.g. <|im_end|>) become control tokens")
    p.add_argument("--raw", action="store_true", help="send the prompt as it is, with no chat format")
    _activation_bits_flag(p, 15, "15 (default: logits within ~0.03 of exact arithmetic) or 8 (llama.cpp's "
                          "rounding: prompts up to ~1.35x faster on AVX-512, KL ~0.01 a token)")
    _remote_flags(p, "answer through an OpenAI-compatible server (llamadesk, llama.cpp, Ollama, vLLM) "
                  "instead of a local model (default: $LLAMADESK_REMOTE)")
    p.add_argument("--docs", action="append", default=[], metavar="NAME",
                   help="answer from this document collection (repeatable; `#NAME` in the prompt works too)")
    p.add_argument("--file", type=Path, help="answer from this file (all of it if it fits, else its best parts)")
    p.add_argument("--send-docs", action="store_true",
                   help="with --remote and --docs/--file: allow sending the passages found to the server")

    default_model, catalog = pull.load_catalog()
    p = sub.add_parser("pull", help="download and install a catalog model (default: SmolLM2-135M-Instruct) "
                       "or a model from the Hugging Face Hub")
    p.add_argument("name", nargs="?", help=f"a catalog model: {', '.join(catalog)} (default {default_model}); "
                   "hf.co/OWNER/REPO[:QUANT] for a GGUF repo's file of that quant (default Q4_K_M); OWNER/REPO "
                   "for a safetensors repo (a gated one needs HF_TOKEN)")
    p.add_argument("--force", action="store_true", help="reinstall even if installed")

    p = sub.add_parser("import", help="import a Hugging Face folder, Meta folder or GGUF file")
    p.add_argument("path", type=Path, help="a Hugging Face or Meta checkpoint folder, or a .gguf file")
    p.add_argument("--name", help="store name (default: from the path)")
    p.add_argument("--force", action="store_true", help="replace an installed model of that name")
    p.add_argument("--keep-float", action="store_true",
                   help="a quantized GGUF: also install its values as plain fp32 (variant `float`)")

    p = sub.add_parser("quantize", help="pack an installed model to int8, int4 or nf4 (a new variant)")
    p.add_argument("ref", help="the model to pack (its source variant)")
    p.add_argument("--scheme", required=True, type=str.lower, help="int8, int4 or nf4")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size: 32, 64 or 128 (default 32)")
    p.add_argument("--out", help="variant name (default: the scheme)")
    p.add_argument("--head", default="auto", help="output head precision: auto (default: int8, one fp16 scale per 32 "
                   "values as Q8_0; per row where 32 does not divide the width), int8, int4, fp16 or fp32")
    p.add_argument("--embeddings", default="int8", help="embedding table precision: int8 (default) or fp32")
    p.add_argument("--force", action="store_true", help="replace an existing variant of that name")
    p.add_argument("--no-report", action="store_true",
                   help="skip the perplexity/KL/top-1 report (source and variant over 2048 tokens, block by block)")

    p = sub.add_parser("eval", help="perplexity of an installed model on a text")
    p.add_argument("ref", help="installed model, NAME or NAME:VARIANT")
    p.add_argument("--text", type=Path, help="a UTF-8 text file (default: Python's own English reference text)")
    p.add_argument("--tokens", type=_count, default=8192, help="how many tokens of the text to score (default 8192)")
    p.add_argument("--window", type=_count, default=512, help="tokens per scored window (default 512)")

    p = sub.add_parser("bench", help="time to first token, prefill and decode speed of installed variants")
    p.add_argument("ref", nargs="?", help="NAME or NAME:VARIANT (default: every installed variant)")
    p.add_argument("--prompt-tokens", type=_count, default=512, help="prompt length to time prefill with (default 512)")
    p.add_argument("--gen-tokens", type=_count, default=128, help="tokens to decode per run (default 128)")
    p.add_argument("--runs", type=_count, default=3, help="timed runs after one warm-up (the median is reported)")
    p.add_argument("--threads", type=_count, help="CPU threads (default and upper bound: the idle cores, as for chat)")
    p.add_argument("--json", action="store_true", help="machine-readable results, with the CPU path and flags")
    p.add_argument("--vs-llamacpp", metavar="GGUF", help="also run llama-cpp-python on this GGUF, side by side")
    p.add_argument("--precise", action="store_true", help="packed layers at fp32-level accuracy")
    _activation_bits_flag(p, 15, "15 (default, as chat and ask) or 8 (llama.cpp's rounding, as serve)")

    p = sub.add_parser("plan", help="which model, variant and context fit this machine, and why")
    p.add_argument("ref", nargs="?", help="limit to NAME or NAME:VARIANT")
    p.add_argument("--ctx", type=_context, help="plan for this context length")
    _kv_dtype_flag(p)
    p.add_argument("--device", choices=("cpu", "cuda"), help="plan for this device")
    p.add_argument("--vram", type=_size, help="plan for a GPU with this much free memory, e.g. 8GiB")
    p.add_argument("--ram", type=_size, help="plan for this much free RAM, e.g. 16GiB")
    p.add_argument("--parallel", type=_count, default=1,
                   help="plan for this many requests at once, each with the full context (as serve --parallel)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("set", help="keep a setting for a model: chat-format llama2|llama3|chatml|alpaca|vicuna|raw|auto")
    p.add_argument("name", help="installed model, NAME (the setting holds for every variant)")
    p.add_argument("key", choices=store.SETTING_NAMES, help="the setting: " + ", ".join(store.SETTING_NAMES))
    p.add_argument("value", help="for chat-format: llama2, llama3, chatml, alpaca, vicuna, raw, or auto to clear")

    p = sub.add_parser("tokenize", help="the token ids of a text (no BOS, no chat format)")
    p.add_argument("name", help="installed model, NAME or NAME:VARIANT")
    p.add_argument("text", nargs="?", help="the text (default or -: stdin, byte for byte)")
    p.add_argument("--json", action="store_true", help='{"ids": [...], "pieces": [...]}')
    p.add_argument("--parse-special", action="store_true", help="special-token text becomes control tokens")

    p = sub.add_parser("show", help="what an installed model is: shape, tokenizer, chat format, stops, variants")
    p.add_argument("name", help="installed model, NAME or NAME:VARIANT")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _serve_parser(sub)
    p = sub.add_parser("ps", help="what a running `llamadesk serve` holds")
    p.add_argument("--remote", metavar="URL", help="the server (default: this machine's, on the default port)")
    p.add_argument("--remote-key-file", type=Path, help="file (mode 600) whose first line is its API key")


    from .docs.commands import add_parser as add_docs_parser

    add_docs_parser(sub)
    sub.add_parser("list", help="list installed models")
    p = sub.add_parser("rm", help="remove an installed model or variant")
    p.add_argument("ref", help="NAME (every variant) or NAME:VARIANT")
    return parser


def _remote_flags(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--remote", metavar="URL", help=what)
    p.add_argument("--remote-key-file", type=Path, help="file (mode 600) whose first line is the remote's API key "
                   "(default: $LLAMADESK_REMOTE_KEY)")


def _remote_params(args: argparse.Namespace) -> dict:
    """The sampling flags the user gave, as OpenAI fields, for a remote server (which applies its
    own defaults to the rest; the local model's defaults, such as its repeat penalty, are not the
    server's). A plain dict: a client of a server loads no torch."""
    if args.top_k is not None or args.repeat_penalty is not None or args.repeat_last_n is not None:
        raise UserError("--top-k, --repeat-penalty and --repeat-last-n are not part of the OpenAI API; "
                        "leave them out with --remote")
    given = {"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}
    return {k: v for k, v in given.items() if v is not None}


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The flags the user gave over the model's own defaults (else Ollama-like ones)."""
    from .sampling_defaults import model_defaults, resolve

    default, catalog = pull.load_catalog()
    name = store.parse_ref(args.model)[0] if args.model else default
    try:
        # a variant's folder holds no generation_config.json: its source's does
        folder = store.find(name).path
    except UserError:
        folder = None  # not installed (yet): the generic defaults
    asked = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
             "repeat_penalty": args.repeat_penalty, "repeat_last_n": args.repeat_last_n}
    suggested = catalog[name].sampling if name in catalog else None
    try:
        return resolve(asked, model_defaults(folder, suggested), args.seed)
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
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # argparse blames the top parser for a command's stray flag: point at the command's help
        commands = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        commands.get(args.command, parser).error(f"unrecognized arguments: {' '.join(extra)}")
    command = args.command or "chat"
    store.usable_home()  # every command reads or writes the home: a bad one is one line, first
    if command == "docs":
        from .docs import commands

        return commands.run(args)
    if command in ("ask", "chat"):
        from .remote import remote_url

        url = remote_url(args.remote)
        # a server's model names are its own (`org/Model`, `llama3:8b`), never looked up here
        params = _remote_params(args) if url else _sampling_params(args)
    if command in ("ask", "chat") and args.system:
        from .prompt_text import from_shell

        args.system = from_shell(args.system, say, "the system prompt")
    if command == "ask":
        if url:
            return ask_remote(url, _read_prompt(args.prompt), args.model, args.system, args.max_tokens,
                              params, args.remote_key_file, args.verbose, args.docs, args.file,
                              args.send_docs)
        return ask(_read_prompt(args.prompt), args.model, args.system, args.max_tokens, params, args.ctx,
                   args.verbose, args.precise, args.threads, args.kv_dtype, args.parse_special,
                   "raw" if args.raw else args.chat_format, args.docs, args.file, args.activation_bits)
    if command == "chat":
        plain = args.plain or not (sys.stdin.isatty() and sys.stdout.isatty())
        if url and plain:
            raise UserError("the line-by-line chat runs local models only; `llamadesk ask --remote URL` answers "
                            "one prompt through a server")
        if plain:
            return chat_plain(args.model, args.system, params, args.ctx, args.kv_dtype, args.chat_format)
        from .tui import run_chat

        return run_chat(args.model, args.system, params, args.ctx, device=None, kv_dtype=args.kv_dtype,
                        chat_format=args.chat_format, remote=url, remote_key_file=args.remote_key_file)
    if command == "pull":
        pull_model(args.name, replace=args.force)
        return 0
    if command == "import":
        if not args.path.exists():
            raise UserError(f"{args.path}: no such file or folder")
        import_model(args.path, args.name and store.parse_ref(args.name)[0], replace=args.force,
                     keep_float=args.keep_float)
        return 0
    if command == "quantize":
        return quantize(args.ref, args.scheme, args.group_size, args.out, args.head, args.embeddings, args.force,
                        not args.no_report)
    if command == "eval":
        if args.tokens < 2 or args.window < 2:
            raise UserError("--tokens and --window must be at least 2")
        return evaluate(args.ref, args.text, args.tokens, args.window)
    if command == "bench":
        return bench(args.ref, args.prompt_tokens, args.gen_tokens, args.runs, args.threads, args.json,
                     args.vs_llamacpp, args.precise, args.activation_bits)
    if command == "plan":
        return show_plan(args.ref, args.ctx, args.device, args.vram, args.ram, args.json, args.kv_dtype, args.parallel)
    if command == "tokenize":
        return tokenize_text(args.name, _read_exact_text(args.text), args.json, args.parse_special)
    if command == "show":
        return show_model(args.name, args.json)
    if command == "set":
        return set_model_setting(args.name, args.key, args.value)
    if command == "serve":
        return serve(args)
    if command == "ps":
        return server_ps(args.remote, args.remote_key_file)
    if command == "list":
        list_models()
        return 0
    if command == "rm":
        removed = store.remove(args.ref)
        for e in removed:
            say(f"Removed {e.ref}")
        if not removed:  # only variants too damaged to list were there
            say(f"Removed {args.ref} (its files could not be read as a model)")
        return 0
    raise AssertionError(command)


def _follow_isa() -> None:
    """LLAMADESK_ISA=avx512|avx2|generic forces the compiled step's vector path; PyTorch's own
    kernels follow it (ATEN_CPU_CAPABILITY, read when torch is first imported) unless that is set."""
    isa = os.environ.get("LLAMADESK_ISA", "").strip().lower()
    if isa in ("avx512", "avx2", "generic") and "torch" not in sys.modules:
        os.environ.setdefault("ATEN_CPU_CAPABILITY", "default" if isa == "generic" else isa)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _follow_isa()
    if not argv or argv[0] in ("--remote", "--remote-key-file") or argv[0].startswith("--remote="):
        argv = ["chat", *argv]  # `llamadesk --remote URL` opens the chat app against a server
    try:
        return run(argv)
    except KeyboardInterrupt as e:  # a command may say what the interruption left (pull: what the next run does)
        say(f"llamadesk: interrupted; {e}" if str(e) else "llamadesk: interrupted")
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
    except Exception as e:
        if isinstance(e, _user_errors()):
            say(f"llamadesk: error: {e}")
            return 1
        # a bug: one line still, the traceback on request
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
