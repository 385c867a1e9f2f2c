"""Byte-level BPE tokenizers on tiktoken, with the model's real token ids. No torch.

One `Tokenizer` serves every model we run. It is built from one of:
  - a Llama 3 `tokenizer.model` (tiktoken ranks, "base64-token rank" per line) plus Meta's 256
    special tokens, exactly as Meta's llama3 tokenizer.py does;
  - a Hugging Face `tokenizer.json` holding a byte-level BPE (vocab + merges), as GPT-2, SmolLM2
    and Llama 3 ship it;
  - GGUF metadata, which `tokenizer_files_from_gguf` first turns into those same two HF files, so
    there is one road from a vocab to a tokenizer.

The model store keeps one folder per model, read by `load_tokenizer`:
    tokenizer.json           HF byte-level BPE (preferred when both are present), or
    tokenizer.model          Llama 3 tiktoken ranks
    tokenizer_config.json    optional: bos_token, eos_token, add_bos_token, chat_template,
                             added_tokens_decoder (special tokens for a tokenizer.model)
    chat_template.jinja      optional: the chat template, as transformers >= 4.43 saves it
"""
from __future__ import annotations

import base64
import codecs
import json
from pathlib import Path
from typing import AbstractSet, Iterable, Literal, Union

import tiktoken

from .tokenizer_spm import (
    SentencePieceTokenizer,
    TokenizerError,
    is_sentencepiece_json,
    sentencepiece_model_from_gguf,
    sentencepiece_model_from_json,
    with_added_tokens,
)


# ---------------------------------------------------------------------------------------------
# Split patterns: the regex that cuts text into pieces before BPE runs on each piece.
# ---------------------------------------------------------------------------------------------

# Meta's llama3 tokenizer.py (also the Split regex in Llama 3's tokenizer.json).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The regex of Hugging Face's ByteLevel pre-tokenizer (use_regex=True), i.e. GPT-2's.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# SmolLM2 runs Digits(individual_digits=True) and then the GPT-2 regex on each stretch between
# digits. In one regex: a digit is always a piece of its own, and a digit ends the stretch before
# it, so whitespace just before a digit behaves as whitespace at the end of the text.
SMOLLM_PATTERN = (
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"
)

# Meta's llama3 tokenizer.py: 256 special tokens follow the base vocab, in this order.
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)]


# ---------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------

class Tokenizer:
    """Text <-> the model's token ids.

    tiktoken numbers tokens by merge rank; a model numbers them however its vocab file says. The
    two lists below translate, so every id that goes in or out of this class is a real vocab id.
    """

    def __init__(
        self,
        encoding: tiktoken.Encoding,
        rank_to_id: list[int],
        *,
        special_tokens: dict[str, int],
        plain_added_tokens: Iterable[str] = (),
        bos_id: int | None,
        eos_id: int | None,
        eos_ids: AbstractSet[int] | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
    ):
        self._encoding = encoding
        self._rank_to_id = rank_to_id  # -1 marks a byte the vocab lacks: dropped, as HF does
        self._id_to_rank = [-1] * (max(rank_to_id) + 1)
        for rank, token_id in enumerate(rank_to_id):
            if token_id >= 0:
                self._id_to_rank[token_id] = rank
        self.special_tokens = dict(special_tokens)
        # Added tokens that are not special are matched in any text, special or not (HF does so).
        self._plain_added = frozenset(plain_added_tokens)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.eos_ids = set(eos_ids) if eos_ids is not None else ({eos_id} - {None})
        self.add_bos = add_bos
        self.chat_template = chat_template

    kind = "byte-level BPE"

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_rank)

    @property
    def control_ids(self) -> frozenset[int]:
        """Ids that are never shown as text in a reply."""
        return frozenset(self.special_tokens.values())

    def encode(
        self,
        text: str,
        bos: bool = False,
        allowed_special: Literal["all"] | AbstractSet[str] = "all",
    ) -> list[int]:
        """Token ids of `text`. Special-token text outside `allowed_special` is encoded as text."""
        if bos and self.bos_id is None:
            raise TokenizerError("this tokenizer has no BOS token to prepend")
        if allowed_special != "all":
            allowed_special = set(allowed_special) | self._plain_added
        ranks = self._encoding.encode(text, allowed_special=allowed_special, disallowed_special=())
        ids = [self._rank_to_id[r] for r in ranks]
        if -1 in ids:
            ids = [i for i in ids if i >= 0]
        return [self.bos_id] + ids if bos else ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self._encoding.decode_bytes([self._rank(i) for i in ids])

    def decode(self, ids: Iterable[int]) -> str:
        # Invalid UTF-8 becomes U+FFFD, as HF's ByteLevel decoder does.
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int | None:
        """The id of a special token name, or of a token whose bytes are `token` in UTF-8."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        try:
            return self._rank_to_id[self._encoding.encode_single_token(token)]
        except KeyError:
            return None

    def id_to_piece(self, token_id: int) -> str:
        """The text of one token; bytes that are not whole UTF-8 characters show as \\xNN."""
        piece = self._encoding.decode_single_token_bytes(self._rank(token_id))
        return piece.decode("utf-8", errors="backslashreplace")

    def _rank(self, token_id: int) -> int:
        rank = self._id_to_rank[token_id] if 0 <= token_id < len(self._id_to_rank) else -1
        if rank < 0:
            raise TokenizerError(f"token id {token_id} is not in the vocabulary")
        return rank


AnyTokenizer = Union[Tokenizer, SentencePieceTokenizer]


class StreamDecoder:
    """Decodes ids one at a time for streaming, never emitting half a UTF-8 character, and never
    a control token's text (an end of turn, a tool-call tag, a header).

    One character can span several tokens (an emoji is often 2-4 byte tokens). For byte-level
    BPE the incremental UTF-8 decoder holds back an incomplete tail until the rest arrives; for
    SentencePiece the text is what the library decodes of the ids, held back while they end
    inside a character. Either way the pieces join to exactly `tokenizer.decode(ids)` of the
    ids that are not control tokens.
    """

    def __init__(self, tokenizer: AnyTokenizer):
        self._tokenizer = tokenizer
        self._hidden = tokenizer.control_ids
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # SentencePiece: the ids from the last settled token on, and the text they gave so far;
        # each step decodes this short tail, not the whole reply (decoding [a, b] starts with
        # decoding [a], dummy-prefix space and all)
        self._ids: list[int] = []
        self._sent = ""

    def push(self, token_id: int) -> str:
        if token_id in self._hidden:
            return ""
        if not isinstance(self._tokenizer, SentencePieceTokenizer):
            return self._utf8.decode(self._tokenizer.decode_bytes([token_id]))
        self._ids.append(token_id)
        text = self._tokenizer.settled_text(self._ids)
        if text is None:
            return ""
        out = self._take(text)
        self._ids, self._sent = [token_id], self._tokenizer.decode([token_id])
        return out

    def flush(self) -> str:
        if not isinstance(self._tokenizer, SentencePieceTokenizer):
            return self._utf8.decode(b"", final=True)
        return self._take(self._tokenizer.decode(self._ids))

    def _take(self, text: str) -> str:
        new, self._sent = text[len(self._sent):], text
        return new


# ---------------------------------------------------------------------------------------------
# Loading a model store folder
# ---------------------------------------------------------------------------------------------

def load_tokenizer(folder: str | Path) -> AnyTokenizer:
    """The tokenizer a model folder holds; it stops on every EOS its files name (tokenizer_config
    .json's eos_token and generation_config.json's eos_token_id list)."""
    folder = Path(folder)
    tokenizer = _load_tokenizer_files(folder)
    tokenizer.eos_ids |= set(generation_config(folder).get("eos_token_id") or [])
    return tokenizer


def generation_config(folder: str | Path) -> dict:
    """A model folder's generation_config.json (eos_token_id always a list), or {}."""
    path = Path(folder) / "generation_config.json"
    config = _read_json(path) if path.exists() else {}
    eos = config.get("eos_token_id")
    if eos is not None:
        config["eos_token_id"] = [eos] if isinstance(eos, int) else list(eos)
    return config


# the sampling settings a model's files may suggest, under generation_config.json's names
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_defaults(folder: str | Path) -> dict:
    """The model's own sampling suggestions ({"temperature": 0.6, "top_p": 0.9, ...}), only
    those its files name; {} for greedy-by-default (do_sample false) or no file."""
    config = generation_config(folder)
    if config.get("do_sample") is False:
        return {}
    return {k: config[k] for k in SAMPLING_KEYS if isinstance(config.get(k), (int, float))}


def merged_generation_config(model_config: dict, generation_file: Path | None) -> dict:
    """generation_config.json for the store from a Hugging Face folder: its own file, with every
    EOS id that config.json or it names (transformers reads one or the other; stopping on either
    is what both mean)."""
    config = dict(_read_json(generation_file)) if generation_file and generation_file.exists() else {}
    eos: list[int] = []
    for value in (config.get("eos_token_id"), model_config.get("eos_token_id")):
        for token_id in [value] if isinstance(value, int) else (value or []):
            if token_id not in eos:
                eos.append(token_id)
    if eos:
        config["eos_token_id"] = eos
    return config


def _load_tokenizer_files(folder: Path) -> AnyTokenizer:
    config_path = folder / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.exists() else {}
    template_path = folder / "chat_template.jinja"
    if template_path.exists():
        config = {**config, "chat_template": template_path.read_text(encoding="utf-8")}
    model_file = folder / "tokenizer.model"
    if model_file.exists() and _is_protobuf(model_file):
        return load_sentencepiece_model(model_file, config, folder / "tokenizer.json")
    if (folder / "tokenizer.json").exists():
        path = folder / "tokenizer.json"
        tokenizer_json = _read_json(path)
        if is_sentencepiece_json(tokenizer_json):
            proto = sentencepiece_model_from_json(tokenizer_json, str(path))
            return _sentencepiece_tokenizer(proto, config, str(path))
        return tokenizer_from_hf(tokenizer_json, config, source=str(path))
    if model_file.exists():
        return load_tiktoken_model(model_file, config)
    raise TokenizerError(f"{folder}: no tokenizer.json or tokenizer.model in this folder")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read ({e.strerror or e})") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object at the top level")
    return data


def _is_protobuf(path: Path) -> bool:
    """SentencePiece's tokenizer.model starts with its first piece (protobuf field 1, bytes:
    0x0A); Llama 3's is base64 text."""
    try:
        with path.open("rb") as f:
            return f.read(1) == b"\n"
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read ({e.strerror or e})") from e


# ---------------------------------------------------------------------------------------------
# Builder (0): SentencePiece (Llama 1 and 2), through model/tokenizer_spm.py
# ---------------------------------------------------------------------------------------------

def load_sentencepiece_model(path: str | Path, config: dict | None = None,
                             tokenizer_json: Path | None = None) -> SentencePieceTokenizer:
    """A SentencePiece tokenizer.model, plus the tokens a fine-tune added after its vocab (listed
    in tokenizer.json's added_tokens or tokenizer_config.json's added_tokens_decoder)."""
    path = Path(path)
    try:
        proto = path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read ({e.strerror or e})") from e
    config = config or {}
    added = {int(i): (_token_text(t), bool(t.get("special", True)) if isinstance(t, dict) else True)
             for i, t in (config.get("added_tokens_decoder") or {}).items()}
    if tokenizer_json is not None and tokenizer_json.exists():
        for t in _read_json(tokenizer_json).get("added_tokens") or []:
            added.setdefault(t["id"], (t["content"], bool(t.get("special"))))
    if added:
        proto = with_added_tokens(proto, added, str(path))
    return _sentencepiece_tokenizer(proto, config, str(path))


def _sentencepiece_tokenizer(proto: bytes, config: dict, source: str) -> SentencePieceTokenizer:
    probe = SentencePieceTokenizer(proto, bos_id=None, eos_id=None, source=source)
    bos = _token_text(config.get("bos_token")) or "<s>"
    eos = _token_text(config.get("eos_token")) or "</s>"
    return SentencePieceTokenizer(
        proto,
        bos_id=probe.token_to_id(bos),
        eos_id=probe.token_to_id(eos),
        add_bos=bool(config.get("add_bos_token", True)),
        chat_template=_chat_template(config),
        source=source,
    )


# ---------------------------------------------------------------------------------------------
# Builder (a): Llama 3 tokenizer.model
# ---------------------------------------------------------------------------------------------

def load_tiktoken_model(path: str | Path, config: dict | None = None) -> Tokenizer:
    """A Llama 3 tokenizer.model, with Meta's special tokens unless the config lists its own
    (Llama 3.1 renamed a few reserved ones in tokenizer_config.json's added_tokens_decoder)."""
    path = Path(path)
    config = config or {}
    ranks = _read_tiktoken_ranks(path)
    n_base = len(ranks)
    listed = config.get("added_tokens_decoder") or {}
    names = {int(i): _token_text(entry) for i, entry in listed.items() if int(i) >= n_base}
    if not names:
        names = {n_base + i: name for i, name in enumerate(LLAMA3_SPECIAL_TOKENS)}
    special_tokens = {name: token_id for token_id, name in sorted(names.items())}
    encoding = _make_encoding(path.name, LLAMA3_PATTERN, ranks, special_tokens, str(path))

    bos = _token_text(config.get("bos_token")) or "<|begin_of_text|>"
    eos = _token_text(config.get("eos_token")) or "<|end_of_text|>"
    eos_id = special_tokens.get(eos)
    eos_ids = {eos_id}
    if "eos_token" not in config:
        # A bare Meta checkpoint: Meta's generate() stops on either of these.
        eos_ids |= {special_tokens.get("<|eot_id|>")}
    return Tokenizer(
        encoding,
        list(range(n_base + len(special_tokens))),
        special_tokens=special_tokens,
        bos_id=special_tokens.get(bos),
        eos_id=eos_id,
        eos_ids=eos_ids - {None},
        add_bos=config.get("add_bos_token", True),
        chat_template=_chat_template(config),
    )


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read ({e.strerror or e})") from e
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:  # binascii.Error is a ValueError too
            raise TokenizerError(f"{path}:{number}: expected 'base64-token rank', got {line[:60]!r}") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks must be 0..N-1 with no gaps or repeats")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{path}: not a byte-level BPE, {len(missing)} single bytes have no rank")
    return ranks


# ---------------------------------------------------------------------------------------------
# Builder (b): Hugging Face tokenizer.json (byte-level BPE)
# ---------------------------------------------------------------------------------------------

def tokenizer_from_hf(tokenizer_json: dict, config: dict | None = None,
                      source: str = "tokenizer.json") -> Tokenizer:
    config = config or {}
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise TokenizerError(f"{source}: only BPE models are supported, got {model.get('type')!r}")
    if tokenizer_json.get("normalizer") is not None:
        raise TokenizerError(f"{source}: a normalizer ({tokenizer_json['normalizer'].get('type')}) "
                             "is not supported")
    pattern = _split_pattern(tokenizer_json.get("pre_tokenizer"), source)

    added = tokenizer_json.get("added_tokens") or []
    for token in added:
        if token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
            raise TokenizerError(f"{source}: added token {token['content']!r} uses lstrip/rstrip/"
                                 "single_word, which this tokenizer cannot reproduce")
    added_ids = {token["id"] for token in added}
    vocab = {piece: i for piece, i in model["vocab"].items() if i not in added_ids}
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges") or []]
    unk_id = model["vocab"].get(model.get("unk_token")) if model.get("unk_token") else None
    ranks, rank_to_id = _ranks_from_merges(vocab, merges, bool(model.get("ignore_merges")),
                                           unk_id, source)

    special_tokens = {}
    for token in added:
        special_tokens[token["content"]] = len(rank_to_id)
        rank_to_id.append(token["id"])
    encoding = _make_encoding(source, pattern, ranks, special_tokens, source)

    ids = {token["content"]: token["id"] for token in added}
    bos = _token_text(config.get("bos_token"))
    eos = _token_text(config.get("eos_token"))
    bos_id = ids.get(bos, model["vocab"].get(bos)) if bos else None
    eos_id = ids.get(eos, model["vocab"].get(eos)) if eos else None
    add_bos = config.get("add_bos_token")
    if add_bos is None:
        add_bos = _post_processor_adds(tokenizer_json.get("post_processor"), bos)
    return Tokenizer(
        encoding,
        rank_to_id,
        special_tokens={t["content"]: t["id"] for t in added if t.get("special")},
        plain_added_tokens=[t["content"] for t in added if not t.get("special")],
        bos_id=bos_id,
        eos_id=eos_id,
        add_bos=bool(add_bos),
        chat_template=_chat_template(config),
    )


def tokenizer_from_gguf(metadata: dict) -> AnyTokenizer:
    files = gguf_tokenizer_files(metadata)
    config = files["tokenizer_config.json"]
    if "tokenizer.model" in files:
        tokenizer = _sentencepiece_tokenizer(files["tokenizer.model"], config, "GGUF tokenizer metadata")
    else:
        tokenizer = tokenizer_from_hf(files["tokenizer.json"], config, source="GGUF tokenizer metadata")
    tokenizer.eos_ids |= set(files["generation_config.json"].get("eos_token_id") or [])
    return tokenizer


def gguf_tokenizer_files(metadata: dict) -> dict[str, bytes | dict]:
    """The store's tokenizer files for a GGUF's vocab: tokenizer.model (SentencePiece, for
    tokenizer.ggml.model 'llama') or tokenizer.json (byte-level BPE, 'gpt2'), and
    tokenizer_config.json."""
    generation = _generation_config_from_gguf(metadata)
    if _text(metadata.get("tokenizer.ggml.model")) != "llama":
        tokenizer_json, config = tokenizer_files_from_gguf(metadata)
        return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": config,
                "generation_config.json": generation}
    proto = sentencepiece_model_from_gguf(metadata, _text)
    tokens = metadata["tokenizer.ggml.tokens"]
    config = {"add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", True)),
              "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False))}
    for name in ("bos", "eos"):
        token_id = metadata.get(f"tokenizer.ggml.{name}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens):
            config[f"{name}_token"] = _text(tokens[token_id])
    if metadata.get("tokenizer.chat_template"):
        config["chat_template"] = _text(metadata["tokenizer.chat_template"])
    return {"tokenizer.model": proto, "tokenizer_config.json": config, "generation_config.json": generation}


# GGUF general.sampling.* (llama.cpp's names) -> generation_config.json's
_GGUF_SAMPLING = {"temp": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                  "penalty_repeat": "repetition_penalty"}


def _generation_config_from_gguf(metadata: dict) -> dict:
    """EOS, end of turn and end of message all end a reply, as llama.cpp stops on each."""
    eos = []
    for key in ("eos", "eot", "eom"):
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(token_id, int) and token_id not in eos:
            eos.append(token_id)
    config: dict = {"eos_token_id": eos} if eos else {}
    for gguf_key, key in _GGUF_SAMPLING.items():
        value = metadata.get(f"general.sampling.{gguf_key}")
        if isinstance(value, (int, float)):
            config[key] = value
    return config


def _split_pattern(pre: dict | None, source: str) -> str:
    """The one tiktoken regex that cuts text exactly as this HF pre-tokenizer does."""
    def byte_level(step: dict, use_regex: bool) -> bool:
        return (step.get("type") == "ByteLevel" and not step.get("add_prefix_space")
                and step.get("use_regex", True) == use_regex)

    pre = pre or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    steps = steps or []
    if len(steps) == 1 and byte_level(steps[0], use_regex=True):
        return GPT2_PATTERN
    if len(steps) == 2 and byte_level(steps[1], use_regex=True) and steps[0] == {
            "type": "Digits", "individual_digits": True}:
        return SMOLLM_PATTERN
    if len(steps) == 2 and byte_level(steps[1], use_regex=False):
        split = steps[0]
        if (split.get("type") == "Split" and split.get("behavior") == "Isolated"
                and not split.get("invert") and "Regex" in (split.get("pattern") or {})):
            return split["pattern"]["Regex"]
    raise TokenizerError(
        f"{source}: unsupported pre_tokenizer {json.dumps(pre)[:300]}; known are GPT-2 ByteLevel, "
        "SmolLM2 Digits+ByteLevel and Llama 3 Split+ByteLevel")


def _ranks_from_merges(vocab: dict[str, int], merges: list, ignore_merges: bool,
                       unk_id: int | None, source: str) -> tuple[dict[bytes, int], list[int]]:
    """tiktoken ranks from BPE merges: the 256 bytes first, then merge i makes the next rank.

    tiktoken merges the adjacent pair whose joined bytes have the lowest rank, and HF the pair
    whose merge comes first, so ranks in merge order make both take the same steps. A second merge
    that makes the same bytes keeps the first rank, as tiktoken's own GPT-2 conversion does.
    """
    byte_chars = _bytes_to_unicode()
    # one str.translate per piece (a per-character loop is most of a load's tokenizer time):
    # each byte's character becomes the code point of that byte, and a character below 256 that
    # stands for no byte (a raw space) one above 255, so that latin-1 refuses it as it refuses
    # any other foreign character
    to_byte = dict.fromkeys(range(256), 256) | {ord(ch): b for b, ch in byte_chars.items()}

    def token_bytes(piece: str) -> bytes:
        try:
            return piece.translate(to_byte).encode("latin-1")
        except UnicodeEncodeError:
            raise TokenizerError(f"{source}: token {piece!r} is not byte-level BPE") from None

    ranks = {bytes([b]): b for b in range(256)}
    # tiktoken needs a rank for every byte; one the vocab lacks becomes unk, or nothing (-1).
    rank_to_id = [vocab.get(ch, -1 if unk_id is None else unk_id) for ch in byte_chars.values()]
    for pair in merges:
        if len(pair) != 2:
            raise TokenizerError(f"{source}: malformed merge {pair!r}")
        joined = token_bytes(pair[0]) + token_bytes(pair[1])
        if joined in ranks:
            continue
        token_id = vocab.get(pair[0] + pair[1])
        if token_id is None:
            raise TokenizerError(f"{source}: merge {pair!r} makes a token missing from the vocab")
        ranks[joined] = len(rank_to_id)
        rank_to_id.append(token_id)
    if ignore_merges:
        # HF then looks a whole piece up in the vocab before merging, as tiktoken always does,
        # so tokens no merge can make are still reachable.
        for piece, token_id in sorted(vocab.items(), key=lambda item: item[1]):
            joined = token_bytes(piece)
            if joined not in ranks:
                ranks[joined] = len(rank_to_id)
                rank_to_id.append(token_id)
    return ranks, rank_to_id


def _post_processor_adds(post_processor: dict | None, bos: str | None) -> bool:
    """Whether HF's post-processor puts BOS first (Llama 3's tokenizer.json says it this way)."""
    if not post_processor or not bos:
        return False
    steps = post_processor.get("processors") or [post_processor]
    for step in steps:
        if step.get("type") == "TemplateProcessing" and step.get("single"):
            first = step["single"][0]
            return first.get("SpecialToken", {}).get("id") == bos
    return False


# ---------------------------------------------------------------------------------------------
# GGUF -> tokenizer.json + tokenizer_config.json
# ---------------------------------------------------------------------------------------------

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
               "use_regex": True}

# tokenizer.ggml.pre -> the HF pre-tokenizer that model was trained with.
_GGUF_PRE_TOKENIZERS = {
    "default": _BYTE_LEVEL,
    "gpt2": _BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated",
         "invert": False},
        {**_BYTE_LEVEL, "use_regex": False}]},
}

_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values that are added tokens


def tokenizer_files_from_gguf(metadata: dict) -> tuple[dict, dict]:
    """(tokenizer.json, tokenizer_config.json) contents for a GGUF's vocab, loadable by both
    `load_tokenizer` and Hugging Face."""
    source = "GGUF tokenizer metadata"
    kind = _text(metadata.get("tokenizer.ggml.model"))
    if kind is None:
        raise TokenizerError("the file holds no tokenizer (no tokenizer.ggml.model in its metadata)")
    if kind != "gpt2":
        raise TokenizerError(f"{source}: tokenizer.ggml.model {kind!r} is not supported, only "
                             "byte-level BPE ('gpt2') and SentencePiece ('llama')")
    pre = _text(metadata.get("tokenizer.ggml.pre")) or "default"
    if pre not in _GGUF_PRE_TOKENIZERS:
        raise TokenizerError(f"{source}: tokenizer.ggml.pre {pre!r} is not supported; known are "
                             f"{', '.join(sorted(_GGUF_PRE_TOKENIZERS))}")
    try:
        tokens = [_text(t) for t in metadata["tokenizer.ggml.tokens"]]
        merges = [_text(m).split(" ", 1) for m in metadata["tokenizer.ggml.merges"]]
    except KeyError as e:
        raise TokenizerError(f"{source}: {e.args[0]} is missing") from None
    types = list(metadata.get("tokenizer.ggml.token_type") or [])
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise TokenizerError(f"{source}: tokenizer.ggml.tokens repeats a token")

    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": kind == _GGUF_CONTROL}
             for i, kind in enumerate(types) if kind in (_GGUF_CONTROL, _GGUF_USER_DEFINED)]

    def token_at(key: str) -> str | None:
        token_id = metadata.get(key)
        if token_id is None:
            return None
        if not 0 <= token_id < len(tokens):
            raise TokenizerError(f"{source}: {key} {token_id} is outside the vocab")
        return tokens[token_id]

    bos, eos = token_at("tokenizer.ggml.bos_token_id"), token_at("tokenizer.ggml.eos_token_id")
    # llama.cpp's default when the key is absent: Llama 3 starts with BOS, others do not.
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", pre == "llama-bpe"))
    post_processor = None
    if add_bos and bos is not None:
        bos_step = {"SpecialToken": {"id": bos, "type_id": 0}}
        post_processor = {
            "type": "TemplateProcessing",
            "single": [bos_step, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos_step, {"Sequence": {"id": "A", "type_id": 0}},
                     bos_step, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [vocab[bos]], "tokens": [bos]}},
        }
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": _GGUF_PRE_TOKENIZERS[pre],
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": pre == "llama-bpe",
                  "vocab": vocab, "merges": merges},
    }
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos}
    if bos is not None:
        config["bos_token"] = bos
    if eos is not None:
        config["eos_token"] = eos
    if metadata.get("tokenizer.chat_template"):
        config["chat_template"] = _text(metadata["tokenizer.chat_template"])
    return tokenizer_json, config


# ---------------------------------------------------------------------------------------------
# Small shared pieces
# ---------------------------------------------------------------------------------------------

def _make_encoding(name: str, pattern: str, ranks: dict[bytes, int],
                   special_tokens: dict[str, int], source: str) -> tiktoken.Encoding:
    try:
        return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks,
                                 special_tokens=special_tokens)
    except ValueError as e:  # a split regex the Rust regex engine cannot compile
        raise TokenizerError(f"{source}: cannot build the tokenizer ({e})") from e


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character, which byte-level vocab files use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in printable)
    chars = {b: chr(b) for b in printable}
    chars.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return dict(sorted(chars.items()))


def _token_text(value) -> str | None:
    """A token as tokenizer_config.json writes it: a string, or {"content": ...} (AddedToken)."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _chat_template(config: dict) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates; chat uses the default one
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    return template


def _text(value) -> str | None:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else value
