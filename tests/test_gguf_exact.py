"""GGUF block types kept exactly: the store holds a file's own blocks, at the file's size, and
its values bit-equal what gguf-py (the format's reference in Python) dequantizes from the file."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open

from app import store
from app.engine import load_model
from app.importer import import_checkpoint
from model.checkpoints import load_state_dict_into, open_checkpoint
from model.model import Transformer
from quant.formats import Packed, unpack
from quant.ggml import GGUF_SCHEMES
from tiny_checkpoints import write_random_blocks_gguf

TYPES = [s.upper() for s in GGUF_SCHEMES]  # Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K
GGUF_TO_META = {"token_embd": "tok_embeddings", "blk.0.attn_q": "layers.0.attention.wq",
                "blk.0.attn_k": "layers.0.attention.wk", "blk.0.attn_v": "layers.0.attention.wv",
                "blk.0.attn_output": "layers.0.attention.wo", "blk.0.ffn_gate": "layers.0.feed_forward.w1",
                "blk.0.ffn_up": "layers.0.feed_forward.w3", "blk.0.ffn_down": "layers.0.feed_forward.w2",
                "output": "output"}


@pytest.fixture(autouse=True)
def dequantized_layers(monkeypatch):
    """The values, not the kernel: GGUF layers dequantize and multiply as the fp32 reference does
    (the native GEMV sums in another order; test_gguf_kernels.py checks it)."""
    from quant.linear import GGUFLinear

    monkeypatch.setattr(GGUFLinear, "NATIVE_ROWS", 0)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMADESK_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def stored_tensors(entry: store.ModelEntry) -> dict[str, torch.Tensor]:
    out = {}
    for fname in entry.manifest["weights"]:
        with safe_open(str(entry.path / fname), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("qtype", TYPES)
def test_each_type_is_stored_as_its_blocks_and_dequantizes_bit_equal(tmp_path, home, qtype):
    path = write_random_blocks_gguf(tmp_path / f"rand-{qtype}.gguf", qtype)
    entry = import_checkpoint(path, "rand")
    layout = entry.manifest["quant"]["layout"]
    state = stored_tensors(entry)

    reader = gguf.GGUFReader(path)
    matrices = [t for t in reader.tensors if len(t.shape) == 2]
    assert len(matrices) == 9
    for t in matrices:
        module = GGUF_TO_META[t.name[: -len(".weight")]]
        assert layout[module]["scheme"] == qtype.lower()
        assert state[f"{module}.blocks"].dtype == torch.uint8
        want = gguf.quants.dequantize(t.data, t.tensor_type)  # (N, K) float32
        got = unpack(Packed.from_state_dict(module, state, layout[module]["scheme"])).numpy()
        assert got.shape == want.shape
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), t.name  # bit for bit

    folder = sum(f.stat().st_size for f in entry.path.iterdir() if f.is_file())
    assert folder <= 1.10 * path.stat().st_size, (folder, path.stat().st_size)


# types whose layers multiply fp32 x (the r16 ones, Q4_0/Q4_1/Q8_0/Q4_K, round x to 15-bit
# integers once the compiled step is loaded: test_gguf_kernels.py checks them against gguf)
@pytest.mark.parametrize("qtype,tied", [("Q2_K", False), ("Q6_K", True), ("Q5_0", True)])
def test_the_stored_blocks_run_as_the_files_values(tmp_path, home, qtype, tied):
    """The model on the file's blocks gives the logits of an fp32 model of the file's values."""
    path = write_random_blocks_gguf(tmp_path / f"rand-{qtype}.gguf", qtype, tied=tied)
    entry = import_checkpoint(path, "rand")
    if tied:  # the table is stored once; the head reads it
        assert entry.manifest["quant"]["layout"]["output"]["tied"] is True
        assert not any(k.startswith("output.") for k in stored_tensors(entry))

    ckpt = open_checkpoint(path)
    with torch.device("meta"):
        reference = Transformer(ckpt.args)
    load_state_dict_into(reference, ckpt)
    reference.setup_caches(64)
    packed = load_model(entry, 64, fuse=False)

    tokens = torch.tensor([[1, 17, 250, 3, 99, 42]])
    with torch.inference_mode():
        want, got = reference(tokens, 0), packed(tokens, 0)
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("table", ["F16", "Q6_K"])
def test_a_tied_table_of_another_type_serves_as_the_head(tmp_path, home, table):
    """Q5_0 matrices (an fp32-x type, as above) with the table in F16 (kept fp16) or Q6_K (kept
    as blocks), tied."""
    path = write_random_blocks_gguf(tmp_path / f"mix-{table}.gguf", "Q5_0", tied=True, table=table)
    entry = import_checkpoint(path, "mix")
    state = stored_tensors(entry)
    layout = entry.manifest["quant"]["layout"]
    if table == "F16":
        assert state["tok_embeddings.weight"].dtype == torch.float16 and "tok_embeddings" not in layout
    else:
        assert layout["tok_embeddings"]["scheme"] == layout["output"]["scheme"] == "q6_k"
    assert not any(k.startswith("output.") for k in state)
    ckpt = open_checkpoint(path)
    with torch.device("meta"):
        reference = Transformer(ckpt.args)
    load_state_dict_into(reference, ckpt)
    reference.setup_caches(64)
    tokens = torch.tensor([[1, 17, 250, 3]])
    with torch.inference_mode():
        torch.testing.assert_close(load_model(entry, 64, fuse=False)(tokens, 0), reference(tokens, 0),
                                   rtol=1e-5, atol=1e-5)


def test_a_float_gguf_stays_a_plain_float_source(tmp_path, home):
    from tiny_checkpoints import tiny_checkpoint

    path, _ = tiny_checkpoint(tmp_path, "gguf")
    entry = import_checkpoint(path, "f32")
    assert "quant" not in entry.manifest
    assert all(t.dtype == torch.float32 for t in stored_tensors(entry).values())


def test_a_variant_of_format_version_1_still_loads(tmp_path, home):
    """Version 2 added schemes; the int8 / int4 / nf4 layouts of version 1 are unchanged."""
    from app.variants import quantize_variant
    from quant.quantize import QuantOptions
    from tiny_checkpoints import tiny_checkpoint

    path, _ = tiny_checkpoint(tmp_path, "hf")
    import_checkpoint(path, "tiny")
    entry = quantize_variant("tiny", QuantOptions("int8"), report_tokens=0)
    manifest = json.loads((entry.path / store.MANIFEST).read_text())
    manifest["format_version"] = 1
    manifest["quant"]["format_version"] = 1
    store.write_json(entry.path / store.MANIFEST, manifest)
    old = store.find("tiny:int8")
    tokens = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        torch.testing.assert_close(load_model(old, 16, fuse=False)(tokens, 0),
                                   load_model(entry, 16, fuse=False)(tokens, 0))


# ---------------------------------------------------------------- bad input: one line, nothing stored
def _import_fails(path, capsys) -> str:
    from app.cli import main

    assert main(["import", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert store.list_entries() == []
    assert not any((store.models_root()).glob(".staging-*"))
    err = err[err.index("llamadesk: error:"):]  # after the step lines ("Converting x.gguf")
    return " ".join(err.split())  # rich wraps a long line to the terminal's width


def _tensor_type_offset(data: bytes, name: bytes) -> int:
    """Byte offset of a tensor's ggml type in a GGUF header: name, n_dims (u32), dims (u64 each), type."""
    i = data.index(name) + len(name)
    n_dims = int.from_bytes(data[i : i + 4], "little")
    return i + 4 + 8 * n_dims


def test_a_file_that_is_not_gguf_gets_one_line(tmp_path, home, capsys):
    from app.cli import main

    path = tmp_path / "notes.gguf"
    path.write_text("shopping list\n")
    assert main(["import", str(path)]) == 1
    assert capsys.readouterr().err == f"llamadesk: error: {path}: not a GGUF file (a GGUF file starts with the bytes 'GGUF')\n"
    assert store.list_entries() == []


def test_truncated_blocks_are_refused(tmp_path, home, capsys):
    path = write_random_blocks_gguf(tmp_path / "cut.gguf", "Q4_K")
    data = path.read_bytes()
    path.write_bytes(data[:-20000])  # into the output matrix's blocks
    err = _import_fails(path, capsys)
    assert err.strip() == (f"llamadesk: error: {path}: not a readable GGUF file: its header or tensors run past "
                           f"its {path.stat().st_size:,} bytes or hold values no GGUF writer makes (truncated or corrupt?)")


def test_an_iq_type_is_refused_by_name(tmp_path, home, capsys):
    path = write_random_blocks_gguf(tmp_path / "iq.gguf", "Q4_0")
    data = bytearray(path.read_bytes())
    at = _tensor_type_offset(bytes(data), b"blk.0.attn_q.weight")
    # IQ4_NL has Q4_0's block geometry (32 values in 18 bytes), so the file stays well formed
    data[at : at + 4] = int(gguf.GGMLQuantizationType.IQ4_NL).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    err = _import_fails(path, capsys)
    assert "blk.0.attn_q.weight is IQ4_NL, a type llamadesk does not hold" in err


def test_an_unknown_type_is_refused(tmp_path, home, capsys):
    path = write_random_blocks_gguf(tmp_path / "unknown.gguf", "Q8_0")
    data = bytearray(path.read_bytes())
    at = _tensor_type_offset(bytes(data), b"blk.0.ffn_up.weight")
    data[at : at + 4] = (99).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    err = _import_fails(path, capsys)
    assert err.strip() == (f"llamadesk: error: {path}: not a readable GGUF file: a tensor has type number 99, "
                           "which no GGUF type has (from a newer llama.cpp?)")


def test_a_split_gguf_is_refused_by_name(tmp_path, home, capsys):
    path = write_random_blocks_gguf(tmp_path / "model-00001-of-00002.gguf", "Q4_0")
    err = _import_fails(path, capsys)
    assert "is one part of a split GGUF (2 parts)" in err and "llama-gguf-split --merge" in err


def test_a_whole_gguf_named_as_part_one_of_one_imports(tmp_path, home):
    path = write_random_blocks_gguf(tmp_path / "model-00001-of-00001.gguf", "Q4_0")
    assert import_checkpoint(path, "whole").ref == "whole:source"


def test_a_split_gguf_is_refused_by_its_metadata(tmp_path, home, capsys):
    path = write_random_blocks_gguf(tmp_path / "renamed.gguf", "Q4_0", split_count=3)
    err = _import_fails(path, capsys)
    assert "is one part of a split GGUF (3 parts)" in err
