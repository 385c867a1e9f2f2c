"""Conversations in SQLite: migrations, two instances on one file, a corrupt file, export."""
import sqlite3
import threading
import time

import pytest

from app import history
from app.history import SCHEMA_VERSION, ChatSettings, History, title_for, to_markdown, write_atomic


class Clock:
    """Time that moves one second per reading, so 'newest first' does not depend on the machine."""

    def __init__(self, start=1_700_000_000.0):
        self.now = start

    def __call__(self):
        self.now += 1
        return self.now


@pytest.fixture
def path(tmp_path):
    return tmp_path / "history.sqlite3"


def test_a_new_file_is_at_the_current_version_in_wal_mode(path):
    History(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_conversations_come_newest_first_with_their_messages(path):
    h = History(path, clock=Clock())
    old = h.create("Capital of France")
    new = h.create("Rope scaling", ChatSettings(system="Be brief.", temperature=0.0, seed=7))
    h.add_message(old.id, "user", "What is the capital of France?")
    h.add_message(old.id, "assistant", "Paris.", model="smollm2-135m-instruct:source")
    assert [c.title for c in h.conversations()] == ["Capital of France", "Rope scaling"]
    assert h.get(new.id).settings == ChatSettings(system="Be brief.", temperature=0.0, seed=7)
    assert [(m.role, m.content, m.model) for m in h.messages(old.id)] == [
        ("user", "What is the capital of France?", None),
        ("assistant", "Paris.", "smollm2-135m-instruct:source"),
    ]
    h.rename(new.id, "  RoPE   scaling ")
    assert h.get(new.id).title == "RoPE scaling"
    h.delete(old.id)
    assert [c.title for c in h.conversations()] == ["RoPE scaling"]
    assert h.messages(old.id) == []  # the messages went with it


def test_a_deleted_chats_id_is_never_given_to_a_new_one(path):
    # a window still showing the deleted chat must not write into its successor
    h = History(path)
    gone = h.create("Gone")
    h.delete(gone.id)
    assert h.create("Next").id != gone.id
    assert not h.exists(gone.id)


def test_a_second_instance_sees_the_first_ones_writes(path):
    first, second = History(path), History(path)
    chat = first.create("Shared")
    first.add_message(chat.id, "user", "hello from the first window")
    assert [m.content for m in second.messages(chat.id)] == ["hello from the first window"]
    second.add_message(chat.id, "assistant", "hello from the second window")
    assert [m.content for m in first.messages(chat.id)] == ["hello from the first window",
                                                            "hello from the second window"]


def test_a_write_waits_while_another_instance_holds_the_lock(path):
    first = History(path)
    chat = first.create("Shared")
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    threading.Timer(0.5, lambda: holder.execute("COMMIT")).start()
    t0 = time.monotonic()
    first.add_message(chat.id, "user", "written once the other window let go")
    assert time.monotonic() - t0 >= 0.4
    assert [m.content for m in first.messages(chat.id)] == ["written once the other window let go"]
    holder.close()


def test_a_corrupt_file_is_kept_aside_and_a_fresh_one_starts(path):
    path.write_bytes(b"this is not a database, it is a shopping list\n" * 200)
    h = History(path, clock=lambda: 1_700_000_000.0)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(1_700_000_000.0))
    kept = path.with_name(f"history.sqlite3.corrupt-{stamp}")
    assert h.recovered_from == kept
    assert kept.read_bytes().startswith(b"this is not a database")
    assert h.conversations() == []
    h.create("After the accident")
    h.close()
    assert [c.title for c in History(path).conversations()] == ["After the accident"]


def test_a_damaged_page_counts_as_corrupt(path):
    h = History(path)
    chat = h.create("Doomed")
    for i in range(300):
        h.add_message(chat.id, "user", f"message {i} " + "x" * 200)
    h.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    h.close()
    data = bytearray(path.read_bytes())
    page = 4096
    data[page * 3: page * 5] = b"\xff" * (2 * page)  # scribble over two pages past the header
    path.write_bytes(bytes(data))
    h = History(path)
    assert h.recovered_from is not None and h.recovered_from.exists()
    assert h.conversations() == []


def test_a_version_1_file_migrates_and_its_system_prompts_become_settings(path):
    db = sqlite3.connect(path, isolation_level=None)
    history._migrate(db, target=1)  # the schema as llamadesk's first release wrote it
    db.executescript("""
        INSERT INTO conversations VALUES (1, 'Pirate talk', 10, 12), (2, 'Plain', 20, 21);
        INSERT INTO messages (conversation_id, role, content, created) VALUES
            (1, 'system', 'Answer like a pirate.', 10),
            (1, 'user', 'Where is Paris?', 11),
            (1, 'assistant', 'In France, matey.', 12),
            (2, 'user', 'Hi', 21);
    """)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    db.close()
    h = History(path)
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    pirate, plain = h.get(1), h.get(2)
    assert pirate.settings == ChatSettings(system="Answer like a pirate.")
    assert [(m.role, m.content) for m in h.messages(1)] == [("user", "Where is Paris?"),
                                                           ("assistant", "In France, matey.")]
    assert plain.settings == ChatSettings()
    assert [c.title for c in h.conversations()] == ["Plain", "Pirate talk"]


def test_a_version_2_file_migrates_to_3_with_meta_and_state(path):
    db = sqlite3.connect(path, isolation_level=None)
    history._migrate(db, target=2)
    db.executescript("""
        INSERT INTO conversations (id, title, created, updated, settings) VALUES (1, 'Kept', 10, 12, '{}');
        INSERT INTO messages (conversation_id, role, content, created, stopped, model) VALUES
            (1, 'user', 'Where is Paris?', 11, 0, NULL),
            (1, 'assistant', 'In France.', 12, 1, 'smollm2-135m-instruct:int4');
    """)
    db.close()
    h = History(path)
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 3
    assert [(m.content, m.stopped, m.model, m.meta) for m in h.messages(1)] == [
        ("Where is Paris?", False, None, {}), ("In France.", True, "smollm2-135m-instruct:int4", {})]

    meta = {"timings": {"tokens_per_s": 31.5, "new_tokens": 3}, "ran_on": {"device": "cpu"},
            "sources": [{"file": "notes.md", "chunk": 2}]}
    added = h.add_message(1, "assistant", "Paris is in France.", meta=meta)
    assert added.meta == meta and h.messages(1)[-1].meta == meta
    with pytest.raises(TypeError):
        h.add_message(1, "assistant", "x", meta={"when": object()})
    assert len(h.messages(1)) == 3  # nothing half-written

    assert h.state("last_chat") is None and h.state("last_chat", 0) == 0
    h.set_state("last_chat", 1)
    h.set_state("last_model", "smollm2-135m-instruct:int4")
    h.set_state("connections", [{"name": "lab", "url": "http://127.0.0.1:8080/v1"}])
    h.set_state("last_chat", 2)
    again = History(path)
    assert (again.state("last_chat"), again.state("last_model")) == (2, "smollm2-135m-instruct:int4")
    assert again.state("connections") == [{"name": "lab", "url": "http://127.0.0.1:8080/v1"}]
    for secret in ({"name": "x", "api_key": "sk-1"}, {"headers": {"Authorization": "Bearer x"}}):
        with pytest.raises(ValueError, match="never saved"):
            again.set_state("connections", [secret])
    assert again.state("connections") == [{"name": "lab", "url": "http://127.0.0.1:8080/v1"}]
    again.set_state("last_model", None)
    assert again.state("last_model") is None


def test_a_file_from_a_newer_llamadesk_is_refused_not_touched(path):
    from app.errors import UserError

    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(UserError, match="newer llamadesk"):
        History(path)
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 99


def test_settings_from_json_ignore_unknown_keys_and_default_missing_ones():
    assert ChatSettings.from_json('{"temperature": 0, "from_the_future": 1}') == ChatSettings(temperature=0)
    assert ChatSettings.from_json("not json") == ChatSettings()


def test_titles_come_from_the_first_line_of_the_first_prompt():
    assert title_for("What is the capital of France?\nAnd of Spain?") == "What is the capital of France?"
    assert title_for("Explain rotary position embeddings and why they extrapolate badly") == \
        "Explain rotary position embeddings and…"
    assert title_for("   \n") == "New chat"


def test_export_is_markdown_written_whole(path, tmp_path):
    h = History(path)
    chat = h.create("Capital of France", ChatSettings(system="Be brief."))
    h.add_message(chat.id, "user", "What is the capital of France?")
    h.add_message(chat.id, "assistant", "Paris, on the Seine", stopped=True, model="smollm2-135m-instruct:source")
    out = tmp_path / "france.md"
    write_atomic(out, to_markdown(h.get(chat.id), h.messages(chat.id)))
    assert out.read_text() == (
        "# Capital of France\n\n**System**\n\nBe brief.\n\n"
        "**You**\n\nWhat is the capital of France?\n\n"
        "**smollm2-135m-instruct:source**\n\nParis, on the Seine\n\n*(stopped)*\n"
    )
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_replys_sources_are_kept_and_exported(path):
    h = History(path)
    chat = h.create("Grounded", ChatSettings(docs=("manuals",), file="notes.md"))
    h.add_message(chat.id, "user", "How do I reset it?")
    sources = [{"n": 1, "path": "manuals/router.pdf", "line": 0, "page": 12},
               {"n": 2, "path": "notes.md", "line": 40, "page": 0}]
    h.add_message(chat.id, "assistant", "Hold the button [1].", model="m:int4", meta={"sources": sources})
    h.add_message(chat.id, "user", "And the weather?")
    h.add_message(chat.id, "assistant", "I cannot tell.", model="m:int4", meta={"sources": []})
    h = History(path)  # read back from the file
    assert h.get(chat.id).settings.docs == ("manuals",) and h.get(chat.id).settings.file == "notes.md"
    assert h.messages(chat.id)[1].meta["sources"] == sources
    assert to_markdown(h.get(chat.id), h.messages(chat.id)).endswith(
        "**m:int4**\n\nHold the button [1].\n\nSources:\n- [1] manuals/router.pdf:p.12\n- [2] notes.md:40\n\n"
        "**You**\n\nAnd the weather?\n\n**m:int4**\n\nI cannot tell.\n\nSources: no source found\n")


def test_stored_settings_of_the_wrong_type_read_as_defaults():
    stored = '{"temperature": "hot", "top_k": 1.5, "top_p": NaN, "seed": true, "max_tokens": 64, "system": 3}'
    assert ChatSettings.from_json(stored) == ChatSettings(max_tokens=64)
    assert ChatSettings.from_json("[1, 2]") == ChatSettings()
    assert ChatSettings.from_json(None) == ChatSettings()


def test_a_row_that_breaks_a_constraint_is_skipped_not_the_whole_file(path):
    h = History(path)
    chat = h.create("kept")
    h.add_message(chat.id, "user", "fine")
    h.close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA ignore_check_constraints = ON")
    db.execute("INSERT INTO messages (conversation_id, role, content, created) VALUES (?, 'robot', 'x', 1)",
               (chat.id,))
    db.execute("INSERT INTO messages (conversation_id, role, content, created) "
               "VALUES (?, 'assistant', CAST(x'ff41' AS TEXT), 2)", (chat.id,))
    db.close()
    h = History(path)
    assert h.recovered_from is None
    messages, skipped = h.read_messages(chat.id)
    assert [m.content for m in messages] == ["fine", "\ufffdA"]
    assert len(skipped) == 1
