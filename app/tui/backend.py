"""What the chat screen needs from a model, the real engine behind it, and fitting a conversation
into the model's context.

The screen talks to a `ChatModel`; `app.engine.Engine` is one. Tests that must control timing (Esc
in the middle of a reply) pass their own loader returning a model gated by a `threading.Event`.
Nothing here imports torch: the engine is imported by the loader, inside the loading worker.
"""
from __future__ import annotations

import gc
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

from ..errors import UserError


class ModelName(Protocol):
    name: str
    variant: str

    @property
    def ref(self) -> str: ...


class ReplyNumbers(Protocol):
    prompt_tokens: int
    new_tokens: int
    stopped: bool

    @property
    def tokens_per_s(self) -> float: ...


class ChatModel(Protocol):
    entry: ModelName
    device: str
    ctx: int
    last: ReplyNumbers  # the numbers of the reply `stream` produced last

    def prompt_ids(self, messages: list[dict]) -> list[int]: ...

    def stream(self, messages: list[dict], params, max_tokens: int,
               cancel: threading.Event) -> Iterator[str]: ...

    def context_used(self) -> int: ...


Loader = Callable[[str], ChatModel]


def engine_loader(ctx: int | None = None, device: str | None = None, kv_dtype: str = "auto") -> Loader:
    def load(ref: str) -> ChatModel:
        from ..engine import Engine

        from ..devices import inference_threads

        # the UI thread renders the reply on a core of its own: torch threads on every core stall
        # each other's barriers whenever it runs (measured, 2 cores: 2 threads 94 tok/s, 1 thread 135)
        threads = inference_threads(ui=True)
        # compiling the decode kernel (once per machine) must not hold up the first reply
        engine = Engine.load(ref, ctx=ctx, device=device, kv_dtype=kv_dtype, compile_kernel="background",
                             threads=threads)
        # the model's ~100k objects never die: out of the collector's sight, a full collection
        # (which holds the GIL, stopping the reply with the UI) no longer walks them
        gc.freeze()
        # the reply's thread takes the GIL back after each compiled step; with the UI thread
        # rendering, the default 5 ms hand-over interval is most of a token's time
        sys.setswitchinterval(0.0005)
        return engine

    return load


def memory_in_use() -> int:
    """This process's resident memory in bytes: the model's weights and KV cache live here."""
    import psutil

    return psutil.Process().memory_info().rss


# ---------------------------------------------------------------- fitting the context
class PromptTooLong(UserError):
    """The newest prompt alone (with the system prompt) does not fit the context."""


@dataclass(frozen=True)
class Fitted:
    messages: list[dict]
    dropped: int  # how many of the oldest messages were left out
    prompt_tokens: int


def fit_to_context(messages: list[dict], count: Callable[[list[dict]], int], ctx: int,
                   reply_room: int) -> Fitted:
    """Drop the oldest whole turns until the prompt leaves `reply_room` tokens for the reply.

    `messages` is an optional system message, then turns that each start with a user message; the
    last turn is the new prompt. The system prompt and the new prompt are never dropped: if those
    two alone do not fit the context, `PromptTooLong` says so rather than cutting the prompt.
    """
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest = messages[len(system):]
    starts = [i for i, m in enumerate(rest) if m["role"] == "user"]
    if not starts:
        raise ValueError("there is no prompt to answer")

    def keep_from(turn: int) -> list[dict]:
        return system + rest[starts[turn]:]

    budget = ctx - reply_room
    n_all = count(messages)
    if n_all <= budget:
        return Fitted(messages, 0, n_all)
    last = len(starts) - 1
    n_last = count(keep_from(last))
    if n_last >= ctx:
        what = "this prompt with the system prompt is" if system else "this prompt is"
        raise PromptTooLong(f"{what} {n_last} tokens, more than the model's {ctx}-token context: "
                            f"shorten it, or start llamadesk with a larger --ctx")
    # the fewest dropped turns that fit: the count only shrinks as turns go, so a binary search;
    # when even the newest turn alone leaves less than `reply_room`, it goes with a shorter reply
    lo, hi = 0, last
    while lo < hi:
        mid = (lo + hi) // 2
        if count(keep_from(mid)) <= budget:
            hi = mid
        else:
            lo = mid + 1
    kept = keep_from(lo)
    n_kept = n_last if lo == last else count(kept)
    return Fitted(kept, starts[lo], n_kept)


def reply_room(max_tokens: int, ctx: int) -> int:
    """Tokens to keep free for the reply: the reply's limit, but never more than a quarter of the
    context, so a large limit does not push out the whole history."""
    return max(1, min(max_tokens, ctx // 4))


# ---------------------------------------------------------------- what the reply worker sends
@dataclass(frozen=True)
class PromptFitted:
    """Sent once the prompt is measured, before the first piece of the reply."""

    prompt_tokens: int
    dropped: int  # oldest messages left out to fit the context
    ctx: int


@dataclass(frozen=True)
class ReplyEnded:
    stopped: bool = False
    new_tokens: int = 0
    tokens_per_s: float = 0.0
    context_used: int = 0
    error: str | None = None  # the reply broke off (what was written so far is kept)
    refused: str | None = None  # the prompt was not sent at all


__all__ = ["ChatModel", "Fitted", "Loader", "PromptFitted", "PromptTooLong", "ReplyEnded", "engine_loader",
           "fit_to_context", "memory_in_use", "reply_room"]
