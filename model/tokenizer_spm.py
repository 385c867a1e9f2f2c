"""SentencePiece tokenizers (Llama 1 and 2 and their fine-tunes) through the sentencepiece library.
No torch, and no BPE of our own: the library encodes and decodes.

Three sources, one road. A `tokenizer.model` in SentencePiece's own protobuf is loaded as it is;
a Llama-2-style `tokenizer.json` (BPE with byte_fallback, "▁" for spaces) and the vocab of a GGUF
whose `tokenizer.ggml.model` is "llama" are first turned into that protobuf, with Llama 2's
normalizer (identity, no whitespace collapsing, dummy prefix), and the importer stores it as
tokenizer.model.

Special-token text is split off before the library sees the text (when allowed), and each piece
of text between is encoded on its own, so a dummy prefix follows every special token, as in
Meta's reference code, llama.cpp and transformers' slow Llama tokenizer.
"""
from __future__ import annotations

import codecs
import json
import re
from typing import AbstractSet, Iterable, Literal

import sentencepiece as spm

# SentencePiece's piece types, which GGUF's tokenizer.ggml.token_type numbers the same way.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenizerError(ValueError):
    """A tokenizer file is missing, corrupt, or describes a tokenizer we cannot reproduce exactly."""


class SentencePieceTokenizer:
    """Text <-> ids of a SentencePiece model; the same surface as tokenizer.Tokenizer."""

    def __init__(self, model_proto: bytes, *, bos_id: int | None, eos_id: int | None,
                 eos_ids: AbstractSet[int] | None = None, add_bos: bool = True,
                 chat_template: str | None = None, source: str = "tokenizer.model"):
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except (RuntimeError, OSError, TypeError) as e:
            raise TokenizerError(f"{source}: not a SentencePiece model ({e})") from None
        n = self._sp.get_piece_size()
        self.model_proto = model_proto
        # unknown and control pieces (<unk>, <s>, </s>) are what text never turns into
        self.special_tokens = {self._sp.id_to_piece(i): i for i in range(n)
                               if self._sp.is_control(i) or self._sp.is_unknown(i)}
        self.control_ids = frozenset(i for i in range(n) if self._sp.is_control(i))
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.eos_ids = set(eos_ids) if eos_ids is not None else ({eos_id} - {None})
        self.add_bos = add_bos
        self.chat_template = chat_template
        self._find_special = None

    kind = "sentencepiece"

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str, bos: bool = False,
               allowed_special: Literal["all"] | AbstractSet[str] = "all") -> list[int]:
        """Token ids of `text`. Special-token text outside `allowed_special` is encoded as text."""
        if bos and self.bos_id is None:
            raise TokenizerError("this tokenizer has no BOS token to prepend")
        specials = self.special_tokens if allowed_special == "all" else \
            {t: self.special_tokens[t] for t in allowed_special if t in self.special_tokens}
        ids = [self.bos_id] if bos else []
        if not specials:
            return ids + self._sp.encode(text)
        start = 0
        for hit in re.finditer("|".join(map(re.escape, sorted(specials, key=len, reverse=True))), text):
            ids += self._sp.encode(text[start:hit.start()]) if hit.start() > start else []
            ids.append(specials[hit.group()])
            start = hit.end()
        return ids + (self._sp.encode(text[start:]) if start < len(text) else [])

    def decode(self, ids: Iterable[int]) -> str:
        """As SentencePiece decodes: control tokens vanish, the first piece's dummy-prefix space
        goes, bytes that are not UTF-8 become one U+FFFD each."""
        return self._sp.decode([self._check(i) for i in ids])

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes each token stands for, joined (no dummy-prefix stripping)."""
        out = bytearray()
        for i in ids:
            if self._sp.is_control(self._check(i)):
                continue
            piece = self._sp.id_to_piece(i)
            if self._sp.is_byte(i):
                out.append(int(_BYTE_PIECE.fullmatch(piece).group(1), 16))
            elif self._sp.is_unknown(i):
                out += self._sp.decode([i]).encode()  # the library's stand-in text (" ⁇ ")
            else:
                out += piece.replace("▁", " ").encode()
        return bytes(out)

    def settled_text(self, ids: list[int]) -> str | None:
        """decode(ids), or None while the ids end inside a UTF-8 character split over byte pieces
        (streaming waits for the rest)."""
        tail = bytearray()
        for i in reversed(ids):
            if not self._sp.is_byte(i):
                break
            tail[:0] = self.decode_bytes([i])
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        utf8.decode(bytes(tail))
        return None if utf8.getstate()[0] else self.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        """The id of a piece, written with spaces or with SentencePiece's "▁"."""
        for piece in (token, token.replace(" ", "▁")):
            i = self._sp.piece_to_id(piece)
            if self._sp.id_to_piece(i) == piece:
                return i
        return None

    def id_to_piece(self, token_id: int) -> str:
        """The text of one token ("▁" shown as a space); a byte that is not a whole character
        shows as \\xNN."""
        self._check(token_id)
        if self._sp.is_control(token_id) or self._sp.is_unknown(token_id):
            return self._sp.id_to_piece(token_id)
        return self.decode_bytes([token_id]).decode("utf-8", errors="backslashreplace")

    def _check(self, token_id: int) -> int:
        if not 0 <= token_id < self._sp.get_piece_size():
            raise TokenizerError(f"token id {token_id} is not in the vocabulary")
        return token_id


# ---------------------------------------------------------------------------------------------
# A ModelProto from a token list: GGUF metadata, or a Llama-2-style tokenizer.json
# ---------------------------------------------------------------------------------------------

def sentencepiece_model(pieces: list[tuple[str, float, int]], add_dummy_prefix: bool = True) -> bytes:
    """A serialized SentencePiece BPE model of (piece, score, type) rows, in id order, with Llama
    2's normalizer: identity (no NFKC), spaces kept as they are, a dummy prefix, byte fallback."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb

    model = sp_pb.ModelProto()
    for piece, score, kind in pieces:
        model.pieces.add(piece=piece, score=score, type=kind)
    trainer = model.trainer_spec
    trainer.model_type = sp_pb.TrainerSpec.BPE
    trainer.byte_fallback = any(kind == BYTE for _, _, kind in pieces)
    trainer.split_digits = True
    trainer.allow_whitespace_only_pieces = True
    ids = {kind: i for i, (_, _, kind) in reversed(list(enumerate(pieces)))}
    trainer.unk_id = ids.get(UNKNOWN, 0)
    trainer.unk_piece = pieces[trainer.unk_id][0] if pieces else "<unk>"
    for name in ("bos", "eos", "pad"):
        setattr(trainer, f"{name}_id", -1)  # the config names BOS and EOS; the model needs none
    norm = model.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = add_dummy_prefix
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return model.SerializeToString()


def sentencepiece_model_from_gguf(metadata: dict, text) -> bytes:
    """The tokenizer.model a GGUF's llama vocab (tokens, scores, token_type) describes."""
    source = "GGUF tokenizer metadata"
    try:
        tokens = [text(t) for t in metadata["tokenizer.ggml.tokens"]]
    except KeyError as e:
        raise TokenizerError(f"{source}: {e.args[0]} is missing") from None
    if "tokenizer.ggml.scores" not in metadata:  # the scores are what orders SentencePiece's merges
        raise TokenizerError(f"{source}: tokenizer.ggml.scores is missing; a SentencePiece vocab needs them")
    scores = list(metadata["tokenizer.ggml.scores"])
    types = list(metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if not len(tokens) == len(scores) == len(types):
        raise TokenizerError(f"{source}: {len(tokens)} tokens, {len(scores)} scores and {len(types)} "
                             "token types do not match")
    if UNKNOWN not in types:
        raise TokenizerError(f"{source}: a SentencePiece vocab needs an unknown token (<unk>)")
    pieces = [(t, float(s), k if k in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE) else NORMAL)
              for t, s, k in zip(tokens, scores, types)]
    return _load_checked(sentencepiece_model(
        pieces, bool(metadata.get("tokenizer.ggml.add_space_prefix", True))), source)


def is_sentencepiece_json(tokenizer_json: dict) -> bool:
    """A tokenizer.json converted from a SentencePiece BPE (Llama 2's): byte fallback over "▁"."""
    model = tokenizer_json.get("model") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and "▁" in str(
        tokenizer_json.get("normalizer") or "") + str(tokenizer_json.get("pre_tokenizer") or "")


def sentencepiece_model_from_json(tokenizer_json: dict, source: str = "tokenizer.json") -> bytes:
    """The tokenizer.model a Llama-2-style tokenizer.json stands for.

    SentencePiece's BPE merges the adjacent pair whose joined piece scores highest; HF's the pair
    whose merge comes first. Scoring each piece by minus the rank of the first merge that makes
    it takes the same steps.
    """
    model = tokenizer_json["model"]
    vocab = dict(model.get("vocab") or {})
    added = {t["content"]: t for t in tokenizer_json.get("added_tokens") or []}
    for content, token in added.items():
        vocab.setdefault(content, token["id"])
    by_id = sorted(vocab.items(), key=lambda item: item[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise TokenizerError(f"{source}: token ids are not 0..N-1 without gaps")
    score: dict[str, float] = {}
    for rank, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        score.setdefault(left + right, -float(rank))
    unk = model.get("unk_token") or ("<unk>" if "<unk>" in vocab else None)
    pieces = []
    for piece, i in by_id:
        if piece == unk:
            kind = UNKNOWN
        elif piece in added:
            kind = CONTROL if added[piece].get("special") else USER_DEFINED
        elif _BYTE_PIECE.fullmatch(piece):
            kind = BYTE
        else:
            kind = NORMAL
        pieces.append((piece, score.get(piece, 0.0 if kind != NORMAL or len(piece) == 1 else -1e9), kind))
    if UNKNOWN not in {kind for _, _, kind in pieces}:
        raise TokenizerError(f"{source}: a SentencePiece vocab needs an unk_token")
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "Metaspace":
        prefix = pre.get("prepend_scheme", "always" if pre.get("add_prefix_space", True) else "never") != "never"
    else:
        prefix = "Prepend" in json.dumps(tokenizer_json.get("normalizer"))
    return _load_checked(sentencepiece_model(pieces, prefix), source)


def with_added_tokens(proto: bytes, added: dict[int, tuple[str, bool]], source: str) -> bytes:
    """`proto` with tokens a fine-tune added after its vocab ({id: (text, special)}, as
    tokenizer_config.json's added_tokens_decoder lists them): special ones as control pieces."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb

    model = sp_pb.ModelProto.FromString(proto)
    known = {p.piece for p in model.pieces}
    for token_id, (text, special) in sorted(added.items()):
        if token_id < len(model.pieces) or text in known:
            continue
        if token_id != len(model.pieces):
            raise TokenizerError(f"{source}: added token {text!r} has id {token_id}, but the vocab "
                                 f"ends at {len(model.pieces) - 1}")
        model.pieces.add(piece=text, score=0.0, type=CONTROL if special else USER_DEFINED)
    return model.SerializeToString()


def _load_checked(proto: bytes, source: str) -> bytes:
    SentencePieceTokenizer(proto, bos_id=None, eos_id=None, source=source)  # fails here, not later
    return proto
