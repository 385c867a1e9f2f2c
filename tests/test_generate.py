"""Generation and sampling on a tiny random model: the functions the CLI and the chat app share."""
import threading

import pytest
import torch

from model.args import ModelArgs
from model.generate import (EagerDecoder, SamplingParams, decode_one_token, generate, prefill, prefill_chunk,
                            sample, sample_rows)
from model.model import Transformer


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, ffn_dim=128)).eval()
    model.setup_caches(128)
    return model


def test_greedy_picks_the_argmax():
    logits = torch.tensor([0.1, 3.0, -2.0, 2.9])
    assert sample(logits, SamplingParams(temperature=0)) == 1


def test_repetition_penalty_demotes_seen_tokens():
    logits = torch.tensor([0.0, 3.0, 2.5, -1.0])
    params = SamplingParams(temperature=0, repetition_penalty=1.5)
    assert sample(logits, params, history=[1]) == 2  # 3.0 / 1.5 = 2.0 < 2.5
    assert sample(logits, params, history=[]) == 1


def test_top_k_one_is_greedy_whatever_the_temperature():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(0)
    picks = {sample(logits, SamplingParams(temperature=5.0, top_k=1), generator=g) for _ in range(20)}
    assert picks == {int(logits.argmax())}


def test_top_p_keeps_only_the_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two tokens only
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    picks = {sample(logits, SamplingParams(temperature=1.0, top_p=0.7), generator=g) for _ in range(200)}
    assert picks == {0, 1}


def test_sampling_draws_tokens_as_often_as_their_probability():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(1)
    picks = torch.tensor([sample(logits, SamplingParams(temperature=1.0), generator=g) for _ in range(4000)])
    freq = torch.bincount(picks, minlength=4).float() / len(picks)
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.025, rtol=0)


def test_top_p_over_a_flat_vocabulary_keeps_the_whole_nucleus():
    # 1000 equally likely tokens but token 0 (a little likelier): top_p 0.9 needs ~900 of them,
    # far past the first candidates looked at
    logits = torch.zeros(1000)
    logits[0] = 1.0
    probs = torch.softmax(logits, 0)
    nucleus = int(((torch.cumsum(probs.sort(descending=True).values, 0) - probs.sort(descending=True).values) < 0.9).sum())
    g = torch.Generator().manual_seed(2)
    picks = [sample(logits, SamplingParams(temperature=1.0, top_p=0.9), generator=g) for _ in range(3000)]
    assert 850 < nucleus < 950
    assert len(set(picks)) > 800  # the whole nucleus is drawn from, not a first slice of it
    assert len(set(picks)) <= nucleus


def test_sampling_params_refuse_nonsense():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2), dict(repetition_penalty=0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_sampling_params_refuse_nan_and_infinity():
    for name in ("temperature", "top_p", "repetition_penalty"):
        for bad in (float("nan"), float("inf"), float("-inf")):
            with pytest.raises(ValueError, match="finite"):
                SamplingParams(**{name: bad})
    for seed in (-1, 2**63):
        with pytest.raises(ValueError, match="seed"):
            SamplingParams(seed=seed)


def test_a_temperature_below_1e_4_is_exactly_greedy():
    # logits where sampling at any real temperature could pick 3: greedy must pick 1, every time
    logits = torch.tensor([0.1, 3.0, -2.0, 3.0 - 1e-6])
    g = torch.Generator().manual_seed(0)
    for t in (1e-38, 1e-20, 5e-5, 0.99e-4, 0.0):
        assert {sample(logits, SamplingParams(temperature=t, top_p=0.5), generator=g) for _ in range(50)} == {1}


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1e-4), SamplingParams(temperature=1e30),
    SamplingParams(temperature=1.0, repetition_penalty=1e-38), SamplingParams(temperature=1.0, repetition_penalty=1e38),
    SamplingParams(temperature=1e-4, top_k=3, top_p=0.01, repetition_penalty=1e-30),
])
def test_extreme_settings_and_broken_logits_still_give_a_token(params):
    """No setting may make the logits NaN or inf (inf - inf is NaN in the softmax, and searching a
    NaN CDF picks garbage): each pick is a real token, and a likely one where one is likely."""
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([-3e38, 3e38, 5.0, -5.0, float("inf"), float("nan"), float("-inf")])
    for history in ([], [0, 1, 2, 3]):
        picks = {sample(logits, params, history, generator=g) for _ in range(20)}
        assert picks <= set(range(7)) and 5 not in picks  # NaN is never picked
    sane = torch.tensor([0.0, 8.0, -8.0])
    assert sample(sane, params, [], generator=g) in (0, 1, 2)


def _greedy_by_the_book(logits: torch.Tensor, penalty: float, history: list[int]) -> int:
    """Greedy as sample() defines it, spelled out: finite logits, the penalty, the first maximum."""
    lo, hi = torch.finfo(torch.float32).min, torch.finfo(torch.float32).max
    x = torch.nan_to_num(logits.float(), nan=lo, posinf=hi, neginf=lo).tolist()
    for t in set(history):
        x[t] = x[t] / penalty if x[t] > 0 else x[t] * penalty
        x[t] = min(max(x[t], lo), hi)  # as _finite does after the penalty
    return x.index(max(x))


@pytest.mark.parametrize("penalty", [1.0, 1.1, 1.5, 0.8])
def test_greedy_with_ties_and_broken_logits_is_the_first_penalized_maximum(penalty):
    """sample() skips the penalty's arithmetic when the raw maximum is untouched by it: the pick
    must be what the whole definition gives, on logits made of ties, zeros, infinities and NaN."""
    g = torch.Generator().manual_seed(0)
    values = torch.tensor([0.0, 1.0, 2.0, -1.0, 2.0, float("inf"), float("-inf"), float("nan"), -3.4028235e38])
    params = SamplingParams(temperature=0, repetition_penalty=penalty)
    for case in range(400):
        logits = values[torch.randint(0, len(values) if case % 2 else 5, (12,), generator=g)]
        history = torch.randint(0, 12, (int(torch.randint(0, 6, (), generator=g)),), generator=g).tolist()
        assert sample(logits, params, history) == _greedy_by_the_book(logits, penalty, history), (logits, history)


def test_rows_sampled_together_pick_what_each_alone_picks():
    """sample_rows (the server's batch) against sample() row by row: greedy rows with and without
    a penalty touching their maximum, NaN and infinite rows, and seeded sampling rows."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 40, generator=g)
    logits[2, 7], logits[3, 1] = float("nan"), float("inf")
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, repetition_penalty=1.3),
              SamplingParams(temperature=0), SamplingParams(temperature=0, repetition_penalty=0.9),
              SamplingParams(temperature=0.8, top_p=0.9, seed=1), SamplingParams(temperature=1.0, top_k=5, seed=2)]
    histories = [[], [int(logits[1].argmax()), 3], [], [1], [4, 4], []]
    picks = sample_rows(logits, params, histories, [torch.Generator().manual_seed(p.seed or 0) for p in params])
    alone = [sample(logits[b], p, histories[b], torch.Generator().manual_seed(p.seed or 0))
             for b, p in enumerate(params)]
    assert picks == alone and picks[1] != int(logits[1].argmax())


def test_the_repetition_penalty_spares_exempt_tokens():
    # token 2 is the end of turn: in the prompt (the template put it there) and the best next token
    logits = torch.tensor([0.0, 2.5, 3.0, -1.0])
    punishing = SamplingParams(temperature=0, repetition_penalty=1.5)
    assert sample(logits, punishing, history=[2]) == 1  # 3.0 / 1.5 = 2.0 < 2.5: the turn runs on
    exempt = SamplingParams(temperature=0, repetition_penalty=1.5, penalty_exempt=frozenset({2}))
    assert sample(logits, exempt, history=[2]) == 2


def test_the_repetition_penalty_looks_back_repeat_last_n_tokens():
    logits = torch.tensor([0.0, 3.0, 2.5, -1.0])
    window = lambda n: SamplingParams(temperature=0, repetition_penalty=1.5, repeat_last_n=n)
    assert sample(logits, window(-1), history=[1, 0, 0]) == 2  # all: token 1 was seen
    assert sample(logits, window(3), history=[1, 0, 0]) == 2
    assert sample(logits, window(2), history=[1, 0, 0]) == 1  # token 1 is out of the window
    assert sample(logits, window(0), history=[1]) == 1  # 0: no penalty at all
    with pytest.raises(ValueError):
        window(-2)


def test_same_seed_same_tokens_other_seed_other_tokens(tiny):
    prompt = [5, 17, 42, 8]
    run = lambda seed: list(generate(tiny, prompt, 24, params=SamplingParams(temperature=1.5, seed=seed)))
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_prefill_then_decode_matches_one_forward(tiny):
    tokens = list(range(3, 40))
    with torch.inference_mode():
        full = tiny(torch.tensor([tokens]))[0]
    last = prefill(tiny, tokens[:30], chunk=7)  # chunked prefill crosses chunk borders
    torch.testing.assert_close(last, full[29], rtol=1e-4, atol=1e-5)
    for i in range(30, 37):
        step = decode_one_token(EagerDecoder(tiny), tokens[i], i)
        torch.testing.assert_close(step, full[i], rtol=1e-4, atol=1e-5)


def test_stop_token_ends_generation_without_being_yielded(tiny):
    prompt = [1, 2, 3]
    greedy = SamplingParams(temperature=0)
    free = list(generate(tiny, prompt, 10, params=greedy))
    stopped = list(generate(tiny, prompt, 10, stop_ids={free[3]}, params=greedy))
    assert stopped == free[: free.index(free[3])]


def test_max_tokens_and_cancel(tiny):
    greedy = SamplingParams(temperature=0)
    assert len(list(generate(tiny, [4, 5], 6, params=greedy))) == 6
    cancel = threading.Event()
    out = []
    for tok in generate(tiny, [4, 5], 50, params=greedy, cancel=cancel):
        out.append(tok)
        if len(out) == 3:
            cancel.set()
    assert len(out) == 3


class LayerCounter:
    """Counts the layers a forward runs and sets `cancel` when layer number `stop_at` (from 1,
    over all chunks) has run: Esc pressed while the model is in the middle of a prompt."""

    def __init__(self, model, cancel: threading.Event, stop_at: int):
        self.ran, self.ran_after_stop, self.cancel, self.stop_at = 0, 0, cancel, stop_at
        self.hooks = [layer.register_forward_hook(self.count) for layer in model.layers]

    def count(self, module, args, output) -> None:
        if self.cancel.is_set():
            self.ran_after_stop += 1
        self.ran += 1
        if self.ran == self.stop_at:
            self.cancel.set()

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


@pytest.mark.parametrize("stop_at", [1, 2, 3])  # inside the first chunk, at its end, inside the second
def test_a_stop_during_the_prompt_lands_before_the_next_layer(tiny, stop_at):
    cancel = threading.Event()
    counter = LayerCounter(tiny, cancel, stop_at)
    try:
        # 5 chunks of 8 tokens, 2 layers each: without the stop, 10 layer runs
        assert prefill(tiny, list(range(3, 43)), chunk=8, cancel=cancel) is None
    finally:
        counter.remove()
    assert counter.ran == stop_at and counter.ran_after_stop == 0


def test_a_stop_during_the_prompt_ends_generation_with_no_token(tiny):
    cancel = threading.Event()
    counter = LayerCounter(tiny, cancel, stop_at=1)
    try:
        assert list(generate(tiny, list(range(3, 43)), 10, params=SamplingParams(temperature=0), cancel=cancel)) == []
    finally:
        counter.remove()
    assert counter.ran == 1
    # the stop's hooks are gone: the next prompt runs whole
    assert prefill(tiny, [4, 5, 6], cancel=threading.Event()) is not None


def test_prefill_chunks_shrink_for_big_layers():
    smollm2_135m = ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, ffn_dim=1536)
    llama_1b = ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim=8192)
    llama_8b = ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim=14336)
    assert (prefill_chunk(smollm2_135m), prefill_chunk(llama_1b), prefill_chunk(llama_8b)) == (512, 128, 64)


def test_generation_stops_at_the_end_of_the_cache(tiny):
    out = list(generate(tiny, [i % 97 for i in range(120)], 50, params=SamplingParams(temperature=0)))
    assert len(out) == 128 - 120 + 1  # the last token is sampled from the final cached position
    with pytest.raises(ValueError, match="context"):
        list(generate(tiny, [1] * 130, 5))


def test_continuing_from_a_cached_prefix_equals_starting_over(tiny):
    greedy = SamplingParams(temperature=0)
    prompt = [9, 8, 7, 6, 5, 4, 3, 2]
    fresh = list(generate(tiny, prompt, 12, params=greedy))
    list(generate(tiny, prompt[:5] + [60, 61], 3, params=greedy))  # fills the cache with another turn
    list(generate(tiny, prompt[:5], 1, params=greedy))
    resumed = list(generate(tiny, prompt[5:], 12, params=greedy, start_pos=5))
    assert resumed == fresh


def test_the_repetition_penalty_looks_at_the_reply_not_the_prompt(tiny, monkeypatch):
    """An answer repeats the question's words on purpose; only the reply's own tokens count."""
    from model import generate as g

    seen = []

    def spy(logits, params, history=(), generator=None):
        seen.append(list(history))
        return sample(logits, params, history, generator)

    monkeypatch.setattr(g, "sample", spy)
    prompt = [5, 17, 42, 8]
    reply = list(generate(tiny, prompt, 6, params=SamplingParams(temperature=0, repetition_penalty=1.5)))
    assert seen == [reply[:i] for i in range(len(reply))] and len(reply) == 6

