"""Where a reply stops, and that no control token the model emits is ever printed.

The tiny models here are real checkpoints whose weights make each next token a function of the
current one (attention and feed-forward outputs zeroed, each chosen token's embedding a basis
vector the output head reads): so the model emits exactly the chain of tokens the test lays
down, control tokens included, through the whole import-load-generate path."""
from __future__ import annotations

import json

import gguf
import pytest
import torch
from tiny_checkpoints import TOKENS, tiny_hf_model, write_hf

from app.cli import main
from app.importer import import_checkpoint
from model.tokenizer import gguf_tokenizer_files, load_tokenizer, sampling_defaults

EOM, PYTHON_TAG = "<|eom_id|>", "<|python_tag|>"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMADESK_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def token(text: str) -> int:
    named = {EOM: "<|reserved_special_token_0|>", PYTHON_TAG: "<|reserved_special_token_1|>"}
    if text in named:
        return TOKENS.index(named[text])
    return TOKENS.index(text)


def chain_checkpoint(folder, chain: list[str], eos_token: str, generation_eos: list[str]):
    """A Llama-3.1-layout HF folder whose model, after token chain[i], always emits chain[i + 1]."""
    model = tiny_hf_model(seed=1)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        for k, (current, following) in enumerate(zip(chain, chain[1:])):
            emb[token(current)] = 0.0
            emb[token(current), k] = 1.0
            head[token(following), k] = 100.0
    write_hf(model, folder)
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text())
    renamed = {"<|reserved_special_token_0|>": EOM, "<|reserved_special_token_1|>": PYTHON_TAG}
    for added in tokenizer_json["added_tokens"]:
        added["content"] = renamed.get(added["content"], added["content"])
    tokenizer_json["model"]["vocab"] = {renamed.get(t, t): i for t, i in tokenizer_json["model"]["vocab"].items()}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": eos_token}))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "eos_token_id": token(eos_token)}))
    (folder / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [token(t) for t in generation_eos], "temperature": 0.6, "top_p": 0.9, "do_sample": True}))
    return folder


# the chat prompt ends "<|end_header_id|>\n\n": its last token is "\n" (Ċ in the byte alphabet)
CHAIN = ["Ċ", "a", PYTHON_TAG, "b", EOM, "c", "<|end_of_text|>", "d", "<|eot_id|>", "e"]


def ask_tiny() -> int:
    return main(["ask", "--model", "tiny", "--temperature", "0", "--max-tokens", "20", "Hi"])


def test_llama31_files_stop_at_eom_and_print_no_control_token(tmp_path, home, capsys):
    """Llama 3.1's generation_config.json: <|end_of_text|>, <|eom_id|>, <|eot_id|> all end a reply."""
    folder = chain_checkpoint(tmp_path / "llama31", CHAIN, "<|eot_id|>", ["<|end_of_text|>", EOM, "<|eot_id|>"])
    entry = import_checkpoint(folder, name="tiny")
    assert load_tokenizer(entry.path).eos_ids == {token("<|end_of_text|>"), token(EOM), token("<|eot_id|>")}
    assert sampling_defaults(entry.path) == {"temperature": 0.6, "top_p": 0.9}
    assert ask_tiny() == 0
    assert capsys.readouterr().out == "ab\n"  # <|python_tag|> went by unprinted; <|eom_id|> stopped it


def test_files_that_name_only_eot_go_on_past_eom_and_end_of_text(tmp_path, home, capsys):
    folder = chain_checkpoint(tmp_path / "llama3", CHAIN, "<|eot_id|>", ["<|eot_id|>"])
    import_checkpoint(folder, name="tiny")
    assert ask_tiny() == 0
    assert capsys.readouterr().out == "abcd\n"  # on through <|eom_id|> and <|end_of_text|>, none shown


def test_config_json_eos_counts_too(tmp_path, home, capsys):
    """A folder whose config.json names the EOS ids and whose generation_config.json does not."""
    folder = chain_checkpoint(tmp_path / "cfg", CHAIN, "<|eot_id|>", [])
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "eos_token_id": [token("<|eot_id|>"), token(EOM)]}))
    import_checkpoint(folder, name="tiny")
    assert ask_tiny() == 0
    assert capsys.readouterr().out == "ab\n"


def test_gguf_eos_eot_eom_and_sampling_keys():
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
                "tokenizer.ggml.tokens": TOKENS, "tokenizer.ggml.merges": [],
                "tokenizer.ggml.token_type": [1] * 288 + [3] * (len(TOKENS) - 288),
                "tokenizer.ggml.eos_token_id": 289, "tokenizer.ggml.eot_token_id": 292,
                "tokenizer.ggml.eom_token_id": 293,
                "general.sampling.temp": 0.6, "general.sampling.top_p": 0.9, "general.sampling.top_k": 40}
    files = gguf_tokenizer_files(metadata)
    assert files["generation_config.json"] == {"eos_token_id": [289, 292, 293], "temperature": 0.6,
                                               "top_p": 0.9, "top_k": 40}
    # the names llama.cpp writes
    assert {gguf.Keys.Tokenizer.EOT_ID, gguf.Keys.Tokenizer.EOM_ID} <= set(metadata)
    assert {gguf.Keys.General.SAMPLING_TEMP, gguf.Keys.General.SAMPLING_TOP_K} <= set(metadata)
