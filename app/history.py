"""Conversations in SQLite: one file under the llamadesk home, safe to share between two app windows.

    history.sqlite3   conversations (title, per-conversation settings), their messages (with a
                      `meta` JSON object each: sources, timings, where a reply ran) and the app's
                      `state` (last chat, last model, saved connections; never a secret)

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
import math
import os
import re
import sqlite3
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

from . import store
from .errors import UserError

FILENAME = "history.sqlite3"
SCHEMA_VERSION = 3
DEFAULT_TITLE = "New chat"
BUSY_TIMEOUT_S = 5.0


def default_path() -> Path:
    return store.home() / FILENAME


# ---------------------------------------------------------------- records
@dataclass(frozen=True)
class ChatSettings:
    """A conversation's system prompt and sampling knobs; unknown or missing keys read as defaults."""

    system: str = ""
    # Ollama-like (app.sampling_defaults.OLLAMA_LIKE): SamplingParams' neutral ones loop on short prompts
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
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
                              repetition_penalty=self.repeat_penalty, repeat_last_n=self.repeat_last_n,
                              seed=self.seed)

    @classmethod
    def from_sampling(cls, params, system: str = "", **rest) -> "ChatSettings":
        """The settings a chat keeps for the model.generate.SamplingParams it runs at (duck-typed:
        no torch import), so that reopened it runs as it did."""
        return cls(system=system, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                   repeat_penalty=params.repetition_penalty, repeat_last_n=params.repeat_last_n, seed=params.seed,
                   **rest)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> "ChatSettings":
        """Settings as stored; a key that is unknown, of the wrong type or not finite reads as its
        default, so one damaged row opens with defaults instead of failing later in the engine."""
        try:
            data = json.loads(text or "{}")
        except (ValueError, TypeError):
            data = {}
        if not isinstance(data, dict):
            return cls()
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data and _fits(data[f.name], _KINDS[f.name])}
        if "docs" in values:  # a JSON list of collection names
            values["docs"] = tuple(name for name in values["docs"] if isinstance(name, str))
        return cls(**values)


# the type each stored setting must have (bool is an int to Python, never a number here)
_KINDS = {"system": (str,), "temperature": (int, float), "top_p": (int, float), "top_k": (int,),
          "repeat_penalty": (int, float), "repeat_last_n": (int,), "max_tokens": (int,), "seed": (int, type(None)),
          "docs": (list,), "file": (str,)}


def _fits(value: object, kinds: tuple[type, ...]) -> bool:
    if isinstance(value, bool) or not isinstance(value, kinds):
        return False
    return not isinstance(value, float) or math.isfinite(value)


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
    meta: dict = field(default_factory=dict)  # JSON: {"sources": [...], "timings": {...}, "ran_on": {...}}


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


def _migrate_2_to_3(db: sqlite3.Connection) -> None:
    """A `meta` JSON object on every message (what a reply drew on, how long it took, where it
    ran), and the app's own `state`: one JSON value per key."""
    db.execute("ALTER TABLE messages ADD COLUMN meta TEXT NOT NULL DEFAULT '{}'")
    db.execute("CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL)")


# _MIGRATIONS[n] takes a file at version n to version n + 1; version 0 is an empty file.
_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    0: lambda db: [db.execute(stmt) for stmt in _V1.split(";") if stmt.strip()],
    1: _migrate_1_to_2,
    2: _migrate_2_to_3,
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
# how `PRAGMA quick_check` words a row that breaks a constraint, as opposed to a damaged page
_ROW_PROBLEMS = ("NULL value in ", "CHECK constraint failed in ", "non-")

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
        # text that is not UTF-8 (a damaged page, another program's write) reads with U+FFFD
        # instead of failing the whole query that lists every chat
        db.text_factory = lambda raw: raw.decode("utf-8", "replace")
        try:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA foreign_keys = ON")
            # A row that breaks a constraint (a NULL, a CHECK) is one bad row, which the readers
            # below skip; anything else is damage to the file itself.
            damage = [r[0] for r in db.execute("PRAGMA quick_check")
                      if r[0] != "ok" and not r[0].startswith(_ROW_PROBLEMS)]
            if damage:
                raise sqlite3.DatabaseError(f"database disk image is malformed: {damage[0]}")
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
        return self.read_messages(conversation_id)[0]

    def read_messages(self, conversation_id: int) -> tuple[list[Message], list[int]]:
        """The conversation's messages in order, and the ids of stored rows that are not a message
        (a role other than user or assistant, no content): those are left out, never fatal."""
        rows = self.db.execute("SELECT id, conversation_id, role, content, created, stopped, model, meta "
                               "FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,)).fetchall()
        readable, skipped = [], []
        for i, c, role, content, created, stopped, model, meta in rows:
            if role not in ("user", "assistant") or content is None:
                skipped.append(i)
                continue
            readable.append(Message(i, c, role, _text(content), _number(created), bool(stopped),
                                    None if model is None else _text(model), _json_object(meta)))
        return readable, skipped

    def add_message(self, conversation_id: int, role: str, content: str, stopped: bool = False,
                    model: str | None = None, meta: dict | None = None) -> Message:
        now = self.clock()
        meta = dict(meta or {})
        meta_json = json.dumps(meta, sort_keys=True)  # raises TypeError before anything is written
        self.db.execute("BEGIN IMMEDIATE")
        try:
            cur = self.db.execute("INSERT INTO messages (conversation_id, role, content, created, stopped, model, meta) "
                                  "VALUES (?, ?, ?, ?, ?, ?, ?)",
                                  (conversation_id, role, content, now, int(stopped), model, meta_json))
            self.db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, conversation_id))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return Message(cur.lastrowid, conversation_id, role, content, now, stopped, model, meta)

    def delete_message(self, message_id: int) -> None:
        self.db.execute("DELETE FROM messages WHERE id = ?", (message_id,))

    # ------------------------------------------------------------ the app's state
    def state(self, key: str, default=None):
        """The JSON value saved under `key` (e.g. "last_chat", "last_model", "connections"), or
        `default` when there is none or it cannot be read."""
        row = self.db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        if row is None:
            return default
        try:
            return json.loads(_text(row[0]))
        except ValueError:
            return default

    def set_state(self, key: str, value) -> None:
        """Save a JSON value under `key`; None removes it. Raises ValueError for a value holding a
        secret (a key named like api_key, token, password): the history is a plain file."""
        if value is None:
            self.db.execute("DELETE FROM state WHERE key = ?", (key,))
            return
        _refuse_secrets(value, key)
        self.db.execute("INSERT INTO state (key, value) VALUES (?, ?) "
                        "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, json.dumps(value)))


def _conversation(row) -> Conversation:
    cid, title, created, updated, settings = row
    title = " ".join(_text(title or "").split()) or DEFAULT_TITLE
    settings = ChatSettings.from_json(settings if isinstance(settings, str) else None)
    return Conversation(cid, title, _number(created), _number(updated), settings)


_SECRET = re.compile(r"(api[_-]?key|secret|token|password|passwd|authorization|bearer|cookie)", re.I)


def _refuse_secrets(value, where: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if _SECRET.search(str(k)):
                raise ValueError(f"{where}.{k}: secrets are never saved in the history")
            _refuse_secrets(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _refuse_secrets(v, f"{where}[{i}]")


def _json_object(text: object) -> dict:
    try:
        value = json.loads(_text(text)) if text is not None else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _text(value: object) -> str:
    """A stored value as text: SQLite keeps whatever type was written, whatever the column says."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else str(value)


def _number(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) else 0.0


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
        sources = m.meta.get("sources")
        if isinstance(sources, list):
            lines += ["", "Sources:" if sources else "Sources: no source found"]
            lines += [f"- {_citation(s)}" for s in sources if isinstance(s, dict)]
        lines.append("")
    return "\n".join(lines)


def _citation(source: dict) -> str:
    """`[n] path:line`, or `[n] path:p.N` for a PDF page, as under a reply in the app."""
    where = f"p.{source['page']}" if source.get("page") else str(source.get("line", ""))
    return f"[{source.get('n', '?')}] {source.get('path', '?')}:{where}"


def title_for(prompt: str, width: int = 40) -> str:
    """A conversation title from its first prompt: the first line, cut at a word near `width`."""
    line = next((s.strip() for s in prompt.splitlines() if s.strip()), DEFAULT_TITLE)
    if len(line) <= width:
        return line
    cut = line[:width].rsplit(" ", 1)[0] or line[:width]
    return cut.rstrip(" ,.;:") + "…"


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Write a whole file or nothing: a temporary file in the same folder, then a rename. `mode`
    0o600 keeps a secret private from its first byte (mkstemp creates the file so)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            # mkstemp makes the file private; an exported chat is an ordinary document
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = ["ChatSettings", "Conversation", "History", "Message", "SCHEMA_VERSION", "default_path",
           "title_for", "to_markdown", "write_atomic"]
