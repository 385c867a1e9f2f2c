"""Llama-2-layout checkpoints (SentencePiece vocab, Llama 2's chat template) in each format a
person holds them: imported, then answering through `llamadesk ask` exactly as transformers'
greedy generation on the same weights does, from the prompt Meta's own recipe builds."""
from __future__ import annotations

import pytest
import sentencepiece as spm
import torch
from tiny_checkpoints import llama2_tokenizer_model, tiny_checkpoint

from app.cli import main
from app.importer import import_checkpoint
from model.chat_format import choose_chat_format
from model.tokenizer import load_tokenizer
from model.tokenizer_spm import SentencePieceTokenizer


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMADESK_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def meta_llama2_prompt(user: str) -> list[int]:
    """Meta's llama chat_completion: BOS, then "[INST] {prompt} [/INST]" encoded in one piece."""
    sp = spm.SentencePieceProcessor(model_proto=llama2_tokenizer_model())
    return [1] + sp.encode(f"[INST] {user.strip()} [/INST]")


@torch.no_grad()
def transformers_reply(oracle, prompt: list[int], n: int) -> str:
    out = oracle.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=2,
                          pad_token_id=0)[0, len(prompt):].tolist()
    sp = spm.SentencePieceProcessor(model_proto=llama2_tokenizer_model())
    return sp.decode([t for t in out if t != 2])


@pytest.mark.parametrize("layout", ["hf", "meta", "gguf", "gguf-q8_0"])
def test_llama2_layout_imports_and_answers(layout, tmp_path, home, capsys):
    path, oracle = tiny_checkpoint(tmp_path, layout, sentencepiece=True)
    # a Meta folder has no template: its name says Llama 2 chat (the app says it guessed)
    entry = import_checkpoint(path, name="llama-2-tiny-chat")
    tokenizer = load_tokenizer(entry.path)
    assert isinstance(tokenizer, SentencePieceTokenizer)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (1, 2, 512)
    chat = choose_chat_format(tokenizer, entry.name)[0]
    assert chat.encode(tokenizer, [{"role": "user", "content": "Hi there"}]) == meta_llama2_prompt("Hi there")

    assert main(["ask", "--model", "llama-2-tiny-chat", "--temperature", "0", "--max-tokens", "12", "Hi there"]) == 0
    answer = capsys.readouterr().out
    want = transformers_reply(oracle, meta_llama2_prompt("Hi there"), 12)
    assert want.strip() and answer == want + "\n"
