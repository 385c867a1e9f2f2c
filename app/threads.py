"""The thread count while decoding: the rule's start value (devices.inference_threads), then
whatever the cores give, step by step.

The rule reads the load once, at load time. A chat or a server runs for hours, and a program
that starts on another core later parks one of our threads behind it: every op then ends at an
OpenMP barrier waiting for that thread (measured, 2 cores, one busy: 2 threads decode ~16x
slower than 1). So the engine's decoder is wrapped in a governor that times each step and now
and then tries one step at a neighbouring thread count, keeping whichever is faster.

Our kernels' arithmetic does not depend on the thread count (quant/csrc/decode_cpu.cpp's
KEY_PARTS; tests/test_gguf_kernels.py), so on GGUF and grouped-int8 models switching mid-reply
changes no logit. Layers that torch's kernels run (dense fp32, an fp16 head) may differ in the last
bits between counts, as they may between machines.
"""
from __future__ import annotations

import gc
import sys
import time
from collections import defaultdict, deque

import torch

# a step this many times its thread count's best recent one collapsed: a core was taken, or the chat
# app's screen or a server's event loop ran a burst of Python on it. Only collapsed steps that go
# on for TAKEN_S mean the core is gone: probe at once then. A screen's burst (a frame, 3-20 ms)
# stalls a step or three; answered by a probe down at each, the chat app spent its replies at
# 1 thread (327 tok/s) where 2 threads beside the same bursts decode 411-427 (measured here).
COLLAPSED, TAKEN_S = 2.5, 0.05
# a probe's count takes over when its step is at most this fraction of the home count's best recent one
BETTER = 0.9
# seconds between probes: from FIRST_PROBE_S after a change, doubling up to LAST_PROBE_S while
# nothing better turns up (a probe at the wrong count costs one slow step)
FIRST_PROBE_S, LAST_PROBE_S = 0.5, 8.0
RECENT = 8  # steps kept per (threads, rows) for the best recent time
# A probe up to a core another program holds does not cost one slow step but seconds: measured
# here, a nice-19 program on the other core made a 2-thread step take ~1.8 s, every OpenMP barrier
# waiting for our thread's turn behind it (a 12-token `ask` at 6 tok/s against 330 at 1 thread).
# So a probe up first reads, over IDLE_WINDOW_S, how many cores the machine leaves idle, and goes
# ahead only from IDLE_ENOUGH: a quarter core, since a server's own event loop and clients keep the
# core it would add half busy (a niced program: under a twentieth idle).
IDLE_WINDOW_S, IDLE_ENOUGH = 0.25, 0.25
# CPython's switch interval (s) while a model serves a screen or a server's clients. The decode
# thread lets go of the GIL inside every torch op between its compiled steps (~50 a token: the
# embedding, the head, sampling) and must then take it back from the thread running Python
# meanwhile (the chat app's screen, the server's event loop), which CPython makes wait up to this
# interval each time; the default 5 ms, or even 0.5 ms, is then a good part of a token's time.
HAND_OVER_S = 5e-5


def settle_after_load() -> None:
    """For a process that keeps a model loaded beside a busy Python thread (chat app, server).

    The model's ~100k objects never die: frozen out of the collector's sight, a full collection
    (which holds the GIL, stopping the decode thread) no longer walks them. And the GIL goes back
    to the decode thread within HAND_OVER_S."""
    gc.freeze()
    sys.setswitchinterval(HAND_OVER_S)


class ThreadGovernor:
    """Wraps a Decoder (model/generate.py's seam): decode() as the inner one's, on a thread count
    between 1 and `ceiling` that it adapts to the step times it measures.

    Times are kept per (threads, rows): a server's batch changes size between steps, and a step
    of 4 rows is no slower for a taken core than one of 1. The count is set on the calling thread
    (torch's thread count is per thread), which is the one that decodes.
    `clock` and `set_threads`/`get_threads` are torch's and time's unless a test fakes them."""

    def __init__(self, inner, ceiling: int, clock=time.perf_counter,
                 set_threads=torch.set_num_threads, get_threads=torch.get_num_threads, idle_cores=None):
        self.inner, self.ceiling = inner, max(1, ceiling)
        self._clock, self._set, self._get = clock, set_threads, get_threads
        self._idle = idle_cores or IdleCores()
        self._window_open = False  # the idle cores are being read for the next probe up
        self._times: dict[tuple[int, int], deque] = defaultdict(lambda: deque(maxlen=RECENT))
        self._home: int | None = None  # the count decoding runs at between probes
        self._probing: int | None = None  # the count this step tries, if a probe
        self._probe_steps: list[float] = []  # the probe's steps so far, each over its reference time
        self._probe_done = 0  # steps the probe has run
        self._probe_len = 1  # steps the probe runs: its fastest is the one compared
        self._reference = (0.0, 0)  # the home count's step time the probe must beat, at that many rows
        self._interval = FIRST_PROBE_S
        self._next_probe = 0.0
        self._down = True  # which neighbour the next probe tries
        self._collapsed_s = 0.0  # how long the steps have been collapsed, one after another

    @property
    def threads(self) -> int:
        """The count decoding runs at (between probes)."""
        return self._home or min(self._get(), self.ceiling)

    @property
    def prefill_chunk(self):
        """The inner decoder's prompt runner (model/generate.py's PromptRunner), or None: a
        prompt's chunk runs on the threads torch has, as the model's forward would."""
        return getattr(self.inner, "prefill_chunk", None)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if self._home is None:
            self._home = min(self._get(), self.ceiling)
        n, B = self._get(), tokens.numel()
        t0 = self._clock()
        logits = self.inner.decode(tokens, positions, rows)
        now = self._clock()
        self._after(n, B, now - t0, now)
        return logits

    def __getattr__(self, name):  # the inner decoder's other attributes (model, blocks, ...)
        return getattr(self.__dict__["inner"], name)

    def _after(self, n: int, B: int, seconds: float, now: float) -> None:
        if self._probing is not None:
            self._times[(self._probing, B)].append(seconds)
            # each probe step against the home count's time at its own batch size (a server's
            # batch can change size under a probe)
            reference, rows = self._reference
            if B != rows:
                reference = self._best(self._home, B)
            if reference is not None:
                self._probe_steps.append(seconds / reference)
            self._probe_done += 1
            if self._probe_done < self._probe_len:
                return
            if not self._probe_steps:
                pass  # nothing to compare with: try again after the same interval
            elif min(self._probe_steps) < BETTER:
                self._home, self._interval = self._probing, FIRST_PROBE_S
            else:
                self._interval = min(2 * max(self._interval, FIRST_PROBE_S / 2), LAST_PROBE_S)
            self._probing = None
            self._set(self._home)
            self._next_probe = now + self._interval
            return
        reference = self._best(n, B)
        self._times[(n, B)].append(seconds)
        if self.ceiling == 1 or reference is None:
            self._collapsed_s = 0.0  # nothing to tell a collapse by: a run of them is broken
            return
        # A probe must beat the home count's best recent step, not its median: a server's event
        # loop and clients share the cores, the steps that spread over every thread are the ones
        # they disturb, and one lucky probe at fewer threads against the median took a server
        # from 2 threads to 1 for good (4 clients: 540 tok/s against 700-770 at 2). Unless a
        # core was just taken: then against the step that collapsed. Collapses are told by the
        # best too, since collapsed steps soon make up the median of the last few.
        self._collapsed_s = self._collapsed_s + seconds if seconds > COLLAPSED * reference else 0.0
        if self._collapsed_s >= TAKEN_S:
            self._down, self._next_probe, reference, self._collapsed_s = True, now, seconds, 0.0
        if now >= self._next_probe:
            self._reference = reference, B
            self._probe_next(now)

    def _probe_next(self, now: float) -> None:
        home = self._home
        down, up = home - 1 >= 1, home + 1 <= self.ceiling
        target = home - 1 if (self._down and down) or not up else home + 1
        if target > home:
            if not self._window_open:  # read the cores first; probe when the window closes
                self._idle.mark()
                self._window_open, self._next_probe = True, now + IDLE_WINDOW_S
                return
            self._window_open = False
            if self._idle.read() < IDLE_ENOUGH:  # taken by another program: as a probe that lost
                self._down = not self._down
                self._interval = min(2 * max(self._interval, FIRST_PROBE_S / 2), LAST_PROBE_S)
                self._next_probe = now + self._interval
                return
        self._probing, self._probe_steps, self._probe_done, self._collapsed_s = target, [], 0, 0.0
        # a probe up's first step wakes (or starts) the OpenMP workers that slept while the count
        # was lower: judged by it alone, 2 threads beside the chat app's screen lost every probe
        # (4.8 ms against 3.0 at 1 thread); the second step is a fair one
        self._probe_len = 2 if target > home else 1
        self._down = not self._down
        self._set(self._probing)

    def _best(self, n: int, B: int) -> float | None:
        """The fastest of the last steps at n threads and B rows; None before 3 of them."""
        recent = self._times.get((n, B))
        return min(recent) if recent and len(recent) >= 3 else None


class IdleCores:
    """How many cores the whole machine left idle between mark() and read(): the idle time the
    kernel counts (psutil.cpu_times, /proc/stat on Linux) over the wall time between them."""

    def __init__(self):
        self._t, self._idle_s = time.monotonic(), self._idle_seconds()

    def mark(self) -> None:
        self._t, self._idle_s = time.monotonic(), self._idle_seconds()

    def read(self) -> float:
        wall = time.monotonic() - self._t
        return (self._idle_seconds() - self._idle_s) / wall if wall > 0 else 0.0

    @staticmethod
    def _idle_seconds() -> float:
        import psutil

        t = psutil.cpu_times()
        return t.idle + getattr(t, "iowait", 0.0)
