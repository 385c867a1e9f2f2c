"""open_checkpoint on real files the tests write: each format it detects, and each way a file breaks."""
from __future__ import annotations

import json
import os

import gguf
import pytest
import torch
from safetensors.torch import load_file, save_file

from model.args import LLAMA31_ROPE_SCALING
from model.checkpoints import CheckpointError, expected_shapes, open_checkpoint
from tiny_checkpoints import (
    VOCAB, meta_state_dict, tiny_checkpoint, tiny_hf_model, write_gguf, write_hf, write_meta,
)


# ---------------------------------------------------------------- what each format reads as
def test_hugging_face_folder(tmp_path):
    path, _ = tiny_checkpoint(tmp_path, "hf")
    ckpt = open_checkpoint(path)
    assert ckpt.format == "hf"
    assert (ckpt.args.dim, ckpt.args.n_layers, ckpt.args.n_heads, ckpt.args.n_kv_heads) == (64, 2, 4, 2)
    assert (ckpt.args.vocab_size, ckpt.args.ffn_dim, ckpt.args.rope_theta) == (VOCAB, 192, 100000.0)
    assert ckpt.files == [path / "model.safetensors"]
    assert ckpt.tokenizer_files == [path / "tokenizer.json", path / "tokenizer_config.json"]
    assert ckpt.metadata == json.loads((path / "config.json").read_text())
    assert ckpt.tensor_names()[:3] == [
        "tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.0.attention.wk.weight",
    ]
    assert ckpt.tensor_names()[-2:] == ["norm.weight", "output.weight"]
    assert set(ckpt.source_types.values()) == {"F32"}


def test_bf16_safetensors_are_read_as_bf16(tmp_path):
    path = write_hf(tiny_hf_model().to(torch.bfloat16), tmp_path / "hf-bf16")
    ckpt = open_checkpoint(path)
    assert set(ckpt.source_types.values()) == {"BF16"}
    assert {t.dtype for _, t in ckpt.tensors()} == {torch.bfloat16}


def test_meta_folder(tmp_path):
    path, _ = tiny_checkpoint(tmp_path, "meta", llama31=True)
    ckpt = open_checkpoint(path)
    assert ckpt.format == "meta"
    assert ckpt.files == [path / "consolidated.00.pth"]
    assert ckpt.tokenizer_files == [path / "tokenizer.model"]
    assert ckpt.metadata["use_scaled_rope"] is True
    assert ckpt.args.rope_scaling == LLAMA31_ROPE_SCALING
    assert ckpt.args.ffn_dim == 192  # from dim 64 and multiple_of 32 by Meta's rule


def test_a_meta_checkpoint_in_torchs_format_before_1_6_reads_the_same(tmp_path):
    path, _ = tiny_checkpoint(tmp_path, "meta")
    new = {k: v.clone() for k, v in open_checkpoint(path).tensors()}
    pth = path / "consolidated.00.pth"
    torch.save(torch.load(pth, weights_only=True), pth, _use_new_zipfile_serialization=False)
    old = {k: v.clone() for k, v in open_checkpoint(path).tensors()}
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in new)


def test_meta_vocab_size_minus_one_comes_from_the_embedding(tmp_path):
    path, _ = tiny_checkpoint(tmp_path, "meta-2shards")
    assert json.loads((path / "params.json").read_text())["vocab_size"] == -1
    ckpt = open_checkpoint(path)
    assert ckpt.args.vocab_size == VOCAB
    assert ckpt.files == [path / "consolidated.00.pth", path / "consolidated.01.pth"]


def test_quantized_gguf_file(tmp_path):
    path, _ = tiny_checkpoint(tmp_path, "gguf-q8_0", tied=True)
    ckpt = open_checkpoint(path)
    assert ckpt.format == "gguf"
    assert ckpt.args.tie_embeddings
    assert "output.weight" not in ckpt.tensor_names()
    assert ckpt.source_types["layers.0.attention.wq.weight"] == "Q8_0"
    assert ckpt.source_types["tok_embeddings.weight"] == "Q8_0"
    assert ckpt.source_types["layers.0.attention_norm.weight"] == "F32"
    assert ckpt.metadata["general.architecture"] == "llama"
    assert ckpt.metadata["tokenizer.ggml.model"] == "gpt2"
    assert ckpt.metadata["tokenizer.ggml.tokens"][:3] == ["!", '"', "#"]
    assert ckpt.metadata["tokenizer.ggml.merges"][:2] == ["Ġ t", "h e"]
    assert ckpt.metadata["tokenizer.ggml.bos_token_id"] == 288  # <|begin_of_text|>
    assert ckpt.tokenizer_files == []


def test_a_folder_holding_one_gguf_opens_it(tmp_path):
    path, _ = tiny_checkpoint(tmp_path, "gguf")
    ckpt = open_checkpoint(tmp_path)
    assert (ckpt.path, ckpt.files) == (tmp_path, [path])


def test_llama31_gguf_keeps_rope_freqs_out_of_the_weights(tmp_path):
    path, _ = tiny_checkpoint(tmp_path, "gguf", llama31=True)
    assert "rope_freqs.weight" in [t.name for t in gguf.GGUFReader(path).tensors]
    ckpt = open_checkpoint(path)
    assert ckpt.args.rope_scaling == LLAMA31_ROPE_SCALING
    assert not any("rope" in name for name in ckpt.tensor_names())


def test_every_layout_yields_the_same_tensors(tmp_path):
    """Un-permuted HF wq/wk, concatenated Meta shards and GGUF's own order all land on Meta's tensors."""
    model = tiny_hf_model(gqa=True)
    want = meta_state_dict(model)
    paths = [
        write_hf(model, tmp_path / "hf"),
        write_hf(model, tmp_path / "hf-sharded", max_shard_size="100KB"),
        write_meta(model, tmp_path / "meta"),
        write_meta(model, tmp_path / "meta-llama2-shards", shards=2, style="llama2"),
        write_meta(model, tmp_path / "meta-llama3-shards", shards=2, style="llama3"),
        write_gguf(model, tmp_path / "tiny.gguf"),
    ]
    assert len(open_checkpoint(paths[1]).files) > 1
    for path in paths:
        got = dict(open_checkpoint(path).tensors())
        assert list(got) == list(want), path
        for name in want:
            assert torch.equal(got[name], want[name]), f"{path}: {name}"


def test_expected_shapes_of_a_tied_gqa_model(tmp_path):
    args = open_checkpoint(tiny_checkpoint(tmp_path, "hf", gqa=True, tied=True)[0]).args
    shapes = expected_shapes(args)
    assert shapes["layers.1.attention.wq.weight"] == (64, 64)
    assert shapes["layers.1.attention.wk.weight"] == (32, 64)  # 2 KV heads of 16
    assert shapes["layers.1.feed_forward.w2.weight"] == (64, 192)
    assert "output.weight" not in shapes
    assert len(shapes) == 1 + 2 * 9 + 1


def test_fingerprint_is_stable_and_tells_models_apart(tmp_path):
    first = write_gguf(tiny_hf_model(seed=0), tmp_path / "a.gguf")
    second = write_gguf(tiny_hf_model(seed=1), tmp_path / "b.gguf")
    fp = open_checkpoint(first).fingerprint()
    assert len(fp) == 64
    assert open_checkpoint(first).fingerprint() == fp
    assert open_checkpoint(second).fingerprint() != fp


# ---------------------------------------------------------------- what is refused, and how it is said
def _refused(path) -> str:
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(path)
    return str(e.value)


def _truncate(file, keep: float = 0.5):
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def _flip(file, offset: int):
    data = bytearray(file.read_bytes())
    data[offset] ^= 0xFF
    file.write_bytes(bytes(data))


def test_missing_path(tmp_path):
    assert _refused(tmp_path / "nope") == f"{tmp_path / 'nope'}: no such file or folder"


def test_folder_with_no_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    assert _refused(tmp_path).startswith(f"{tmp_path}: no checkpoint found; expected config.json")


def test_file_that_is_not_gguf(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\0" * 64)
    assert "not a GGUF file" in _refused(tmp_path / "model.bin")


def test_truncated_safetensors(tmp_path):
    path, _ = tiny_checkpoint(tmp_path, "hf")
    _truncate(path / "model.safetensors")
    message = _refused(path)
    assert message.startswith(f"{path / 'model.safetensors'}: not a readable safetensors file (truncated or corrupt?)")


def test_safetensors_with_a_flipped_header_byte(tmp_path):
    path, _ = tiny_checkpoint(tmp_path, "hf")
    _flip(path / "model.safetensors", 12)  # inside the JSON header, after the 8-byte length
    assert "model.safetensors: not a readable safetensors file" in _refused(path)


def test_sharded_hf_with_a_shard_missing(tmp_path):
    path, _ = tiny_checkpoint(tmp_path, "hf-sharded")
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert _refused(path) == f"{shard}: listed in model.safetensors.index.json but missing"


def test_truncated_gguf(tmp_path):
    path, _ = tiny_checkpoint(tmp_path, "gguf")
    _truncate(path)
    # one line in words, not the numpy error the reader raised
    assert _refused(path) == (f"{path}: not a readable GGUF file: its header or tensors run past its "
                              f"{path.stat().st_size:,} bytes or hold values no GGUF writer makes (truncated or corrupt?)")


def test_gguf_with_a_broken_magic(tmp_path):
    path, _ = tiny_checkpoint(tmp_path, "gguf")
    _flip(path, 0)
    assert _refused(path) == f"{path}: not a GGUF file (a GGUF file starts with the bytes 'GGUF')"


def test_truncated_pth(tmp_path):
    path, _ = tiny_checkpoint(tmp_path, "meta")
    _truncate(path / "consolidated.00.pth")
    pth = path / "consolidated.00.pth"
    assert _refused(path).startswith(f"{pth}: not a readable PyTorch checkpoint (truncated or corrupt?)")


class _RunsAShellCommand:
    """Unpickling this calls os.system: what a malicious .pth does."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_pickle_with_code_is_refused_without_running_it(tmp_path):
    path, _ = tiny_checkpoint(tmp_path, "meta")
    witness = tmp_path / "code-ran"
    torch.save({"tok_embeddings.weight": _RunsAShellCommand(f"touch {witness}")}, path / "consolidated.00.pth")
    message = _refused(path)
    assert message.startswith(f"{path / 'consolidated.00.pth'}: holds Python objects besides tensors")
    assert "refers to posix.system" in message or "refers to nt.system" in message
    assert "weights_only" not in message  # torch's advice to switch the check off is not passed on
    assert not witness.exists()


def test_gguf_of_another_architecture(tmp_path):
    path = tmp_path / "qwen.gguf"
    w = gguf.GGUFWriter(path, "qwen2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert _refused(path) == f"{path}: architecture qwen2 is not supported; llamadesk runs LLaMA models ('llama')"


def test_hf_config_of_another_model_type(tmp_path):
    path, _ = tiny_checkpoint(tmp_path, "hf")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    assert _refused(path) == f"{path / 'config.json'}: model_type qwen2 is not supported; llamadesk runs LLaMA models"


def test_config_with_the_wrong_hidden_size(tmp_path):
    path, _ = tiny_checkpoint(tmp_path, "hf")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "hidden_size": 96}))
    assert _refused(path) == (
        f"{path / 'model.safetensors'} (model.embed_tokens.weight): tok_embeddings.weight has shape (320, 64), "
        "but config.json implies (320, 96)"
    )


def test_safetensors_missing_a_tensor(tmp_path):
    path, _ = tiny_checkpoint(tmp_path, "hf")
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    assert _refused(path) == f"{path}: missing tensor layers.1.feed_forward.w2.weight"


def test_gguf_with_a_tensor_llama_does_not_have(tmp_path):
    path = write_gguf(tiny_hf_model(attention_bias=True), tmp_path / "biased.gguf")
    assert _refused(path) == f"{path}: unknown tensor 'blk.0.attn_q.bias'; is this a LLaMA?"


def test_gguf_rope_freqs_that_are_not_llama31(tmp_path):
    model = tiny_hf_model(llama31=True)
    model.config.rope_parameters["low_freq_factor"] = 2.0  # llama.cpp would bake this into rope_freqs
    path = write_gguf(model, tmp_path / "odd-rope.gguf")
    assert "rope_freqs.weight is not Llama 3.1's RoPE scaling" in _refused(path)


# ---------------------------------------------------------------- the real default model
@pytest.mark.e2e
def test_default_model_header(default_gguf):
    ckpt = open_checkpoint(default_gguf)
    a = ckpt.args
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size, a.ffn_dim) == (576, 30, 9, 3, 49152, 1536)
    assert a.tie_embeddings and a.rope_theta == 100000.0
    assert ckpt.source_types["tok_embeddings.weight"] == "Q8_0"
    assert ckpt.source_types["layers.0.attention.wq.weight"] == "Q4_1"
    assert ckpt.metadata["tokenizer.ggml.eos_token_id"] == 2  # <|im_end|>
