"""The one place the server touches a model: jobs in, text pieces out, a bounded queue.

    HTTP handlers --submit(Job)--> Scheduler --admit--> rows (at most `parallel`) --step--> Rows
          ^                           |                                                  |
          +--- job.events (asyncio) <-+---------- sample, detokenize, stop strings <-----+

`Rows` is the seam to the model: `prefill(slot, ids, cancel) -> logits (V,)` (None if cancelled) and
`step(tokens, positions, slots) -> logits (B, V)`, one row per active request, each with its own
position and KV-cache slot. `EngineRows` runs them on an `Engine` with `--parallel` cache rows
through its Decoder.
"""
from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from model.generate import SamplingParams, sample_rows
from model.tokenizer import StreamDecoder

from ..errors import UserError


# How often the decode thread hands text to the event loop while rows only grow. Each hand-over
# wakes the loop, whose Python (an SSE or NDJSON chunk a row) then holds the GIL the decode thread
# needs: a hand-over each step took 0.35 ms beside a 3.5 ms 4-row step. A row's first text and
# its end go at once; in between its pieces are joined into one chunk (vLLM's --stream-interval).
STREAM_INTERVAL_S = 0.02


class QueueFull(Exception):
    """Every slot and queue place is taken; `retry_after` is a guess in whole seconds."""

    def __init__(self, retry_after: int):
        super().__init__("the server is busy")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    pass


@dataclass
class Job:
    """One request's generation. The worker thread fills `events` through the loop:
    ("text", str) pieces, then one ("done", finish_reason) or ("error", message).
    `finish_reason` is "stop" (end of turn or a stop string), "length" (max_tokens or the
    context's end) or "cancelled" (client gone or shutdown)."""
    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    stop: list[str] = field(default_factory=list)
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    completion_tokens: int = 0
    submitted: float = 0.0
    started: float = 0.0
    first_token: float = 0.0
    finished: float = 0.0
    text_handed: bool = False  # some of its text has gone to the event loop (Scheduler._flush)


# ---------------------------------------------------------------- the seam to the model
class EngineRows:
    """Decoding rows over one loaded `Engine`: `slots` KV-cache rows of the planned context each,
    fed together through the engine's decoder (model/generate.py's Decoder: B rows, each at its
    own position in its own cache row, a row's logits independent of the others).

    Every prompt is prefilled whole. Reusing a cached prefix (as the chat does) changes the first
    logits in the third decimal (the cache holds bf16; a fresh prefill attends over exact values),
    enough to change a seeded sample: a request's text must not depend on what ran before it.
    """

    def __init__(self, engine, slots: int = 1):
        self.engine = engine
        if slots > 1:
            engine.use_cache_rows(slots)
        self.max_rows = slots
        self.ctx = engine.ctx  # positions per slot
        self.tokenizer, self.stop_ids = engine.tokenizer, engine.stop_ids

    def prefill(self, slot: int, ids: list[int], cancel: threading.Event | None = None) -> torch.Tensor | None:
        """Run `ids` (the whole prompt) into `slot`'s cache; the last position's logits (V,), or
        None once `cancel` is set (checked before every layer: a client that left waits for one
        layer over one chunk, not the whole prompt)."""
        from model.generate import prefill

        # the engine's record of what its cache holds stays empty while the server uses it, so
        # the engine's own `stream` never reuses what these rows wrote
        self.engine._cached = []
        return prefill(self.engine.model, ids, 0, cache_row=slot, cancel=cancel, decoder=self.engine.decoder)

    def step(self, tokens: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        """Feed token b at positions[b] into cache slot slots[b]; logits (B, V)."""
        return self.engine.decoder.decode(torch.tensor(tokens), torch.tensor(positions), torch.tensor(slots))

    def release(self, slot: int) -> None:
        """The row in `slot` is done; its cache slot is free for the next one."""


# ---------------------------------------------------------------- one active request
class _Row:
    def __init__(self, job: Job, slot: int, tokenizer, stop_ids: set[int]):
        self.job, self.slot, self.stop_ids = job, slot, stop_ids
        self.pos = len(job.prompt)
        # the reply's own tokens: the repeat penalty counts these, as the chat and ask do (counting
        # the prompt's words pushed small models out of the prompt's language)
        self.history: list[int] = []
        self.generator = torch.Generator().manual_seed(job.params.seed) if job.params.seed is not None else None
        self.text = _StopText(StreamDecoder(tokenizer), job.stop)
        self.logits: torch.Tensor | None = None

    @property
    def last(self) -> int:
        """The token the next step feeds: the reply's latest, else the prompt's last."""
        return self.history[-1] if self.history else self.job.prompt[-1]

    def take(self, token: int) -> tuple[str, str | None]:
        """Account for a sampled token: (the text to send, "" for none; the finish reason when
        this row is done, else None)."""
        job = self.job
        if token in self.stop_ids:
            return "", "stop"
        job.completion_tokens += 1
        self.history.append(token)
        piece, hit = self.text.push(token)
        if hit:
            return piece, "stop"
        return piece, "length" if job.completion_tokens >= job.max_tokens else None


class _StopText:
    """Detokenizes a row and ends it at the first stop string, never sending any part of one:
    text that could still grow into a stop string is held back until it cannot."""

    def __init__(self, decoder: StreamDecoder, stops: list[str]):
        self.decoder, self.stops = decoder, [s for s in stops if s]
        self.held = ""

    def push(self, token: int) -> tuple[str, bool]:
        return self._feed(self.decoder.push(token))

    def flush(self) -> str:
        piece, hit = self._feed(self.decoder.flush())
        return piece if hit else piece + self.held

    def _feed(self, piece: str) -> tuple[str, bool]:
        text = self.held + piece
        if not self.stops:
            self.held = ""
            return text, False
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.held = ""
            return text[:cut], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False


# ---------------------------------------------------------------- the scheduler
class Scheduler:
    """Admits jobs up to `parallel` active plus `queue` waiting, and decodes the active ones.

    Active jobs run as rows of `rows` (at most rows.max_rows at once); each step feeds every
    active row its last token, samples each row's next token from its own logits and generator,
    and lets rows join (prefill) and leave (stop, length, cancel) between steps.
    """

    def __init__(self, rows: EngineRows | None, parallel: int = 4, queue: int = 16):
        if parallel < 1 or queue < 0:
            raise UserError("--parallel must be at least 1 and --queue at least 0")
        self.rows, self.parallel, self.queue_size = rows, parallel, queue
        self.tokenizer, self.stop_ids = (rows.tokenizer, rows.stop_ids) if rows is not None else (None, set())
        self._calls: deque[tuple[Future, object]] = deque()  # run on the worker thread (call)
        self._stopped = False  # the worker has ended: calls are refused (under the lock)
        self._waiting: deque[Job] = deque()
        self._active: list[_Row] = []
        self._lock = threading.Condition()
        self._closing = False
        self._seconds_per_job = 2.0  # a running estimate for Retry-After
        self._out: list[tuple[Job, tuple]] = []  # events not handed over yet, for _flush
        self._handed_at = 0.0  # time.monotonic() of the last hand-over
        self.last_finished = time.monotonic()  # when the last job ended (keep_alive counts from it)
        self._thread = threading.Thread(target=self._run, name="llamadesk-decode", daemon=True)
        self._thread.start()

    # -- called from the event loop
    def submit(self, job: Job) -> None:
        """Queue `job`; raises QueueFull when every slot and queue place is taken."""
        job.loop = job.loop or asyncio.get_running_loop()
        job.events = job.events or asyncio.Queue()
        with self._lock:
            if self._closing or self.rows is None:
                raise ShuttingDown()
            if len(self._active) + len(self._waiting) >= self.parallel + self.queue_size:
                turns = (len(self._waiting) + 1) / min(self.parallel, self.rows.max_rows)
                raise QueueFull(max(1, math.ceil(turns * self._seconds_per_job)))
            job.submitted = time.monotonic()
            self._waiting.append(job)
            self._lock.notify()

    def counts(self) -> dict:
        with self._lock:
            return {"active": len(self._active), "queued": len(self._waiting),
                    "parallel": self.parallel, "queue": self.queue_size,
                    "rows": self.rows.max_rows if self.rows is not None else 0}

    def idle(self) -> bool:
        with self._lock:
            return not self._active and not self._waiting

    def replace(self, rows: EngineRows | None) -> None:
        """Decode on `rows` from now on (None: nothing loaded); only while idle."""
        with self._lock:
            assert not self._active and not self._waiting, "replacing the rows under running requests"
            self.rows = rows
            if rows is not None:
                self.tokenizer, self.stop_ids = rows.tokenizer, rows.stop_ids

    def call(self, fn):
        """fn() on the decode thread, between steps; waits, returns its value or raises its
        exception. Models are loaded through it: every torch op of a model on the one thread
        (app.tui.backend.ModelThread says why: loaded on the main thread, the server decoded with
        an OpenMP pool a core more than the machine has)."""
        if threading.current_thread() is self._thread:
            return fn()
        future: Future = Future()
        with self._lock:
            if self._stopped:  # nobody would run it
                raise ShuttingDown()
            self._calls.append((future, fn))
            self._lock.notify()
        return future.result()

    def close(self, grace_s: float = 10.0, join_s: float | None = 5.0) -> None:
        """Stop admitting; let jobs finish for up to `grace_s`, cancel the rest, end the worker
        (waiting up to `join_s` for it, None: until it ends; a load in progress cannot be stopped)."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._active and not self._waiting:
                    break
            time.sleep(0.02)
        with self._lock:
            for job in [r.job for r in self._active] + list(self._waiting):
                job.cancel.set()
            self._lock.notify()
        self._thread.join(timeout=join_s)

    # -- the worker thread
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while self._round():
                    pass
        finally:  # whatever ended the worker, a call still queued is told, never left waiting
            with self._lock:
                self._stopped = True
                calls, self._calls = self._calls, deque()
            for future, _ in calls:
                future.set_exception(ShuttingDown())

    def _round(self) -> bool:
        """Calls, joining rows' prompts, one step of the active rows; False once closed and done."""
        with self._lock:
            while not self._active and not self._waiting and not self._calls:
                if self._closing:
                    return False
                self._lock.wait()
            calls, self._calls = self._calls, deque()
            joining = self._admit() if self.rows is not None else []
        while calls:
            _run_call(*calls.popleft())  # popped: the result (a loaded model) is not kept here
        if joining:
            self._flush(now=True)  # the text held so far does not wait behind the prompts
        for row in joining:
            self._prefill(row)
        if self._active:
            try:
                self._step()
            except Exception as e:  # sampling or detokenizing failed: end those rows, keep serving
                for row in list(self._active):
                    self._drop(row, error=f"{type(e).__name__}: {e}")
        self._flush()
        with self._lock:
            return not (self._closing and not self._active and not self._waiting and not self._calls)

    def _admit(self) -> list[_Row]:
        """Move waiting jobs into free slots (under the lock); cancelled ones leave at once."""
        joining = []
        used = {r.slot for r in self._active}
        while self._waiting and len(self._active) < min(self.parallel, self.rows.max_rows):
            job = self._waiting.popleft()
            if job.cancel.is_set():
                self._finish_job(job, "cancelled")
                continue
            slot = min(set(range(self.rows.max_rows)) - used)
            used.add(slot)
            row = _Row(job, slot, self.tokenizer, self.stop_ids)
            self._active.append(row)
            joining.append(row)
        return joining

    def _prefill(self, row: _Row) -> None:
        row.job.started = time.monotonic()
        try:
            row.logits = self.rows.prefill(row.slot, row.job.prompt, row.job.cancel)
        except Exception as e:  # one bad request must not take the worker down
            self._drop(row, error=f"{type(e).__name__}: {e}")
            return
        if row.logits is None:  # the client left during its prompt
            self._drop(row, "cancelled")

    def _step(self) -> None:
        ready: list[_Row] = []
        for row in list(self._active):
            if row.logits is None:
                continue
            if row.job.cancel.is_set():
                self._drop(row, "cancelled")
                continue
            ready.append(row)
        if not ready:
            return
        tokens = sample_rows(torch.stack([r.logits for r in ready]), [r.job.params for r in ready],
                             [r.history for r in ready], [r.generator for r in ready])
        feed: list[_Row] = []
        for row, token in zip(ready, tokens):
            job = row.job
            if not job.first_token:
                job.first_token = time.monotonic()
            piece, reason = row.take(token)
            if piece:
                self._emit(job, "text", piece)
            if reason is None and row.pos >= self.rows.ctx:
                reason = "length"
            if reason is not None:
                self._drop(row, reason)
            else:
                feed.append(row)
        if not feed:
            return
        try:
            logits = self.rows.step([r.last for r in feed], [r.pos for r in feed], [r.slot for r in feed])
        except Exception as e:
            for row in feed:
                self._drop(row, error=f"{type(e).__name__}: {e}")
            return
        for b, row in enumerate(feed):  # logits: (B, V)
            row.logits = logits[b]
            row.pos += 1

    def _drop(self, row: _Row, reason: str = "", error: str = "") -> None:
        tail = row.text.flush() if not error and reason != "cancelled" else ""
        if tail:
            self._emit(row.job, "text", tail)
        self.rows.release(row.slot)
        with self._lock:
            self._active.remove(row)
        if error:
            row.job.finished = time.monotonic()
            self._emit(row.job, "error", error)
        else:
            self._finish_job(row.job, reason)

    def _finish_job(self, job: Job, reason: str) -> None:
        job.finished = self.last_finished = time.monotonic()
        if job.started:
            self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * (job.finished - job.started)
        self._emit(job, "done", reason)

    def _emit(self, job: Job, *event) -> None:
        self._out.append((job, event))

    def _flush(self, now: bool = False) -> None:
        """Hand what was emitted to the event loops: one wake-up a loop, not one a token and
        client, and with rows only growing at most every STREAM_INTERVAL_S (a first piece or an
        end at once; everything when `now`), each row's pieces joined into one."""
        urgent = now or any(event[0] != "text" or not job.text_handed for job, event in self._out)
        if not self._out or not (urgent or time.monotonic() - self._handed_at >= STREAM_INTERVAL_S):
            return
        self._handed_at = time.monotonic()
        out, self._out = _joined(self._out), []
        by_loop: dict = {}
        for job, event in out:
            job.text_handed = job.text_handed or event[0] == "text"
            by_loop.setdefault(job.loop, []).append((job, event))
        for loop, events in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, events)
            except RuntimeError:  # the server's loop has ended: nobody is left to tell
                for job, _ in events:
                    job.cancel.set()


def _run_call(future: Future, fn) -> None:
    try:
        with torch.inference_mode(False):  # a load, as it would run anywhere else
            future.set_result(fn())
    except BaseException as e:  # the caller raises it
        future.set_exception(e)


def _joined(out: list[tuple[Job, tuple]]) -> list[tuple[Job, tuple]]:
    """`out` with each job's consecutive text events joined into one, in order."""
    joined: list[tuple[Job, tuple]] = []
    last: dict[int, int] = {}  # id(job) -> index in joined of its latest text event, while it is its last event
    for job, event in out:
        at = last.pop(id(job), None)
        if event[0] == "text" and at is not None:
            joined[at] = (job, ("text", joined[at][1][1] + event[1]))
            last[id(job)] = at
            continue
        if event[0] == "text":
            last[id(job)] = len(joined)
        joined.append((job, event))
    return joined


def _deliver(events: list) -> None:
    """On the event loop: each (job, event) into its job's queue, in the order emitted."""
    for job, event in events:
        job.events.put_nowait(event)
