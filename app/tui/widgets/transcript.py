"""The conversation: one `MessageView` per message, replies rendered as Markdown while they stream."""
from __future__ import annotations

import time

from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widget import Widget
from textual.widgets import Label, Markdown, Static

# short enough not to wrap beside the sidebar (a wrapped line ended on a dangling "·" at 120
# columns); the footer shows the palette's key
WELCOME = "Ask anything.\nEnter sends · Ctrl+J new line · Esc stops · F1 help"


class MessageView(Vertical):
    """One message. Focusable, so a reply can be picked with Tab and copied. Only replies stream."""

    can_focus = True

    def __init__(self, role: str, content: str, who: str, message_id: int | None = None,
                 stopped: bool = False) -> None:
        super().__init__(classes=f"-{role}" + (" -stopped" if stopped else ""))
        self.role = role
        self.content = content
        self.who = who
        self.message_id = message_id
        self.append_s = 0.0  # how long the last streamed piece took to render
        self.meta: dict = {}  # what goes with the message besides its text, e.g. {"sources": [...]}

    def compose(self) -> ComposeResult:
        yield Label(self.who, classes="who", markup=False)
        # a reply is Markdown; a prompt is shown exactly as typed (its line breaks, its `\[`)
        if self.role == "assistant":
            yield Markdown(self.content)
        else:
            yield Static(self.content, classes="typed", markup=False)
        yield Label("stopped", classes="stopped-mark")

    async def write(self, text: str) -> None:
        """Append streamed text. Markdown.append re-parses only the document's last block, but
        that block whole: a long list costs more with every piece (the caller paces the pieces)."""
        self.content += text
        t0 = time.perf_counter()
        await self.query_one(Markdown).append(text)
        self.append_s = time.perf_counter() - t0

    def mark_stopped(self) -> None:
        self.add_class("-stopped")


class Notice(Static):
    """A line in the transcript that is not a message: context trimmed, a refusal, an error."""

    def __init__(self, text: str, kind: str = "info") -> None:
        super().__init__(text, classes=f"-{kind}", markup=False)


class Transcript(VerticalScroll):
    async def show(self, widgets: list[Widget]) -> None:
        await self.remove_children()
        await self.mount_all(widgets or [Static(WELCOME, id="welcome", markup=False)])
        # a chat at its latest turn, as it was left: scrolled now, the messages have no heights yet
        # (their Markdown lays out later) and the end is the top; anchored, the view follows them
        # down until the user scrolls. The welcome reads from its top.
        self.anchor(bool(widgets))

    async def add(self, widget: Widget, before: Widget | None = None) -> None:
        welcome = self.query("#welcome")
        if welcome:
            await welcome.remove()
        await self.mount(widget, before=before)
        self.anchor()

    def last_reply(self) -> MessageView | None:
        replies = [v for v in self.query(MessageView) if v.role == "assistant"]
        return replies[-1] if replies else None
