"""First start with no model: offer to download the default one, and show the download's log.

The download's steps (fetch, convert, pack int4, compile the decode step) each take from seconds
to minutes: the log keeps every step's line, and the line under it shows the running step, its
progress when it reports one, and its elapsed time, redrawn twice a second.
"""
from __future__ import annotations

import time
from typing import Callable

from rich.text import Text
from textual import events, on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Label, LoadingIndicator, Static
from textual.worker import Worker, WorkerState

from ...errors import UserError


class PullModal(ModalScreen["str | None"]):
    """Dismissed with the installed model's ref, or None when the user declines."""

    BINDINGS = [("escape", "decline", "Not now")]

    def __init__(self, name: str, pull: Callable[[str], object]) -> None:
        super().__init__()
        self.model_name = name
        self.pull = pull
        self._partial = ""  # printed text not yet ended by a newline
        self._step = ""  # the running step: the last finished line
        self._step_since = time.monotonic()
        self.logged: list[str] = []  # the finished lines: one a step

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="pull"):
            yield Label("No model is installed yet.", classes="question")
            yield Label(f"Download the default model, {self.model_name} (about 100 MB, once)? "
                        f"Everything runs on this machine afterwards.", markup=False)
            with Horizontal(classes="buttons"):
                yield Button("Download", variant="primary", id="download")
                yield Button("Not now", id="decline")
            yield LoadingIndicator()
            yield Label("", id="pull-line", markup=False)
            # one Static wrapped at its own width whenever it is laid out: a RichLog wraps each line
            # once, at the width it had when written (before the dialog showed it, or before its
            # scrollbar came), and then crops it: a path lost its end
            with VerticalScroll(id="pull-log"):
                yield Static("", id="pull-lines")

    @on(Button.Pressed, "#decline")
    def action_decline(self) -> None:
        if not self.has_class("-pulling"):
            self.dismiss(None)

    @on(Button.Pressed, "#download")
    def _download(self) -> None:
        self.add_class("-pulling")
        self.query_one("#pull-line", Label).update("")
        # pull_model reports on stderr through rich; capturing it here turns that into the log
        self.app.begin_capture_print(self, stdout=False, stderr=True)
        self._step, self._step_since = "Starting", time.monotonic()
        self.set_interval(0.5, self._show_step)
        self._pull()

    @work(thread=True, exit_on_error=False)
    def _pull(self) -> str:
        # the model's name, not the variant pulled: pull also packs a variant (the default model's
        # exact int4), and the memory plan picks among them as at every other start
        return self.pull(self.model_name).name

    def on_print(self, event: events.Print) -> None:
        # Writes come in pieces (print sends the text, then the newline) and progress is redrawn
        # with carriage returns (and, from rich, escape codes): each finished line is a step and
        # goes to the log; the line being redrawn is the step's progress.
        *done, self._partial = (self._partial + event.text).split("\n")
        finished = [plain for plain in map(_visible, done) if plain]
        if finished:
            self.logged += finished
            self._step, self._step_since = finished[-1], time.monotonic()
            self.query_one("#pull-lines", Static).update(Text("\n".join(self.logged)))
            self.call_after_refresh(self.query_one("#pull-log").scroll_end, animate=False)
        self._show_step()

    def _show_step(self) -> None:
        if not self.has_class("-pulling"):
            return
        elapsed = int(time.monotonic() - self._step_since)
        # m:ss has no space, so a wrap never parts the number from its unit
        clock = f"{elapsed // 60}:{elapsed % 60:02d}"
        self.query_one("#pull-line", Label).update(f"{_visible(self._partial) or self._step} · {clock}")

    @on(Worker.StateChanged)
    def _pulled(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.SUCCESS:
            self.app.end_capture_print(self)
            self.dismiss(event.worker.result)
        elif event.state == WorkerState.ERROR:
            self.app.end_capture_print(self)
            self.remove_class("-pulling")
            error = event.worker.error
            message = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
            self.query_one("#pull-line", Label).update(f"The download failed: {message}")


def _visible(line: str) -> str:
    """What a terminal would show of a line: the text after the last carriage return, unstyled."""
    return Text.from_ansi(line.rsplit("\r", 1)[-1]).plain.strip()
