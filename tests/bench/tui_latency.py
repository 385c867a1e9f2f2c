"""The chat app on the real default model: Enter to first visible reply text, frame rate while a
reply streams, and how fast a keypress shows up while the model writes.

    python tests/bench/tui_latency.py --threads 2
    python tests/bench/tui_latency.py --prompts 2 --long-runs 0 --diagnose   # what a stall was doing
    python tests/bench/tui_latency.py --default-home HOME --model llama-1b:source   # another model

One cold prompt (the first after the model loaded), `--prompts` warm ones, each in a new chat,
then `--long-runs` long prose replies and `--list-runs` long Markdown-list replies, during which
a letter is typed into the prompt box every ~0.35 s. Before it starts, the script waits (up to
`--wait-load` s) for the 1-min load to fall under `--max-load`, and it prints the load throughout.

The app runs headless under `App.run_test()` (as tests/test_tui.py drives it), in a temporary
LLAMADESK_HOME holding a copy of the per-machine test home's `models` folder (never written to).
No app code is changed: the measuring points are wrappers put on methods from outside, some of
them Textual internals (`App._display`, `Screen._on_timer_update`, the `@on` handler table), as
of textual 8.2.8; a Textual upgrade may need them adjusted.

Definitions
- frame: one call of `App._display` for the chat screen with a compositor update, outside a batch:
  what Textual would write to the terminal. Headless Textual skips turning the update into escape
  codes, so this script does it itself (`update.render_segments(app.console)`, not written
  anywhere) to charge each frame what a real terminal costs; `--no-render` leaves that out.
- first reply text visible: the first frame after Enter whose screen cells inside the reply's
  Markdown widget hold a non-blank character (read back from the compositor's strips).
- content update: one completed `Markdown.append` on the reply.
- keypress latency: a Key event sent as the terminal driver sends it (`driver.send_message`), to
  the first frame that shows the character in the prompt box; "handled" is when PromptInput's
  key handler gets it.
- event-loop lag: a task on the app's loop that sleeps 5 ms and records how late it wakes.
- engine TTFT and tok/s: `engine.last` (`ReplyStats`) of the same reply; "engine alone" makes the same
  `Engine.stream` call again right after each reply, on the app's model thread while the event loop
  waits for it (so the UI is idle), with the engine's KV cache set back to where the app's reply started.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT = "smollm2-135m-instruct"
now = time.perf_counter

COLD_PROMPT = "What is the capital of France?"
WARM_PROMPTS = [
    "Name three primary colors.",
    "What is 12 times 12?",
    "Write a haiku about the sea.",
    "Give me one tip for learning Python.",
    "What does a CPU do?",
    "Why is the sky blue?",
    "Suggest a name for a cat.",
]
# the model answers this with a 40-item numbered list (267 tokens): one top-level Markdown block that grows
LIST_PROMPT = "Write a bulleted list of 40 different fruits, one per line."
KEYS = "abcdefghijklmnopqrstuvwxyz"  # the keypress probes' letters, in turn
LONG_PROMPT = ("Write a long, detailed story about a dragon who learns to bake bread. Use several paragraphs, "
               "a list of ingredients, and end with a short poem.")


# ---------------------------------------------------------------- machine and load
def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "CPU"


def code_line() -> str:
    """The commit, and whether app/ or assets/ had uncommitted changes when measured."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=REPO).stdout

    dirty = [line[3:] for line in git("status", "--porcelain", "--", "app", "assets", "model").splitlines()
             if line.strip()]
    return git("rev-parse", "--short", "HEAD").strip() + (
        " plus uncommitted changes in " + ", ".join(sorted(dirty)) if dirty else "")


def wait_for_quiet(max_load: float, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while os.getloadavg()[0] > max_load and time.monotonic() < deadline:
        print(f"load {load_avg()} > {max_load}: waiting", file=sys.stderr, flush=True)
        time.sleep(15)


# ---------------------------------------------------------------- what one reply recorded
@dataclass
class ReplyRecord:
    label: str
    prompt: str
    t_enter: float = 0.0
    t_key: float | None = None  # PromptInput got the Enter key
    t_submitted: float | None = None  # ChatScreen._submitted began
    t_started: float | None = None  # _start_reply returned: the worker is launched
    t_stream: float | None = None  # Engine.stream called (worker thread)
    t_first_piece: float | None = None  # Engine.stream yielded its first text (worker thread)
    t_first_write: float | None = None  # the drain timer wrote the first text to the view
    t_first_append: float | None = None  # the first Markdown.append finished
    t_visible: float | None = None  # first frame with reply text on screen
    t_last_piece: float | None = None
    t_end: float | None = None  # ChatScreen.reply back to None
    pieces: list = field(default_factory=list)  # (t, chars) per piece, worker thread
    prompt_tokens: int = 0
    reused_tokens: int = 0
    new_tokens: int = 0
    engine_ttft_s: float = 0.0
    engine_tok_s: float = 0.0
    chars: int = 0
    load: str = ""  # the load average at Enter
    call: tuple | None = None  # (messages, params, max_tokens) the app passed to Engine.stream
    cached_before: list | None = None  # the engine's KV-cache token list when the app's reply began
    alone: dict | None = None  # the same call again right after, with the UI idle
    text: str = ""  # the reply as the app saved it
    cpu_at_end: float = 0.0  # the main thread's CPU time when the reply ended


class Bench:
    """The wrappers' shared state: the reply being measured, frames, appends, keys, loop lag."""

    def __init__(self, render: bool):
        self.render = render
        self.app = None
        self.reply: ReplyRecord | None = None
        self.frames: list[tuple[float, float, float, float]] = []  # (t, render_s, check_s, main thread CPU s)
        self.timer_updates: list[tuple[float, float]] = []  # (t, duration) of Screen._on_timer_update
        self.appends: list[tuple[float, float, int]] = []  # (t_done, duration, chars)
        self.drains: list[tuple[float, float]] = []  # (t, duration) of ChatScreen._drain
        self.lag: list[tuple[float, float]] = []
        self.key_probe: dict | None = None  # {"want": text, "t_sent", "t_handled", "t_visible"}
        self.t_loaded: float | None = None
        self.keys_during: list[dict] = []
        self.gcs: list[tuple[float, float, int]] = []  # (t, duration, generation) of each collection
        self.worker_threads: int | None = None  # torch threads as the reply worker sees them
        self.decode_threads: list[int] = []  # the thread governor's count at each reply's end
        self.samples: list[tuple[float, float, str]] = []  # --diagnose: (t, sampler lateness, main stack)

    # -------- frame checks
    def on_frame(self, t: float, render_s: float) -> None:
        c0 = now()
        r, probe = self.reply, self.key_probe
        if r is not None and r.t_visible is None and r.t_first_write is not None:
            md = self._reply_markdown()
            if md is not None and md.children and _visible_text(self.app.chat, md).strip():
                r.t_visible = t
        if probe is not None and probe.get("t_visible") is None and probe.get("t_handled") is not None:
            from app.tui.widgets.prompt import PromptInput

            prompt = self.app.chat.query_one(PromptInput)
            if probe["want"] in prompt.text and probe["want"] in _visible_text(self.app.chat, prompt):
                probe["t_visible"] = t
        self.frames.append((t, render_s, now() - c0, time.thread_time()))

    def _reply_markdown(self):
        from textual.widgets import Markdown

        reply = self.app.chat.reply
        if reply is None:
            return None
        return reply.view.query_one(Markdown)


def _visible_text(screen, widget) -> str:
    """The characters on screen inside `widget`'s visible area, read from the compositor."""
    comp = screen._compositor
    got = comp.visible_widgets.get(widget)
    if got is None:
        return ""
    region, clip = got
    area = region.intersection(clip)
    if not area:
        return ""
    strips = comp.render_strips()
    return "\n".join(strips[y].crop(area.x, area.right).text for y in range(area.y, min(area.bottom, len(strips))))


def instrument(bench: Bench) -> None:
    """Wrap the app's and Textual's methods; nothing in the app's source changes."""
    from textual.app import App
    from textual.screen import Screen
    from textual.widgets import Markdown

    from app.engine import Engine
    from app.tui.screens.chat import ChatScreen
    from app.tui.widgets.prompt import PromptInput
    from app.tui.widgets.transcript import MessageView

    orig_display = App._display

    def _display(self, screen, renderable):
        if renderable is None or self._batch_count or bench.app is not self or screen is not self.chat:
            return orig_display(self, screen, renderable)
        t = now()
        render_s = 0.0
        if bench.render and self._running and not self._closed:
            r0 = now()
            renderable.render_segments(self.console)  # what a real terminal driver would build
            render_s = now() - r0
        result = orig_display(self, screen, renderable)
        bench.on_frame(t, render_s)
        return result

    App._display = _display

    orig_timer_update = Screen._on_timer_update

    def _on_timer_update(self):
        t0 = now()
        try:
            return orig_timer_update(self)
        finally:
            if isinstance(self, ChatScreen):
                bench.timer_updates.append((t0, now() - t0))

    Screen._on_timer_update = _on_timer_update

    orig_append = Markdown.append

    def append(self, markdown):
        inner = orig_append(self, markdown)
        r = bench.reply
        if r is None or bench.app is None or bench.app.chat.reply is None \
                or bench.app.chat.reply.view.query_one(Markdown) is not self:
            return inner
        t0 = now()

        async def timed():
            await inner
            t = now()
            bench.appends.append((t, t - t0, len(markdown)))
            if r.t_first_append is None:
                r.t_first_append = t

        from textual.await_complete import AwaitComplete

        return AwaitComplete(timed())

    Markdown.append = append

    orig_key = PromptInput._on_key

    async def _on_key(self, event):
        t = now()
        r, probe = bench.reply, bench.key_probe
        if event.key == "enter" and r is not None and r.t_key is None:
            r.t_key = t
        if probe is not None and event.character == probe["char"] and probe.get("t_handled") is None:
            probe["t_handled"] = t
        await orig_key(self, event)

    PromptInput._on_key = _on_key

    orig_submitted = ChatScreen._submitted

    async def _submitted(self, event):
        if bench.reply is not None and bench.reply.t_submitted is None:
            bench.reply.t_submitted = now()
        await orig_submitted(self, event)

    # @on(...) registered the original function in the class's handler table at class creation
    handlers = ChatScreen.__dict__["_decorated_handlers"][PromptInput.Submitted]
    handlers[:] = [(_submitted if m is orig_submitted else m, sel) for m, sel in handlers]
    ChatScreen._submitted = _submitted

    orig_start = ChatScreen._start_reply

    async def _start_reply(self):
        await orig_start(self)
        if bench.reply is not None and bench.reply.t_started is None:
            bench.reply.t_started = now()

    ChatScreen._start_reply = _start_reply

    orig_drain = ChatScreen._drain

    async def _drain(self):
        t0 = now()
        try:
            await orig_drain(self)
        finally:
            if bench.reply is not None:
                bench.drains.append((t0, now() - t0))

    ChatScreen._drain = _drain

    orig_write = MessageView.write

    async def write(self, text):
        r = bench.reply
        if r is not None and r.t_first_write is None and self.role == "assistant":
            r.t_first_write = now()
        await orig_write(self, text)

    MessageView.write = write

    orig_loaded = ChatScreen._loaded

    async def _loaded(self, model):
        if bench.t_loaded is None:
            bench.t_loaded = now()
        await orig_loaded(self, model)

    ChatScreen._loaded = _loaded

    orig_stream = Engine.stream

    def stream(self, *args, **kwargs):
        r = bench.reply
        if r is not None:
            r.t_stream = now()
            r.call = (args[0], args[1] if len(args) > 1 else kwargs.get("params"),
                      args[2] if len(args) > 2 else kwargs.get("max_tokens", 512))
            r.cached_before = list(getattr(self, "_cached", []))
        if bench.worker_threads is None:
            import torch

            bench.worker_threads = torch.get_num_threads()
        gen = orig_stream(self, *args, **kwargs)
        try:
            for piece in gen:
                if r is not None:
                    t = now()
                    if r.t_first_piece is None:
                        r.t_first_piece = t
                    r.t_last_piece = t
                    r.pieces.append((t, len(piece)))
                yield piece
        finally:
            gen.close()
            if r is not None and hasattr(self.decoder, "threads"):  # app/threads.py's ThreadGovernor
                bench.decode_threads.append(self.decoder.threads)

    Engine.stream = stream

    import gc

    gc_start = {}

    def on_gc(phase, info):
        if phase == "start":
            gc_start["t"] = now()
        elif "t" in gc_start:
            bench.gcs.append((gc_start["t"], now() - gc_start.pop("t"), info["generation"]))

    gc.callbacks.append(on_gc)


def sample_main(bench: Bench, every: float = 0.01) -> None:
    """--diagnose: the main thread's innermost frames, every 10 ms. A sample that comes late means
    this thread could not get the GIL either: whoever held it was not running Python."""
    import traceback

    main = threading.main_thread().ident
    while True:
        t0 = now()
        time.sleep(every)
        t = now()
        frame = sys._current_frames().get(main)
        where = " < ".join(f"{Path(f.f_code.co_filename).name}:{n} {f.f_code.co_name}"
                           for f, n in list(traceback.walk_stack(frame))[:6]) if frame else ""
        bench.samples.append((t, t - t0 - every, where))


# ---------------------------------------------------------------- driving the app
# how often the script's own checks wake the app's event loop (the lag probe, the waits for a
# reply's stages): each wake-up takes the GIL and a core from the decode step, as nothing in a real
# terminal does; --poll-ms sets it
POLL_S = 0.005


async def lag_probe(bench: Bench, stop: asyncio.Event) -> None:
    while not stop.is_set():
        t0 = now()
        await asyncio.sleep(POLL_S)
        bench.lag.append((t0, now() - t0 - POLL_S))


async def until(condition, timeout: float, step: float | None = None) -> bool:
    step = step or POLL_S
    deadline = now() + timeout
    while now() < deadline:
        if condition():
            return True
        await asyncio.sleep(step)
    return condition()


async def one_reply(bench: Bench, pilot, label: str, prompt_text: str, timeout: float,
                    keys_during: bool = False) -> ReplyRecord:
    from app.tui.widgets.prompt import PromptInput
    from app.tui.widgets.transcript import Transcript

    app = pilot.app
    if app.chat.conversation is not None:
        await pilot.press("ctrl+n")  # each prompt in a fresh chat, so every prompt starts alike
        await until(lambda: app.chat.conversation is None and app.chat.query("#welcome"), 5)
    await asyncio.sleep(0.3)  # let the new-chat repaint and the context count settle
    prompt = app.query_one(PromptInput)
    prompt.focus()
    prompt.text = prompt_text
    await asyncio.sleep(0.1)
    r = ReplyRecord(label, prompt_text, load=load_avg())
    bench.reply = r
    r.t_enter = now()
    press = asyncio.create_task(pilot.press("enter"))  # Pilot waits for idle; the clock is already running
    await until(lambda: r.t_started is not None, timeout)
    if keys_during:
        await until(lambda: r.t_visible is not None or app.chat.reply is None, timeout)
        r_keys = []
        while app.chat.reply is not None:
            got = await key_latency(bench, app, KEYS[len(r_keys) % len(KEYS)], 2.0)
            if app.chat.reply is not None and r.t_last_piece is not None:
                r_keys.append(got)
            await asyncio.sleep(0.3)
        bench.keys_during = [k for k in r_keys if k["t_handled"] is not None]
        prompt.text = ""
    await until(lambda: app.chat.reply is None, timeout)
    r.t_end = now()
    await press
    model = app.chat.model
    stats = model.last
    r.prompt_tokens, r.reused_tokens, r.new_tokens = stats.prompt_tokens, stats.reused_tokens, stats.new_tokens
    r.engine_ttft_s, r.engine_tok_s = stats.ttft_s, stats.tokens_per_s
    r.chars = sum(c for _, c in r.pieces)
    bench.reply = None
    r.text = app.query_one(Transcript).last_reply().content
    r.cpu_at_end = time.thread_time()
    await asyncio.sleep(0.2)
    # on the model thread, as the app's replies: a torch call from another thread starts an OpenMP
    # pool of its own, and beyond one pool a core the app's steps slow down (backend.ModelThread)
    r.alone = app.chat.model_thread.call(engine_alone, model, r)
    await asyncio.sleep(0.2)
    return r


async def key_latency(bench: Bench, app, char: str, timeout: float) -> dict:
    from textual import events

    from app.tui.widgets.prompt import PromptInput

    prompt = app.chat.query_one(PromptInput)
    prompt.text = ""  # each probe types one letter into an empty box, a different letter than the last
    await asyncio.sleep(0.05)
    want = char
    probe = {"char": char, "want": want, "t_sent": now(), "t_handled": None, "t_visible": None}
    bench.key_probe = probe
    app._driver.send_message(events.Key(char, char))
    await until(lambda: probe["t_visible"] is not None, timeout)
    bench.key_probe = None
    return probe


async def drive(args, bench: Bench, settings_long, settings_short) -> dict:
    from app.history import History
    from app.tui import ChatApp
    from app.tui.widgets.prompt import PromptInput

    width, height = (int(x) for x in args.size.split("x"))
    history = History(Path(os.environ["LLAMADESK_HOME"]) / "history.sqlite3")
    app = ChatApp(args.model, settings_short, history=history)
    bench.app = app
    out: dict = {}
    t_start = now()
    stop = asyncio.Event()
    async with app.run_test(size=(width, height)) as pilot:
        lagger = asyncio.create_task(lag_probe(bench, stop))
        ok = await until(lambda: app.chat.model is not None, 300, 0.05)
        assert ok, "the model did not load"
        out["load_s"] = bench.t_loaded - t_start
        model = app.chat.model
        out["model"] = f"{model.entry.name}:{model.entry.variant}"
        out["ctx"] = model.ctx
        import torch

        out["threads"] = torch.get_num_threads()
        out["load_at_prompts"] = load_avg()

        records = [await one_reply(bench, pilot, "cold (1st after load)", COLD_PROMPT, args.timeout)]
        for i, p in enumerate(WARM_PROMPTS[:args.prompts]):
            records.append(await one_reply(bench, pilot, f"warm {i + 1}", p, args.timeout))

        # a keypress with the model idle, for comparison
        await asyncio.sleep(0.5)
        idle = []
        app.chat.query_one(PromptInput).focus()
        for i in range(5):
            idle.append(await key_latency(bench, app, KEYS[i], 2.0))
            await asyncio.sleep(0.3)
        app.chat.query_one(PromptInput).text = ""
        out["keys_idle"] = idle

        app.chat.draft_settings = settings_long
        app.chat.new_chat_settings = settings_long
        long_runs = []
        out["load_at_long"] = load_avg()
        runs = [(f"long {i + 1}", LONG_PROMPT) for i in range(args.long_runs)] + \
               [("long list" if args.list_runs == 1 else f"long list {i + 1}", LIST_PROMPT)
                for i in range(args.list_runs)]
        for label, text in runs:
            f0, a0, d0, u0, l0 = len(bench.frames), len(bench.appends), len(bench.drains), \
                len(bench.timer_updates), len(bench.lag)
            cpu0 = time.thread_time()
            r = await one_reply(bench, pilot, label, text, args.timeout, keys_during=True)
            long_runs.append({"record": r, "frames": bench.frames[f0:], "appends": bench.appends[a0:],
                              "drains": bench.drains[d0:], "timer_updates": bench.timer_updates[u0:],
                              "lag": bench.lag[l0:], "keys": bench.keys_during,
                              "main_cpu_s": r.cpu_at_end - cpu0})
        stop.set()
        await lagger
    out["records"] = records
    out["long"] = long_runs
    return out


def engine_alone(model, r: ReplyRecord) -> dict:
    """The app's Engine.stream call once more, right after the app's reply, while the event loop
    waits for it so that the UI does nothing meanwhile. The engine's KV-cache list is set back
    to what it was when the app's reply began, so the same prompt tokens are reused; greedy
    sampling writes the same tokens, so the engine ends in the state the app's reply left."""
    messages, params, max_tokens = r.call
    model._cached = list(r.cached_before)
    t0 = now()
    for _ in model.stream(messages, params, max_tokens, threading.Event()):
        pass
    st = model.last
    return {"ttft_s": st.ttft_s, "tok_s": st.tokens_per_s, "new_tokens": st.new_tokens, "reused": st.reused_tokens,
            "prompt_tokens": st.prompt_tokens, "wall_s": now() - t0, "same_tokens": st.new_tokens == r.new_tokens}


def ask_runs(ref: str, prompts: list[str], settings, rounds: int) -> list[float]:
    """Decode tok/s of `llamadesk ask -v` (a process of its own, the thread rule's count) on each
    prompt, `rounds` times, with the app's variant, token limit and greedy sampling: the figure
    issue 4/6 holds the app to ("within 10% of `ask` on the same prompt and variant")."""
    import re

    out = []
    for _ in range(rounds if prompts else 0):
        for prompt in prompts:
            cmd = [sys.executable, "-m", "app.cli", "ask", "-v", "-m", ref, "--temperature", "0",
                   "--repeat-penalty", str(settings.repeat_penalty), "--repeat-last-n", str(settings.repeat_last_n),
                   "--max-tokens", str(settings.max_tokens), prompt]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
            found = re.search(r"(\d+) tokens at ([\d.]+) tok/s", done.stderr + done.stdout)
            if done.returncode or not found:
                raise SystemExit(f"ask failed ({done.returncode}): {(done.stderr or done.stdout)[-500:]}")
            out.append(float(found.group(2)))
    return out


# ---------------------------------------------------------------- numbers
def pct_or_dash(x: float | None) -> str:
    return "–" if x is None else f"{x * 100:.0f}%"


def ms(x: float | None) -> str:
    return "–" if x is None else f"{x * 1000:.0f}"


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def d(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def stalls(bench: Bench, r: ReplyRecord, over: float = 0.05) -> list[dict]:
    """Every event-loop lag above `over` while the reply ran, with what overlapped it: garbage
    collections, the longest pause between the worker's pieces, the main thread's sampled stack."""
    out = []
    for t, lag in bench.lag:
        if not (r.t_enter <= t <= (r.t_end or t)) or lag < over:
            continue
        t1 = t + POLL_S + lag
        gcs = [(g, round(dur * 1e3)) for tg, dur, g in bench.gcs if tg < t1 and tg + dur > t]
        piece_gap = max((b[0] - a[0] for a, b in zip(r.pieces, r.pieces[1:]) if a[0] < t1 and b[0] > t), default=0)
        samples = [(round(late * 1e3), where) for ts, late, where in bench.samples if t <= ts <= t1 + 0.02]
        out.append({"at_s": t - r.t_enter, "lag_ms": lag * 1e3, "gc": gcs, "piece_gap_ms": piece_gap * 1e3,
                    "samples": samples})
    return out


def per_s(x: float | None, r: ReplyRecord) -> str:
    """Milliseconds per second of the decode (first to last piece)."""
    if x is None or r.t_first_piece is None or r.t_last_piece is None or r.t_last_piece - r.t_first_piece < 0.2:
        return "–"
    return f"{x * 1000 / (r.t_last_piece - r.t_first_piece):.0f}"


def busy_between(bench: Bench, t0: float | None, t1: float | None) -> float | None:
    """Seconds the main thread spent in screen updates (layout, compositor, frame) between t0 and t1."""
    if t0 is None or t1 is None:
        return None
    return sum(max(0.0, min(t + dur, t1) - max(t, t0)) for t, dur in bench.timer_updates)


def ui_cpu_share(bench: Bench, r: ReplyRecord) -> float | None:
    """The main (UI) thread's CPU time over wall time, from the first to the last frame while the
    worker wrote pieces (thread_time is read at each frame)."""
    if r.t_first_piece is None or r.t_last_piece is None:
        return None
    inside = [f for f in bench.frames if r.t_first_piece <= f[0] <= r.t_last_piece]
    if len(inside) < 2 or inside[-1][0] - inside[0][0] < 0.2:
        return None
    return (inside[-1][3] - inside[0][3]) / (inside[-1][0] - inside[0][0])


def long_summary(run: dict) -> dict:
    r: ReplyRecord = run["record"]
    t0, t1 = r.t_visible, r.t_last_piece
    span = (t1 - t0) if t0 and t1 else float("nan")
    frames = [f for f in run["frames"] if t0 <= f[0] <= t1]
    ft = [f[0] for f in frames]
    gaps = [b - a for a, b in zip(ft, ft[1:])]
    appends = [a for a in run["appends"] if t0 <= a[0] <= t1]
    at = [a[0] for a in appends]
    agaps = [b - a for a, b in zip(at, at[1:])]
    updates = [u for u in run["timer_updates"] if t0 <= u[0] <= t1]
    drains = [x for x in run["drains"] if t0 <= x[0] <= t1]
    lag = [x[1] for x in run["lag"] if t0 <= x[0] <= t1]
    pieces = [p for p in r.pieces if t0 <= p[0] <= t1]
    keys = run["keys"]
    return {
        "span_s": span,
        "frames": len(frames), "fps": len(frames) / span,
        "frame_gap_p50_ms": pct(gaps, 50) * 1e3, "frame_gap_p95_ms": pct(gaps, 95) * 1e3,
        "frame_gap_max_ms": max(gaps, default=float("nan")) * 1e3,
        "content_ups": len(appends) / span,
        "content_gap_p50_ms": pct(agaps, 50) * 1e3, "content_gap_p95_ms": pct(agaps, 95) * 1e3,
        "content_gap_max_ms": max(agaps, default=float("nan")) * 1e3,
        "append_p50_ms": pct([a[1] for a in appends], 50) * 1e3,
        "append_max_ms": max((a[1] for a in appends), default=float("nan")) * 1e3,
        "update_p50_ms": pct([u[1] for u in updates], 50) * 1e3,
        "update_p95_ms": pct([u[1] for u in updates], 95) * 1e3,
        "update_max_ms": max((u[1] for u in updates), default=float("nan")) * 1e3,
        "render_p50_ms": pct([f[1] for f in frames], 50) * 1e3,
        "render_max_ms": max((f[1] for f in frames), default=float("nan")) * 1e3,
        "check_total_ms": sum(f[2] for f in run["frames"]) * 1e3,
        "drains_per_s": len(drains) / span,
        "drain_p50_ms": pct([x[1] for x in drains], 50) * 1e3,
        "drain_max_ms": max((x[1] for x in drains), default=float("nan")) * 1e3,
        "lag_p50_ms": pct(lag, 50) * 1e3, "lag_p95_ms": pct(lag, 95) * 1e3,
        "lag_max_ms": max(lag, default=float("nan")) * 1e3,
        "pieces_per_s": len(pieces) / span,
        "main_cpu_share": run["main_cpu_s"] / (r.t_end - r.t_enter),
        "keys": len(keys),
        "key_handled_p50_ms": pct([k["t_handled"] - k["t_sent"] for k in keys], 50) * 1e3,
        "key_visible_p50_ms": pct([k["t_visible"] - k["t_sent"] for k in keys if k["t_visible"]], 50) * 1e3,
        "key_visible_max_ms": max((k["t_visible"] - k["t_sent"] for k in keys if k["t_visible"]),
                                  default=float("nan")) * 1e3,
        "keys_not_seen": sum(1 for k in keys if k["t_visible"] is None),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=5, help="warm prompts (default 5)")
    ap.add_argument("--short-tokens", type=int, default=64, help="max tokens of the TTFT prompts")
    ap.add_argument("--long-tokens", type=int, default=400, help="max tokens of the long reply")
    ap.add_argument("--long-runs", type=int, default=2, help="long replies of prose (a story)")
    ap.add_argument("--list-runs", type=int, default=1, help="long replies that are one long Markdown list")
    ap.add_argument("--size", default="120x40", help="terminal size, COLSxROWS (default 120x40)")
    ap.add_argument("--hand-over-s", type=float, default=None,
                    help="what if: the app's GIL switch interval were this (app/threads.py HAND_OVER_S)")
    ap.add_argument("--ask-rounds", type=int, default=1,
                    help="after the app, `llamadesk ask` on the warm prompts this many times (0: none)")
    ap.add_argument("--no-render", action="store_true", help="do not build the terminal output of each frame")
    ap.add_argument("--max-load", type=float, default=0.5, help="wait while the 1-min load is above this")
    ap.add_argument("--wait-load", type=float, default=300, help="wait at most this long for the load (s)")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--default-home", type=Path, default=None,
                    help="source of the models folder (default: the test suite's home of the default model)")
    ap.add_argument("--model", default=None,
                    help="the ref to chat with, installed in that home (default: its default model), e.g. "
                         "llama-1b:source from tests/bench/make_1b_gguf.py and `llamadesk import`")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for the engine instead of default_threads(), which counts the cores the "
                         "1-min load leaves idle when the model loads")
    ap.add_argument("--diagnose", action="store_true",
                    help="sample the main thread's stack every 10 ms, to say what a stall was doing")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    ap.add_argument("--poll-ms", type=float, default=5.0,
                    help="period of the script's own event-loop checks (lag probe, waits; default 5 ms)")
    args = ap.parse_args()
    global POLL_S
    POLL_S = args.poll_ms / 1000

    from app import pull, store

    source = args.default_home or pull.cache_dir() / f"test-home-v{store.FORMAT_VERSION}"
    name = (args.model or DEFAULT).split(":")[0]
    if not (source / "models" / name).is_dir():
        print(f"{source}/models/{name} is missing: run the test suite once (the default_home fixture), or "
              "import it there.", file=sys.stderr)
        return 2
    command = "python " + " ".join([str(Path(sys.argv[0]).resolve().relative_to(REPO))
                                    if Path(sys.argv[0]).resolve().is_relative_to(REPO) else sys.argv[0]]
                                   + sys.argv[1:])
    load_first = load_avg()
    wait_for_quiet(args.max_load, args.wait_load)
    load_start = load_avg()
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    code = code_line()

    with tempfile.TemporaryDirectory(prefix="llamadesk-tuibench-") as tmp:
        home = Path(tmp)
        shutil.copytree(source / "models", home / "models")
        os.environ["LLAMADESK_HOME"] = str(home)
        os.chdir(home)

        from app.history import ChatSettings

        bench = Bench(render=not args.no_render)
        instrument(bench)
        if args.threads:
            import app.engine

            app.engine.inference_threads = lambda requested=None, ui=False: args.threads  # the start count
        if args.hand_over_s:
            import app.threads

            app.threads.HAND_OVER_S = args.hand_over_s
        if args.diagnose:
            threading.Thread(target=sample_main, args=(bench,), daemon=True).start()
        short = ChatSettings(temperature=0.0, max_tokens=args.short_tokens)
        long = ChatSettings(temperature=0.0, max_tokens=args.long_tokens)
        out = asyncio.run(drive(args, bench, long, short))
        asks = ask_runs(out["model"], WARM_PROMPTS[:args.prompts], short, args.ask_rounds)
        asks_long = ask_runs(out["model"], [LONG_PROMPT] if args.long_runs else [], long, args.ask_rounds)
        load_end = load_avg()

    records: list[ReplyRecord] = out["records"]
    longs = [long_summary(x) for x in out["long"]]
    alone = [r.alone for r in records + [x["record"] for x in out["long"]]]
    import textual
    import torch

    # ---------------- the console table
    print(f"\ncode {code}")
    print(f"model {out['model']}, ctx {out['ctx']}, torch threads {out['threads']}, load: first {load_first}, "
          f"start {load_start}, prompts {out['load_at_prompts']}, long {out['load_at_long']}, end {load_end}; "
          f"model load {out['load_s']:.1f} s; GIL switch interval {sys.getswitchinterval() * 1e3:.2f} ms\n")
    hdr = ("reply", "prompt tok", "reused", "Enter→key", "Enter→submit", "submit→started", "started→stream",
           "stream→1st piece", "engine TTFT", "1st piece→write", "write→append", "append→visible",
           "1st piece→visible", "Enter→visible", "tok/s app", "engine alone TTFT", "tok/s alone",
           "UI updates in prefill", "UI CPU% decoding", "updates ms/s", "appends ms/s", "load at Enter")
    rows = []
    for r, a in zip(records + [x["record"] for x in out["long"]], alone):
        rows.append((r.label, str(r.prompt_tokens), str(r.reused_tokens), ms(d(r.t_enter, r.t_key)),
                     ms(d(r.t_enter, r.t_submitted)), ms(d(r.t_submitted, r.t_started)),
                     ms(d(r.t_started, r.t_stream)), ms(d(r.t_stream, r.t_first_piece)), ms(r.engine_ttft_s),
                     ms(d(r.t_first_piece, r.t_first_write)), ms(d(r.t_first_write, r.t_first_append)),
                     ms(d(r.t_first_append, r.t_visible)), ms(d(r.t_first_piece, r.t_visible)),
                     ms(d(r.t_enter, r.t_visible)), f"{r.engine_tok_s:.1f}", ms(a["ttft_s"]), f"{a['tok_s']:.1f}",
                     ms(busy_between(bench, r.t_stream, r.t_first_piece)),
                     "–" if ui_cpu_share(bench, r) is None else f"{ui_cpu_share(bench, r) * 100:.0f}",
                     per_s(busy_between(bench, r.t_first_piece, r.t_last_piece), r),
                     per_s(sum(dur for t, dur, _ in bench.appends if r.t_first_piece <= t <= r.t_last_piece), r),
                     r.load.split()[0]))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(hdr)]
    print("  ".join(h.rjust(w) for h, w in zip(hdr, widths)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))

    for r in records + [x["record"] for x in out["long"]]:
        print(f"  {r.label}: {r.new_tokens} tokens: {r.text[:100]!r}")
    warm = records[1:]
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    warm_visible = med([r.t_visible - r.t_enter for r in warm if r.t_visible])
    warm_ttft = med([r.engine_ttft_s for r in warm])
    warm_ui = med([r.t_visible - r.t_first_piece for r in warm if r.t_visible and r.t_first_piece])
    warm_pre = med([r.t_stream - r.t_enter for r in warm if r.t_stream])
    warm_toks = med([r.engine_tok_s for r in warm])
    alone_warm = alone[1:len(records)]
    alone_ttft = med([a["ttft_s"] for a in alone_warm])
    alone_toks = med([a["tok_s"] for a in alone_warm])
    cold = records[0]
    idle_keys = out["keys_idle"]
    idle_handled = med([k["t_handled"] - k["t_sent"] for k in idle_keys if k["t_handled"]])
    idle_visible = med([k["t_visible"] - k["t_sent"] for k in idle_keys if k["t_visible"]])
    print(f"\nwarm medians ({len(warm)} prompts): Enter→visible {ms(warm_visible)} ms = Enter→Engine.stream "
          f"{ms(warm_pre)} + engine TTFT {ms(warm_ttft)} + first piece→visible {ms(warm_ui)} (+ rest); "
          f"tok/s in app {warm_toks:.1f}, engine alone TTFT {ms(alone_ttft)} ms, {alone_toks:.1f} tok/s")
    app_long = med([x["record"].engine_tok_s for x in out["long"] if "list" not in x["record"].label])
    for what, runs, app_toks in (("warm prompts", asks, warm_toks), ("long story", asks_long, app_long)):
        if runs:
            print(f"`llamadesk ask` on the same {what}, variant and sampling, {len(runs)} runs: median "
                  f"{med(runs):.1f} tok/s ({min(runs):.1f}-{max(runs):.1f}); the app's median {app_toks:.1f} is "
                  f"{app_toks / med(runs):.2f}x of it (issue 4/6: within 10%)")
    print(f"keypress with the model idle: handled {ms(idle_handled)} ms, visible {ms(idle_visible)} ms (median of "
          f"{len(idle_keys)})")
    for x, s in zip(out["long"], longs):
        r = x["record"]
        print(f"\n{r.label}: {r.new_tokens} tokens, {r.chars} chars, streaming {s['span_s']:.1f} s "
              f"(first visible to last piece); pieces {s['pieces_per_s']:.1f}/s, drain ticks {s['drains_per_s']:.1f}/s "
              f"(p50 {s['drain_p50_ms']:.1f} ms, max {s['drain_max_ms']:.0f} ms)")
        print(f"  frames {s['frames']} = {s['fps']:.1f}/s; gap p50 {s['frame_gap_p50_ms']:.0f} ms, p95 "
              f"{s['frame_gap_p95_ms']:.0f} ms, max {s['frame_gap_max_ms']:.0f} ms; screen update (layout+compositor) "
              f"p50 {s['update_p50_ms']:.1f} ms, p95 {s['update_p95_ms']:.1f} ms, max {s['update_max_ms']:.0f} ms; "
              f"render to escape codes p50 {s['render_p50_ms']:.1f} ms, max {s['render_max_ms']:.0f} ms")
        print(f"  content updates {s['content_ups']:.1f}/s; gap p50 {s['content_gap_p50_ms']:.0f} ms, p95 "
              f"{s['content_gap_p95_ms']:.0f} ms, max {s['content_gap_max_ms']:.0f} ms; Markdown.append p50 "
              f"{s['append_p50_ms']:.1f} ms, max {s['append_max_ms']:.0f} ms")
        print(f"  event-loop lag p50 {s['lag_p50_ms']:.1f} ms, p95 {s['lag_p95_ms']:.1f} ms, max {s['lag_max_ms']:.0f} ms; "
              f"main thread CPU {s['main_cpu_share'] * 100:.0f}% of the reply's wall time; "
              f"measuring checks {s['check_total_ms']:.0f} ms in all")
        print(f"  keypress during the reply ({s['keys']}): handled p50 {s['key_handled_p50_ms']:.0f} ms, visible p50 "
              f"{s['key_visible_p50_ms']:.0f} ms, max {s['key_visible_max_ms']:.0f} ms, not seen in 2 s: "
              f"{s['keys_not_seen']}")
    for x in [{"record": r} for r in records] + out["long"]:
        r = x["record"]
        found = stalls(bench, r)
        if not found:
            continue
        gen2 = sum(1 for st in found if any(g == 2 for g, _ in st["gc"]))
        print(f"  {r.label}: {len(found)} loop stalls over 50 ms, longest {max(st['lag_ms'] for st in found):.0f} ms, "
              f"{gen2} during a full collection; the longest five:")
        for st in sorted(found, key=lambda st: -st["lag_ms"])[:5]:
            gcs = [(g, ms_) for g, ms_ in st["gc"] if g or ms_]
            print(f"    +{st['at_s']:.2f} s after Enter: loop lag {st['lag_ms']:.0f} ms; gc (gen, ms) {gcs or 'none'}; "
                  f"longest worker piece gap over it {st['piece_gap_ms']:.0f} ms")
            for late, where in st["samples"][:4]:
                print(f"      sample (late {late} ms): {where}")
    before = [round(dur * 1e3) for t, dur, g in bench.gcs if g == 2 and t < records[0].t_enter]
    after = [dur * 1e3 for t, dur, g in bench.gcs if g == 2 and t >= records[0].t_enter]
    print(f"\ngarbage collections: {len(bench.gcs)}; full ones before the 1st Enter (ms): {before}; after: "
          f"{len(after)}, " + (f"{min(after):.0f} to {max(after):.0f} ms, median {statistics.median(after):.0f} ms"
                               if after else "none")
          + f"; torch threads seen by the reply worker: {bench.worker_threads}"
          + f"; decode threads at each reply's end (the governor's): {bench.decode_threads}")

    # ---------------- the Markdown snippet
    L = longs
    lr = [x["record"] for x in out["long"]]
    snippet = [
        "## Chat app: keypress to first token, frame rate",
        "",
        f"Date: {date}. Machine: `lscpu` model name \"{cpu_name()}\", {os.cpu_count()} cores; Python "
        f"{platform.python_version()}, torch {torch.__version__}, textual {textual.__version__}. Load (`uptime` 1, 5, "
        f"15 min): {load_start} at the start, {out['load_at_long']} before the long replies, {load_end} at the end. "
        f"Code: {code}.",
        "",
        f"    {command}",
        "",
        f"The app runs headless under `App.run_test()` at {args.size}, on {out['model']} (ctx {out['ctx']}, "
        f"{out['threads']} torch threads, " + (f"forced with --threads" if args.threads else
        "as `default_threads()` chose from the load when the model loaded") + f"), greedy. Each prompt "
        f"goes into a new chat (Ctrl+N), is put in the prompt box, and Enter is pressed with `pilot.press`. "
        f"Short replies stop at {args.short_tokens} tokens, the long ones at {args.long_tokens}: \"long\" asks "
        f"for a story in paragraphs, \"long list\" for a list of 40 fruits (one numbered list, one top-level "
        f"Markdown block that grows with every piece). "
        f"The points are wrappers the script puts on app and Textual methods; the app is not changed. "
        f"\"Visible\" is the first frame (`App._display` of the chat screen) whose cells inside the reply's "
        f"Markdown widget hold a non-blank character. Each frame is also turned into escape codes "
        f"(`render_segments`, which headless Textual skips), so frames cost what a terminal's would"
        f"{' (off in this run)' if args.no_render else ''}."
        f" Engine TTFT and tok/s are `engine.last`; "
        f"\"alone\" is the same `Engine.stream` call (same messages, same reused KV-cache prefix) made again right "
        f"after the app's reply, on the app's model thread while the event loop waits, so the UI does nothing "
        f"meanwhile.",
        "",
        "| reply | prompt tokens (reused) | Enter → `Engine.stream` (ms) | engine TTFT (ms) | first piece → visible (ms) "
        "| **Enter → visible (ms)** | tok/s in app | engine alone: TTFT (ms), tok/s | UI thread CPU while decoding |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r, a in zip(records + lr, alone):
        snippet.append(f"| {r.label} | {r.prompt_tokens} ({r.reused_tokens}) | {ms(d(r.t_enter, r.t_stream))} | "
                       f"{ms(r.engine_ttft_s)} | {ms(d(r.t_first_piece, r.t_visible))} | "
                       f"**{ms(d(r.t_enter, r.t_visible))}** | {r.engine_tok_s:.1f} | {ms(a['ttft_s'])}, {a['tok_s']:.1f} | "
                       f"{pct_or_dash(ui_cpu_share(bench, r))} |")
    snippet += [
        f"| **warm median** | | {ms(warm_pre)} | {ms(warm_ttft)} | {ms(warm_ui)} | **{ms(warm_visible)}** | "
        f"{warm_toks:.1f} | {ms(alone_ttft)}, {alone_toks:.1f} | |",
        "",
        "While a long reply streams (from the first visible text to the last piece): a frame is one `App._display` "
        "of the chat screen; a content update is one finished `Markdown.append` on the reply; event-loop lag is how "
        "late a 5 ms sleep on the app's loop wakes; a keypress is a Key event sent as the terminal driver sends it, "
        "timed to the first frame that shows the character in the prompt box.",
        "",
        "| reply | tokens | stream (s) | frames/s | frame gap p50 / p95 / max (ms) | content updates/s "
        "| content gap p95 / max (ms) | screen update p50 / max (ms) | loop lag p95 / max (ms) "
        "| keypress → visible p50 / max (ms) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r, s in zip(lr, L):
        snippet.append(
            f"| {r.label} | {r.new_tokens} | {s['span_s']:.1f} | {s['fps']:.1f} | {s['frame_gap_p50_ms']:.0f} / "
            f"{s['frame_gap_p95_ms']:.0f} / {s['frame_gap_max_ms']:.0f} | {s['content_ups']:.1f} | "
            f"{s['content_gap_p95_ms']:.0f} / {s['content_gap_max_ms']:.0f} | {s['update_p50_ms']:.1f} / "
            f"{s['update_max_ms']:.0f} | {s['lag_p95_ms']:.0f} / {s['lag_max_ms']:.0f} | "
            f"{s['key_visible_p50_ms']:.0f} / {s['key_visible_max_ms']:.0f} ({s['keys']} keys"
            + (f", {s['keys_not_seen']} not shown within 2 s" if s['keys_not_seen'] else "") + ") |")
    snippet.append(f"| model idle | | | | | | | | | {ms(idle_visible)} / "
                   f"{ms(max((k['t_visible'] - k['t_sent'] for k in idle_keys if k['t_visible']), default=None))} "
                   f"({len(idle_keys)} keys) |")
    all_stalls = [st for r in records + lr for st in stalls(bench, r)]
    t_first, t_last = records[0].t_enter, max(r.t_end for r in records + lr)
    gen2 = [dur for t, dur, g in bench.gcs if g == 2 and t_first <= t <= t_last]
    with_gc = [st for st in all_stalls if any(g == 2 for g, _ in st["gc"])]
    snippet += [
        "",
        f"Stalls: {len(all_stalls)} event-loop stalls over 50 ms while the {len(records) + len(lr)} replies ran "
        f"(longest {max((st['lag_ms'] for st in all_stalls), default=0):.0f} ms), {len(with_gc)} of them during a full "
        f"(generation 2) garbage collection. From the first Enter to the last reply's end there were {len(gen2)} full "
        f"collections, "
        + (f"{min(gen2) * 1e3:.0f} to {max(gen2) * 1e3:.0f} ms each" if gen2 else "none")
        + "; a collection holds the GIL, so the model's worker thread stops with the UI.",
    ]
    print("\n----- Markdown for docs/BENCHMARKS.md -----\n")
    print("\n".join(snippet))

    if args.json:
        raw = {"command": command, "date": date, "cpu": cpu_name(), "load": [load_first, load_start, load_end],
               **{k: v for k, v in out.items() if k not in ("records", "long")},
               "records": [asdict(r) for r in records],
               "long": [{"record": asdict(x["record"]), "summary": s, "frames": x["frames"],
                         "appends": x["appends"], "lag": x["lag"], "keys": x["keys"]}
                        for x, s in zip(out["long"], longs)],
               "engine_alone": alone}
        for rec in raw["records"] + [x["record"] for x in raw["long"]]:
            rec.pop("call", None)
            rec.pop("cached_before", None)
        args.json.write_text(json.dumps(raw, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
