"""The quantizer on the real default model: SmolLM2-135M-Instruct, imported from its Q4_1 GGUF."""
import pytest

from agreement import assert_agree, forced_logits, greedy_answer
from app import store
from app.engine import Engine, choose_decoder, load_model
from app.variants import quantize_variant, write_float_copy
from model.generate import SamplingParams
from model.tokenizer import load_tokenizer
from quant.quantize import QuantOptions

pytestmark = pytest.mark.e2e
PROMPT = ("<|im_start|>user\nWrite a short, cheerful story about a small robot who learns to paint. "
          "Describe the colours it discovers, the first picture it makes, and what its friends say "
          "when they see it hanging on the workshop wall.<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def variants(default_home):
    """int4, int8 and nf4 variants in the per-machine test home, made once per machine (again
    when a cached one predates what the tests below read)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMADESK_HOME", str(default_home))
        have = {e.variant: e for e in store.list_entries()}
        for scheme in ("int4", "int8", "nf4"):
            quant = have[scheme].manifest["quant"] if scheme in have else {}
            quality = (quant.get("report") or {}).get("quality") or {}
            head = quant.get("layout", {}).get("output", {})
            wq = quant.get("layout", {}).get("layers.0.attention.wq", {})
            # made before the report's `weights_only`, before the Q8_0 table's own grid as head,
            # or before int8 was grouped (one scale per 32)
            if ("weights_only" not in quality or head.get("scheme") == "fp16"
                    or (scheme == "int8" and wq.get("group_size") != 32)):
                quantize_variant("smollm2-135m-instruct", QuantOptions(scheme), replace=True)
        if "float" not in have:  # the source's Q4_1 values in fp32: the reference that runs fast
            write_float_copy(store.find("smollm2-135m-instruct:source"))
        yield {e.variant: e for e in store.list_entries()}


def _quality(variants, scheme):
    return variants[scheme].manifest["quant"]["report"]["quality"]


def test_int4_repacks_the_q4_1_grid_exactly(variants):
    report = variants["int4"].manifest["quant"]["report"]
    blocks = [r for r in report["tensors"] if r["name"].startswith("layers.")]
    assert len(blocks) == 30 * 7 and all(r["sqnr_db"] == float("inf") for r in blocks)
    head = next(r for r in report["tensors"] if r["name"] == "output")
    assert head["scheme"] == "int8" and head["group_size"] == 32 and head["sqnr_db"] == float("inf")


def test_int4_weights_alone_are_the_source(variants):
    """Blocks on the Q4_1 grid and the head on the Q8_0 grid: at the source's arithmetic the
    variant predicts exactly what the source does; the runtime's ~1.5% of top-1 flips (near-ties)
    come from the bf16 kernels."""
    weights = _quality(variants, "int4")["weights_only"]
    assert weights["top1_agreement"] == 1.0 and weights["ppl_change"] == 0.0 and weights["kl_mean"] == 0.0


def test_int4_perplexity_on_the_default_text_is_within_a_tenth_of_a_percent(variants, monkeypatch):
    """The issue's acceptance, as `llamadesk eval` measures it: 8192 tokens, 512-token windows."""
    from app.variants import eval_model

    monkeypatch.setenv("LLAMADESK_HOME", str(variants["source"].path.parents[2]))
    (_, n, source), (_, _, int4) = (eval_model(f"smollm2-135m-instruct:{v}", None, 8192) for v in ("source", "int4"))
    assert n == 8192
    assert 0 <= int4 / source - 1 < 0.001  # measured +0.040%


def test_int8_costs_under_half_a_percent_of_perplexity(variants):
    quality = _quality(variants, "int8")
    assert quality["ppl_change"] < 0.005
    assert quality["weights_only"]["ppl_change"] < 0.005


def test_int8_top1_comes_from_its_weights_not_its_kernels(variants):
    """int8 with one fp16 scale per 32 (as Q8_0) re-grids a Q4_1 source: ~97.9% top-1 over 4096
    tokens, as llama.cpp's own Q8_0 of it (97.97%, tests/bench/int8_vs_q8_0.py); its kernel is
    fp32, so as it runs it predicts as its weights do. A guard against regressions."""
    quality = _quality(variants, "int8")
    assert quality["weights_only"]["top1_agreement"] > 0.965
    assert abs(quality["top1_agreement"] - quality["weights_only"]["top1_agreement"]) < 0.01


def test_nf4_is_reported_honestly(variants):
    q = variants["nf4"].manifest["quant"]["report"]["quality"]
    assert q["ppl_change"] > 0.05  # NF4's grid does not fit a Q4_1 source: it loses real quality


# Teacher-forced logits of the variant against the source's, by tests/agreement.py's rule. The
# tolerances (logit units; the logits span ~32 here) stand ~1.5x above the largest difference
# measured on AVX-512 and AVX2 builds of torch's kernels (ATEN_CPU_CAPABILITY=avx2): precise
# 0.22 / 0.20, bf16 kernels 0.48 / 0.47. At step 61 the source's two best tokens are 0.024
# apart: the step where free-running greedy answers parted on AVX2.
PRECISE_TOL = 0.35
FAST_TOL = 0.75


@pytest.fixture(scope="module")
def source_answer(variants):
    """The prompt's first 64 ids, the source's 64 greedy tokens and its logits before each: its
    Q4_1 values in fp32 (its :float copy; the source's own blocks give the same, slower)."""
    ids = load_tokenizer(variants["source"].path).encode(PROMPT)[:64]
    model = load_model(variants["float"], 256)
    decoder = choose_decoder(model)
    answer = greedy_answer(model, ids, 64, decoder)
    return ids, answer, forced_logits(model, ids, answer, decoder)


def test_int4_follows_the_source_when_precise(variants, source_answer):
    """Exact weights (blocks and head), near-fp32 arithmetic: the source's logits within
    PRECISE_TOL at each of 64 steps, and its token wherever it leads by more."""
    ids, answer, reference = source_answer
    assert len(answer) == 64 and load_tokenizer(variants["source"].path).decode(answer).strip()
    precise = load_model(variants["int4"], 256, precise=True)  # runs the Python blocks
    assert_agree(reference, forced_logits(precise, ids, answer, choose_decoder(precise)), PRECISE_TOL)


def test_int4_fast_path_follows_the_source(variants, source_answer):
    """The default path rounds activations and scales to bf16 (the CPU kernels take only bf16),
    as llama.cpp rounds activations to 8 bits for its Q4_1 matmuls: a wider tolerance."""
    ids, answer, reference = source_answer
    fast = load_model(variants["int4"], 256)
    assert_agree(reference, forced_logits(fast, ids, answer, choose_decoder(fast)), FAST_TOL)


@pytest.mark.parametrize("variant", ["int4", "int8", "nf4"])
def test_every_variant_answers(variants, variant, monkeypatch):
    monkeypatch.setenv("LLAMADESK_HOME", str(variants["source"].path.parents[2]))
    engine = Engine.load(f"smollm2-135m-instruct:{variant}", ctx=512)
    reply = "".join(engine.stream([{"role": "user", "content": "What is the capital of France?"}],
                                  SamplingParams(temperature=0), 40))
    assert "Paris" in reply
