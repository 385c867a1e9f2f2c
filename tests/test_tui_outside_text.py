"""Text from users, models, files and the history is data in the chat app, never markup, and a
damaged history row never takes the app down.

Each markup-like string goes through every place the app shows outside text: the chat's title
(sidebar, settings and delete dialogs, notifications), the prompt and the reply, the model's name
(status line, reply header), and the exported file. What must hold: the app keeps running and the
screen shows the string as written, no styling, no lost characters.
"""
from __future__ import annotations

import sqlite3

import pytest

from app.history import ChatSettings, History
from app.tui import ChatApp
from app.tui.screens.pull import PullModal
from app.tui.widgets.conversation_list import ConversationList
from app.tui.widgets.status import StatusLine
from app.tui.widgets.transcript import MessageView

from test_tui import RSS, FakeEntry, GatedModel, fake_app, home, notices, replies, send, until  # noqa: F401

WIDE = (200, 60)  # wide enough that no title or line is cut, so the screen can be searched

MARKUP_LIKE = [
    "what does [/] mean",
    "array[0] = x[/i]",
    "[bold]x",
    "[b]bold[/b] text",
    "[/bold] closes nothing",
    "[i]never closed",
    "[link=https://example.com]click[/link]",
    "[link='file:///etc/passwd']x",
    "[@click=app.quit]quit[/]",
    "[@click=app.bell]ring",
    "[red on blue]colour[/]",
    "[#ff0000]hex colour",
    "[$accent]a variable",
    "[reverse]flipped",
    "[[double]] brackets",
    "a ] lone close",
    "[ lone open",
    "[]",
    r"\[escaped] markup",
    "[dim]x[/dim] y [/]",
    "[on red]",
    "$var [b]",
    "[u]under[/u][s]strike",
    ":smile: [blink]emoji",
]


def screen_text(app) -> str:
    """What the terminal shows now, toasts and modals included, as plain text."""
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


def sidebar_titles(app) -> list[str]:
    sidebar = app.chat.query_one(ConversationList)
    return [str(sidebar._get_visual(sidebar.get_option_at_index(i))) for i in range(sidebar.option_count)]


@pytest.mark.asyncio
async def test_markup_like_text_shows_as_written_in_every_widget(home):
    model = GatedModel(["unused"], open_gate=True)
    model.entry = FakeEntry("[bold]model[/]", "[@click=app.quit]v")
    app = fake_app(model)
    async with app.run_test(size=WIDE, notifications=True) as pilot:
        await until(pilot, lambda: app.chat.model is not None)
        status = app.query_one(StatusLine)
        assert "[bold]model[/]" in screen_text(app)  # the status line
        for text in MARKUP_LIKE:
            model.pieces = [f"echo {text}"]
            await pilot.press("ctrl+n")
            await send(pilot, text)
            await until(pilot, lambda: app.chat.reply is None and replies(app))
            shown = screen_text(app)
            # the prompt, the reply and its writer's name, all as written (a reply is Markdown,
            # where a backslash escapes the next character: that one is Markdown's, not markup)
            assert text in shown, (text, shown)
            assert f"echo {text.replace(chr(92), '')}" in shown
            # the sidebar's title (the sidebar is narrow: its drawn text, not the screen's)
            assert sidebar_titles(app)[0] == text
            assert "[bold]model[/]:[@click=app.quit]v" in shown
            status.activity = f"activity {text}"
            await pilot.pause()
            assert f"activity {text}" in screen_text(app)
        assert app.is_running
        titles = [c.title for c in app.history.conversations()]
        assert sorted(titles) == sorted(MARKUP_LIKE)


@pytest.mark.asyncio
async def test_markup_like_titles_in_dialogs_notifications_and_export(home):
    history = History(home / "history.sqlite3")
    for text in MARKUP_LIKE:
        chat = history.create(text)
        history.add_message(chat.id, "user", text)
        history.add_message(chat.id, "assistant", f"reply {text}", model="[b]m[/b]:x")
    model = GatedModel(["Ok."], open_gate=True)
    app = fake_app(model, history=history)
    async with app.run_test(size=WIDE, notifications=True) as pilot:
        await until(pilot, lambda: app.chat.model is not None)
        for conversation in history.conversations():
            text = conversation.title
            await app.chat.open_conversation(conversation.id)
            await pilot.pause()
            shown = screen_text(app)
            assert text in shown and f"reply {text.replace(chr(92), '')}" in shown and "[b]m[/b]:x" in shown

            await pilot.press("ctrl+s")  # the settings dialog names the chat
            await until(pilot, lambda: app.screen is not app.chat)
            await until(pilot, lambda: f"Settings for “{text}”" in screen_text(app))
            await pilot.press("escape")
            await until(pilot, lambda: app.screen is app.chat)

            await pilot.press("f4")  # a notification
            await pilot.pause()
            app.notify(f"note {text}")  # any notification, from anywhere in the app
            await until(pilot, lambda: f"note {text}" in screen_text(app))
            app.clear_notifications()

            await pilot.press("f3")  # export: the file holds the text as written
            await until(pilot, lambda: app.screen is not app.chat)
            target = home / f"export-{conversation.id}.md"
            app.screen.query_one("Input").value = str(target)
            await pilot.press("enter")
            await until(pilot, lambda: target.exists())
            exported = target.read_text()
            assert exported.startswith(f"# {text}\n") and f"reply {text}" in exported
            await until(pilot, lambda: f"Exported to {target}" in [n.message for n in app._notifications])
            app.clear_notifications()

            await pilot.press("f8")  # the delete question quotes the title; the notice too
            await until(pilot, lambda: app.screen is not app.chat)
            await until(pilot, lambda: f"Delete “{text}”" in screen_text(app))
            await pilot.click("#yes")
            await until(pilot, lambda: app.screen is app.chat and not history.exists(conversation.id))
            await until(pilot, lambda: f"Deleted the chat “{text}”" in screen_text(app))
            app.clear_notifications()
        assert app.is_running


@pytest.mark.asyncio
async def test_markup_like_errors_in_the_download_dialog_and_a_failed_load(home):
    def pull(name):
        raise RuntimeError("[/] broke [bold]here")

    def loader(ref):
        raise RuntimeError("[@click=app.quit]no[/]")

    app = ChatApp("x:y", loader=loader, memory=lambda: RSS, pull=pull)
    async with app.run_test(size=WIDE, notifications=True) as pilot:
        await until(pilot, lambda: "RuntimeError: [@click=app.quit]no[/]" in screen_text(app))
        app.push_screen(PullModal("[b]name", pull))
        await pilot.pause()
        assert "[b]name" in screen_text(app)
        await pilot.click("#download")
        await until(pilot, lambda: "The download failed" in screen_text(app))
        assert "RuntimeError: [/] broke [bold]here" in screen_text(app)


# ---------------------------------------------------------------- damaged rows
@pytest.mark.asyncio
async def test_damaged_history_rows_show_what_can_be_shown_and_say_what_could_not(home):
    path = home / "history.sqlite3"
    history = History(path)
    chat = history.create("fine")
    history.add_message(chat.id, "user", "a question that was stored well")
    history.close()
    db = sqlite3.connect(path, isolation_level=None)
    # bytes that are not UTF-8 in a title and a message; a title that is a number; settings of
    # the wrong types; a message with a role the app does not know
    db.execute("INSERT INTO conversations (title, created, updated, settings) "
               "VALUES (CAST(x'6361ff5b2f5d' AS TEXT), 1, 2, '{\"temperature\": \"hot\", \"top_k\": 1.5}')")
    bad = db.execute("SELECT max(id) FROM conversations").fetchone()[0]
    db.execute("INSERT INTO messages (conversation_id, role, content, created) "
               "VALUES (?, 'user', CAST(x'636166e9205b625d' AS TEXT), 3)", (bad,))
    db.execute("PRAGMA ignore_check_constraints = ON")
    db.execute("INSERT INTO messages (conversation_id, role, content, created) VALUES (?, 'robot', 'beep', 4)",
               (bad,))
    db.execute("INSERT INTO conversations (title, created, updated) VALUES (42, 'yesterday', 5)")
    db.close()

    model = GatedModel(["Ok."], open_gate=True)
    app = fake_app(model)
    async with app.run_test(size=WIDE, notifications=True) as pilot:
        await until(pilot, lambda: app.chat.model is not None)
        assert sorted(sidebar_titles(app)) == ["42", "ca\ufffd[/]", "fine"]
        await app.chat.open_conversation(bad)
        await pilot.pause()
        assert [v.content for v in app.chat.query(MessageView)] == ["caf\ufffd [b]"]
        assert any("1 stored message(s)" in n and "could not be read" in n for n in notices(app))
        settings = app.chat.settings
        defaults = ChatSettings()
        assert (settings.temperature, settings.top_k) == (defaults.temperature, defaults.top_k)  # damaged knobs
        await send(pilot, "still answers")
        await until(pilot, lambda: app.chat.reply is None and len(replies(app)) == 1)
        assert replies(app)[0].content == "Ok."

