"""The status line: model, variant, device, context used / total, tokens/s, memory, and what is happening."""
from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget


class StatusLine(Widget):
    model: reactive[str] = reactive("no model")
    variant: reactive[str] = reactive("")
    device: reactive[str] = reactive("")
    ctx_used: reactive[int] = reactive(0)
    ctx_total: reactive[int] = reactive(0)
    ctx_estimated: reactive[bool] = reactive(False)  # a server that reports no context: our own count
    tokens_per_s: reactive[float | None] = reactive(None)
    memory_bytes: reactive[int | None] = reactive(None)
    activity: reactive[str] = reactive("")
    docs: reactive[str] = reactive("")  # what answers quote: collections, an attached file

    def render(self) -> Text:
        parts = [(self.model, "bold")]
        if self.variant:
            parts.append((self.variant, ""))
        if self.device:
            parts.append((self.device, ""))
        if self.ctx_total:
            about = "~" if self.ctx_estimated else ""
            parts.append((f"ctx {about}{self.ctx_used}/{about}{self.ctx_total}", ""))
        if self.tokens_per_s is not None:
            parts.append((f"{self.tokens_per_s:.1f} tok/s", ""))
        if self.memory_bytes is not None:
            parts.append((f"RSS {self.memory_bytes / 2**20:,.0f} MiB", ""))
        if self.docs:
            parts.append((f"docs: {self.docs}", ""))
        text = Text(" ")
        for i, (part, style) in enumerate(parts):
            if i:
                text.append(" · ", "dim")
            text.append(part, style)
        if self.activity:
            text.append("  ")
            text.append(self.activity, "italic")
        return text
