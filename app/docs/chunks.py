"""Blocks -> chunks of at most MAX_CHARS characters, split at headings, then paragraphs, then lines.

Each chunk keeps where it starts (line, and page for PDFs) so an answer can cite it, and the
heading it sits under, which the index searches as the chunk's title.
"""
from __future__ import annotations

from dataclasses import dataclass

from .files import Block

MAX_CHARS = 1500
MIN_CHARS = 400  # tuned on tests/bench/docs_bench.py: recall@3 0.797 at 0, 0.826 at 400


@dataclass(frozen=True)
class Chunk:
    text: str
    line: int
    page: int | None
    heading: str = ""


def chunk_blocks(blocks: list[Block], max_chars: int = MAX_CHARS, min_chars: int = MIN_CHARS) -> list[Chunk]:
    """Pack blocks into chunks of <= max_chars characters.

    A heading starts a new chunk (it stays with the text under it) once the open one holds
    min_chars: a run of short sections shares a chunk, since BM25 favours tiny chunks that repeat
    one word. A page break starts a new chunk so a citation's page is exact; a paragraph that
    alone is too long is cut at line ends, then at spaces, then anywhere.
    """
    chunks: list[Chunk] = []
    parts: list[str] = []
    size = 0
    start: tuple[int, int | None] = (1, None)
    heading = ""
    body = False  # the open chunk holds more than headings

    def flush() -> None:
        nonlocal parts, size, body
        if parts:
            chunks.append(Chunk("\n\n".join(parts), start[0], start[1], heading))
        parts, size, body = [], 0, False

    for block in blocks:
        if (block.heading and body and size >= min_chars) or (parts and block.page != start[1]):
            flush()
        if block.heading:
            heading = block.text[:200]
        # a long block under a heading is cut to leave room for the heading in its first chunk
        room = max_chars - (size + 2 if parts and not body else 0)
        for text, line in _pieces(block, room):
            if parts and size + 2 + len(text) > max_chars:
                flush()
            if not parts:
                start = (line, block.page)
            parts.append(text)
            size += len(text) + (2 if len(parts) > 1 else 0)
            body = body or not block.heading
    flush()
    return chunks


def _pieces(block: Block, max_chars: int) -> list[tuple[str, int]]:
    """The block as (text, line) pieces of <= max_chars characters."""
    if len(block.text) <= max_chars:
        return [(block.text, block.line)]
    pieces: list[tuple[str, int]] = []
    current: list[str] = []
    size = 0
    line = block.line
    for offset, text in enumerate(block.text.split("\n")):
        for cut in _cut(text, max_chars):
            if current and size + 1 + len(cut) > max_chars:
                pieces.append(("\n".join(current), line))
                current, size = [], 0
            if not current:
                line = block.line + offset
            current.append(cut)
            size += len(cut) + (1 if len(current) > 1 else 0)
    if current:
        pieces.append(("\n".join(current), line))
    return pieces


def _cut(text: str, max_chars: int) -> list[str]:
    """One line as pieces of <= max_chars, cut at the last space before the limit if any."""
    out = []
    while len(text) > max_chars:
        at = text.rfind(" ", max_chars // 2, max_chars)
        at = at if at > 0 else max_chars
        out.append(text[:at])
        text = text[at:].lstrip(" ")
    out.append(text)
    return out
