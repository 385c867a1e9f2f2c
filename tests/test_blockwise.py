"""The quality report run block by block gives the figures of the three whole models it replaced.

The oracle is the report as it was made before (quant.quality.compare_all over the source, the
variant and the variant's unpacked weights, each loaded whole): same text, same windows.
"""

import pytest
import torch

from app import store
from app.blockwise import compare_blockwise
from app.engine import load_model
from app.importer import import_checkpoint
from app.variants import quantize_variant, source_tensors, text_ids
from model.args import ModelArgs
from model.model import Transformer
from quant.linear import swap_linears
from quant.quality import compare_all, run_unpacked
from quant.quantize import QuantOptions
from tiny_checkpoints import tiny_checkpoint


def whole_unpacked(entry: store.ModelEntry, ctx: int) -> Transformer:
    """The variant whole, its layers running their unpacked fp32 weights (the old report's third model)."""
    args = ModelArgs.from_dict(entry.manifest["args"])
    layout = entry.manifest["quant"]["layout"]
    with torch.device("meta"):
        model = Transformer(args)
    swap_linears(model, {m: w["scheme"] for m, w in layout.items()},
                 group_size={m: w["group_size"] for m, w in layout.items() if "group_size" in w})
    model.load_state_dict(dict(source_tensors(entry)), assign=True, strict=True)
    run_unpacked(model).eval()
    model.setup_caches(ctx)
    return model


@pytest.mark.parametrize("layout, tied, opts", [
    ("hf", False, QuantOptions("int8")),
    ("hf", True, QuantOptions("int4", embeddings="fp32", head="fp32")),  # float table and head, tied in the source
    ("gguf-q8_0", True, QuantOptions("int4")),  # a source kept as GGUF blocks, its table tied to the head
])
def test_block_by_block_equals_the_whole_models(tmp_path, monkeypatch, layout, tied, opts):
    monkeypatch.setenv("LLAMADESK_HOME", str(tmp_path / "home"))
    path, _ = tiny_checkpoint(tmp_path, layout, tied=tied)
    source = import_checkpoint(path, name="tiny")
    packed = quantize_variant("tiny", opts, report_tokens=0)
    ids = text_ids(source, None, 200)  # windows of 64: three whole ones and a short one, batched apart
    window = 64

    with torch.inference_mode():
        oracle = compare_all(load_model(source, window, precise=True), [load_model(packed, window), whole_unpacked(packed, window)],
                             ids, window)
    steps = []
    got = compare_blockwise(source, packed, ids, window, progress=lambda d, t, w: steps.append((d, t, w)))

    for mine, theirs in zip(got, oracle):
        assert mine.tokens == theirs.tokens == len(ids) - 4  # each window predicts all its tokens but the first
        assert mine.ppl_reference == pytest.approx(theirs.ppl_reference, rel=1e-5)
        assert mine.ppl_candidate == pytest.approx(theirs.ppl_candidate, rel=1e-5)
        assert mine.kl_mean == pytest.approx(theirs.kl_mean, rel=1e-3, abs=1e-7)
        assert mine.top1_agreement == theirs.top1_agreement
    assert steps[0] == (0, 8, "embedding") and steps[-1] == (8, 8, "logits")
    assert [w for _, _, w in steps[1:7]] == ["block 1/2"] * 3 + ["block 2/2"] * 3


def test_the_report_holds_no_model(tmp_path, monkeypatch):
    """What quantize measures goes through blockwise: the three whole models are never built."""
    import app.engine

    monkeypatch.setenv("LLAMADESK_HOME", str(tmp_path / "home"))
    path, _ = tiny_checkpoint(tmp_path, "hf")
    import_checkpoint(path, name="tiny")
    monkeypatch.setattr(app.engine, "build_model", lambda *a, **k: pytest.fail("a whole model was built"))
    report = quantize_variant("tiny", QuantOptions("int8"), report_tokens=64).manifest["quant"]["report"]
    assert report["quality"]["tokens"] == 63 and report["quality"]["weights_only"]["tokens"] == 63


def test_quantize_and_eval_off_a_terminal_say_each_step_on_stderr(tmp_path, monkeypatch, capsys):
    from app.cli import main

    monkeypatch.setenv("LLAMADESK_HOME", str(tmp_path / "home"))
    path, _ = tiny_checkpoint(tmp_path, "hf")
    import_checkpoint(path, name="tiny")
    capsys.readouterr()  # what making the checkpoint printed
    assert main(["quantize", "tiny", "--scheme", "int8"]) == 0
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert lines[:2] == ["Packing tiny to int8", "Measuring quality on 2048 tokens of Python's reference text"]
    assert out == ""
    assert main(["eval", "tiny:int8", "--tokens", "64", "--window", "32"]) == 0
    out, err = capsys.readouterr()
    assert err == ""  # a short run off a terminal: the answer alone
    assert out.startswith("tiny:int8: perplexity ")  # the answer alone on stdout


def test_a_long_step_off_a_terminal_adds_a_line_every_ten_seconds(monkeypatch, capsys):
    from app import cli

    now = [0.0]
    monkeypatch.setattr("time.monotonic", lambda: now[0])
    with cli._Steps() as steps:
        steps.say("Packing x to int4")
        for i in range(1, 40):
            now[0] = i * 1.0
            steps.progress(i, 39, "layers.3.attention.wq")
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["Packing x to int4", "  layers.3.attention.wq 10/39 [10 s]", "  layers.3.attention.wq 20/39 [20 s]",
                     "  layers.3.attention.wq 30/39 [30 s]"]


def test_the_import_quality_line_scores_fewer_tokens_on_bigger_models():
    from app.variants import quick_tokens

    smollm2 = ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, ffn_dim=1536, tie_embeddings=True)
    issue_1_2b = ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=49152, ffn_dim=8192)
    llama3_8b = ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim=14336)
    assert [quick_tokens(a) for a in (smollm2, issue_1_2b, llama3_8b)] == [256, 256, 64]


def test_import_of_a_float_source_ends_with_one_quality_line(tmp_path, monkeypatch, capsys):
    from app.cli import main

    monkeypatch.setenv("LLAMADESK_HOME", str(tmp_path / "home"))
    path, _ = tiny_checkpoint(tmp_path, "hf")
    assert main(["import", str(path), "--name", "tiny"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "perplexity" in line]
    # 256 tokens in one window: 255 predictions
    assert len(lines) == 1 and lines[0].startswith("tiny:int8 against tiny:source on 255 tokens: perplexity ")
