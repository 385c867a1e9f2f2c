"""The quantizer on the real default model: SmolLM2-135M-Instruct, imported from its Q4_1 GGUF."""
import pytest
import torch

from app import store
from app.engine import Engine, load_model
from app.variants import quantize_variant
from model.generate import SamplingParams, generate
from model.tokenizer import load_tokenizer
from quant.quantize import QuantOptions

pytestmark = pytest.mark.e2e
PROMPT = ("<|im_start|>user\nWrite a short, cheerful story about a small robot who learns to paint. "
          "Describe the colours it discovers, the first picture it makes, and what its friends say "
          "when they see it hanging on the workshop wall.<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def variants(default_home):
    """int4, int8 and nf4 variants in the per-machine test home, made once per machine."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMADESK_HOME", str(default_home))
        have = {e.variant for e in store.list_entries()}
        for scheme in ("int4", "int8", "nf4"):
            if scheme not in have:
                quantize_variant("smollm2-135m-instruct", QuantOptions(scheme))
        yield {e.variant: e for e in store.list_entries()}


def test_int4_repacks_the_q4_1_grid_exactly(variants):
    report = variants["int4"].manifest["quant"]["report"]
    blocks = [r for r in report["tensors"] if r["name"].startswith("layers.")]
    assert len(blocks) == 30 * 7 and all(r["sqnr_db"] == float("inf") for r in blocks)
    assert report["quality"]["ppl_change"] < 0.001  # the acceptance bound: +0.1%


def test_int8_costs_under_half_a_percent_of_perplexity(variants):
    assert variants["int8"].manifest["quant"]["report"]["quality"]["ppl_change"] < 0.005


def test_nf4_is_reported_honestly(variants):
    q = variants["nf4"].manifest["quant"]["report"]["quality"]
    assert q["ppl_change"] > 0.05  # NF4's grid does not fit a Q4_1 source: it loses real quality


def _greedy(entry, ids, precise=False):
    model = load_model(entry, 256, precise=precise)
    return list(generate(model, ids, 32, params=SamplingParams(temperature=0)))


def test_int4_greedy_answer_equals_the_source_when_precise(variants):
    """Exact weights, fp32-level arithmetic: the same 32 greedy tokens as the fp32 source."""
    tok = load_tokenizer(variants["source"].path)
    ids = tok.encode(PROMPT)[:64]
    source = _greedy(variants["source"], ids)
    assert _greedy(variants["int4"], ids, precise=True) == source
    assert tok.decode(source).strip()


def test_int4_fast_path_agrees_with_the_source_on_the_answer_start(variants):
    """The default path rounds activations and scales to bf16 (the CPU kernels take only bf16),
    as llama.cpp rounds activations to 8 bits for its Q4_1 matmuls: the text starts the same."""
    tok = load_tokenizer(variants["source"].path)
    ids = tok.encode(PROMPT)[:64]
    source, fast = _greedy(variants["source"], ids), _greedy(variants["int4"], ids)
    assert fast[:8] == source[:8]


@pytest.mark.parametrize("variant", ["int4", "int8", "nf4"])
def test_every_variant_answers(variants, variant, monkeypatch):
    monkeypatch.setenv("LLAMADESK_HOME", str(variants["source"].path.parents[2]))
    engine = Engine.load(f"smollm2-135m-instruct:{variant}", ctx=512)
    reply = "".join(engine.stream([{"role": "user", "content": "What is the capital of France?"}],
                                  SamplingParams(temperature=0), 40))
    assert "Paris" in reply
