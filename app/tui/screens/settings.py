"""A conversation's system prompt and sampling settings."""
from __future__ import annotations

from dataclasses import replace

from textual import on
from textual.app import ComposeResult
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, TextArea

from ...history import ChatSettings

# (field, label, parse); an empty seed means a different reply each time; temperature 0 is greedy
_FIELDS = [
    ("temperature", "Temperature", float),
    ("top_p", "Top p", float),
    ("top_k", "Top k (0: off)", int),
    ("repeat_penalty", "Repeat penalty", float),
    ("repeat_last_n", "Repeat last N", int),
    ("max_tokens", "Max tokens", int),
    ("seed", "Seed (empty: any)", lambda s: int(s) if s else None),
]


class SettingsModal(ModalScreen["ChatSettings | None"]):
    BINDINGS = [("escape", "dismiss(None)", "Cancel"), ("ctrl+s", "save", "Save")]

    def __init__(self, settings: ChatSettings, title: str) -> None:
        super().__init__()
        self.settings = settings
        self.title_text = title

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="settings"):
            yield Label(f"Settings for “{self.title_text}”", classes="question", markup=False)
            yield Label("System prompt")
            yield TextArea(self.settings.system, id="system", soft_wrap=True, tab_behavior="focus")
            with Grid(id="knobs"):
                for name, label, _ in _FIELDS:
                    value = getattr(self.settings, name)
                    with Vertical(classes="knob"):
                        yield Label(label)
                        yield Input("" if value is None else str(value), id=name)
            yield Label("", id="problem", markup=False)
            with Horizontal(classes="buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        # focusing the system prompt scrolls a dialog taller than the terminal past its title
        self.call_after_refresh(self.query_one("#settings").scroll_home, animate=False)

    def on_resize(self, event) -> None:
        # four knobs a row need ~80 columns; on a narrow terminal two a row keep labels on one line
        self.set_class(event.size.width < 80, "-narrow")

    def _read(self) -> ChatSettings:
        values = {"system": self.query_one("#system", TextArea).text.strip()}
        for name, label, parse in _FIELDS:
            raw = self.query_one(f"#{name}", Input).value.strip()
            try:
                values[name] = parse(raw)
            except ValueError:
                raise ValueError(f"{label}: {raw!r} is not a number") from None
        settings = replace(self.settings, **values)  # what this modal does not show stays
        settings.sampling_params()  # the engine's own range checks, so the modal and engine agree
        return settings

    @on(Input.Submitted)
    @on(Button.Pressed, "#save")
    def action_save(self) -> None:
        try:
            self.dismiss(self._read())
        except ValueError as e:
            self.query_one("#problem", Label).update(str(e))

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(None)
