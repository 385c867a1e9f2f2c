"""Pick one of the installed models and variants to chat with."""
from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option

from ... import store


class ModelPicker(ModalScreen["str | None"]):
    BINDINGS = [("escape", "dismiss(None)", "Cancel")]

    def __init__(self, entries: list[store.ModelEntry], current: str | None) -> None:
        super().__init__()
        self.entries = entries
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="models"):
            yield Label("Chat with which model?", classes="question")
            if not self.entries:
                yield Label("No model is installed. Run `llamadesk pull` or `llamadesk import PATH`.")
                return
            options = []
            for e in self.entries:
                mark = "● " if e.ref == self.current else "  "
                options.append(Option(f"{mark}{e.ref}  ({e.size_bytes / 1e6:,.0f} MB)", id=e.ref))
            yield OptionList(*options, id="model-list", markup=False)

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)
