"""Conversations in SQLite: one file under the llamadesk home, safe to share between two app windows.

    history.sqlite3   conversations (title, per-conversation settings) and their messages

The schema version lives in `PRAGMA user_version`; `_MIGRATIONS[n]` takes a version-n file to n+1,
each in its own transaction, so a file from any older llamadesk opens. WAL mode and a busy timeout
let a second instance read while the first writes. A file SQLite cannot read is moved aside as
`history.sqlite3.corrupt-<timestamp>` (never deleted: it may hold the only copy of someone's
chats) and a fresh one takes its place.

Every method runs on the thread that opened the file (the UI thread); each call is one short
transaction, so nothing here needs a worker.
"""
from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

from . import store
from .errors import UserError

FILENAME = "history.sqlite3"
SCHEMA_VERSION = 2
DEFAULT_TITLE = "New chat"
BUSY_TIMEOUT_S = 5.0


def default_path() -> Path:
    return store.home() / FILENAME


# ---------------------------------------------------------------- records
@dataclass(frozen=True)
class ChatSettings:
    """A conversation's system prompt and sampling knobs; unknown or missing keys read as defaults."""

    system: str = ""
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    repeat_penalty: float = 1.0
    max_tokens: int = 1024
    seed: int | None = None
    docs: tuple[str, ...] = ()  # document collections the answers quote (app/docs)
    file: str = ""  # one attached file the answers quote

    def __post_init__(self) -> None:
        object.__setattr__(self, "docs", tuple(self.docs))  # JSON gives a list

    def sampling_params(self):
        """The engine's SamplingParams; raises ValueError for an out-of-range knob.

        Imported here, not at module level, so the history and the UI open without loading torch.
        """
        from model.generate import SamplingParams

        if self.max_tokens < 1:
            raise ValueError(f"max tokens must be at least 1, got {self.max_tokens}")
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              repetition_penalty=self.repeat_penalty, seed=self.seed)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> "ChatSettings":
        try:
            data = json.loads(text or "{}")
        except ValueError:
            data = {}
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known}) if isinstance(data, dict) else cls()


@dataclass(frozen=True)
class Conversation:
    id: int
    title: str
    created: float
    updated: float
    settings: ChatSettings = field(default_factory=ChatSettings)


@dataclass(frozen=True)
class Message:
    id: int
    conversation_id: int
    role: str  # "user" or "assistant"
    content: str
    created: float
    stopped: bool = False  # the user stopped this reply before the model finished it
    model: str | None = None  # the model that wrote an assistant reply, as name:variant


# ---------------------------------------------------------------- schema
# AUTOINCREMENT: an id is never reused, so a window still showing a chat that another window
# deleted cannot write into a newer chat that took its number.
_V1 = """
CREATE TABLE conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content TEXT NOT NULL,
    created REAL NOT NULL,
    stopped INTEGER NOT NULL DEFAULT 0,
    model TEXT
);
CREATE INDEX messages_by_conversation ON messages (conversation_id, id);
CREATE INDEX conversations_by_update ON conversations (updated DESC);
"""


def _migrate_1_to_2(db: sqlite3.Connection) -> None:
    """Per-conversation settings. Version 1 kept a system prompt as a leading 'system' message;
    it moves into the settings so the prompt can be edited without rewriting the transcript."""
    db.execute("ALTER TABLE conversations ADD COLUMN settings TEXT NOT NULL DEFAULT '{}'")
    rows = db.execute("SELECT id, conversation_id, content FROM messages WHERE role = 'system' ORDER BY id").fetchall()
    moved: set[int] = set()
    for msg_id, conv_id, content in rows:
        if conv_id not in moved:
            settings = ChatSettings(system=content)
            db.execute("UPDATE conversations SET settings = ? WHERE id = ?", (settings.to_json(), conv_id))
            moved.add(conv_id)
        db.execute("DELETE FROM messages WHERE id = ?", (msg_id,))


# _MIGRATIONS[n] takes a file at version n to version n + 1; version 0 is an empty file.
_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    0: lambda db: [db.execute(stmt) for stmt in _V1.split(";") if stmt.strip()],
    1: _migrate_1_to_2,
}


def _migrate(db: sqlite3.Connection, target: int = SCHEMA_VERSION) -> None:
    while True:
        # BEGIN IMMEDIATE takes the write lock before reading the version, so two instances
        # starting together cannot both run the same step.
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise UserError(f"the chat history was written by a newer llamadesk (schema version {version}, "
                                f"this one knows {SCHEMA_VERSION}); upgrade llamadesk")
            if version >= target:
                db.execute("COMMIT")
                return
            _MIGRATIONS[version](db)
            db.execute(f"PRAGMA user_version = {version + 1}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


# ---------------------------------------------------------------- the history
class History:
    """The conversations in one SQLite file. `recovered_from` is set when a corrupt file was moved aside."""

    def __init__(self, path: Path | None = None, clock: Callable[[], float] = time.time):
        self.path = Path(path) if path is not None else default_path()
        self.clock = clock
        self.recovered_from: Path | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = self._open()
        except sqlite3.DatabaseError as e:
            if not _is_corrupt(e):
                raise UserError(f"{self.path}: cannot open the chat history ({e})") from None
            self.recovered_from = self._move_aside()
            self.db = self._open()

    def _open(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are explicit (BEGIN ... COMMIT) so migrations and
        # multi-statement writes are atomic and nothing is left open between calls.
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA foreign_keys = ON")
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"database disk image is malformed: {check}")
            _migrate(db)
        except BaseException:
            db.close()
            raise
        return db

    def _move_aside(self) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.clock()))
        kept = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        os.replace(self.path, kept)
        # The write-ahead log belongs to the broken file; left in place SQLite would replay it
        # into the fresh one.
        for suffix in ("-wal", "-shm"):
            side = self.path.with_name(self.path.name + suffix)
            if side.exists():
                os.replace(side, kept.with_name(kept.name + suffix))
        return kept

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------ conversations
    def conversations(self) -> list[Conversation]:
        """Newest first: the one with the latest message at the top."""
        rows = self.db.execute("SELECT id, title, created, updated, settings FROM conversations "
                               "ORDER BY updated DESC, id DESC").fetchall()
        return [_conversation(r) for r in rows]

    def get(self, conversation_id: int) -> Conversation:
        row = self.db.execute("SELECT id, title, created, updated, settings FROM conversations WHERE id = ?",
                              (conversation_id,)).fetchone()
        if row is None:
            raise KeyError(conversation_id)
        return _conversation(row)

    def exists(self, conversation_id: int) -> bool:
        return self.db.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone() is not None

    def create(self, title: str = DEFAULT_TITLE, settings: ChatSettings | None = None) -> Conversation:
        now = self.clock()
        settings = settings or ChatSettings()
        cur = self.db.execute("INSERT INTO conversations (title, created, updated, settings) VALUES (?, ?, ?, ?)",
                              (title, now, now, settings.to_json()))
        return Conversation(cur.lastrowid, title, now, now, settings)

    def rename(self, conversation_id: int, title: str) -> None:
        title = " ".join(title.split())
        if not title:
            raise ValueError("a conversation needs a title")
        self.db.execute("UPDATE conversations SET title = ? WHERE id = ?", (title, conversation_id))

    def set_settings(self, conversation_id: int, settings: ChatSettings) -> None:
        self.db.execute("UPDATE conversations SET settings = ? WHERE id = ?", (settings.to_json(), conversation_id))

    def delete(self, conversation_id: int) -> None:
        self.db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    # ------------------------------------------------------------ messages
    def messages(self, conversation_id: int) -> list[Message]:
        rows = self.db.execute("SELECT id, conversation_id, role, content, created, stopped, model FROM messages "
                               "WHERE conversation_id = ? ORDER BY id", (conversation_id,)).fetchall()
        return [Message(i, c, role, content, created, bool(stopped), model)
                for i, c, role, content, created, stopped, model in rows]

    def add_message(self, conversation_id: int, role: str, content: str, stopped: bool = False,
                    model: str | None = None) -> Message:
        now = self.clock()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            cur = self.db.execute("INSERT INTO messages (conversation_id, role, content, created, stopped, model) "
                                  "VALUES (?, ?, ?, ?, ?, ?)", (conversation_id, role, content, now, int(stopped), model))
            self.db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, conversation_id))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return Message(cur.lastrowid, conversation_id, role, content, now, stopped, model)

    def delete_message(self, message_id: int) -> None:
        self.db.execute("DELETE FROM messages WHERE id = ?", (message_id,))


def _conversation(row) -> Conversation:
    cid, title, created, updated, settings = row
    return Conversation(cid, title, created, updated, ChatSettings.from_json(settings))


def _is_corrupt(e: sqlite3.DatabaseError) -> bool:
    """Damage, as opposed to a locked or unwritable file, which moving aside would not fix."""
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        return code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
    return "malformed" in str(e) or "not a database" in str(e)


# ---------------------------------------------------------------- export
def to_markdown(conversation: Conversation, messages: list[Message]) -> str:
    lines = [f"# {conversation.title}", ""]
    if conversation.settings.system:
        lines += ["**System**", "", conversation.settings.system, ""]
    for m in messages:
        who = "You" if m.role == "user" else (m.model or "Assistant")
        lines += [f"**{who}**", "", m.content.rstrip()]
        if m.stopped:
            lines += ["", "*(stopped)*"]
        lines.append("")
    return "\n".join(lines)


def title_for(prompt: str, width: int = 40) -> str:
    """A conversation title from its first prompt: the first line, cut at a word near `width`."""
    line = next((s.strip() for s in prompt.splitlines() if s.strip()), DEFAULT_TITLE)
    if len(line) <= width:
        return line
    cut = line[:width].rsplit(" ", 1)[0] or line[:width]
    return cut.rstrip(" ,.;:") + "…"


def write_atomic(path: Path, text: str) -> None:
    """Write a whole file or nothing: a temporary file in the same folder, then a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            # mkstemp makes the file private; an exported chat is an ordinary document
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = ["ChatSettings", "Conversation", "History", "Message", "SCHEMA_VERSION", "default_path",
           "title_for", "to_markdown", "write_atomic"]
