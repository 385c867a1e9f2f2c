"""The scheduler above the decoding seam, with a stand-in batched decoder (B rows at once).

`CountingRows` plays the decoder the lead's batched step will be: `step(tokens, positions, slots)`
returns (B, V) logits whose argmax is the fed token + 1, so each row's greedy reply is known in
advance, and it records every call so the tests can see rows join, step together and leave.
"""
from __future__ import annotations

import asyncio

import pytest
import torch

from app.serve.scheduler import Job, QueueFull, Scheduler, _StopText
from model.generate import SamplingParams
from model.tokenizer import StreamDecoder, load_tokenizer

GREEDY = SamplingParams(temperature=0)
pytestmark = pytest.mark.timeout(120)  # a worker that died would leave a job waiting forever


@pytest.fixture(scope="module")
def tokenizer(default_home):
    return load_tokenizer(default_home / "models" / "smollm2-135m-instruct" / "source")


class CountingRows:
    def __init__(self, tokenizer, max_rows: int, ctx: int = 64):
        self.tokenizer, self.stop_ids, self.max_rows, self.ctx = tokenizer, {0}, max_rows, ctx
        self.vocab = tokenizer.vocab_size
        self.calls: list[tuple] = []
        self.slots_in_use: set[int] = set()

    def _next(self, token: int) -> torch.Tensor:
        logits = torch.zeros(self.vocab)
        logits[token + 1] = 1.0
        return logits

    def prefill(self, slot, ids, cancel=None):
        assert slot not in self.slots_in_use and 0 <= slot < self.max_rows
        self.slots_in_use.add(slot)
        self.calls.append(("prefill", slot, len(ids)))
        return self._next(ids[-1])

    def step(self, tokens, positions, slots):
        assert len(set(slots)) == len(slots) and set(slots) <= self.slots_in_use
        self.calls.append(("step", tuple(tokens), tuple(positions), tuple(slots)))
        return torch.stack([self._next(t) for t in tokens])  # (B, V)

    def release(self, slot):
        self.slots_in_use.remove(slot)


async def _collect(scheduler, job) -> tuple[str, str, str]:
    scheduler.submit(job)
    text = []
    while True:
        kind, value = await job.events.get()
        if kind == "text":
            text.append(value)
        else:
            return "".join(text), kind, value


async def _until_done(*jobs) -> None:
    for job in jobs:
        while (await job.events.get())[0] == "text":
            pass


def _closing(scheduler, coroutine):
    """asyncio.run(coroutine), then the scheduler closed whatever happened."""
    try:
        return asyncio.run(coroutine)
    finally:
        scheduler.close(grace_s=5)


def _run(scheduler, jobs):
    async def main():
        return await asyncio.gather(*(_collect(scheduler, j) for j in jobs))
    try:
        return asyncio.run(main())
    finally:
        scheduler.close(grace_s=5)


def test_rows_step_together_join_and_leave(tokenizer):
    rows = CountingRows(tokenizer, max_rows=4)
    starts = [1000, 2000, 3000, 4000, 5000, 6000]
    lengths = [3, 8, 5, 8, 4, 6]
    jobs = [Job([7, 8, s], GREEDY, n) for s, n in zip(starts, lengths)]
    results = _run(Scheduler(rows, parallel=4, queue=4), jobs)
    for (text, kind, finish), s, n in zip(results, starts, lengths):
        assert (kind, finish) == ("done", "length")
        assert text == tokenizer.decode(range(s + 1, s + 1 + n))
    steps = [c for c in rows.calls if c[0] == "step"]
    assert max(len(c[1]) for c in steps) == 4  # four rows in one pass
    for _, tokens, positions, _ in steps:  # each row's position is its own: prompt 3 + fed tokens
        for t, p in zip(tokens, positions):
            assert p == 3 + (t % 1000) - 1
    # the fifth and sixth jobs joined only as earlier rows left, into a freed slot
    prefills = [c for c in rows.calls if c[0] == "prefill"]
    assert len(prefills) == 6 and len({c[1] for c in prefills}) == 4
    assert rows.slots_in_use == set()


def test_one_row_at_a_time_when_the_decoder_has_one_slot(tokenizer):
    rows = CountingRows(tokenizer, max_rows=1)
    results = _run(Scheduler(rows, parallel=4, queue=4), [Job([5, s], GREEDY, 4) for s in (100, 200, 300)])
    assert [r[0] for r in results] == [tokenizer.decode(range(s + 1, s + 5)) for s in (100, 200, 300)]
    assert all(len(c[1]) == 1 for c in rows.calls if c[0] == "step")


def test_stop_token_and_context_end(tokenizer):
    rows = CountingRows(tokenizer, max_rows=2, ctx=10)
    rows.stop_ids = {rows.vocab - 1}
    stop_at = Job([5, rows.vocab - 3], GREEDY, 50)  # vocab - 2, then the stop id
    full = Job([5, 100], GREEDY, 50)
    (a, _, fa), (b, _, fb) = _run(Scheduler(rows, parallel=2, queue=0), [stop_at, full])
    assert fa == "stop" and a == tokenizer.decode([rows.vocab - 2])
    # 2 prompt tokens in a 10-token context: 8 fed, and the token sampled at the end shown
    assert fb == "length" and full.completion_tokens == 9


def test_queue_bound_and_retry_after(tokenizer):
    rows = CountingRows(tokenizer, max_rows=1)
    scheduler = Scheduler(rows, parallel=1, queue=1)

    async def main():
        jobs = [Job([1, 10], GREEDY, 3), Job([1, 20], GREEDY, 3), Job([1, 30], GREEDY, 3)]
        with scheduler._lock:  # hold the worker so that nothing leaves while we fill the places
            scheduler.submit(jobs[0])
            scheduler.submit(jobs[1])
            with pytest.raises(QueueFull) as e:
                scheduler.submit(jobs[2])
            assert e.value.retry_after >= 1
        await _until_done(*jobs[:2])
    _closing(scheduler, main())


def test_cancel_stops_a_row_before_its_next_step(tokenizer):
    rows = CountingRows(tokenizer, max_rows=2, ctx=20_000)  # its steps take microseconds: room to run
    scheduler = Scheduler(rows, parallel=2, queue=0)

    async def main():
        job = Job([1, 10], GREEDY, 10_000)
        scheduler.submit(job)
        assert (await job.events.get())[0] == "text"
        job.cancel.set()
        steps_then = sum(c[0] == "step" for c in rows.calls)
        while True:
            event = await job.events.get()
            if event[0] != "text":
                return event, steps_then
    try:
        event, steps_then = asyncio.run(main())
    finally:
        scheduler.close(grace_s=5)
    assert event == ("done", "cancelled")
    assert sum(c[0] == "step" for c in rows.calls) <= steps_then + 2


# ---------------------------------------------------------------- stop strings
def _feed(tokenizer, text: str, stops: list[str]) -> tuple[list[str], bool]:
    s = _StopText(StreamDecoder(tokenizer), stops)
    out = []
    for t in tokenizer.encode(text):
        piece, hit = s.push(t)
        out.append(piece)
        if hit:
            return out, True
    out.append(s.flush())
    return out, False


def test_a_stop_string_across_tokens_is_never_sent(tokenizer):
    pieces, hit = _feed(tokenizer, "Red, green. END of list, blue", ["END of"])
    assert hit and "".join(pieces) == "Red, green. "
    assert not any("END" in p for p in pieces)


def test_text_held_back_for_a_possible_stop_comes_out_at_the_end(tokenizer):
    pieces, hit = _feed(tokenizer, "one two thr", ["three"])
    assert not hit and "".join(pieces) == "one two thr"
    assert pieces[-1].endswith("thr")  # held until the reply ended


def test_no_stops_passes_text_through(tokenizer):
    pieces, hit = _feed(tokenizer, "héllo ✓ world", [])
    assert not hit and "".join(pieces) == "héllo ✓ world"


def test_a_failing_row_ends_in_an_error_and_the_next_job_still_runs(tokenizer):
    class OutOfVocab(CountingRows):
        def _next(self, token):
            if token != 666:
                return super()._next(token)
            logits = torch.zeros(self.vocab + 10)
            logits[self.vocab + 5] = 1.0  # an id the tokenizer cannot decode
            return logits

    rows = OutOfVocab(tokenizer, max_rows=1)
    (_, kind, message), (text, kind2, finish) = _run(Scheduler(rows, parallel=1, queue=2),
                                                     [Job([1, 666], GREEDY, 4), Job([1, 100], GREEDY, 3)])
    assert kind == "error" and "not in the vocabulary" in message
    assert (kind2, finish, text) == ("done", "length", tokenizer.decode([101, 102, 103]))


class RunnerUpRows(CountingRows):
    """Favours token + 1 (logit 1.0), then token + 2 (0.5): a penalty on token + 1 makes it + 2."""

    def _next(self, token: int) -> torch.Tensor:
        logits = torch.zeros(self.vocab)
        logits[token + 1], logits[token + 2] = 1.0, 0.5
        return logits


def test_the_repeat_penalty_counts_the_reply_not_the_prompt(tokenizer):
    """A prompt ending in token 4000 and holding 4001, the decoder's favourite next token: a
    penalty on the prompt's tokens would push the reply to 4002; on the reply's own tokens (as
    the chat and ask count it) the reply goes 4001, 4002, 4003."""
    rows = RunnerUpRows(tokenizer, max_rows=1)
    params = SamplingParams(temperature=0, repetition_penalty=10.0, repeat_last_n=64)
    [(text, kind, finish)] = _run(Scheduler(rows, parallel=1, queue=0), [Job([4001, 7, 4000], params, 3)])
    steps = [c for c in rows.calls if c[0] == "step"]
    assert (kind, finish) == ("done", "length")
    assert [c[1] for c in steps] == [(4001,), (4002,)]


class SlowRows(CountingRows):
    """Steps of 2 ms, as the default model's on 2 threads."""

    def step(self, tokens, positions, slots):
        import time

        time.sleep(0.002)
        return super().step(tokens, positions, slots)


def test_a_rows_text_reaches_the_loop_in_a_few_chunks_first_piece_at_once(tokenizer):
    """Each hand-over wakes the event loop and costs it a chunk a row; a row's pieces are joined
    between hand-overs (at most every STREAM_INTERVAL_S), its first piece and its end go at once."""
    from app.serve.scheduler import STREAM_INTERVAL_S

    job = Job([7, 8, 1000], GREEDY, 60)

    async def main():
        scheduler = Scheduler(SlowRows(tokenizer, max_rows=1, ctx=256), parallel=1, queue=0)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        scheduler.submit(job)
        chunks = []
        try:
            while True:
                kind, value = await job.events.get()
                if kind != "text":
                    return chunks, value, loop.time() - t0
                chunks.append(value)
        finally:
            scheduler.close(grace_s=5)

    chunks, finish, seconds = asyncio.run(main())
    assert finish == "length" and "".join(chunks) == "".join(tokenizer.decode([t]) for t in range(1001, 1061))
    assert chunks[0] == tokenizer.decode([1001])  # handed alone, not held for the next ones
    # 60 steps of >= 2 ms: a chunk each STREAM_INTERVAL_S at most, however long the reply took here
    assert 2 <= len(chunks) <= 2 + seconds / STREAM_INTERVAL_S, (len(chunks), seconds)


def test_text_held_for_joining_goes_out_before_a_new_rows_prompt(tokenizer):
    """A prompt can take seconds on a CPU: what the running rows wrote so far is handed over
    before it, not held behind it."""
    pending_at_prefill = []

    class Watched(SlowRows):
        def prefill(self, slot, ids, cancel=None):
            pending_at_prefill.append(sum(event[0] == "text" for _, event in scheduler._out))
            return super().prefill(slot, ids, cancel)

    scheduler = Scheduler(Watched(tokenizer, max_rows=2, ctx=256), parallel=2, queue=0)

    async def main():
        first = Job([7, 8, 1000], GREEDY, 40)
        scheduler.submit(first)
        assert (await first.events.get())[0] == "text"
        await asyncio.sleep(0.01)  # a few steps of text, held for joining
        second = Job([7, 8, 2000], GREEDY, 4)
        scheduler.submit(second)
        await _until_done(first, second)

    _closing(scheduler, main())
    assert pending_at_prefill == [0, 0]


def test_joined_keeps_each_jobs_order_and_joins_only_neighbouring_text():
    from app.serve.scheduler import _joined

    a, b = Job([1], GREEDY, 1), Job([2], GREEDY, 1)
    out = [(a, ("text", "x")), (b, ("text", "1")), (a, ("text", "y")), (b, ("text", "2")),
           (a, ("done", "stop")), (b, ("text", "3")), (a, ("text", "late"))]
    assert _joined(out) == [(a, ("text", "xy")), (b, ("text", "123")), (a, ("done", "stop")),
                            (a, ("text", "late"))]


def test_calls_run_on_the_decode_thread_and_let_go_of_what_they_return(tokenizer):
    import threading
    import weakref

    from app.serve.scheduler import ShuttingDown

    scheduler = Scheduler(None, parallel=1, queue=0)
    try:
        assert scheduler.call(threading.current_thread) is scheduler._thread
        assert scheduler.call(lambda: scheduler.call(lambda: 7)) == 7  # from the thread itself: inline
        with pytest.raises(ZeroDivisionError):
            scheduler.call(lambda: 1 / 0)

        class Model:
            pass

        kept = weakref.ref(scheduler.call(Model))
        import gc

        gc.collect()
        assert kept() is None  # a loaded model is freed when the server lets go of it (keep_alive)
    finally:
        scheduler.close(grace_s=0)
    with pytest.raises(ShuttingDown):
        scheduler.call(lambda: 1)
