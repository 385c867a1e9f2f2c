"""Document collections in their own SQLite file, searched with FTS5.

    docs.sqlite3 (under the llamadesk home)
      collections   name, the folders and files it was made from, ignore globs
      files         one row per indexed file: size, mtime, sha256 (what `update` compares)
      chunks        each chunk: where it starts (file, line, page), its title (file name,
                    heading) and its text, zlib-compressed
      chunks_fts    FTS5 (porter, unicode61) over title and text, contentless: the text is kept
                    once, compressed, in `chunks`, so the index stays under 1.5x the text

Each `add`, `update` and `rm` is one transaction in WAL mode: a process killed halfway (kill -9
included) leaves the previous index as it was, and readers never wait for a writer.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import store
from ..errors import UserError
from .chunks import Chunk, chunk_blocks
from .files import MAX_FILE_BYTES, SkippedFile, read_blocks, walk

FILENAME = "docs.sqlite3"
SCHEMA_VERSION = 1
FTS_MODULE = "fts5"
BUSY_TIMEOUT_S = 5.0
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")

Progress = Callable[[int, int, str], None]


def default_path() -> Path:
    return store.home() / FILENAME


def check_name(name: str) -> str:
    """A collection name as stored (lower case); raises UserError for anything else."""
    low = name.strip().lower()
    if not _NAME.match(low):
        raise UserError(f"{name!r} is not a collection name (letters, digits, '.', '-', '_'; at most 64)")
    return low


@dataclass
class CollectionInfo:
    name: str
    roots: list[str]
    ignore: list[str]
    files: int
    chunks: int
    chars: int
    updated: float


@dataclass
class SyncSummary:
    """What an add or update did; `notes` holds one line per file left out and why."""

    name: str
    added: int = 0
    changed: int = 0
    unchanged: int = 0
    removed: int = 0
    chunks: int = 0
    chars: int = 0
    notes: list[str] = field(default_factory=list)
    hidden: int = 0  # dotfiles and dot-folders (.git) not looked into: counted, not listed

    def line(self) -> str:
        hidden = f"; {self.hidden} hidden (dot) files and folders skipped" if self.hidden else ""
        return (f"{self.name}: {self.added} added, {self.changed} changed, {self.unchanged} unchanged, "
                f"{self.removed} removed ({self.chunks} chunks, {self.chars / 1e6:.1f} MB of text read); "
                f"{len(self.notes)} left out{hidden}")


class NothingRead(UserError):
    """A new collection in which no file could be read: it is not created. `summary` says why,
    file by file."""

    def __init__(self, summary: SyncSummary):
        super().__init__(f"no file could be read, so collection {summary.name} was not created"
                         + (" (the lines above say why)" if summary.notes else " (no files found)"))
        self.summary = summary


_SCHEMA = """
CREATE TABLE IF NOT EXISTS collections (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, roots TEXT NOT NULL, ignore TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY, collection INTEGER NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL, chars INTEGER NOT NULL, chunks INTEGER NOT NULL,
    UNIQUE (collection, path));
CREATE TABLE IF NOT EXISTS chunks (id INTEGER PRIMARY KEY, file INTEGER NOT NULL, line INTEGER NOT NULL,
    page INTEGER, title TEXT NOT NULL, body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_by_file ON chunks (file);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(title, body, content='', tokenize='porter unicode61');
"""


class DocsIndex:
    """An open docs.sqlite3 (or ":memory:" for one file attached to a single question)."""

    def __init__(self, path: Path | str | None = None):
        self.path = str(path if path is not None else default_path())
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_S,
                                      check_same_thread=False)
            _require_fts5(self.db)
            self.db.execute("PRAGMA journal_mode=WAL")
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise UserError(f"{self.path} was written by a newer llamadesk (schema {version}); upgrade")
            if version < SCHEMA_VERSION:
                self.db.executescript(f"BEGIN; {_SCHEMA} "
                                      f"PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
        except sqlite3.DatabaseError as e:
            raise UserError(f"{self.path}: the documents index cannot be opened ({e}); "
                            f"move it aside and add the collections again") from None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "DocsIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ collections
    def collections(self) -> list[CollectionInfo]:
        rows = self.db.execute(
            "SELECT c.name, c.roots, c.ignore, c.updated, count(f.id), coalesce(sum(f.chunks), 0), "
            "coalesce(sum(f.chars), 0) FROM collections c LEFT JOIN files f ON f.collection = c.id "
            "GROUP BY c.id ORDER BY c.name").fetchall()
        return [CollectionInfo(name, json.loads(roots), json.loads(ignore), files, chunks, chars, updated)
                for name, roots, ignore, updated, files, chunks, chars in rows]

    def names(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM collections ORDER BY name")]

    def require(self, name: str) -> int:
        """The id of collection `name`; UserError naming the known ones if it does not exist."""
        row = self.db.execute("SELECT id FROM collections WHERE name = ?", (check_name(name),)).fetchone()
        if row is None:
            known = ", ".join(self.names()) or "none yet"
            raise UserError(f"no document collection named {name!r} (have: {known}); "
                            f"create one with `llamadesk docs add {check_name(name)} PATH...`")
        return row[0]

    def add(self, name: str, paths: list[Path], ignore: list[str] = (), progress: Progress | None = None) -> SyncSummary:
        """Create collection `name` from `paths` (files or folders), or add them to it, and index
        what is new or changed. Raises UserError for a path that does not exist, and NothingRead
        (nothing written) when a new collection would hold no file: an empty one is no use to pick."""
        name = check_name(name)
        roots = [os.path.abspath(p) for p in paths]
        for p in roots:
            if not os.path.exists(p):
                raise UserError(f"{p}: no such file or folder")
        with self._transaction():
            row = self.db.execute("SELECT id, roots, ignore FROM collections WHERE name = ?", (name,)).fetchone()
            now = time.time()
            if row is None:
                cid = self.db.execute("INSERT INTO collections (name, roots, ignore, created, updated) "
                                      "VALUES (?, ?, ?, ?, ?)",
                                      (name, json.dumps(roots), json.dumps(list(ignore)), now, now)).lastrowid
            else:
                cid = row[0]
                roots = list(dict.fromkeys(json.loads(row[1]) + roots))
                ignore = list(dict.fromkeys(json.loads(row[2]) + list(ignore)))
                self.db.execute("UPDATE collections SET roots = ?, ignore = ? WHERE id = ?",
                                (json.dumps(roots), json.dumps(ignore), cid))
            summary = self._sync(cid, name, [Path(r) for r in roots], list(ignore), progress)
            if row is None and not summary.added:
                raise NothingRead(summary)  # the transaction rolls back: no collection
            return summary

    def update(self, name: str, progress: Progress | None = None) -> SyncSummary:
        """Re-read what changed in collection `name`'s folders and files (size, mtime, then sha256)."""
        with self._transaction():
            cid = self.require(name)
            roots, ignore = self.db.execute("SELECT roots, ignore FROM collections WHERE id = ?", (cid,)).fetchone()
            return self._sync(cid, check_name(name), [Path(r) for r in json.loads(roots)], json.loads(ignore),
                              progress)

    def remove(self, name: str) -> None:
        with self._transaction():
            cid = self.require(name)
            for (fid,) in self.db.execute("SELECT id FROM files WHERE collection = ?", (cid,)).fetchall():
                self._delete_file(fid)
            self.db.execute("DELETE FROM collections WHERE id = ?", (cid,))

    def add_chunks(self, name: str, path: str, chunks: list[Chunk]) -> None:
        """Index chunks made elsewhere as one file of collection `name` (made if needed); used
        for a single attached file in a ":memory:" index."""
        with self._transaction():
            row = self.db.execute("SELECT id FROM collections WHERE name = ?", (name,)).fetchone()
            cid = row[0] if row else self.db.execute(
                "INSERT INTO collections (name, roots, ignore, created, updated) VALUES (?, '[]', '[]', 0, 0)",
                (name,)).lastrowid
            fid = self.db.execute("INSERT INTO files (collection, path, size, mtime_ns, sha256, chars, chunks) "
                                  "VALUES (?, ?, 0, 0, '', ?, ?)",
                                  (cid, path, sum(len(c.text) for c in chunks), len(chunks))).lastrowid
            self._insert_chunks(fid, Path(path), chunks)

    # ------------------------------------------------------------ writing
    def _transaction(self):
        index = self

        class _Tx:
            def __enter__(self):
                try:
                    index.db.execute("BEGIN IMMEDIATE")
                except sqlite3.OperationalError as e:
                    raise UserError(f"the documents index is busy ({e}): another llamadesk is changing it; "
                                    f"try again when it is done") from None

            def __exit__(self, kind, value, tb):
                try:
                    if kind is None:
                        index.db.execute("COMMIT")
                        return False
                    index.db.execute("ROLLBACK")
                except sqlite3.DatabaseError as e:
                    value = e
                if isinstance(value, sqlite3.DatabaseError):  # the disk full, the file damaged
                    raise UserError(f"{index.path}: the documents index could not be written ({value}); "
                                    f"it is as it was before") from None
                return False

        return _Tx()

    def _sync(self, cid: int, name: str, roots: list[Path], ignore: list[str], progress: Progress | None) -> SyncSummary:
        summary = SyncSummary(name)
        known = {path: (fid, size, mtime, sha) for fid, path, size, mtime, sha in self.db.execute(
            "SELECT id, path, size, mtime_ns, sha256 FROM files WHERE collection = ?", (cid,))}
        hidden: list[Path] = []
        found = list(walk(roots, ignore, hidden))
        summary.hidden = len(hidden)
        keep: set[str] = set()  # paths whose indexed copy stays (seen, or left out but unchanged)
        for done, (path, st, reason) in enumerate(found, start=1):
            key = str(path)
            if progress:
                progress(done, len(found), key)
            if reason:
                summary.notes.append(f"{path}: {reason}")
                keep.add(key)
                continue
            old = known.get(key)
            if old and old[1] == st.st_size and old[2] == st.st_mtime_ns:
                summary.unchanged += 1
                keep.add(key)
                continue
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                summary.notes.append(f"{path}: vanished while indexing")
                continue
            except OSError as e:
                summary.notes.append(f"{path}: cannot be read ({e.strerror or type(e).__name__})")
                keep.add(key)
                continue
            if len(data) > MAX_FILE_BYTES:
                summary.notes.append(f"{path}: larger than {MAX_FILE_BYTES // 2**20} MB")
                continue
            sha = hashlib.sha256(data).hexdigest()
            if old and old[3] == sha:
                self.db.execute("UPDATE files SET size = ?, mtime_ns = ? WHERE id = ?",
                                (st.st_size, st.st_mtime_ns, old[0]))
                summary.unchanged += 1
                keep.add(key)
                continue
            try:
                chunks = chunk_blocks(read_blocks(path, data))
            except SkippedFile as e:
                summary.notes.append(f"{path}: {e}")
                continue
            chars = sum(len(c.text) for c in chunks)
            if old:
                self._delete_file(old[0])
                summary.changed += 1
            else:
                summary.added += 1
            fid = self.db.execute("INSERT INTO files (collection, path, size, mtime_ns, sha256, chars, chunks) "
                                  "VALUES (?, ?, ?, ?, ?, ?, ?)",
                                  (cid, key, st.st_size, st.st_mtime_ns, sha, chars, len(chunks))).lastrowid
            self._insert_chunks(fid, path, chunks)
            summary.chunks += len(chunks)
            summary.chars += chars
            keep.add(key)
        present = [str(r) for r in roots if r.exists()]
        for r in roots:
            if not r.exists():
                summary.notes.append(f"{r}: no longer exists; what was indexed from it is kept")
        for key, (fid, *_) in known.items():
            if key not in keep and any(key == r or key.startswith(r.rstrip(os.sep) + os.sep) for r in present):
                self._delete_file(fid)
                summary.removed += 1
        self.db.execute("UPDATE collections SET updated = ? WHERE id = ?", (time.time(), cid))
        return summary

    def _insert_chunks(self, fid: int, path: Path, chunks: list[Chunk]) -> None:
        title = re.sub(r"[-_.]+", " ", path.stem)
        for c in chunks:
            heading = f"{title} {c.heading}".strip()
            rowid = self.db.execute("INSERT INTO chunks (file, line, page, title, body) VALUES (?, ?, ?, ?, ?)",
                                    (fid, c.line, c.page, heading, pack_text(c.text))).lastrowid
            self.db.execute("INSERT INTO chunks_fts (rowid, title, body) VALUES (?, ?, ?)", (rowid, heading, c.text))

    def _delete_file(self, fid: int) -> None:
        # a contentless FTS5 table forgets a row when told the values it was given
        rows = self.db.execute("SELECT id, title, body FROM chunks WHERE file = ?", (fid,)).fetchall()
        self.db.executemany("INSERT INTO chunks_fts (chunks_fts, rowid, title, body) VALUES ('delete', ?, ?, ?)",
                            [(rowid, title, unpack_text(body)) for rowid, title, body in rows])
        self.db.execute("DELETE FROM chunks WHERE file = ?", (fid,))
        self.db.execute("DELETE FROM files WHERE id = ?", (fid,))


def pack_text(text: str) -> bytes:
    return zlib.compress(text.encode("utf-8"), 6)


def unpack_text(data: bytes) -> str:
    return zlib.decompress(data).decode("utf-8")


def _require_fts5(db: sqlite3.Connection) -> None:
    try:
        db.execute(f"CREATE VIRTUAL TABLE temp._fts5_probe USING {FTS_MODULE}(x)")
        db.execute("DROP TABLE temp._fts5_probe")
    except sqlite3.OperationalError:
        db.close()
        raise UserError(f"this Python's SQLite ({sqlite3.sqlite_version}) was built without FTS5, which document "
                        f"collections need; use a Python whose sqlite3 has it (python.org and most Linux "
                        f"builds do)") from None
