"""The model store: names, atomic writes, removal. Uses a throw-away LLAMADESK_HOME."""
import json
import os

import pytest

from app import store
from app.errors import UserError


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMADESK_HOME", str(tmp_path))
    return tmp_path


def _install(name, variant):
    with store.staging(name, variant) as tmp:
        store.write_json(tmp / store.MANIFEST, {"name": name, "variant": variant, "args": {}})
        (tmp / "model-00001.safetensors").write_bytes(b"x" * 10)


def test_refs_read_like_ollama_tags():
    assert store.parse_ref("SmolLM2-135M-Instruct:int4") == ("smollm2-135m-instruct", "int4")
    assert store.parse_ref("llama3.2-1b") == ("llama3.2-1b", None)
    for bad in ("", "../etc", "a b", "x:../y", ":int4"):
        with pytest.raises(UserError, match="not a model name"):
            store.parse_ref(bad)


def test_name_from_path():
    from pathlib import Path

    assert store.name_from_path(Path("/m/SmolLM2-135M-Instruct.Q4_1.gguf")) == "smollm2-135m-instruct.q4_1"
    assert store.name_from_path(Path("/m/Meta Llama 3 8B")) == "meta-llama-3-8b"
    assert store.name_from_path(Path("/m/Ünïcode Mödel.gguf")) == "unicode-model"
    assert store.name_from_path(Path("/m/模型.gguf")) == "model"


def test_a_completed_write_appears_whole(home):
    _install("tiny", "source")
    (entry,) = store.list_entries()
    assert (entry.ref, entry.size_bytes > 10) == ("tiny:source", True)
    assert store.find("tiny").variant == "source"
    assert not [p for p in (home / "models").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_failed_write_leaves_nothing(home, error):
    with pytest.raises(type(error)):
        with store.staging("tiny", "source") as tmp:
            (tmp / "model-00001.safetensors").write_bytes(b"half")
            raise error
    assert store.list_entries() == []
    assert os.listdir(home / "models") == []


def test_disk_full_is_one_clear_message(home):
    with pytest.raises(UserError, match="disk is full"):
        with store.staging("tiny", "source"):
            raise OSError(28, "No space left on device")
    assert os.listdir(home / "models") == []


def test_installing_twice_needs_replace(home):
    _install("tiny", "source")
    with pytest.raises(UserError, match="already installed"):
        _install("tiny", "source")
    with store.staging("tiny", "source", replace=True) as tmp:
        store.write_json(tmp / store.MANIFEST, {"name": "tiny", "variant": "source", "args": {}, "new": True})
    assert store.find("tiny:source").manifest["new"] is True


def test_leftovers_of_a_dead_process_are_cleaned(home):
    root = home / "models"
    root.mkdir()
    dead = root / ".staging-999999999-tiny-source-1"
    dead.mkdir()
    _install("other", "source")
    assert not dead.exists()


def test_find_and_remove_explain_what_is_installed(home):
    _install("tiny", "source")
    _install("tiny", "int4")
    with pytest.raises(UserError, match=r"'huge' is not installed \(installed: tiny\)"):
        store.find("huge")
    with pytest.raises(UserError, match="tiny:int8 is not installed .*tiny:int4"):
        store.find("tiny:int8")
    assert [e.ref for e in store.remove("tiny:int4")] == ["tiny:int4"]
    assert [e.ref for e in store.list_entries()] == ["tiny:source"]
    store.remove("tiny")
    assert store.list_entries() == [] and not (home / "models" / "tiny").exists()


def test_removing_a_model_takes_its_damaged_variants_too_and_an_empty_variant_is_no_name(home):
    _install("tiny", "source")
    _install("tiny", "int8")
    (home / "models" / "tiny" / "int8" / store.MANIFEST).write_text("{not json")
    with pytest.raises(UserError, match="'tiny:' is not a model name"):
        store.remove("tiny:")
    assert [e.ref for e in store.remove("tiny")] == ["tiny:source"]
    assert not (home / "models" / "tiny").exists()
    _install("tiny", "source")  # nothing of it listable: still removable
    (home / "models" / "tiny" / "source" / store.MANIFEST).write_text("{not json")
    assert store.list_entries() == [] and store.remove("tiny") == []
    assert not (home / "models" / "tiny").exists()
    with pytest.raises(UserError, match="'tiny' is not installed"):
        store.remove("tiny")


def test_a_new_source_removes_only_what_another_source_made(home):
    def install(variant, manifest):
        with store.staging("m", variant) as tmp:
            store.write_json(tmp / store.MANIFEST, {"name": "m", "variant": variant, "args": {}, **manifest})

    install("source", {"source": {"fingerprint": "new"}})
    install("int4", {"source": {"fingerprint": "old"}, "quant": {"scheme": "int4", "source_fingerprint": "old"}})
    install("int8", {"source": {"fingerprint": "new"}, "quant": {"scheme": "int8", "source_fingerprint": "new"}})
    install("float", {"source": {"fingerprint": "new"}})  # a float copy of the GGUF's blocks
    install("mystery", {})  # nothing recorded: kept
    gone = store.remove_packed_from_other_sources(store.find("m:source"))
    assert [e.ref for e in gone] == ["m:int4"]
    assert [e.variant for e in store.list_entries()] == ["float", "int8", "mystery", "source"]


def test_a_folder_without_manifest_is_not_a_model(home):
    (home / "models" / "junk" / "source").mkdir(parents=True)
    (home / "models" / "junk" / "source" / store.MANIFEST).write_text("{not json")
    assert store.list_entries() == []
