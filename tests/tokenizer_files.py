"""Tokenizer inputs for the tests: GGUF metadata read with the gguf package, a Llama 3 sized
tokenizer.model made on the spot, and the 2000+ line corpus every tokenizer is compared on.

The app reads GGUF in model/checkpoints.py; the tests read it here with the gguf package directly,
so the tokenizer is checked against the file rather than against our own reader.
"""
from __future__ import annotations

import base64
import functools
import json
import random
import string
import textwrap
from pathlib import Path
from pydoc_data.topics import topics

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


# ---------------------------------------------------------------------------------------------
# The corpus: prose and code from Python's own docs and source, plus generated edge cases
# ---------------------------------------------------------------------------------------------

def make_corpus() -> list[str]:
    rng = random.Random(1234)
    lines: list[str] = []

    doc_lines = [line for key in sorted(topics) for line in topics[key].splitlines()]
    lines += doc_lines[:: len(doc_lines) // 700][:700]
    code_lines = Path(textwrap.__file__).read_text().splitlines()
    code_lines += Path(json.__file__).read_text().splitlines()
    lines += code_lines[:400]
    # Several lines at once, so newlines and indentation meet the split regex together.
    for start in range(0, 1500, 6):
        lines.append("\n".join(doc_lines[start:start + 3]))
    for start in range(0, 300, 6):
        lines.append("\r\n".join(code_lines[start:start + 4]) + "\r\n")

    number_forms = [
        lambda: str(rng.randrange(10 ** rng.randint(1, 12))),
        lambda: f" {rng.randrange(100000)}",
        lambda: f"{rng.randrange(10 ** 9):,}",
        lambda: f"{rng.uniform(-1000, 1000):.{rng.randint(0, 6)}f}",
        lambda: f"v{rng.randint(0, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 300)}",
        lambda: f"{rng.randrange(1 << 32):#x}",
        lambda: f"{rng.randint(1900, 2099)}-{rng.randint(1, 12):02}-{rng.randint(1, 28):02}",
        lambda: f"x={rng.randint(0, 99)};y = {rng.randint(0, 999)}  z\t{rng.randint(0, 9)}",
        lambda: f"{rng.random():.3e} and {rng.randint(0, 9)}th of {rng.randint(10, 99)}%",
        lambda: "".join(rng.choice("0123456789 ,.") for _ in range(rng.randint(1, 30))),
        lambda: rng.choice(["１２３", "²³", "½ cup", "Ⅻ", "٣٤٥", "३४५", "①②", "10⁻³"]) + " 7",
    ]
    lines += [rng.choice(number_forms)() for _ in range(300)]

    def chars(lo: int, hi: int, n: int) -> str:
        return "".join(chr(rng.randint(lo, hi)) for _ in range(n))

    word_pools = [
        lambda: chars(0x4E00, 0x9FFF, rng.randint(1, 6)),  # CJK ideographs
        lambda: chars(0x3041, 0x30FF, rng.randint(1, 6)),  # kana
        lambda: chars(0xAC00, 0xD7A3, rng.randint(1, 4)),  # hangul
        lambda: chars(0x0430, 0x044F, rng.randint(2, 9)),  # cyrillic
        lambda: chars(0x03B1, 0x03C9, rng.randint(2, 8)),  # greek
        lambda: chars(0x0627, 0x064A, rng.randint(2, 7)),  # arabic
        lambda: chars(0x0905, 0x0939, 3) + "\u093f\u094d",  # devanagari with vowel marks
        lambda: chars(0x1F300, 0x1F64F, rng.randint(1, 3)),  # emoji
        lambda: rng.choice(["👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "❤️", "🤖✨", "🏳️‍🌈"]),
        lambda: rng.choice(["naïve", "café", "Ångström", "straße", "œuvre", "e\u0301te\u0301", "Ñandú"]),
        lambda: rng.choice(["∑∫√∞", "≈≠≤≥", "→←↔", "€£¥", "©®™", "°±×÷", "“quoted”", "it’s", "—", "…"]),
        lambda: rng.choice(["I'm", "DON'T", "we'll", "They've", "she'd", "IT'S", "you're"]),
        lambda: "".join(rng.choice(string.ascii_letters + "_") for _ in range(rng.randint(1, 12))),
        lambda: rng.choice(["(", ")", "{}", "[]", "==", "->", "::", "//", "#", "@", "&&", "'", '"', "`"]),
    ]
    separators = [" ", "", "  ", "\t", ", ", ". ", "\n", " \n", "\n\n", "   "]
    for _ in range(500):
        words = [rng.choice(word_pools)() for _ in range(rng.randint(1, 10))]
        lines.append("".join(w + rng.choice(separators) for w in words))

    spaces = [" ", "  ", "    ", "\t", "\t\t", "\n", "\r\n", "\n\n\n", "\u00a0", "\u3000",
              "\u2028", "\u200b", "\x0b", "\x0c", "\x85", " \t \n"]
    tokens = ["a", "Hello", "7", "42", "2024", ".", "'s", "'LL", "(", "x1", "日本", "😀"]
    for _ in range(200):
        lines.append("".join(rng.choice(spaces if rng.random() < 0.5 else tokens)
                             for _ in range(rng.randint(2, 12))))

    special_like = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<filename>", "<jupyter_code>",
                    "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                    "<|reserved_special_token_7|>", "<|", "|>", "<|im_start", "im_end|>", "<",
                    ">", "|", "user", "assistant", "\n", " ", "<|im_end|", "<<|eot_id|>>", "9"]
    for _ in range(200):
        lines.append("".join(rng.choice(special_like) for _ in range(rng.randint(1, 8))))

    # Bytes some vocabs lack (control characters, a plane-4 character), and very long runs.
    lines += ["a\x04b\x1dc", "\x00null\x00", "\U00040000!", "tab\x13stop"]
    lines += [" " * 300 + "x", "9" * 500, "ab" * 700, "\n" * 50 + "end", "\t " * 100]
    return lines


# ---------------------------------------------------------------------------------------------
# SentencePiece: a Llama-2-style model trained here, and its vocab as a GGUF holds it
# ---------------------------------------------------------------------------------------------

def train_llama2_sentencepiece(lines: list[str], vocab_size: int) -> bytes:
    """A SentencePiece BPE model trained with Llama 2's settings: identity normalization, spaces
    kept as they are, digits split, byte fallback, <unk> <s> </s> as ids 0 1 2."""
    import io

    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        max_sentence_length=1 << 16, num_threads=1, minloglevel=2)
    return out.getvalue()


def add_sentencepiece_vocab(writer, model_proto: bytes, bos_id: int = 1, eos_id: int = 2) -> None:
    """Write a SentencePiece vocab into a GGUFWriter as llama.cpp's convert_hf_to_gguf.py does
    (_create_vocab_sentencepiece): every piece with its score and type."""
    import gguf
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        types.append(gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL
                     if sp.is_control(i) else gguf.TokenType.UNUSED if sp.is_unused(i)
                     else gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(bos_id)
    writer.add_eos_token_id(eos_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
