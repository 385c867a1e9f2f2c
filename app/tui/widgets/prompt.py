"""The multi-line prompt: Enter sends, Shift+Enter or Ctrl+J starts a new line."""
from __future__ import annotations

from textual import events
from textual.message import Message
from textual.widgets import TextArea


class PromptInput(TextArea):
    class Submitted(Message):
        def __init__(self, prompt: "PromptInput", text: str) -> None:
            super().__init__()
            self.prompt = prompt
            self.text = text

    def __init__(self, **kwargs) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)

    async def _on_key(self, event: events.Key) -> None:
        # Runs before TextArea's own handler, which would insert a newline for Enter; prevent_default
        # keeps that handler from running for the keys decided here. Shift+Enter only reaches
        # terminals that report it (kitty protocol); Ctrl+J is the newline every terminal sends.
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            if self.text.strip():
                self.post_message(self.Submitted(self, self.text))
        elif event.key in ("shift+enter", "ctrl+j"):
            event.stop()
            event.prevent_default()
            self.replace("\n", *self.selection)
