"""`llamadesk import` end to end on tiny checkpoints: what lands in the store and in what dtype,
what makes it ready to chat, and the float copy of a GGUF's blocks."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from app import store
from app.cli import main
from app.errors import UserError
from app.importer import import_checkpoint
from app.variants import eval_model, source_tensors
from tiny_checkpoints import tiny_checkpoint, tiny_hf_model, write_hf


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMADESK_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def dtypes(entry: store.ModelEntry) -> set[torch.dtype]:
    out = set()
    for fname in entry.manifest["weights"]:
        with safe_open(str(entry.path / fname), framework="pt") as f:
            out |= {f.get_tensor(k).dtype for k in f.keys()}
    return out


def test_a_bf16_folder_is_stored_in_bf16_and_ends_ready_to_chat(tmp_path, home, capsys):
    path = write_hf(tiny_hf_model().to(torch.bfloat16), tmp_path / "hf-bf16")
    assert main(["import", str(path), "--name", "tiny"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert dtypes(store.find("tiny:source")) == {torch.bfloat16}  # never widened
    assert [e.ref for e in store.list_entries()] == ["tiny:int8", "tiny:source"]  # a 2-layer model: no int4
    assert "tiny:int8 against tiny:source on" in err and "top-1 agreement" in err


def test_import_force_removes_the_variants_packed_from_the_replaced_source(tmp_path, home, capsys):
    from app.variants import quantize_variant
    from quant.quantize import QuantOptions

    first = write_hf(tiny_hf_model(seed=0), tmp_path / "first")
    assert main(["import", str(first), "--name", "m"]) == 0
    quantize_variant("m", QuantOptions("int4", group_size=32), out="mine", report_tokens=0)
    with pytest.raises(UserError, match="'float' is the name of a float copy; choose another --out"):
        quantize_variant("m", QuantOptions("int4", group_size=32), out="float", report_tokens=0)
    # the same files again: every variant still holds the source's values
    assert main(["import", str(first), "--name", "m", "--force"]) == 0
    assert [e.ref for e in store.list_entries()] == ["m:int8", "m:mine", "m:source"]
    capsys.readouterr()
    second = write_hf(tiny_hf_model(seed=1), tmp_path / "second")
    assert main(["import", str(second), "--name", "m", "--force"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "Removed m:mine: it was packed from the m:source this import replaced" in err
    assert [e.ref for e in store.list_entries()] == ["m:int8", "m:source"]  # int8 packed again, from the new one
    fingerprint = store.find("m:source").manifest["source"]["fingerprint"]
    assert store.find("m:int8").manifest["quant"]["source_fingerprint"] == fingerprint


def test_a_folder_without_a_tokenizer_is_named_as_the_user_gave_it(tmp_path, home):
    path = write_hf(tiny_hf_model(), tmp_path / "no tokenizer")
    for f in path.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(UserError) as e:
        import_checkpoint(path, "m")
    assert str(e.value) == f"{path}: no tokenizer.json or tokenizer.model in this folder"
    assert store.list_entries() == [] and not list((home / "models").glob(".*"))


def test_an_f16_gguf_is_stored_in_f16(tmp_path, home):
    path, _ = tiny_checkpoint(tmp_path, "gguf-f16")
    entry = import_checkpoint(path, "f16")
    assert "quant" not in entry.manifest
    assert dtypes(entry) == {torch.float16, torch.float32}  # matrices F16, norms F32, as in the file


def test_keep_float_writes_the_exact_values_of_a_quantized_gguf(tmp_path, home, capsys):
    path, _ = tiny_checkpoint(tmp_path, "gguf-q4_0", tied=True)
    assert main(["import", str(path), "--name", "q40", "--keep-float"]) == 0
    source, copy = store.find("q40:source"), store.find("q40:float")
    assert [e.ref for e in store.list_entries()] == ["q40:float", "q40:source"]  # blocks need no packing
    want = dict(source_tensors(source))
    got = dict(source_tensors(copy))
    assert want.keys() == got.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # eval reads either; the same values give the same perplexity, up to the source's r16 kernel
    # taking x as 15-bit integers (~1e-5 here; a wrong value moves it by far more)
    _, n, ppl_source = eval_model("q40:source", None, 64, 32)
    _, _, ppl_copy = eval_model("q40:float", None, 64, 32)
    assert n == 64 and ppl_source == pytest.approx(ppl_copy, rel=1e-4)


def test_the_tokenizer_check_is_a_user_error(tmp_path, home, capsys):
    """A tokenizer with more tokens than the embedding has rows: one line, nothing installed."""
    import json

    path = write_hf(tiny_hf_model(), tmp_path / "hf")
    config = json.loads((path / "config.json").read_text())
    config["vocab_size"] = 300
    (path / "config.json").write_text(json.dumps(config))
    # the tensors must agree with the config, so cut the tables to 300 rows as well
    from safetensors.torch import load_file, save_file

    state = load_file(str(path / "model.safetensors"))
    state = {k: (v[:300].contiguous() if v.shape[0] == 320 else v) for k, v in state.items()}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()  # what writing the folder printed
    assert main(["import", str(path), "--name", "tiny"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") <= 1 and "the tokenizer has 320 tokens but the embedding only 300 rows" in " ".join(err.split())
    assert store.list_entries() == []


def test_eval_reports_its_progress_window_by_window(tmp_path, home):
    path, _ = tiny_checkpoint(tmp_path, "gguf-q8_0")
    import_checkpoint(path, "q80")
    seen = []
    _, n, ppl = eval_model("q80", None, 100, 32, progress=lambda done, total, what: seen.append((done, total)))
    assert n == 100 and ppl > 1
    # before each 32-token window, then done; a window scores all its tokens but the first
    assert seen == [(0, 96), (31, 96), (62, 96), (93, 96), (96, 96)]


def test_eval_refuses_a_window_past_the_trained_context(tmp_path, home):
    path, _ = tiny_checkpoint(tmp_path, "gguf-q8_0")
    import_checkpoint(path, "q80")
    trained = store.find("q80").manifest["args"]["max_seq_len"]
    with pytest.raises(UserError, match=f"q80 was trained for at most {trained} tokens, not a {trained + 8}-token "
                                        f"window"):
        eval_model("q80", None, trained + 8, trained + 8)
    assert eval_model("q80", None, trained + 8, trained)[1] == trained + 8
