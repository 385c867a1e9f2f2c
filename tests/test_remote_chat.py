"""The chat app as a client of a server: saved connections (keys apart from the history), the
context a server does not report, names full of markup, and consent before passages leave.

The fast tests run the app against the replay server of test_remote.py (llama.cpp's recorded
stream on 127.0.0.1); the last runs it against a real `llamadesk serve` in another process.
"""
from __future__ import annotations

import http.server
import json
import stat
import threading
import time

import httpx
import pytest
from textual.widgets import Input, Label, OptionList

from app import cli
from app.connections import (Connection, connections, keys_path, open_connection, remove_connection,
                             save_connection)
from app.errors import UserError
from app.history import ChatSettings, History
from app.remote import ASSUMED_CTX, Remote
from app.tui import ChatApp
from app.tui.screens.connections import ConnectionPicker
from app.tui.screens.dialogs import ConfirmDialog
from app.tui.screens.models import ModelPicker
from app.tui.widgets.prompt import PromptInput
from app.tui.widgets.status import StatusLine

from test_remote import STREAMS, _Replay, replay  # noqa: F401  (a fixture)
from test_tui import RSS, SIZE, GatedModel, notices, replies, send, until
from test_tui_docs import home  # noqa: F401  (a fixture: a home holding the collection "town")

REPLY = "Red, green and blue é ✓"  # what tests/remote_streams/llamacpp.sse says


@pytest.fixture
def server(replay):  # noqa: F811
    handler, url = replay
    handler.stream = (STREAMS / "llamacpp.sse").read_bytes()
    return handler, url


def remote_app(url: str, settings: ChatSettings | None = None, key: str | None = None, **kwargs) -> ChatApp:
    local = GatedModel(["Here."], open_gate=True)
    return ChatApp(None, settings or ChatSettings(temperature=0.0), remote=Remote.connect(url, key),
                   loader=lambda ref: local, memory=lambda: RSS, **kwargs)


async def answered(pilot, app, text: str) -> None:
    n = len(replies(app))
    await send(pilot, text)
    await until(pilot, lambda: app.chat.reply is None and len(replies(app)) == n + 1)


# ---------------------------------------------------------------- saved connections
def test_a_saved_connection_keeps_its_key_in_a_0600_file_never_in_the_history(home):  # noqa: F811
    history = History()
    save_connection(history, "nas", "http://nas.local:8462", "sk-secret-123")
    save_connection(history, "gpu box", "https://gpu.example:8000/v1")
    assert connections(history) == [Connection("nas", "http://nas.local:8462"),
                                    Connection("gpu box", "https://gpu.example:8000/v1")]
    assert stat.S_IMODE(keys_path().stat().st_mode) == 0o600
    assert json.loads(keys_path().read_text()) == {"nas": "sk-secret-123"}
    assert open_connection(history, "nas").client.headers["authorization"] == "Bearer sk-secret-123"
    assert "authorization" not in open_connection(history, "gpu box").client.headers
    with pytest.raises(ValueError, match="secrets are never saved"):
        history.set_state("connections", [{"name": "x", "url": "http://x", "api_key": "k"}])
    with pytest.raises(UserError, match="http:// or https://"):
        save_connection(history, "bad", "nas.local:8462")
    with pytest.raises(UserError, match="needs a name"):
        save_connection(history, "  ", "http://nas.local:8462")
    history.close()
    for f in home.glob("history.sqlite3*"):  # the database, its WAL and shared memory
        assert b"sk-secret-123" not in f.read_bytes(), f

    history = History()
    remove_connection(history, "nas")
    assert connections(history) == [Connection("gpu box", "https://gpu.example:8000/v1")]
    assert json.loads(keys_path().read_text()) == {}
    history.close()


def test_a_key_file_others_can_read_is_refused(home):  # noqa: F811
    history = History()
    save_connection(history, "nas", "http://nas.local:8462", "sk-1")
    keys_path().chmod(0o644)
    with pytest.raises(UserError, match="chmod 600"):
        open_connection(history, "nas")
    history.close()


@pytest.mark.asyncio
async def test_the_servers_screen_adds_a_connection_chats_through_it_and_goes_back(home, server):  # noqa: F811
    handler, url = server
    app = ChatApp("fake-model:test", ChatSettings(temperature=0.0),
                  loader=lambda ref: GatedModel(["Here."], open_gate=True), memory=lambda: RSS)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.chat.model is not None)
        await pilot.press("ctrl+t")
        await until(pilot, lambda: isinstance(app.screen, ConnectionPicker))
        for field, value in (("name", "replay"), ("url", url), ("key", "sk-typed")):
            app.screen.query_one(f"#{field}", Input).value = value
        await pilot.click("#add")
        await until(pilot, lambda: app.chat.model is not None and app.chat.model.entry.name == "only-model")
        status = app.chat.query_one(StatusLine)
        assert status.device == f"on {url[len('http://'):]}"
        await answered(pilot, app, "colours?")
        assert replies(app)[-1].content == REPLY
        assert handler.seen[-1]["auth"] == "Bearer sk-typed"
        saved = app.history.messages(app.chat.conversation.id)[-1]
        assert saved.model == "only-model" and saved.meta["ran_on"] == {"device": status.device}

        await pilot.press("ctrl+t")
        await until(pilot, lambda: isinstance(app.screen, ConnectionPicker))
        listed = app.screen.query_one(OptionList)
        assert [str(listed.get_option_at_index(i).prompt) for i in range(listed.option_count)] == [
            "  This machine (installed models)", f"● replay  {url}"]
        listed.highlighted = 0
        listed.focus()
        await pilot.press("enter")
        await until(pilot, lambda: app.chat.remote is None and app.chat.model is not None
                    and app.chat.model.entry.name == "fake-model")
    assert b"sk-typed" not in (home / "history.sqlite3").read_bytes()


class _Hanging(_Replay):
    """Sends a role chunk and one word, then nothing (a server deep in a long prefill) until the
    client hangs up, which it records."""

    hung_up = threading.Event()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        for delta in ({"role": "assistant", "content": ""}, {"content": "Thinking"}):
            self.wfile.write(f"data: {json.dumps({'choices': [{'index': 0, 'delta': delta}]})}\n\n".encode())
        self.wfile.flush()
        self.connection.settimeout(30)
        if self.connection.recv(1) == b"":  # the client's FIN
            type(self).hung_up.set()


@pytest.mark.asyncio
async def test_esc_closes_a_stream_that_sends_nothing_more(home):  # noqa: F811
    handler = type("Hanging", (_Hanging,), {"models": ["slow"], "hung_up": threading.Event(), "seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        app = remote_app(f"http://127.0.0.1:{server.server_address[1]}")
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.chat.model is not None)
            await send(pilot, "Summarise this long document.")
            await until(pilot, lambda: replies(app) and replies(app)[0].content == "Thinking")
            t0 = time.monotonic()
            await pilot.press("escape")
            await until(pilot, lambda: app.chat.reply is None)
            assert time.monotonic() - t0 < 10  # not the 30 s the server would hold the read (loose: a busy CI)
            assert handler.hung_up.wait(5)  # the server sees the client gone
            saved = app.history.messages(app.chat.conversation.id)[-1]
            assert (saved.content, saved.stopped) == ("Thinking", True)
    finally:
        server.shutdown()


@pytest.mark.asyncio
async def test_a_server_that_cannot_be_reached_is_one_line_in_the_app(home):  # noqa: F811
    from serve_helpers import free_port

    port = free_port()  # nothing listens there
    app = remote_app(f"http://127.0.0.1:{port}")
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: notices(app))
        assert notices(app)[0].startswith(f"Could not load a model: 127.0.0.1:{port}: cannot reach the server")
        assert "\n" not in notices(app)[0] and app.chat.model is None


# ---------------------------------------------------------------- what the server reports
@pytest.mark.asyncio
async def test_a_server_without_context_info_is_said_so_and_the_app_trims_by_its_estimate(home, server):  # noqa: F811
    handler, url = server
    history = History()
    chat = history.create("Long", ChatSettings(temperature=0.0, max_tokens=256))
    # 4 turns of 1,673 estimated tokens each (5,007 characters / 3, + 4): with 256 kept for the
    # reply, 3,840 of the assumed 4,096 hold the last two and the new prompt
    for i in range(4):
        history.add_message(chat.id, "user", f"turn {i} " + "word " * 1000)
        history.add_message(chat.id, "assistant", "ok")
    history.set_state("last_chat", chat.id)
    history.close()
    app = remote_app(url)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.chat.model is not None and notices(app))
        host = url[len("http://"):]
        assert notices(app)[0] == (f"{host} does not say how long its context is: the app assumes {ASSUMED_CTX} "
                                   "tokens and trims the conversation by its own estimate of the tokens, about 3 "
                                   "characters each.")
        status = app.chat.query_one(StatusLine)
        assert status.ctx_total == ASSUMED_CTX and f"ctx ~{status.ctx_used}/~{ASSUMED_CTX}" in str(status.render())
        await answered(pilot, app, "And now?")
        sent = handler.seen[-1]["body"]["messages"]
        assert [m["content"].split(" ")[1] for m in sent if m["role"] == "user"] == ["2", "3", "now?"]
        assert any("the oldest 4 messages are left out" in n for n in notices(app))


@pytest.mark.asyncio
async def test_a_reported_context_is_used_as_it_is(home, server):  # noqa: F811
    handler, url = server
    handler.context = 32768
    app = remote_app(url)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.chat.model is not None)
        status = app.chat.query_one(StatusLine)
        assert status.ctx_total == 32768 and not status.ctx_estimated
        assert notices(app) == []


@pytest.mark.asyncio
async def test_a_remote_model_name_full_of_markup_is_shown_as_text(home, server):  # noqa: F811
    handler, url = server
    name = "[bold red]boom[/] [link=file:///etc]x[/link] :warning:"
    handler.models = [name, "plain"]
    app = remote_app(url)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.chat.model is not None)
        assert str(app.chat.query_one(StatusLine).render()).startswith(f" {name} · on ")
        await answered(pilot, app, "colours?")
        assert handler.seen[-1]["body"]["model"] == name
        assert str(replies(app)[-1].query_one(".who", Label).render()) == name
        await pilot.press("ctrl+o")
        await until(pilot, lambda: isinstance(app.screen, ModelPicker))
        listed = app.screen.query_one(OptionList)
        assert [str(listed.get_option_at_index(i).prompt) for i in range(2)] == [f"● {name}", "  plain"]


# ---------------------------------------------------------------- passages leave only with consent
@pytest.mark.asyncio
async def test_passages_go_to_a_server_only_after_consent_asked_once_per_connection(home, server):  # noqa: F811
    handler, url = server
    settings = ChatSettings(temperature=0.0, docs=("town",))
    question = "Where is the Zorbl festival held?"
    app = remote_app(url, settings)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.chat.model is not None)
        await send(pilot, question)
        await until(pilot, lambda: isinstance(app.screen, ConfirmDialog))
        assert url[len("http://"):] in app.screen.question
        await pilot.press("escape")  # no: nothing is sent, the prompt is given back
        await until(pilot, lambda: app.screen is app.chat and notices(app))
        assert handler.seen == [] and replies(app) == []
        assert app.chat.query_one(PromptInput).text == question
        assert notices(app)[-1].startswith("Not sent: your documents stay on this machine.")

        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, ConfirmDialog))
        await pilot.click("#yes")
        await until(pilot, lambda: app.chat.reply is None and replies(app))
        assert "> The Zorbl festival is held every year" in handler.seen[-1]["body"]["messages"][-1]["content"]
        assert notices(app)[-1] == f"Sources: [1] {home / 'notes' / 'festival.md'}:1"
        await answered(pilot, app, "And when?")  # asked once: no dialog now
        assert len(handler.seen) == 2

    again = remote_app(url, settings)
    async with again.run_test(size=SIZE) as pilot:  # remembered across restarts
        await until(pilot, lambda: again.chat.model is not None)
        await answered(pilot, again, question)
        assert len(handler.seen) == 3


def test_ask_remote_with_docs_refuses_without_send_docs(home, server, capsys):  # noqa: F811
    handler, url = server
    assert cli.main(["ask", "Where is the Zorbl festival held?", "--remote", url, "--docs", "town"]) == 1
    err = capsys.readouterr().err
    assert err == (f"llamadesk: error: answering from collection town through --remote would send passages of your "
                   f"documents to {url[len('http://'):]}; add --send-docs to allow it\n")
    assert cli.main(["ask", "#town Where is the Zorbl festival held?", "--remote", url]) == 1
    assert "add --send-docs" in capsys.readouterr().err
    assert handler.seen == []

    assert cli.main(["ask", "Where is the Zorbl festival held?", "--remote", url, "--docs", "town",
                     "--send-docs"]) == 0
    out = capsys.readouterr().out
    assert out == f"{REPLY}\n\nSources:\n[1] {home / 'notes' / 'festival.md'}:1\n"
    assert "> The Zorbl festival is held every year" in handler.seen[-1]["body"]["messages"][-1]["content"]


def test_a_client_of_a_server_loads_no_torch(home, server):  # noqa: F811
    import subprocess
    import sys

    _, url = server
    code = ("import sys; from app import cli; "
            f"assert cli.main(['ask', 'colours?', '--remote', {url!r}, '--temperature', '0']) == 0; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == REPLY + "\n"


def test_llamadesk_dash_dash_remote_opens_the_chat_app(monkeypatch):
    """`llamadesk --remote URL` is the chat command: the parser routes it there."""
    seen = {}
    monkeypatch.setattr(cli, "run", lambda argv: seen.setdefault("argv", argv) and 0)
    cli.main(["--remote", "http://127.0.0.1:1"])
    assert seen["argv"] == ["chat", "--remote", "http://127.0.0.1:1"]


# ---------------------------------------------------------------- a real server in another process
@pytest.mark.e2e
@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_the_app_chats_with_llamadesk_serve_in_another_process_and_esc_stops_it(default_home, tmp_path,
                                                                                        monkeypatch):
    from serve_helpers import serve_process

    monkeypatch.setenv("LLAMADESK_HOME", str(tmp_path))  # this side's history; the server has the models
    with serve_process(default_home, "--ctx", "1024") as (proc, port):
        url = f"http://127.0.0.1:{port}"
        loaded = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"] if "max_model_len" in m]
        app = ChatApp(loaded[0], ChatSettings(temperature=0.0, max_tokens=400), remote=Remote.connect(url),
                      memory=lambda: RSS)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.chat.model is not None, timeout=60)
            status = app.chat.query_one(StatusLine)
            assert (status.model, status.device, status.ctx_total) == (loaded[0], f"on 127.0.0.1:{port}", 1024)
            await send(pilot, "What is the capital of France?")
            await until(pilot, lambda: app.chat.reply is None and replies(app), timeout=120)
            assert "Paris" in replies(app)[0].content

            await send(pilot, "Write a long story about a dragon who learns to bake bread.")
            await until(pilot, lambda: len(replies(app)) == 2 and replies(app)[1].content, timeout=120)
            await pilot.press("escape")
            await until(pilot, lambda: app.chat.reply is None, timeout=30)
            stopped = app.history.messages(app.chat.conversation.id)[-1]
            assert stopped.stopped and stopped.content
            assert len(stopped.content.split()) < 200  # far from the 400 tokens it was allowed
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        log = proc.stderr.read()
    # the server's request log: the first reply ran to its end, the second was cut off by Esc
    assert "finish=stop" in log and "finish=cancelled" in log
