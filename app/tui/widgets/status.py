"""The status line: model, variant, device, context used / total, tokens/s, memory, and what is happening."""
from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget


class StatusLine(Widget):
    # layout=True: on a narrow terminal a longer line wraps to a second row, so the height changes
    model: reactive[str] = reactive("no model", layout=True)
    variant: reactive[str] = reactive("", layout=True)
    device: reactive[str] = reactive("", layout=True)
    ctx_used: reactive[int] = reactive(0, layout=True)
    ctx_total: reactive[int] = reactive(0, layout=True)
    ctx_estimated: reactive[bool] = reactive(False, layout=True)  # a server that reports no context: our own count
    tokens_per_s: reactive[float | None] = reactive(None, layout=True)
    memory_bytes: reactive[int | None] = reactive(None, layout=True)
    activity: reactive[str] = reactive("", layout=True)
    docs: reactive[str] = reactive("", layout=True)  # what answers quote: collections, an attached file

    def render(self) -> Text:
        return self._fit(self.size.width)

    def get_content_height(self, container, viewport, width: int) -> int:
        return self._fit(width).plain.count("\n") + 1

    def _fit(self, width: int) -> Text:
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
        if self.activity:
            parts.append((self.activity, "italic"))
        # parts go on one line while they fit the width; on a narrow terminal a wrap falls between
        # two parts, never inside one ("RSS 300" over "MiB")
        text, used = Text(" "), 1
        for i, (part, style) in enumerate(parts):
            if i and used + 3 + len(part) > width:
                text.append("\n ")
                used = 1
            elif i:
                text.append(" · ", "dim")
                used += 3
            text.append(part, style)
            used += len(part)
        return text
