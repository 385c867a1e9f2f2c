"""What the chat screen needs from a model and the real engine behind it.

The screen talks to a `ChatModel`; `app.engine.Engine` is one, `app.remote.RemoteChat` (a model on
a server) another. Tests that must control timing (Esc
in the middle of a reply) pass their own loader returning a model gated by a `threading.Event`.
Fitting a conversation into the context lives in `app.context` (chat --plain uses it too).
Nothing here imports torch: the engine is imported by the loader, inside the loading worker.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

from ..context import Fitted, PromptTooLong, fit_to_context, reply_room


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

    def count_tokens(self, messages: list[dict]) -> int: ...  # the prompt `messages` make

    def stream(self, messages: list[dict], params, max_tokens: int,
               cancel: threading.Event) -> Iterator[str]: ...

    def context_used(self) -> int: ...


Loader = Callable[[str], ChatModel]


class ModelThread:
    """One thread that loads a chat's model and writes every reply with it.

    libgomp (the OpenMP runtime torch's CPU build ships) keeps a pool of worker threads for each
    thread that starts parallel work, and once its pools hold more threads than the machine has
    cores, their workers stop spinning between parallel regions and sleep: every one of a decode
    step's ~150 regions then waits for a woken thread. Loaded on one worker thread and replying on
    a new one each time, the app had three such threads on two cores (measured: 2.46 ms a step
    against 2.01 on the loading thread, 367 tok/s against 449; docs/BENCHMARKS.md).
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="llamadesk-model", initializer=self._started)
        self._ident: int | None = None

    def _started(self) -> None:
        self._ident = threading.get_ident()

    def call(self, fn: Callable, *args):
        """fn(*args) on this thread (started on first use), after the calls before it; waits and
        returns its value or raises its exception. From the thread itself, a plain call."""
        if threading.get_ident() == self._ident:
            return fn(*args)
        return self._pool.submit(fn, *args).result()


def engine_loader(ctx: int | None = None, device: str | None = None, kv_dtype: str = "auto",
                  chat_format: str | None = None) -> Loader:
    def load(ref: str) -> ChatModel:
        from ..engine import Engine
        from ..threads import settle_after_load

        # the UI thread renders the reply on a core of its own (ui=True): torch threads on every
        # core stall each other's barriers whenever it runs (measured, 2 cores: 2 threads 94 tok/s,
        # 1 thread 135). Compiling the decode kernel (once per machine) must not hold up the first reply.
        engine = Engine.load(ref, ctx=ctx, device=device, kv_dtype=kv_dtype, compile_kernel="background",
                             ui=True, chat_format=chat_format)
        settle_after_load()
        return engine

    return load


def remote_loader(remote) -> Loader:
    """Models on `remote` (app.remote.Remote): the ref is the server's model name, "" its first."""
    def load(ref: str) -> ChatModel:
        from ..remote import RemoteChat

        return RemoteChat.open(remote, ref or None)

    return load


def memory_in_use() -> int:
    """This process's resident memory in bytes: the model's weights and KV cache live here."""
    import psutil

    return psutil.Process().memory_info().rss


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


__all__ = ["ChatModel", "Fitted", "Loader", "ModelThread", "PromptFitted", "PromptTooLong", "ReplyEnded",
           "engine_loader", "fit_to_context", "memory_in_use", "remote_loader", "reply_room"]
