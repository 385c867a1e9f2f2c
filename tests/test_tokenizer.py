"""The tokenizer gives the model's real ids, checked against Hugging Face `tokenizers` as oracle.

SmolLM2's oracle is built here straight from the GGUF vocab and merges; the Llama 3 oracle is
transformers' own tiktoken -> HF conversion of a tokenizer.model this file trains and writes.
Both are compared on the same 2000+ generated lines.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from pydoc_data.topics import topics
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer
from tokenizer_files import gguf_metadata, make_corpus, write_llama3_sized_model

from model.tokenizer import (
    StreamDecoder,
    Tokenizer,
    TokenizerError,
    load_tiktoken_model,
    load_tokenizer,
    tokenizer_files_from_gguf,
    tokenizer_from_gguf,
    tokenizer_from_hf,
)

# Meta's llama3 tokenizer.py, written out again here so the oracle does not borrow ours.
META_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
META_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|reserved_special_token_4|>", "<|eot_id|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    lines = make_corpus()
    assert len(lines) >= 2000
    return lines


def mismatches(ours: Tokenizer, oracle: HFTokenizer, lines: list[str]) -> list:
    expected = [e.ids for e in oracle.encode_batch(lines, add_special_tokens=False)]
    return [(line, got, want) for line, want in zip(lines, expected)
            if (got := ours.encode(line)) != want]


# ---------------------------------------------------------------------------------------------
# SmolLM2, from the real GGUF
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm_metadata(default_gguf: Path) -> dict:
    return gguf_metadata(default_gguf)


@pytest.fixture(scope="module")
def smollm(smollm_metadata: dict) -> Tokenizer:
    return tokenizer_from_gguf(smollm_metadata)


@pytest.fixture(scope="module")
def smollm_oracle(smollm_metadata: dict) -> HFTokenizer:
    """SmolLM2's tokenizer as its tokenizer.json describes it, built by HF from the GGUF vocab."""
    tokens = smollm_metadata["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in smollm_metadata["tokenizer.ggml.merges"]]
    oracle = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    oracle.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    oracle.decoder = decoders.ByteLevel()
    control = [t for t, kind in zip(tokens, smollm_metadata["tokenizer.ggml.token_type"]) if kind == 3]
    oracle.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return oracle


def test_smollm_special_tokens_and_vocab(smollm: Tokenizer):
    assert smollm.vocab_size == 49152
    assert smollm.bos_id == 1  # <|im_start|>, as the GGUF says
    assert smollm.eos_id == 2  # <|im_end|>
    assert smollm.eos_ids == {2}
    assert smollm.add_bos is False
    assert smollm.special_tokens["<|endoftext|>"] == 0
    assert smollm.special_tokens["<|im_start|>"] == 1
    assert smollm.special_tokens["<|im_end|>"] == 2
    assert smollm.special_tokens["<empty_output>"] == 16
    assert len(smollm.special_tokens) == 17


def test_smollm_encodes_a_chatml_turn(smollm: Tokenizer):
    assert smollm.encode("<|im_start|>user\nWhat is 12+30?<|im_end|>\n") == [
        1,  # <|im_start|>
        4093,  # user
        198,  # \n
        1780,  # What
        314,  # " is"
        216,  # " "  (a digit follows, so the space stands alone)
        33,  # 1
        34,  # 2  (every digit is its own token)
        27,  # +
        35,  # 3
        32,  # 0
        47,  # ?
        2,  # <|im_end|>
        198,  # \n
    ]


def test_smollm_special_text_is_plain_text_when_not_allowed(smollm: Tokenizer):
    assert smollm.encode("<|im_end|>", allowed_special=set()) == [
        44,  # <
        108,  # |
        306,  # im
        79,  # _
        486,  # end
        108,  # |
        46,  # >
    ]
    assert smollm.encode("Hi<|im_end|>", bos=True) == [
        1,  # <|im_start|>, SmolLM2's BOS
        26843,  # Hi
        2,  # <|im_end|>
    ]


def test_smollm_pieces(smollm: Tokenizer):
    assert smollm.token_to_id("<|im_end|>") == 2
    assert smollm.token_to_id(" world") == 905
    assert smollm.token_to_id("no such token here") is None
    assert smollm.id_to_piece(905) == " world"
    assert smollm.id_to_piece(218) == "\\x80"  # a lone UTF-8 continuation byte
    with pytest.raises(TokenizerError, match="49152"):
        smollm.decode([49152])


def test_smollm_matches_hf_on_corpus(smollm: Tokenizer, smollm_oracle: HFTokenizer, corpus):
    assert mismatches(smollm, smollm_oracle, corpus)[:3] == []


def test_smollm_decode_inverts_encode(smollm: Tokenizer, smollm_oracle: HFTokenizer, corpus):
    # Control characters SmolLM2's vocab has no byte for are dropped (HF drops them too).
    lossless = [line for line in corpus if not any(c in line for c in "\x04\x1d\x13\U00040000")]
    assert [line for line in lossless if smollm.decode(smollm.encode(line)) != line] == []
    assert smollm.decode(smollm.encode("a\x04b")) == "ab"
    assert smollm_oracle.decode(smollm_oracle.encode("a\x04b").ids) == "ab"


def test_gguf_files_load_here_and_in_hf(smollm_metadata, smollm_oracle, corpus, tmp_path):
    tokenizer_json, config = tokenizer_files_from_gguf(smollm_metadata)
    assert config["bos_token"] == "<|im_start|>"
    assert config["eos_token"] == "<|im_end|>"
    assert config["add_bos_token"] is False
    assert config["chat_template"].startswith("{% for message in messages %}")
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))

    loaded = load_tokenizer(tmp_path)
    assert (loaded.bos_id, loaded.eos_id, loaded.chat_template) == (1, 2, config["chat_template"])
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    sample = corpus[::4]
    assert [e.ids for e in hf.encode_batch(sample, add_special_tokens=False)] == \
        [e.ids for e in smollm_oracle.encode_batch(sample, add_special_tokens=False)]
    assert mismatches(loaded, smollm_oracle, sample)[:3] == []
    # transformers >= 4.43 saves the template as its own file, which wins over the config's
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    assert load_tokenizer(tmp_path).chat_template == "{{ messages }}"


def test_gpt2_pre_tokenizer_matches_hf(smollm_metadata, corpus):
    """The same vocab with plain GPT-2 splitting: numbers are no longer cut digit by digit."""
    metadata = {**smollm_metadata, "tokenizer.ggml.pre": "gpt2"}
    ours = tokenizer_from_gguf(metadata)
    oracle = HFTokenizer.from_str(json.dumps(tokenizer_files_from_gguf(metadata)[0]))
    assert oracle.pre_tokenizer.pre_tokenize_str(" 2024") == [("Ġ2024", (0, 5))]
    assert mismatches(ours, oracle, corpus[::3])[:3] == []


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------

def test_stream_decoder_never_emits_half_a_character(smollm: Tokenizer):
    text = "Emoji 😀👍🏽 and 日本語, naïve."
    ids = smollm.encode(text)
    stream = StreamDecoder(smollm)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    # 😀 is split over several tokens: the first ones hold their bytes back.
    assert smollm.decode_bytes(smollm.encode(" 😀")) == b" \xf0\x9f\x98\x80"
    stream = StreamDecoder(smollm)
    assert [stream.push(i) for i in smollm.encode(" 😀")] == [
        " ",  # " \xf0\x9f\x98": the space shows, the emoji's first three bytes wait
        "😀",  # \x80 completes it
    ]


def test_stream_decoder_replaces_bytes_that_cannot_complete(smollm: Tokenizer):
    stream = StreamDecoder(smollm)
    assert stream.push(218) == "\ufffd"  # a lone continuation byte can never become valid
    assert stream.push(40303) == " "  # " \xf0\x9f\x98": the emoji's start is held back
    assert stream.flush() == "\ufffd"  # the text ended mid-character
    assert smollm.decode([218, 40303]) == "\ufffd \ufffd"


# ---------------------------------------------------------------------------------------------
# Llama 3: a tokenizer.model made here, and transformers' conversion of it as the oracle
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama3_model(tmp_path_factory, corpus) -> Path:
    """A 4000-rank tokenizer.model trained the way Llama 3's was: byte-level BPE over Meta's split
    regex, written as one "base64-token rank" line per token."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    trainer = HFTokenizer(models.BPE())
    trainer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(META_PATTERN), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer.train_from_iterator([topics[k] for k in sorted(topics)] + corpus, trainers.BpeTrainer(
        vocab_size=4000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    ranked = sorted(trainer.get_vocab().items(), key=lambda item: item[1])
    path = tmp_path_factory.mktemp("llama3") / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(bytes(byte_of[c] for c in piece)).decode()} {rank}\n"
                            for piece, rank in ranked))
    return path


@pytest.fixture(scope="module")
def llama3_oracle(llama3_model: Path) -> HFTokenizer:
    from transformers.convert_slow_tokenizer import TikTokenConverter

    return TikTokenConverter(vocab_file=str(llama3_model), pattern=META_PATTERN,
                             extra_special_tokens=META_SPECIALS).converted()


def test_llama3_model_matches_hf_conversion_on_corpus(llama3_model, llama3_oracle, corpus):
    ours = load_tiktoken_model(llama3_model)
    assert ours.special_tokens["<|begin_of_text|>"] == 4000  # specials follow the 4000 ranks
    assert ours.special_tokens["<|eot_id|>"] == 4009
    assert mismatches(ours, llama3_oracle, corpus)[:3] == []
    assert [line for line in corpus if ours.decode(ours.encode(line)) != line] == []


def test_llama3_hf_tokenizer_json_matches_too(llama3_oracle, corpus, tmp_path):
    """transformers writes one merge for every way to split a token; the first one sets its rank."""
    (tmp_path / "tokenizer.json").write_text(llama3_oracle.to_str())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    ours = load_tokenizer(tmp_path)
    assert (ours.bos_id, ours.eos_ids) == (4000, {4009})
    assert mismatches(ours, llama3_oracle, corpus)[:3] == []


def test_llama3_special_ids_are_metas(tmp_path):
    tokenizer = load_tiktoken_model(write_llama3_sized_model(tmp_path / "tokenizer.model"))
    assert tokenizer.vocab_size == 128256
    assert tokenizer.bos_id == 128000
    assert tokenizer.eos_ids == {128001, 128009}  # Meta stops on <|end_of_text|> or <|eot_id|>
    assert tokenizer.add_bos is True
    assert tokenizer.special_tokens["<|reserved_special_token_250|>"] == 128255
    assert tokenizer.encode("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>") == [
        128000,  # <|begin_of_text|>
        128006,  # <|start_header_id|>
        117, 115, 101, 114,  # u s e r  (this vocab has only single bytes for text)
        128007,  # <|end_header_id|>
        10, 10,  # \n \n
        72, 105,  # H i
        128009,  # <|eot_id|>
    ]


def test_llama3_config_renames_specials_and_sets_eos(tmp_path):
    """Llama 3.1 lists its special tokens in tokenizer_config.json (128008 became <|eom_id|>),
    and some configs hold several named chat templates, of which chat uses "default"."""
    write_llama3_sized_model(tmp_path / "tokenizer.model")
    names = dict(enumerate(META_SPECIALS, start=128000))
    names[128008] = "<|eom_id|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {str(i): {"content": n, "special": True} for i, n in names.items()},
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "chat_template": [{"name": "tool_use", "template": "{{ tools }}"},
                          {"name": "default", "template": "{{ bos_token }}"}],
    }))
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.encode("<|eom_id|>") == [128008]
    assert tokenizer.eos_ids == {128009}
    assert tokenizer.chat_template == "{{ bos_token }}"


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

def test_missing_and_corrupt_files_name_the_file(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_text("IQ== 0\nnot-base64! 1\n")
    with pytest.raises(TokenizerError, match=r"tokenizer\.model:2: expected 'base64-token rank'"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_text("IQ== 0\nIg== 1\n")
    with pytest.raises(TokenizerError, match="254 single bytes have no rank"):
        load_tokenizer(tmp_path)


def test_unsupported_tokenizers_are_refused(smollm_metadata):
    with pytest.raises(TokenizerError, match="tokenizer.ggml.pre 'qwen2' is not supported"):
        tokenizer_from_gguf({**smollm_metadata, "tokenizer.ggml.pre": "qwen2"})
    with pytest.raises(TokenizerError, match="tokenizer.ggml.model 'bert' is not supported"):
        tokenizer_from_gguf({**smollm_metadata, "tokenizer.ggml.model": "bert"})
    metaspace = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first"}
    tokenizer_json = {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
                      "pre_tokenizer": metaspace}
    with pytest.raises(TokenizerError, match="my/tokenizer.json: unsupported pre_tokenizer"):
        tokenizer_from_hf(tokenizer_json, source="my/tokenizer.json")


def test_llama_bpe_gguf_gets_bos_and_a_post_processor(llama3_oracle):
    """A Llama 3 GGUF ("llama-bpe") without add_bos_token starts with BOS, as llama.cpp does."""
    vocab = json.loads(llama3_oracle.to_str())["model"]
    tokens = sorted(vocab["vocab"], key=vocab["vocab"].get) + META_SPECIALS
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * 4000 + [3] * 256,
        "tokenizer.ggml.merges": [" ".join(m) for m in vocab["merges"]],
        "tokenizer.ggml.bos_token_id": 4000,
        "tokenizer.ggml.eos_token_id": 4009,
    }
    tokenizer_json, config = tokenizer_files_from_gguf(metadata)
    assert config["add_bos_token"] is True
    hf = HFTokenizer.from_str(json.dumps(tokenizer_json))
    ours = tokenizer_from_gguf(metadata)
    text = "Hello <|eot_id|> 12345"
    assert hf.encode(text).ids == ours.encode(text, bos=ours.add_bos)
    assert hf.encode(text).ids[0] == 4000  # <|begin_of_text|>
