"""What a question is answered from: collections (`--docs NAME`, `#NAME` in the prompt) or one file.

`Grounds.pick` checks what was asked for before any model loads (a missing collection or file is
one clear line at once); `Grounds.apply` turns the question into the prompt with its passages once
the model's tokenizer can count them.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import UserError
from .chunks import chunk_blocks
from .files import MAX_FILE_BYTES, SkippedFile, kind_of, read_blocks
from .index import DocsIndex, check_name, default_path
from .retrieve import Passage, fit_passages, grounded_prompt, search

_TAG = re.compile(r"(?<![\w#])#([A-Za-z0-9](?:[A-Za-z0-9._-]{0,62}[A-Za-z0-9])?)(?![\w-])")
ATTACHED = "attached"  # the in-memory collection holding one attached file
Notice = Callable[[list[str]], None]  # hears of `#NAME` words that name no collection


def untagged_line(tags: list[str], lister: str = "`llamadesk docs list`") -> str:
    """One line saying that `tags` ("#nope") name no collection, and what lists the ones there are."""
    verb = "names" if len(tags) == 1 else "name"
    return f"{', '.join(tags)} {verb} no document collection ({lister} shows them); sent as text"


@dataclass
class Grounds:
    """Collections and/or one file a question is answered from."""

    collections: list[str] = field(default_factory=list)
    file: Path | None = None

    @classmethod
    def pick(cls, prompt: str, collections: list[str] = (), file: Path | None = None,
             taggable: list[str] | None = None, notice: Notice | None = None) -> tuple["Grounds", str]:
        """(grounds, prompt) for a question: `#NAME` words naming an existing collection (one of
        `taggable`, when given) are taken out of the prompt and added; other `#NAME`s stay text,
        told to `notice` (None: nobody), since a mistyped name would otherwise answer
        from nothing unnoticed. Raises UserError for a collection or file that is not there."""
        names = [check_name(n) for n in collections]
        tagged = tagged_collections(prompt, taggable)
        if notice is not None:
            _notice_untagged(prompt, tagged, notice)
        if tagged:
            prompt = _TAG.sub(lambda m: "" if m.group(1).lower() in tagged else m.group(0), prompt)
            prompt = re.sub(r"[ \t]{2,}", " ", prompt).strip()
            names += [n for n in tagged if n not in names]
        if names:
            with DocsIndex() as index:
                for n in names:
                    index.require(n)
        if file is not None:
            _file_bytes(file)  # fails now rather than after the model has loaded
        return cls(list(dict.fromkeys(names)), file), prompt

    def __bool__(self) -> bool:
        return bool(self.collections) or self.file is not None

    def describe(self) -> str:
        parts = [f"collection {', '.join(self.collections)}"] if self.collections else []
        return " and ".join(parts + ([str(self.file)] if self.file else []))

    def apply(self, question: str, budget_tokens: int, count_tokens: Callable[[str], int],
              context: str = "") -> tuple[str, list[Passage]]:
        """The user message that quotes the passages for `question`, and those passages, numbered.
        Passages take at most `budget_tokens` as `count_tokens` counts them."""
        found: list[Passage] = []
        if self.file is not None:
            found += _file_passages(self.file, question, budget_tokens, count_tokens, context)
        if self.collections:
            with DocsIndex() as index:
                # the attached file's passages cover it: its copy in a collection would be quoted twice
                attached = os.path.realpath(self.file) if self.file is not None else None
                found += [p for p in search(index, self.collections, question, context)
                          if os.path.realpath(p.path) != attached]
        chosen = fit_passages(found, budget_tokens, count_tokens)
        return grounded_prompt(question, chosen, self.describe()), chosen


def tagged_collections(prompt: str, taggable: list[str] | None = None) -> list[str]:
    """The collections that `#NAME` words in `prompt` name, in order: existing ones, and only those
    in `taggable` when given (a server's clients pick among the collections it serves, no other)."""
    if "#" not in prompt or not default_path().exists():
        return []
    with DocsIndex() as index:
        known = set(index.names())
    if taggable is not None:
        known &= set(taggable)
    return list(dict.fromkeys(m.group(1).lower() for m in _TAG.finditer(prompt) if m.group(1).lower() in known))


def _notice_untagged(prompt: str, tagged: list[str], notice: Notice) -> None:
    """One line naming the `#NAME`s that name no collection; all digits ("#1") is a number, not a try.
    Said only to someone who has collections: to anyone else "#include" is just text."""
    if "#" not in prompt or not default_path().exists():
        return
    with DocsIndex() as index:
        if not index.names():
            return
    untagged = [m.group(0) for m in _TAG.finditer(prompt)
                if m.group(1).lower() not in tagged and not m.group(1).isdigit()]
    untagged = list(dict.fromkeys(untagged))
    if untagged:
        notice(untagged)


def ground_chat(messages: list[dict], collections, file: str, ctx: int, max_tokens: int,
                count_tokens: Callable[[str], int],
                taggable: list[str] | None = None,
                notice: Notice | None = None) -> tuple[list[dict], list[Passage] | None]:
    """A chat's messages with the last user message grounded in `collections`, `#NAME`s it holds
    (among `taggable`, when given) and/or `file`; the turn before it joins the search, so a
    follow-up finds what the conversation is about. `notice` hears of `#NAME`s that name no
    collection (None: nobody, as for a server). Passages None: nothing to ground in, the
    messages unchanged."""
    from .retrieve import passage_budget

    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users or users[-1] != len(messages) - 1:
        return messages, None
    context = messages[users[-2]]["content"] if len(users) > 1 else ""
    grounds, question = Grounds.pick(messages[-1]["content"], list(collections), Path(file) if file else None,
                                     taggable, notice)
    if not grounds:
        return messages, None
    prompt, passages = grounds.apply(question, passage_budget(ctx, max_tokens), count_tokens, context)
    return messages[:-1] + [{"role": "user", "content": prompt}], passages


def file_problem(path: Path, shown: str | None = None) -> str | None:
    """Why `path` cannot be attached, as one line naming it as `shown` (default: the path), or
    None when it can. Reads nothing: the chat app's picker asks it as the user types."""
    shown = str(path) if shown is None else shown
    if path.is_dir():
        return f"{shown} is a folder; `llamadesk docs add NAME {shown}` makes a collection of it"
    if not path.is_file():
        return f"{shown}: no such file"
    if path.stat().st_size > MAX_FILE_BYTES:
        return f"{shown}: larger than {MAX_FILE_BYTES // 2**20} MB; too large to attach"
    if kind_of(path) is None:
        return f"{shown}: not a kind of file llamadesk reads (text, Markdown, reST, HTML, PDF, source code)"
    return None


def _file_bytes(path: Path) -> bytes:
    problem = file_problem(path)
    if problem:
        raise UserError(problem)
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None


def _file_passages(path: Path, question: str, budget: int, count_tokens, context: str) -> list[Passage]:
    """The whole file as one passage when it fits `budget`; else its best chunks for `question`."""
    try:
        blocks = read_blocks(path, _file_bytes(path))
    except SkippedFile as e:
        raise UserError(f"{path}: {e}") from None
    whole = Passage(os.path.abspath(path), blocks[0].line, blocks[0].page, "\n\n".join(b.text for b in blocks),
                    score=-1e9)
    # a token is rarely more than 8 characters: longer text cannot fit, and is not worth counting
    if len(whole.text) <= budget * 8 and fit_passages([whole], budget, count_tokens):
        return [whole]
    with DocsIndex(":memory:") as index:
        index.add_chunks(ATTACHED, whole.path, chunk_blocks(blocks))
        return search(index, [ATTACHED], question, context, limit=50)
