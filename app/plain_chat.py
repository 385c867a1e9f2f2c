"""`llamadesk chat --plain`: a line-by-line chat, with Ollama's `>>>` prompt and Ollama's commands.

    >>> What is RoPE?          a prompt; the reply streams on stdout
    >>> \"\"\"                   opens a multi-line prompt, closed by a line ending in \"\"\"
    >>> /set parameter temperature 0
    >>> /set system Answer in one sentence.
    >>> /show parameters       /show info, /show system
    >>> /clear                 forget the conversation (a new chat in the history)
    >>> /bye                   quit (Ctrl-D too); Ctrl-C stops a reply

Replies go to stdout, everything else (notices, warnings) to stderr. The conversation is saved
in the history like the chat app's. When it outgrows the context, the oldest turns are left out
of what the model sees (as in the chat app) with a notice, and a reply the context cut is said
to be cut. The `>>>` prompt shows only on a terminal, so piped output is the replies alone.
"""
from __future__ import annotations

import sys
import threading
from dataclasses import replace
from typing import Callable, Iterator, TextIO

from .context import PromptTooLong, fit_to_context, reply_room
from .errors import UserError
from .history import ChatSettings, History, title_for
from .prompt_text import from_shell

HELP = """Available commands:
  /set parameter NAME VALUE  set a parameter: num_ctx, temperature, top_k, top_p, repeat_penalty,
                             repeat_last_n, seed, num_predict, stop (stop adds a stop string)
  /set system TEXT           set the system prompt
  /show [info|parameters|system]   show the model, the parameters or the system prompt
  /clear                     forget this conversation (the next prompt starts a new chat)
  /bye                       quit (Ctrl-D quits too)
  /?, /help                  this help
Use \"\"\" to begin and end a multi-line message. Ctrl-C stops a reply."""

# Ollama's parameter names -> (SamplingParams field or a setting of this session, parser)
PARAMETERS: dict[str, tuple[str, Callable[[str], object]]] = {
    "temperature": ("temperature", float),
    "top_k": ("top_k", int),
    "top_p": ("top_p", float),
    "repeat_penalty": ("repetition_penalty", float),
    "repeat_last_n": ("repeat_last_n", int),
    "seed": ("seed", int),
    "num_predict": ("num_predict", int),
    "num_ctx": ("num_ctx", int),
    "stop": ("stop", str),
}


class PlainChat:
    """One session. `load(ctx)` gives an engine (`app.engine.Engine` or a test's stand-in) with
    `.entry.ref`, `.ctx`, `.prompt_ids(messages)`, `.stream(messages, params, max_tokens, cancel)`
    and `.last.new_tokens`/`.last.prompt_tokens`."""

    def __init__(self, load: Callable[[int | None], object], params, system: str | None = None,
                 max_tokens: int = 1024, history: History | None = None, say: Callable[[str], None] = print,
                 out: TextIO | None = None, interactive: bool = False, ctx: int | None = None):
        self.load = load
        self.engine = load(ctx)
        self.params = params
        self.system = system or ""
        self.max_tokens = max_tokens
        self.stops: list[str] = []
        self.history = history
        self.say = say
        self.out = out or sys.stdout
        self.interactive = interactive
        self.messages: list[dict] = []
        self.conversation_id: int | None = None

    # ------------------------------------------------------------ the loop
    def run(self, lines: Iterator[str]) -> int:
        """Read prompts and commands from `lines` until /bye or their end; the exit status."""
        for text in _prompts(lines, self.say):
            if text.startswith("/"):
                if not self.command(text):
                    return 0
            elif text.strip():
                self.ask(text)
        return 0

    def ask(self, text: str) -> str:
        """Send one prompt; stream the reply to `out`; return it (also what is saved)."""
        text = text.rstrip()
        system = [{"role": "system", "content": self.system}] if self.system else []
        asked = self.messages + [{"role": "user", "content": text}]
        ctx = self.engine.ctx
        try:
            fitted = fit_to_context(system + asked, lambda m: len(self.engine.prompt_ids(m)), ctx,
                                    reply_room(self.max_tokens, ctx), getattr(self.engine, "max_ctx", None))
        except PromptTooLong as e:
            self.say(f"llamadesk: not sent: {e}")
            return ""
        if fitted.dropped:
            self.say(f"(the conversation no longer fits the {ctx}-token context: the oldest {fitted.dropped} "
                     f"messages are left out of this reply{' (the system prompt stays)' if system else ''})")
        self.messages = asked
        self._save("user", text)
        reply, cut_by_stop, interrupted = self._stream(fitted.messages)
        stats = self.engine.last
        if interrupted:
            self.say("(stopped)")
        elif not cut_by_stop and stats.prompt_tokens + stats.new_tokens >= ctx:
            self.say(f"(the reply was cut: the {ctx}-token context is full; the oldest turns will be left "
                     f"out of the next one)")
        self.messages.append({"role": "assistant", "content": reply})
        self._save("assistant", reply, stopped=interrupted)
        return reply

    def _stream(self, messages: list[dict]) -> tuple[str, bool, bool]:
        """(the reply, whether a stop string ended it, whether Ctrl-C did)."""
        cancel = threading.Event()
        shown, held = "", ""  # text written, and text held back while it may begin a stop string
        limit = self.max_tokens if self.max_tokens > 0 else self.engine.ctx
        try:
            for piece in self.engine.stream(messages, self.params, limit, cancel):
                held += piece
                hit = min((held.find(s) for s in self.stops if s in held), default=-1)
                if hit >= 0:
                    cancel.set()
                    self._write(held[:hit])
                    return shown + held[:hit], True, False
                keep = _longest_stop_prefix(held, self.stops)
                self._write(held[:len(held) - keep])
                shown, held = shown + held[:len(held) - keep], held[len(held) - keep:]
        except KeyboardInterrupt:
            cancel.set()
            self._write(held + "\n")
            return shown + held, False, True
        self._write(held + "\n")
        return shown + held, False, False

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def _save(self, role: str, text: str, stopped: bool = False) -> None:
        if self.history is None or not text:
            return
        if self.conversation_id is None or not self.history.exists(self.conversation_id):
            self.conversation_id = self.history.create(title_for(text), self._settings()).id
        model = self.engine.entry.ref if role == "assistant" else None
        self.history.add_message(self.conversation_id, role, text, stopped=stopped, model=model)

    def _settings(self) -> ChatSettings:
        """What this chat runs at, as the app would reopen it (not ChatSettings' generic defaults)."""
        return ChatSettings.from_sampling(self.params, self.system or "",
                                          **({"max_tokens": self.max_tokens} if self.max_tokens > 0 else {}))

    def _keep_settings(self) -> None:
        """A /set after the chat began: saved with it too, so that reopened it runs as it does now."""
        if self.history is not None and self.conversation_id is not None and self.history.exists(self.conversation_id):
            self.history.set_settings(self.conversation_id, self._settings())

    # ------------------------------------------------------------ commands
    def command(self, line: str) -> bool:
        """Run one /command; False means quit."""
        words = line.split()
        name = words[0].lower()
        if name in ("/bye", "/exit"):
            return False
        if name in ("/?", "/help"):
            self._write(HELP + "\n")
        elif name == "/clear":
            self.messages, self.conversation_id = [], None
            self.say("Cleared session context")
        elif name == "/show":
            self._show(words[1] if len(words) > 1 else "info")
        elif name == "/set" and len(words) >= 3 and words[1] == "system":
            self.system = line.split(None, 2)[2].strip()
            self._keep_settings()
            self.say("Set system message.")
        elif name == "/set" and len(words) == 4 and words[1] == "parameter":
            self._set(words[2], words[3])
        elif name == "/set":
            self.say("usage: /set parameter NAME VALUE, or /set system TEXT (/? lists the parameters)")
        else:
            self.say(f"Unknown command '{words[0]}'. Type /? for help")
        return True

    def _set(self, name: str, raw: str) -> None:
        if name not in PARAMETERS:
            self.say(f"Unknown parameter '{name}' (known: {', '.join(PARAMETERS)})")
            return
        field, parse = PARAMETERS[name]
        try:
            value = parse(raw)
        except ValueError:  # Python's own words ("could not convert string to float") say less
            kind = {int: "a whole number", float: "a number"}.get(parse, "a value")
            self.say(f"Couldn't set parameter: {name} takes {kind}, not {raw!r}")
            return
        try:
            if field == "num_predict":
                self.max_tokens = value
            elif field == "stop":
                self.stops.append(value)
            elif field == "num_ctx":
                self._resize(value)
            else:
                self.params = replace(self.params, **{field: value})
        except (ValueError, UserError) as e:
            self.say(f"Couldn't set parameter: {name} {raw!r}: {e}")
            return
        self._keep_settings()
        self.say(f"Set parameter '{name}' to '{raw}'")

    def _resize(self, ctx: int) -> None:
        if ctx < 16:
            raise ValueError("num_ctx must be at least 16")
        old = self.engine.ctx
        self.engine = None  # the old model goes first, so two never sit in memory together
        try:
            self.engine = self.load(ctx)
        except (ValueError, UserError):
            self.engine = self.load(old)  # refused (too long for the model or the memory): as it was
            raise

    def _show(self, what: str) -> None:
        p = self.params
        if what == "info":
            self._write(f"  model    {self.engine.entry.ref}\n  context  {self.engine.ctx} tokens\n")
        elif what == "parameters":
            rows = [("num_ctx", self.engine.ctx), ("temperature", p.temperature), ("top_k", p.top_k),
                    ("top_p", p.top_p), ("repeat_penalty", p.repetition_penalty),
                    ("repeat_last_n", p.repeat_last_n), ("seed", "random" if p.seed is None else p.seed),
                    ("num_predict", self.max_tokens)]
            rows += [("stop", s) for s in self.stops]
            self._write("".join(f"  {k:15} {v}\n" for k, v in rows))
        elif what == "system":
            self._write((self.system or "(no system prompt)") + "\n")
        else:
            self.say("usage: /show info | parameters | system")


def _longest_stop_prefix(text: str, stops: list[str]) -> int:
    """How many characters at the end of `text` could be the start of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def _prompts(lines: Iterator[str], say: Callable[[str], None]) -> Iterator[str]:
    """Prompts and commands from raw lines: bad bytes replaced (with a warning), \"\"\" blocks joined."""
    block: list[str] | None = None
    for raw in lines:
        line = from_shell(raw.rstrip("\n"), say)
        if block is None:
            if line.lstrip().startswith('"""'):
                rest = line.lstrip()[3:]
                if rest.rstrip().endswith('"""') and rest.strip():
                    yield rest.rstrip()[:-3]
                    continue
                block = [rest] if rest else []
                continue
            yield line
        elif line.rstrip().endswith('"""'):
            block.append(line.rstrip()[:-3])
            yield "\n".join(block)
            block = None
        else:
            block.append(line)
    if block is not None:
        yield "\n".join(block)


def terminal_lines(interactive: bool) -> Iterator[str]:
    """Lines from stdin; on a terminal with Ollama's `>>> ` (and `... ` inside a \"\"\" block)."""
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # bad bytes reach from_shell, not a traceback
    if not interactive:
        yield from sys.stdin
        return
    in_block = False
    while True:
        try:
            line = input("... " if in_block else ">>> ")
        except EOFError:
            print()
            return
        if line.count('"""') % 2:
            in_block = not in_block
        yield line


__all__ = ["HELP", "PARAMETERS", "PlainChat", "terminal_lines"]
