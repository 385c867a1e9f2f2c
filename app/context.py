"""Fitting a conversation into a model's context: the oldest whole turns go first, the system
prompt and the newest prompt never. The chat app and `chat --plain` both use it. No torch import."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .errors import UserError


class PromptTooLong(UserError):
    """The newest prompt alone (with the system prompt) does not fit the context."""


@dataclass(frozen=True)
class Fitted:
    messages: list[dict]
    dropped: int  # how many of the oldest messages were left out
    prompt_tokens: int


def too_long_hint(ctx: int, max_ctx: int | None, larger: str) -> str:
    """What to do about a prompt over a `ctx`-token context: `larger` (how to ask for a larger
    one) only while the model was trained for more than `ctx` tokens (`max_ctx`, None: unknown)."""
    if max_ctx is not None and ctx >= max_ctx:
        return f"shorten it ({max_ctx} tokens is the longest context this model was trained for)"
    return f"shorten it, or {larger}"


def fit_to_context(messages: list[dict], count: Callable[[list[dict]], int], ctx: int,
                   reply_room: int, max_ctx: int | None = None,
                   larger: str = "start llamadesk with a larger --ctx") -> Fitted:
    """Drop the oldest whole turns until the prompt leaves `reply_room` tokens for the reply.

    `messages` is an optional system message, then turns that each start with a user message; the
    last turn is the new prompt. The system prompt and the new prompt are never dropped: if those
    two alone do not fit the context, `PromptTooLong` says so rather than cutting the prompt
    (and suggests `larger`, how to get a larger context, only below `max_ctx`, the model's longest).
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
                            + too_long_hint(ctx, max_ctx, larger))
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


__all__ = ["Fitted", "PromptTooLong", "fit_to_context", "reply_room"]
