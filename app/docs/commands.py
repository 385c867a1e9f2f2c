"""`llamadesk docs add|list|rm|update`: the flags, and one function per subcommand.

Nothing here imports torch, textual or rich: listing collections is instant.
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path

from .index import DocsIndex, NothingRead, SyncSummary


def add_parser(sub) -> None:
    """The `docs` subcommand and its own subcommands, on the CLI's subparsers."""
    docs = sub.add_parser("docs", help="document collections the answers can quote (add, list, rm, update)")
    verbs = docs.add_subparsers(dest="docs_command", required=True, help="what to do with collections")
    p = verbs.add_parser("add", help="create a collection from files and folders, or add them to one")
    p.add_argument("name")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    p.add_argument("--ignore", action="append", default=[], metavar="GLOB",
                   help="leave out names or paths matching GLOB (repeatable), e.g. --ignore '*.log'")
    verbs.add_parser("list", help="the collections, their files and size")
    p = verbs.add_parser("rm", help="remove a collection from the index (the files stay)")
    p.add_argument("name")
    p = verbs.add_parser("update", help="re-read what changed in a collection's files")
    p.add_argument("name", nargs="?")
    p.add_argument("--all", action="store_true", help="every collection")


def run(args: argparse.Namespace) -> int:
    if args.docs_command == "add":
        return docs_add(args.name, args.paths, args.ignore)
    if args.docs_command == "list":
        return docs_list()
    if args.docs_command == "rm":
        return docs_rm(args.name)
    if args.docs_command == "update":
        if bool(args.name) == bool(args.all):
            print("llamadesk docs update: error: give a collection NAME or --all", file=sys.stderr)
            return 2
        return docs_update(None if args.all else args.name)
    raise AssertionError(args.docs_command)


def docs_add(name: str, paths: list[Path], ignore: list[str]) -> int:
    with DocsIndex() as index:
        try:
            _report(index.add(name, paths, ignore, progress=_progress()))
        except NothingRead as e:
            _left_out(e.summary)  # why each file was not read, then the error line
            raise
    return 0


def docs_update(name: str | None) -> int:
    with DocsIndex() as index:
        for n in [name] if name else index.names():
            _report(index.update(n, progress=_progress()))
    return 0


def docs_rm(name: str) -> int:
    with DocsIndex() as index:
        index.remove(name)
    print(f"Removed collection {name.lower()} (the files themselves are untouched)")
    return 0


def docs_list() -> int:
    with DocsIndex() as index:
        rows = index.collections()
    if not rows:
        print("No document collections. Create one with `llamadesk docs add NAME PATH...`.")
        return 0
    print(f"{'NAME':24} {'FILES':>7} {'CHUNKS':>8} {'TEXT':>9}  {'UPDATED':16}  FROM")
    for c in rows:
        when = datetime.fromtimestamp(c.updated).strftime("%Y-%m-%d %H:%M")
        print(f"{c.name:24} {c.files:7} {c.chunks:8} {c.chars / 1e6:7.1f}MB  {when:16}  "
              f"{printable(', '.join(c.roots))}")
    return 0


def _report(summary: SyncSummary) -> None:
    print(summary.line())
    _left_out(summary)


def _left_out(summary: SyncSummary) -> None:
    for note in summary.notes:
        print(f"  left out: {printable(note)}")


def printable(text: str) -> str:
    """A file name as data on a terminal: control characters (escape sequences) shown as '?'."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _progress():
    """A one-line counter on a terminal's stderr, redrawn at most 10 times a second."""
    if not sys.stderr.isatty():
        return None
    last = [0.0]

    def show(done: int, total: int, path: str) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.1 or done == total:
            last[0] = now
            tail = printable(path[-50:])
            sys.stderr.write(f"\r\x1b[KIndexing {done}/{total} {tail}")
            if done == total:
                sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()

    return show
