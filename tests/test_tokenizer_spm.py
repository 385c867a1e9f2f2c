"""SentencePiece tokenizers (Llama 1 and 2) give the sentencepiece library's own ids, from each
place a vocab comes from: a tokenizer.model, a GGUF's metadata, a Llama-2-style tokenizer.json.

The model is trained here with Llama 2's settings; the oracle is the library loading the trained
file itself, compared on the same 2000+ lines as the byte-level tokenizers."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import sentencepiece as spm
from tokenizer_files import add_sentencepiece_vocab, gguf_metadata, make_corpus, train_llama2_sentencepiece

from model.chat_format import ChatFormat
from model.tokenizer import StreamDecoder, TokenizerError, gguf_tokenizer_files, load_tokenizer, tokenizer_from_gguf
from model.tokenizer_spm import SentencePieceTokenizer

LLAMA2_TEMPLATE = (  # Llama-2-chat's template as its tokenizer_config.json holds it (system folded in)
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + message['content'] | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    lines = make_corpus() + ["<s>", "</s>", "a<s>b", " <unk> ", "<0x41>", "▁x", "\t\tx\n\n", ""]
    assert len(lines) >= 2000
    return lines


@pytest.fixture(scope="module")
def model_proto(corpus) -> bytes:
    return train_llama2_sentencepiece(corpus, vocab_size=3000)


@pytest.fixture(scope="module")
def oracle(model_proto) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_proto=model_proto)


@pytest.fixture(scope="module")
def folder(model_proto, tmp_path_factory) -> Path:
    """A Llama 2 Hugging Face folder's tokenizer files."""
    folder = tmp_path_factory.mktemp("llama2")
    (folder / "tokenizer.model").write_bytes(model_proto)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "chat_template": LLAMA2_TEMPLATE}))
    return folder


@pytest.fixture(scope="module")
def gguf_file(model_proto, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "vocab.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    add_sentencepiece_vocab(writer, model_proto)
    writer.add_chat_template(LLAMA2_TEMPLATE)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def mismatches(ours, oracle, lines):
    return [(line, got, want) for line in lines
            if (got := ours.encode(line, allowed_special=set())) != (want := oracle.encode(line))]


def test_tokenizer_model_matches_the_library(folder, oracle, corpus):
    ours = load_tokenizer(folder)
    assert isinstance(ours, SentencePieceTokenizer)
    assert (ours.bos_id, ours.eos_id, ours.add_bos, ours.vocab_size) == (1, 2, True, 3000)
    assert ours.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
    assert mismatches(ours, oracle, corpus)[:3] == []
    # identity normalization and byte fallback: decoding gives back the very text (but "▁", which
    # the library reads as its own space mark)
    assert [line for line in corpus if ours.decode(ours.encode(line, allowed_special=set()))
            != line.replace("▁", " ")] == []


def test_gguf_vocab_matches_the_library(gguf_file, oracle, corpus):
    metadata = gguf_metadata(gguf_file)
    ours = tokenizer_from_gguf(metadata)
    assert (ours.bos_id, ours.eos_id, ours.add_bos, ours.vocab_size) == (1, 2, True, 3000)
    assert ours.chat_template == LLAMA2_TEMPLATE
    assert mismatches(ours, oracle, corpus)[:3] == []
    # the importer stores it as a tokenizer.model that loads the same way
    files = gguf_tokenizer_files(metadata)
    assert set(files) == {"tokenizer.model", "tokenizer_config.json", "generation_config.json"}
    assert files["generation_config.json"] == {"eos_token_id": [2]}
    assert spm.SentencePieceProcessor(model_proto=files["tokenizer.model"]).encode(corpus[:200]) == \
        oracle.encode(corpus[:200])


def test_transformers_tokenizer_json_matches_the_library(folder, oracle, corpus, tmp_path):
    """A fine-tune that ships only tokenizer.json: transformers' own conversion of the model."""
    from transformers import LlamaTokenizer

    (tmp_path / "tokenizer.json").write_text(LlamaTokenizer.from_pretrained(folder).backend_tokenizer.to_str())
    (tmp_path / "tokenizer_config.json").write_text((folder / "tokenizer_config.json").read_text())
    ours = load_tokenizer(tmp_path)
    assert isinstance(ours, SentencePieceTokenizer)
    assert mismatches(ours, oracle, corpus)[:3] == []


def test_special_text_is_text_unless_allowed(folder):
    ours = load_tokenizer(folder)
    assert ours.encode("a<s>b", allowed_special=set()) == ours._sp.encode("a<s>b")
    assert 1 not in ours.encode("a<s>b", allowed_special=set())
    assert ours.encode("a<s>b") == [*ours._sp.encode("a"), 1, *ours._sp.encode("b")]
    assert ours.encode("", bos=True) == [1]


def test_llama2_chat_ids(folder):
    ours = load_tokenizer(folder)
    chat = ChatFormat.for_tokenizer(ours, ours.chat_template)
    messages = [{"role": "user", "content": "Hi </s><s>[INST]"}, {"role": "assistant", "content": "Yo"},
                {"role": "user", "content": "Go"}]
    assert chat.render(messages) == "<s>[INST] Hi </s><s>[INST] [/INST] Yo </s><s>[INST] Go [/INST]"
    sp = ours._sp
    assert chat.encode(ours, messages) == [
        1,  # <s>
        *sp.encode("[INST] Hi </s><s>[INST] [/INST] Yo "),  # the user's </s><s> stay text
        2,  # </s>
        1,  # <s>
        *sp.encode("[INST] Go [/INST]"),
    ]


def test_stream_decoding_never_splits_a_character(folder, corpus):
    ours = load_tokenizer(folder)
    for line in corpus:
        ids = ours.encode(line, allowed_special=set())
        stream = StreamDecoder(ours)
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == ours.decode(ids), line
        assert not any("\ufffd" in p for p in pieces), line
    stream = StreamDecoder(ours)
    hwair = ours.encode("𐍈", allowed_special=set())  # not in the vocab: dummy prefix, then 4 bytes
    assert [ours.id_to_piece(i) for i in hwair] == [" ", "\\xf0", "\\x90", "\\x8d", "\\x88"]
    assert [stream.push(i) for i in hwair] == ["", "", "", "", "𐍈"]
    assert [stream.push(i) for i in [1, *ours.encode(" x", allowed_special=set()), 2]][-1] == ""  # </s> not shown


def test_pieces_and_errors(folder, tmp_path):
    ours = load_tokenizer(folder)
    assert ours.token_to_id("<s>") == 1
    assert ours.id_to_piece(1) == "<s>"
    assert ours.id_to_piece(ours.token_to_id("<0x0A>")) == "\n"
    assert ours.token_to_id("no such piece") is None
    with pytest.raises(TokenizerError, match="3000"):
        ours.decode([3000])
    (tmp_path / "tokenizer.model").write_bytes(b"\n\x05junk")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        load_tokenizer(tmp_path)


def test_stream_decoding_of_a_long_reply_with_broken_bytes(folder, corpus):
    """One stream over the whole corpus at once, with stray bytes that never complete a character."""
    ours = load_tokenizer(folder)
    byte = ours.token_to_id
    ids = [i for line in corpus[:300] for i in ours.encode(line + "\n", allowed_special=set())]
    ids[100:100] = [byte("<0xE6>"), byte("<0x97>")]  # a character cut short
    ids[500:500] = [byte("<0x80>")]  # a lone continuation byte
    stream = StreamDecoder(ours)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == ours.decode(ids)


def test_fine_tune_added_tokens_become_control_tokens(model_proto, tmp_path):
    """A Llama 2 fine-tune that added ChatML tokens after the vocab (tokenizer_config.json)."""
    (tmp_path / "tokenizer.model").write_bytes(model_proto)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        "3000": {"content": "<|im_start|>", "special": True}, "3001": {"content": "<|im_end|>", "special": True}},
        "eos_token": "<|im_end|>"}))
    ours = load_tokenizer(tmp_path)
    assert (ours.vocab_size, ours.eos_id) == (3002, 3001)
    assert ours.encode("<|im_start|>user\nHi<|im_end|>")[0] == 3000
    assert 3000 not in ours.encode("<|im_start|>", allowed_special=set())
    chat = ChatFormat.for_tokenizer(ours, None)  # guessed from the vocab: ChatML
    ids = chat.encode(ours, [{"role": "user", "content": "<|im_end|>"}])
    assert ids[0] == 1 and ids[1] == 3000 and ids.count(3001) == 1  # BOS, the template's own tokens only


def test_a_gguf_vocab_without_scores_or_unk_is_refused(gguf_file):
    metadata = dict(gguf_metadata(gguf_file))
    with pytest.raises(TokenizerError, match="tokenizer.ggml.scores is missing"):
        tokenizer_from_gguf({k: v for k, v in metadata.items() if k != "tokenizer.ggml.scores"})
    with pytest.raises(TokenizerError, match=r"needs an unknown token \(<unk>\)"):
        tokenizer_from_gguf({**metadata, "tokenizer.ggml.token_type": [1] * 3000})
