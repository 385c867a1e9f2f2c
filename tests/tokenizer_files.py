"""Tokenizer inputs for the tests: GGUF metadata read with the gguf package, and a Llama 3 sized
tokenizer.model made on the spot.

The app reads GGUF in model/checkpoints.py; the tests read it here with the gguf package directly,
so the tokenizer is checked against the file rather than against our own reader.
"""
from __future__ import annotations

import base64
import functools
from pathlib import Path

from gguf import GGUFReader, GGUFValueType


@functools.cache  # both tokenizer test files read the same 100 MB file; read it once per run
def gguf_metadata(path: Path) -> dict:
    """{key: str | int | float | bool | list} for every metadata field (no tensors). Shared:
    callers must not change it."""
    out = {}
    for key, field in GGUFReader(path).fields.items():
        if key.startswith("GGUF."):  # the header (version, counts), not metadata
            continue
        kind = field.types[-1]
        values = [_value(field.parts[i], kind) for i in field.data]
        out[key] = values if field.types[0] == GGUFValueType.ARRAY else values[0]
    return out


def _value(part, kind: GGUFValueType):
    if kind == GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    return part.tolist()[0]


def write_llama3_sized_model(path: Path) -> Path:
    """A tokenizer.model with Llama 3's 128000 base ranks, so Meta's special tokens land on their
    real ids (128000...). Ranks 0-255 are the single bytes; the rest are filler tokens that start
    with 0xFF, a byte UTF-8 text never holds, so any text encodes byte by byte: id = byte value."""
    tokens = [bytes([b]) for b in range(256)]
    tokens += [b"\xff" + n.to_bytes(3, "big") for n in range(128000 - 256)]
    lines = [f"{base64.b64encode(token).decode()} {rank}" for rank, token in enumerate(tokens)]
    path.write_text("\n".join(lines) + "\n")
    return path
