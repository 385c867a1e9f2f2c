"""`llamadesk quantize`: packed variants of a tiny imported model, their metadata, and bad input."""
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from app import store
from app.engine import load_model
from app.errors import UserError
from app.importer import import_checkpoint
from app.variants import quantize_variant, source_tensors
from quant.formats import FORMAT_VERSION
from quant.quantize import QuantOptions, dequantized
from tiny_checkpoints import tiny_checkpoint


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMADESK_HOME", str(tmp_path / "home"))
    path, oracle = tiny_checkpoint(tmp_path, "hf", tied=False)
    import_checkpoint(path, name="tiny")
    return tmp_path / "home"


def _logits(ref, tokens=(3, 17, 42, 99, 5, 250, 7, 1)):
    model = load_model(store.find(ref), 64)
    with torch.inference_mode():
        return model(torch.tensor([list(tokens)]))[0]


def _listing(home):
    return sorted(str(p.relative_to(home)) for p in (home / "models").rglob("*"))


@pytest.mark.parametrize("scheme, max_rel", [("int8", 0.03), ("int4", 0.4), ("nf4", 0.45)])
def test_each_scheme_packs_loads_and_stays_close(home, scheme, max_rel):
    # random 64-wide weights are the worst case for 4 bits (no outliers to spare, errors add up
    # over two layers): the bounds are loose here; the real model's report is tested end to end
    entry = quantize_variant("tiny", QuantOptions(scheme), report_tokens=64)
    assert entry.ref == f"tiny:{scheme}"
    ref, got = _logits("tiny:source"), _logits(entry.ref)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < max_rel, rel
    report = entry.manifest["quant"]["report"]
    assert {r["name"] for r in report["tensors"]} >= {"layers.0.attention.wq", "output", "tok_embeddings"}
    assert report["quality"]["tokens"] > 0 and 0 <= report["quality"]["top1_agreement"] <= 1
    weights = report["quality"]["weights_only"]  # the same weights at the source's fp32 arithmetic
    assert weights["tokens"] == report["quality"]["tokens"] and 0 <= weights["top1_agreement"] <= 1


def test_the_file_says_what_it_holds(home):
    entry = quantize_variant("tiny", QuantOptions("int4", group_size=64), report_tokens=0)
    (fname,) = entry.manifest["weights"]
    with safe_open(str(entry.path / fname), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["llamadesk_format_version"] == str(FORMAT_VERSION)
    header = json.loads(meta["llamadesk_quant"])
    layout = json.loads(meta["llamadesk_layout"])
    assert header["scheme"] == "int4" and header["source_fingerprint"]
    assert layout["layers.1.feed_forward.w2"] == {"scheme": "int4", "group_size": 64, "shape": [64, 192]}
    assert layout["tok_embeddings"]["scheme"] == "int8" and layout["output"]["scheme"] == "int8"
    assert {"layers.0.attention.wq.qweight", "layers.0.attention.wq.scales", "layers.0.attention.wq.mins",
            "layers.0.attention_norm.weight"} <= keys


def test_packed_size_is_the_theoretical_bits_per_weight(home):
    src = store.find("tiny:source")
    entry = quantize_variant("tiny", QuantOptions("int4"), report_tokens=0)
    layout = entry.manifest["quant"]["layout"]
    expected = 0
    for module, w in layout.items():
        n, k = w["shape"] if "shape" in w else (0, 0)
        if w["scheme"] == "int4":
            expected += n * k / 2 + n * k / w["group_size"] * 4  # 4 bits + fp16 scale and min per group
        elif w["scheme"] == "int8":
            # int8 + one fp16 scale per group of 32 (one fp32 scale per row where 32 does not divide K)
            expected += n * k + n * k / w["group_size"] * (2 if w["group_size"] == 32 else 4)
    norms = sum(64 * 4 for _ in range(2 * 2 + 1))
    on_disk = sum((entry.path / f).stat().st_size for f in entry.manifest["weights"])
    header_bytes = on_disk - expected - norms
    assert 0 <= header_bytes < 0.02 * on_disk + 16384  # safetensors' JSON header, metadata included
    assert on_disk < 0.45 * sum((src.path / f).stat().st_size for f in src.manifest["weights"])


@pytest.mark.parametrize("opts, message", [
    (dict(scheme="int3"), "unknown scheme 'int3'"),
    (dict(scheme="int4", group_size=48), "int4 group size must be one of 32, 64, 128"),
    (dict(scheme="int8", head="int2"), "the head can be"),
])
def test_bad_options_are_refused(opts, message):
    with pytest.raises(ValueError, match=message):
        QuantOptions(**opts)


def test_a_source_that_is_not_installed(home):
    with pytest.raises(UserError, match="'nope' is not installed"):
        quantize_variant("nope", QuantOptions("int8"))


def test_quantizing_a_packed_variant_is_refused(home):
    quantize_variant("tiny", QuantOptions("int8"), report_tokens=0)
    with pytest.raises(UserError, match="already packed"):
        quantize_variant("tiny:int8", QuantOptions("int4"))


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failure_mid_write_leaves_nothing(home, monkeypatch, failure):
    before = _listing(home)
    calls = []

    def progress(done, total, what):
        calls.append(what)
        if len(calls) == 5:
            raise failure

    with pytest.raises((UserError, KeyboardInterrupt)) as e:
        quantize_variant("tiny", QuantOptions("int4"), progress=progress, report_tokens=0)
    if isinstance(failure, OSError):
        assert "disk is full" in str(e.value)
    assert _listing(home) == before
    assert quantize_variant("tiny", QuantOptions("int4"), report_tokens=0).ref == "tiny:int4"  # a rerun starts clean


def test_tampered_files_and_newer_formats_are_refused(home):
    entry = quantize_variant("tiny", QuantOptions("int4"), report_tokens=0)
    manifest_path = entry.path / store.MANIFEST
    manifest = json.loads(manifest_path.read_text())

    newer = dict(manifest, quant=dict(manifest["quant"], format_version=FORMAT_VERSION + 1))
    manifest_path.write_text(json.dumps(newer))
    with pytest.raises(UserError, match="made by a newer llamadesk"):
        load_model(store.find("tiny:int4"), 32)

    lying = json.loads(json.dumps(manifest))
    lying["quant"]["layout"]["layers.0.attention.wq"]["scheme"] = "int8"
    manifest_path.write_text(json.dumps(lying))
    with pytest.raises(UserError, match="do not match the model"):
        load_model(store.find("tiny:int4"), 32)

    manifest_path.write_text(json.dumps(manifest))
    (fname,) = manifest["weights"]
    data = (entry.path / fname).read_bytes()
    (entry.path / fname).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cannot read the weights"):
        load_model(store.find("tiny:int4"), 32)


def test_int4_of_a_q4_0_source_reproduces_its_values_exactly(tmp_path, monkeypatch):
    """A GGUF Q4_0 source (d * (q - 8)) gets int4 group 32 with the zero point at 8 by default."""
    monkeypatch.setenv("LLAMADESK_HOME", str(tmp_path / "home"))
    path, _ = tiny_checkpoint(tmp_path, "gguf-q4_0", tied=False)
    source = import_checkpoint(path, name="q40")
    assert source.manifest["source"]["types"]["layers.0.attention.wq.weight"] == "Q4_0"
    # the table and head kept in fp32 too: the whole variant then holds the source's values
    entry = quantize_variant("q40", QuantOptions("int4", embeddings="fp32", head="fp32"), report_tokens=64)
    report = entry.manifest["quant"]["report"]
    rows = {r["name"]: r for r in report["tensors"]}
    blocks = [f"layers.{i}.{m}" for i in range(2) for m in ("attention.wq", "attention.wk", "attention.wv",
                                                            "attention.wo", "feed_forward.w1", "feed_forward.w2",
                                                            "feed_forward.w3")]
    assert all(rows[b]["scheme"] == "int4" and rows[b]["group_size"] == 32 for b in blocks)
    assert all(rows[b]["sqnr_db"] == math.inf for b in blocks)
    src = dict(source_tensors(source))  # the source's Q4_0 blocks, dequantized
    packed = load_file(str(entry.path / entry.manifest["weights"][0]))
    for b in blocks:
        assert torch.equal(dequantized(packed, b, "int4"), src[f"{b}.weight"]), b
    # so with the source's arithmetic it predicts what the source predicts
    weights = report["quality"]["weights_only"]
    assert weights["top1_agreement"] == 1.0 and weights["kl_mean"] < 1e-9


def test_a_tied_model_gets_its_own_packed_head(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMADESK_HOME", str(tmp_path / "home"))
    path, _ = tiny_checkpoint(tmp_path, "gguf-q8_0", tied=True)
    import_checkpoint(path, name="tied")
    entry = quantize_variant("tied", QuantOptions("int4"), report_tokens=0)
    layout = entry.manifest["quant"]["layout"]
    # a Q8_0 table keeps its own grid, exactly, as the embedding and as the head
    assert layout["tok_embeddings"] == {"scheme": "int8", "group_size": 32, "shape": [320, 64]}
    assert layout["output"] == {"scheme": "int8", "group_size": 32, "shape": [320, 64]}
    rows = {r["name"]: r for r in entry.manifest["quant"]["report"]["tensors"]}
    assert rows["output"]["sqnr_db"] == rows["tok_embeddings"]["sqnr_db"] == math.inf
    ref, got = _logits("tied:source"), _logits("tied:int4")
    assert ((got - ref).norm() / ref.norm()).item() < 0.25
