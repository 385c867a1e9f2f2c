"""Sampling settings on the real default model, through the engine the CLI and the chat app use."""
from __future__ import annotations

import pytest

from model.generate import SamplingParams

pytestmark = pytest.mark.e2e

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
TEA = [{"role": "user", "content": "Write a two-line poem about tea."}]


@pytest.fixture(scope="module")
def engine(default_home):
    from app.engine import Engine

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMADESK_HOME", str(default_home))
        yield Engine.load("smollm2-135m-instruct:source", ctx=512)


def reply(engine, messages, max_tokens=40, **params) -> str:
    return "".join(engine.stream(messages, SamplingParams(**params), max_tokens))


def test_a_tiny_temperature_answers_exactly_as_greedy(engine):
    greedy = reply(engine, FRANCE, temperature=0)
    assert "Paris" in greedy
    for t in (1e-38, 1e-10, 9e-5):
        assert reply(engine, FRANCE, temperature=t, top_p=0.9, seed=1) == greedy


def test_the_same_seed_gives_the_same_text_whatever_ran_before(engine):
    first = reply(engine, TEA, temperature=0.9, seed=11)
    again = reply(engine, TEA, temperature=0.9, seed=11)  # a regenerate: the whole prompt is cached
    reply(engine, [{"role": "user", "content": "Tell me about cats."}], max_tokens=20, temperature=0.9)
    after_another = reply(engine, TEA, temperature=0.9, seed=11)  # a second request
    assert first.strip() and first == again == after_another


def test_the_repeat_penalty_does_not_punish_the_end_of_turn(engine):
    question = [{"role": "user", "content": "Is water wet? Answer yes or no."}]
    "".join(engine.stream(question, SamplingParams(temperature=0, repetition_penalty=1.5), 200))
    # the penalty counts the reply's own tokens (never the template's end of turn): a heavy one
    # makes the answer ramble on (84 tokens here) but it still ends by itself
    assert engine.last.new_tokens < 200, engine.last.new_tokens
