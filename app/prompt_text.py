"""Prompts as they come from the shell: an argument, stdin, or a line typed into `chat --plain`.

The rules, the same for every way in:
- trailing whitespace goes: a piped prompt ends in a newline, which the model reads as part of
  the question (SmolLM2 answered `echo "What is the capital of France?" |` in French); nothing
  else in the text is touched;
- a blank prompt is refused with one line, never sent;
- bytes that are not UTF-8 become U+FFFD, with one warning on stderr, never a traceback.

Python hands bytes it cannot decode from argv (and from stdin, read here as bytes) over as lone
surrogates ("surrogateescape"); `from_shell` turns those into U+FFFD. No torch import.
"""
from __future__ import annotations

import re
import sys
from typing import Callable

from .errors import UserError

_ESCAPED = re.compile("[\udc80-\udcff]")  # one per byte surrogateescape could not decode
REPLACEMENT = "\ufffd"


def from_shell(text: str, warn: Callable[[str], None], what: str = "the prompt") -> str:
    """`text` with each undecodable byte replaced by U+FFFD; `warn` gets one line if there were any."""
    fixed, n = _ESCAPED.subn(REPLACEMENT, text)
    if n:
        warn(f"llamadesk: warning: {what} is not valid UTF-8: {n} byte{'s' * (n != 1)} read as {REPLACEMENT}")
    return fixed


def read_stdin() -> str:
    """All of stdin as text, undecodable bytes kept as surrogates for `from_shell`."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # a replaced stdin (an embedding program, a test) is already text
        return sys.stdin.read()
    return buffer.read().decode("utf-8", "surrogateescape")


def prompt_text(text: str, where: str = "the prompt") -> str:
    """The prompt to send: `text` without trailing whitespace. Raises UserError when blank."""
    text = text.rstrip()
    if not text.strip():
        raise UserError(f"{where} is empty; give a question, e.g. llamadesk ask \"What is RoPE?\"")
    return text


__all__ = ["from_shell", "prompt_text", "read_stdin"]
