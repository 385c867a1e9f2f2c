"""Where the models run: this machine or a saved server; add and remove saved servers.

A connection is a name, a URL and an optional API key (app.connections keeps the key in its own
0600 file, never in the history). Names and URLs are shown as typed: text, never markup.
"""
from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, OptionList
from textual.widgets.option_list import Option

from ...connections import Connection, connections, remove_connection, save_connection
from ...errors import UserError
from ...history import History
from ...remote import api_base

LOCAL = "\0local"  # the option id of this machine: no connection name holds a NUL


class ConnectionPicker(ModalScreen["str | None"]):
    """Answers a saved connection's name, LOCAL for this machine's models, or None when cancelled."""

    BINDINGS = [("escape", "dismiss(None)", "Cancel")]

    def __init__(self, history: History, current: str | None) -> None:
        super().__init__()
        self.history = history
        self.current = current  # the API base the chat uses now (Remote.base; None: this machine)

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="connections"):
            yield Label("Chat with models on which machine?", classes="question")
            yield OptionList(*self._options(connections(self.history)), id="connection-list", markup=False)
            yield Label("Add a server (OpenAI-compatible: llamadesk, llama.cpp, Ollama, vLLM)", classes="hint")
            yield Input(placeholder="name, e.g. nas", id="name")
            yield Input(placeholder="http://nas.local:8462", id="url")
            yield Input(placeholder="API key (optional; kept in a private file, not the history)", password=True,
                        id="key")
            yield Label("", id="problem", markup=False)
            with Horizontal(classes="buttons"):
                yield Button("Add and connect", variant="primary", id="add")
                yield Button("Remove selected", id="remove")
                yield Button("Cancel", id="cancel")

    def _options(self, saved: list[Connection]) -> list[Option]:
        def mark(url: str | None) -> str:
            return "● " if (url and api_base(url)) == self.current else "  "

        return [Option(f"{mark(None)}This machine (installed models)", id=LOCAL)] + [
            Option(f"{mark(c.url)}{c.name}  {c.url}", id=c.name) for c in saved]

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    @on(Input.Submitted)
    @on(Button.Pressed, "#add")
    def _add(self) -> None:
        name, url, key = (self.query_one(f"#{i}", Input).value for i in ("name", "url", "key"))
        try:
            saved = save_connection(self.history, name, url, key)
        except UserError as e:
            self.query_one("#problem", Label).update(str(e))
            return
        self.dismiss(saved.name)

    @on(Button.Pressed, "#remove")
    def _remove(self) -> None:
        listed = self.query_one(OptionList)
        if listed.highlighted is None or listed.get_option_at_index(listed.highlighted).id == LOCAL:
            self.query_one("#problem", Label).update("Pick a saved server in the list first.")
            return
        remove_connection(self.history, listed.get_option_at_index(listed.highlighted).id)
        listed.clear_options()
        listed.add_options(self._options(connections(self.history)))
        self.query_one("#problem", Label).update("")

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(None)
