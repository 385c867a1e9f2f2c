"""F1: every key and command, from the same table that makes the bindings and the palette."""
from __future__ import annotations

from rich.table import Table
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, Static


class HelpScreen(ModalScreen[None]):
    BINDINGS = [("escape,f1,q", "dismiss", "Close")]

    def __init__(self, rows: list[tuple[str, str, str]]) -> None:
        super().__init__()
        self.rows = rows

    def compose(self) -> ComposeResult:
        table = Table(box=None, show_header=False, padding=(0, 2, 0, 0), expand=True)
        # keys wrap at their commas ("Shift+Enter," over "Ctrl+J"): on a narrow terminal what a key
        # does needs the room
        table.add_column(style="bold", max_width=14)
        table.add_column(no_wrap=True)
        table.add_column(style="dim")
        for key, title, why in self.rows:
            table.add_row(key, title, why)
        with Vertical(classes="dialog", id="help"):
            yield Label("llamadesk keys", classes="question")
            yield Static(table)
            yield Label("Every command is also in the palette (Ctrl+P). Esc closes this.", classes="hint")
