"""The chat app answering from document collections: the picker, grounded prompts, sources shown."""
from __future__ import annotations

import pytest
from textual.widgets import SelectionList

from app.docs import DocsIndex
from app.history import History
from app.tui.screens.docs import DocsPicker
from app.tui.widgets.status import StatusLine

from test_tui import SIZE, GatedModel, fake_app, notices, replies, send, until

FESTIVAL = "# The Zorbl festival\n\nThe Zorbl festival is held every year in the town of Quillhaven.\n"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMADESK_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "festival.md").write_text(FESTIVAL, encoding="utf-8")
    with DocsIndex() as index:
        index.add("town", [tmp_path / "notes"])
        index.add("empty", [tmp_path / "notes" / "festival.md"])
    return tmp_path


async def ask_and_wait(pilot, app, text: str) -> None:
    n = len(replies(app))
    await send(pilot, text)
    await until(pilot, lambda: app.chat.reply is None and len(replies(app)) == n + 1)


@pytest.mark.asyncio
async def test_a_chat_attaches_a_collection_quotes_it_shows_sources_and_keeps_it_after_a_restart(home):
    model = GatedModel(["Quillhaven", "."], open_gate=True)
    app = fake_app(model)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.chat.model is not None)
        await pilot.press("f9")
        await until(pilot, lambda: isinstance(app.screen, DocsPicker) and app.screen.query(SelectionList))
        app.screen.query_one(SelectionList).select("town")
        app.screen.query_one("#file").focus()
        await pilot.press("enter")  # Enter in the file field, empty: collections only
        await until(pilot, lambda: app.chat.query_one(StatusLine).docs == "town")
        await ask_and_wait(pilot, app, "Where is the Zorbl festival held?")
        prompt = model.prompts[-1][-1]["content"]
        assert f"[1] {home / 'notes' / 'festival.md'}:1" in prompt
        assert "> The Zorbl festival is held every year in the town of Quillhaven." in prompt
        assert notices(app)[-1] == f"Sources: [1] {home / 'notes' / 'festival.md'}:1"
        assert replies(app)[-1].meta == {"sources": [{"n": 1, "path": str(home / "notes" / "festival.md"),
                                                      "line": 1, "page": None}]}
        await ask_and_wait(pilot, app, "How do I bake sourdough bread?")
        assert notices(app)[-1] == "Sources: no source found"
        assert "No source was found in collection town" in model.prompts[-1][-1]["content"]
        conversation_id = app.chat.conversation.id
    history = History()
    assert history.get(conversation_id).settings.docs == ("town",)
    history.close()

    again = GatedModel(["Still", " here"], open_gate=True)
    app = fake_app(again)
    async with app.run_test(size=SIZE) as pilot:
        # the restart reopens the last chat: its collection, and the sources under its old replies
        await until(pilot, lambda: app.chat.model is not None and len(replies(app)) == 2)
        assert app.chat.conversation.id == conversation_id
        assert app.chat.query_one(StatusLine).docs == "town"
        assert notices(app) == [f"Sources: [1] {home / 'notes' / 'festival.md'}:1", "Sources: no source found"]
        assert replies(app)[0].meta == {"sources": [{"n": 1, "path": str(home / "notes" / "festival.md"),
                                                     "line": 1, "page": None}]}
        await ask_and_wait(pilot, app, "What happens at the Zorbl festival in Quillhaven?")
        assert "> The Zorbl festival is held every year" in again.prompts[-1][-1]["content"]
        # the earlier turns reach the model as the user wrote them, not with their passages
        assert again.prompts[-1][0]["content"] == "Where is the Zorbl festival held?"


@pytest.mark.asyncio
async def test_hash_name_in_a_chat_prompt_picks_the_collection_for_that_prompt(home):
    model = GatedModel(["Quillhaven"], open_gate=True)
    app = fake_app(model)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.chat.model is not None)
        await ask_and_wait(pilot, app, "#town Where is the Zorbl festival held?")
        assert "> The Zorbl festival is held" in model.prompts[-1][-1]["content"]
        assert notices(app)[-1] == f"Sources: [1] {home / 'notes' / 'festival.md'}:1"
        await ask_and_wait(pilot, app, "What does #include do in C?")  # no such collection: plain text
        assert model.prompts[-1][-1]["content"] == "What does #include do in C?"
        assert notices(app)[-1] == "#include names no document collection (F9 shows them); sent as text"


@pytest.mark.asyncio
async def test_a_file_attached_and_in_the_chosen_collection_is_one_source(home):
    from dataclasses import replace

    model = GatedModel(["Quillhaven"], open_gate=True)
    app = fake_app(model)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.chat.model is not None)
        festival = home / "notes" / "festival.md"
        app.chat.apply_settings(replace(app.chat.settings, docs=("town",), file=str(festival)))
        await ask_and_wait(pilot, app, "Where is the Zorbl festival held?")
        assert notices(app)[-1] == f"Sources: [1] {festival}:1"
        assert model.prompts[-1][-1]["content"].count("The Zorbl festival is held every year") == 1


@pytest.mark.asyncio
async def test_the_picker_attaches_one_file_and_refuses_a_missing_one(home):
    from textual.widgets import Input, Label

    model = GatedModel(["Quillhaven"], open_gate=True)
    app = fake_app(model)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.chat.model is not None)
        app.action_documents()
        await until(pilot, lambda: isinstance(app.screen, DocsPicker) and app.screen.query("#file"))
        field = app.screen.query_one("#file", Input)
        field.focus()
        field.value = str(home / "nope.md")
        await pilot.press("enter")
        await until(pilot, lambda: str(app.screen.query_one("#problem", Label).render()))
        assert str(app.screen.query_one("#problem", Label).render()) == f"{home / 'nope.md'}: no such file"
        field.value = str(home / "notes")
        await pilot.press("enter")
        await until(pilot, lambda: "folder" in str(app.screen.query_one("#problem", Label).render()))
        assert str(app.screen.query_one("#problem", Label).render()) == (
            f"{home / 'notes'} is a folder; `llamadesk docs add NAME {home / 'notes'}` makes a collection of it")
        field.value = str(home / "notes" / "festival.md")
        await pilot.press("enter")
        await until(pilot, lambda: app.chat.query_one(StatusLine).docs == "festival.md")
        await ask_and_wait(pilot, app, "Where is the Zorbl festival held?")
        assert "> The Zorbl festival is held every year" in model.prompts[-1][-1]["content"]
        assert notices(app)[-1] == f"Sources: [1] {home / 'notes' / 'festival.md'}:1"
