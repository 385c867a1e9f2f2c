"""Pick the model to chat with: an installed model and variant, or one a server lists."""
from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option

from ... import store


class ModelPicker(ModalScreen["str | None"]):
    """Answers the chosen model's ref (a server's name for it), or None when cancelled. Names,
    a server's included, are shown as text, never markup."""

    BINDINGS = [("escape", "dismiss(None)", "Cancel")]

    def __init__(self, choices: list[tuple[str, str]], current: str | None,
                 none_yet: str = "No model is installed. Run `llamadesk pull` or `llamadesk import PATH`.") -> None:
        """`choices`: (ref, what to show after it)."""
        super().__init__()
        self.choices = choices
        self.current = current
        self.none_yet = none_yet

    @classmethod
    def installed(cls, current: str | None) -> "ModelPicker":
        return cls([(e.ref, f"  ({e.size_bytes / 1e6:,.0f} MB)") for e in store.list_entries()], current)

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="models"):
            yield Label("Chat with which model?", classes="question")
            if not self.choices:
                yield Label(self.none_yet, markup=False)
                return
            options = [Option(f"{'● ' if ref == self.current else '  '}{ref}{more}", id=ref)
                       for ref, more in self.choices]
            yield OptionList(*options, id="model-list", markup=False)

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)
