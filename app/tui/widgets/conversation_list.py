"""The sidebar: conversations, newest first; choosing one posts `ConversationList.Opened`."""
from __future__ import annotations

from textual import on
from textual.message import Message
from textual.widgets import OptionList
from textual.widgets.option_list import Option

from ...history import Conversation


class ConversationList(OptionList):
    """Titles are shown as written: a chat's title comes from its first prompt, never markup."""

    class Opened(Message):
        def __init__(self, conversation_id: int) -> None:
            super().__init__()
            self.conversation_id = conversation_id

    def __init__(self, **kwargs) -> None:
        super().__init__(markup=False, **kwargs)

    def show(self, conversations: list[Conversation], current: int | None) -> None:
        self.clear_options()
        self.add_options(Option(c.title, id=str(c.id)) for c in conversations)
        if current is not None:
            ids = [c.id for c in conversations]
            self.highlighted = ids.index(current) if current in ids else None
        else:
            self.highlighted = None

    def on_focus(self) -> None:
        # Tab lands on a chat, so Enter opens it at once (without this, nothing is highlighted
        # while a new chat is open and Enter does nothing until an arrow key)
        if self.highlighted is None and self.option_count:
            self.highlighted = 0

    @on(OptionList.OptionSelected)
    def _opened(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.post_message(self.Opened(int(event.option.id)))
