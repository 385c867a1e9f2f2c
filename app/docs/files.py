"""Which files a collection holds, and their text as blocks (paragraphs and headings).

A file's kind comes from its extension. Text is UTF-8 (a BOM allowed), else cp1252; a NUL in the
first 8 KiB marks a binary file. PDFs are read page by page through pypdf. Every file that is left
out gets one line saying why; nothing else stops because of it.
"""
from __future__ import annotations

import fnmatch
import html.parser
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

MAX_FILE_BYTES = 100 * 2**20
BINARY_PROBE_BYTES = 8192

TEXT = {".txt", ".text", ".md", ".markdown", ".rst", ".adoc", ".org", ".tex"}
HTML = {".html", ".htm", ".xhtml"}
PDF = {".pdf"}
CODE = {".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".hh", ".cs", ".java", ".kt", ".kts", ".scala",
        ".go", ".rs", ".swift", ".m", ".mm", ".js", ".mjs", ".cjs", ".ts", ".tsx", ".jsx", ".vue", ".svelte", ".rb",
        ".php", ".pl", ".pm", ".lua", ".r", ".jl", ".dart", ".zig", ".nim", ".hs", ".ml", ".ex", ".exs", ".erl",
        ".clj", ".el", ".lisp", ".scm", ".sh", ".bash", ".zsh", ".fish", ".ps1", ".bat", ".sql", ".css", ".scss",
        ".less", ".toml", ".yaml", ".yml", ".json", ".ini", ".cfg", ".conf", ".xml", ".csv", ".tsv", ".proto",
        ".graphql", ".cmake", ".mk", ".gradle", ".tf", ".nix", ".vim", ".diff", ".patch", ".ipynb", ".log"}
CODE_NAMES = {"makefile", "dockerfile", "cmakelists.txt", "readme", "license", "changelog", "notes"}
# formats people often hold that need converters this project does not carry
REFUSED = {".docx": "Word", ".doc": "Word", ".odt": "OpenDocument", ".rtf": "RTF", ".epub": "EPUB",
           ".mobi": "Mobi", ".pptx": "PowerPoint", ".ppt": "PowerPoint", ".xlsx": "Excel", ".xls": "Excel",
           ".pages": "Pages"}


class SkippedFile(Exception):
    """A file that is left out of the index; the message is the reason, for the summary line."""


@dataclass(frozen=True)
class Block:
    """A paragraph or heading: its text, the 1-based line it starts on (within its page for a
    PDF), the 1-based page (None outside PDFs), and whether it is a heading."""

    text: str
    line: int
    page: int | None = None
    heading: bool = False


def kind_of(path: Path) -> str | None:
    """'text', 'html', 'pdf' or 'code' from the file name; None for anything else."""
    ext = path.suffix.lower()
    for kind, exts in (("text", TEXT), ("html", HTML), ("pdf", PDF), ("code", CODE)):
        if ext in exts:
            return kind
    if path.name.lower() in CODE_NAMES:
        return "text"
    return None


# ---------------------------------------------------------------- finding files
def walk(roots: list[Path], ignore: list[str] = (),
         hidden: list[Path] | None = None) -> Iterator[tuple[Path, os.stat_result | None, str | None]]:
    """Every file under `roots`: (path, stat, None) to index, (path, None, reason) for a file left
    out (an unknown kind too: the user should hear of every file that is not read).

    Dotfiles and dot-folders (.git included) are skipped, each appended to `hidden` when given
    (one summary line, not a line per file of .git); so is any path matching an `ignore` glob
    (against its name or its path below the root), which the user asked for. Symlinks are
    followed, each folder once, so a link loop ends. Files over MAX_FILE_BYTES are left out with
    a reason.
    """
    seen_dirs: set[tuple[int, int]] = set()
    for root in roots:
        root = Path(os.path.abspath(root))
        try:
            st = root.stat()
        except OSError as e:
            yield root, None, f"cannot be read ({_reason(e)})"
            continue
        if not os.path.isdir(root):
            yield from _check_file(root, st)
            continue
        stack = [root]
        while stack:
            folder = stack.pop()
            try:
                st = folder.stat()
                key = (st.st_dev, st.st_ino)
                if key in seen_dirs:
                    continue  # a symlink loop, or a folder reached twice
                seen_dirs.add(key)
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError as e:
                yield folder, None, f"folder cannot be read ({_reason(e)})"
                continue
            subdirs = []
            for entry in entries:
                path = Path(entry.path)
                if entry.name.startswith("."):
                    if hidden is not None:
                        hidden.append(path)
                    continue
                if _ignored(path, root, ignore):
                    continue
                try:
                    if entry.is_dir():
                        subdirs.append(path)
                        continue
                    st = entry.stat()
                except OSError as e:
                    yield path, None, f"cannot be read ({_reason(e)})"
                    continue
                yield from _check_file(path, st)
            stack.extend(reversed(subdirs))


def _check_file(path: Path, st: os.stat_result):
    ext = path.suffix.lower()
    if ext in REFUSED:
        yield path, None, f"{REFUSED[ext]} files ({ext}) are not supported; save it as PDF or text"
    elif kind_of(path) is None:
        yield path, None, "not a kind of file llamadesk reads (text, Markdown, reST, HTML, PDF, source code)"
    elif st.st_size > MAX_FILE_BYTES:
        yield path, None, f"larger than {MAX_FILE_BYTES // 2**20} MB ({st.st_size / 2**20:.0f} MB)"
    else:
        yield path, st, None


def _ignored(path: Path, root: Path, globs) -> bool:
    rel = path.relative_to(root).as_posix()
    return any(fnmatch.fnmatch(path.name, g) or fnmatch.fnmatch(rel, g) for g in globs)


def _reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


# ---------------------------------------------------------------- reading text
def decode(data: bytes) -> str:
    """UTF-8 (a BOM allowed) else cp1252; raises SkippedFile for binary data."""
    if b"\0" in data[:BINARY_PROBE_BYTES]:
        raise SkippedFile("binary (not text)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def read_blocks(path: Path, data: bytes) -> list[Block]:
    """The blocks of a file whose bytes are `data`; raises SkippedFile with the reason it holds no
    usable text (binary, a broken, encrypted or scanned PDF, an empty file)."""
    kind = kind_of(path) or "text"
    if kind == "pdf":
        blocks = _pdf_blocks(data)
    else:
        text = decode(data)
        blocks = _html_blocks(text) if kind == "html" else text_blocks(text, headings=kind == "text")
    if not blocks:
        raise SkippedFile("no text")
    return blocks


_ATX = re.compile(r"^#{1,6}\s+\S")
_UNDERLINE = re.compile(r"^([=\-~^*#+`'\"])\1{2,}\s*$")


def text_blocks(text: str, headings: bool = True, page: int | None = None) -> list[Block]:
    """Paragraphs split at blank lines; with `headings`, Markdown `# ...` lines and lines
    underlined with `===`/`---`/`***` (reST, setext) become heading blocks."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    blocks: list[Block] = []
    para: list[str] = []
    start = 0

    def flush() -> None:
        if para:
            blocks.append(Block("\n".join(para), start + 1, page))
            para.clear()

    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if not line.strip():
            flush()
        elif headings and _UNDERLINE.match(line) and not para:
            pass  # an overline, or an underline already taken with its title
        elif headings and not para and i + 1 < len(lines) and _UNDERLINE.match(lines[i + 1].rstrip()) \
                and len(line.strip()) <= 200:
            blocks.append(Block(line.strip(), i + 1, page, heading=True))
            i += 1
        elif headings and _ATX.match(line):
            flush()
            blocks.append(Block(line.lstrip("#").strip(), i + 1, page, heading=True))
        else:
            if not para:
                start = i
            para.append(line)
        i += 1
    flush()
    return blocks


class _HTMLText(html.parser.HTMLParser):
    _BLOCK = {"p", "div", "section", "article", "li", "ul", "ol", "table", "tr", "td", "th", "br", "pre",
              "blockquote", "dd", "dt", "dl", "header", "footer", "nav", "main", "aside", "figure", "hr"}
    _HEAD = {"h1", "h2", "h3", "h4", "h5", "h6", "title"}
    _SKIP = {"script", "style", "noscript", "template", "svg"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[Block] = []
        self.parts: list[str] = []
        self.line = 1
        self.skipping = 0
        self.heading = False

    def _flush(self) -> None:
        text = re.sub(r"\s+", " ", "".join(self.parts)).strip()
        if text:
            self.blocks.append(Block(text, self.line, None, self.heading))
        self.parts = []

    def handle_starttag(self, tag, attrs):
        if tag in self._SKIP:
            self.skipping += 1
        elif tag in self._BLOCK or tag in self._HEAD:
            self._flush()
            self.heading = tag in self._HEAD

    def handle_endtag(self, tag):
        if tag in self._SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self._BLOCK or tag in self._HEAD:
            self._flush()
            self.heading = False

    def handle_data(self, data):
        if self.skipping:
            return
        if not self.parts:
            if not data.strip():
                return
            self.line = self.getpos()[0] + data[: len(data) - len(data.lstrip())].count("\n")
        self.parts.append(data)


def _html_blocks(text: str) -> list[Block]:
    parser = _HTMLText()
    parser.feed(text)
    parser.close()
    parser._flush()
    return parser.blocks


def _pdf_blocks(data: bytes) -> list[Block]:
    try:
        import pypdf
        from pypdf.errors import PyPdfError
    except ImportError:
        raise SkippedFile("PDF support needs pypdf (pip install pypdf)") from None
    import logging

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its warnings about odd files are not ours to print
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise SkippedFile("encrypted PDF (needs a password)")
        blocks: list[Block] = []
        pages = 0
        for number, page in enumerate(reader.pages, start=1):
            pages += 1
            blocks += text_blocks(page.extract_text() or "", headings=False, page=number)
    except SkippedFile:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError, OSError,
            RecursionError, NotImplementedError) as e:
        if "crypt" in str(e).lower() or "AES" in str(e):
            raise SkippedFile("encrypted PDF (cannot be read)") from None
        raise SkippedFile(f"broken PDF ({type(e).__name__})") from None
    if not blocks:
        raise SkippedFile(f"PDF with no text in {pages} page(s) (scanned? it needs OCR first)")
    return blocks
