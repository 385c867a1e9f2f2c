"""Pick the document collections a chat answers from, and optionally one attached file."""
from __future__ import annotations

from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, SelectionList

from ...docs.attach import file_problem
from ...docs.index import CollectionInfo


class DocsPicker(ModalScreen["tuple[list[str], str] | None"]):
    """Answers (collections, file path or ""), or None when cancelled."""

    BINDINGS = [("escape", "dismiss(None)", "Cancel")]

    def __init__(self, collections: list[CollectionInfo], chosen: list[str], file: str) -> None:
        super().__init__()
        self.collections = collections
        self.chosen = chosen
        self.file = file

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="docs"):
            yield Label("Answer this chat from which documents?", classes="question")
            if self.collections:
                yield SelectionList[str](*[(f"{c.name}  ({c.files} files)", c.name, c.name in self.chosen)
                                           for c in self.collections], id="collections")
            else:
                yield Label("No collections yet: `llamadesk docs add NAME PATH...` makes one.", classes="hint")
            yield Label("Attach a file (empty: none)")
            yield Input(self.file, placeholder="~/notes/plan.md", id="file")
            yield Label("", id="problem", markup=False)
            with Horizontal(classes="buttons"):
                yield Button("Use", variant="primary", id="use")
                yield Button("Cancel", id="cancel")

    @on(Input.Submitted)
    @on(Button.Pressed, "#use")
    def _use(self) -> None:
        file = self.query_one("#file", Input).value.strip()
        problem = file and file_problem(Path(file).expanduser(), file)
        if problem:
            self.query_one("#problem", Label).update(problem)
            return
        names = list(self.query_one(SelectionList).selected) if self.collections else []
        self.dismiss((names, str(Path(file).expanduser()) if file else ""))

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(None)
