"""Generation as small free functions: prefill, decode_one_token, sample, generate.

`generate` is an iterator of token ids; the caller (CLI, chat app, tests) decides what to do with
each one and stops it through a `threading.Event`. Nothing here knows about text.

Each generated token runs through a Decoder: the one seam where a faster runtime over the same
weights and KV cache replaces the eager blocks (the CPU's compiled step in quant/decode_cpu.py,
the CUDA graph in model/static_decode.py). The app's engine picks it; the model never knows.
Prompts run in chunks through the decoder's `prefill_chunk` where it has one (the CPU step), else
through the model's own forward.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol

import torch

from .args import ModelArgs
from .model import Transformer


GREEDY_BELOW = 1e-4  # a temperature under this picks the most likely token, exactly
_LOWEST = torch.finfo(torch.float32).min


@dataclass
class SamplingParams:
    """How to pick each token. Raises ValueError for a value out of range, NaN or infinite.

    `penalty_exempt` holds token ids the repetition penalty never touches: the chat template's
    control tokens are in every prompt, and punishing the end-of-turn token makes a reply run on.
    """

    temperature: float = 0.7  # below GREEDY_BELOW (0 included) means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    repeat_last_n: int = -1  # how many recent tokens the penalty looks at: -1 all, 0 none
    penalty_exempt: frozenset[int] = frozenset()

    def __post_init__(self):
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.repeat_last_n < -1:
            raise ValueError(f"repeat_last_n must be -1 (all), 0 (none) or a count, got {self.repeat_last_n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


class Decoder(Protocol):
    """One decode step for B sequences at once, over a model's weights and KV cache.

    decode(tokens (B,) long, positions (B,) long, rows (B,) long) -> logits (B, V): row i feeds
    tokens[i] at positions[i], writing and reading KV-cache row rows[i] (one per sequence: a
    server's requests each have their own). A row's logits never depend on the other rows, so
    a request gives the same text alone or beside others. Bound to the caches of its build:
    after model.setup_caches, build a new one."""

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor: ...


class PromptRunner(Protocol):
    """What a Decoder may also have, as its `prefill_chunk` attribute (None where it has none now):
    a prompt's chunk through its own runtime.

    prefill_chunk(tokens, start_pos, row, before_layer) -> logits (V,) of the last token: the T
    tokens at positions start_pos.. into KV-cache row `row`, each seeing those before it, as the
    model's forward over the chunk does. `before_layer()` is called before every layer (prefill's
    stop check: it may raise)."""

    def __call__(self, tokens: list[int], start_pos: int, row: int,
                 before_layer: Callable[[], None]) -> torch.Tensor: ...


class EagerDecoder:
    """The model's own blocks, one row at a time (the reference every other decoder matches)."""

    def __init__(self, model: Transformer):
        self.model = model

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.model(tokens[i].view(1, 1), int(positions[i]), cache_row=int(rows[i]))[0, -1]
                            for i in range(tokens.shape[0])])  # (B, V)


PREFILL_CHUNK = 512  # prompt tokens per forward: big enough for GEMM speed, small for memory
# One layer over one chunk is the longest a stop waits during a prompt (see prefill). 16 GFLOP takes
# ~0.09 s at the ~175 GFLOP/s the 2-core Xeon prefilled a 1.2B Q4_0 Llama at on its AVX2 path
# (83 tok/s, 2026-12-01; ~0.05 s on the 2-core EPYC), and lets that model take 128 tokens a chunk,
# not 64: 2-3% faster there (a block's codes widened once for twice the rows, half the calls); the
# default model's layers stay far under it at 512 tokens (measured on the 2-core Xeon: 26 ms a
# layer fp32, 50 ms int4).
LAYER_STEP_FLOPS = 16e9
MIN_PREFILL_CHUNK = 64  # below this the int4 kernels lose most of their prefill speed (measured: 32 is 7x slower)


def prefill_chunk(args: ModelArgs) -> int:
    """Prompt tokens per prefill chunk for a model of this shape: PREFILL_CHUNK, halved while one
    layer over a chunk (2 FLOPs per weight per token) costs more than LAYER_STEP_FLOPS, down to
    MIN_PREFILL_CHUNK. 512 for SmolLM2-135M, 128 for a 1.2B Llama (61M weights a layer), 64 for an 8B."""
    layer_weights = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.n_kv_heads) + 3 * args.dim * args.ffn_dim
    chunk = PREFILL_CHUNK
    while chunk > MIN_PREFILL_CHUNK and 2 * layer_weights * chunk > LAYER_STEP_FLOPS:
        chunk //= 2
    return chunk


class _Stopped(Exception):
    """Raised between two layers of a prefill whose cancel event was set."""


@torch.inference_mode()
def prefill(model: Transformer, tokens: list[int], start_pos: int = 0, chunk: int | None = None,
            cache_row: int = 0, cancel: threading.Event | None = None,
            decoder: Decoder | None = None) -> torch.Tensor | None:
    """Run the prompt in chunks (default: prefill_chunk(model.args) tokens) into KV-cache row
    `cache_row`; return the last position's logits (V,). A chunk runs through `decoder`'s
    prefill_chunk where it has one (PromptRunner: the CPU step, ~10% faster on a 1.2B Llama's
    prompt than the model's forward: docs/BENCHMARKS.md), else through the model's forward.

    With `cancel`, returns None once it is set: it is checked before every chunk and before every
    layer (a forward pre-hook on the eager path, so the model stays unaware), so a stop waits for
    one layer over one chunk at most, not a whole prompt (a 1.1k-token prompt on an fp32 source
    took ~5 s). The cache rows the stopped chunk was writing hold partial values: the caller
    treats every position from `start_pos` on as not cached."""
    chunk = chunk or prefill_chunk(model.args)
    if start_pos + len(tokens) > model.max_cache_len:  # as the forward says it
        raise ValueError(f"{start_pos + len(tokens)} tokens exceed the cache of {model.max_cache_len}")
    runner: PromptRunner | None = getattr(decoder, "prefill_chunk", None) if decoder is not None else None
    thread = threading.get_ident()

    def stop_check() -> None:
        # before each layer; on the forward's path a hook on shared modules: another thread's
        # forward (a server row) is not ours to stop
        if cancel is not None and cancel.is_set() and threading.get_ident() == thread:
            raise _Stopped

    hooks = []
    if cancel is not None and runner is None:
        hooks = [layer.register_forward_pre_hook(lambda module, args: stop_check()) for layer in model.layers]
    logits = None
    try:
        for s in range(0, len(tokens), chunk):
            if cancel is not None and cancel.is_set():
                return None
            if runner is not None:
                logits = runner(tokens[s : s + chunk], start_pos + s, cache_row, stop_check)
            else:
                part = torch.tensor(tokens[s : s + chunk], dtype=torch.long).unsqueeze(0)  # (1, T)
                logits = model(part, start_pos + s, last_only=True, cache_row=cache_row)[0, -1]
    except _Stopped:
        return None
    finally:
        for hook in hooks:
            hook.remove()
    return logits


def decode_one_token(decoder: Decoder, token: int, pos: int, cache_row: int = 0) -> torch.Tensor:
    """Logits (V,) after `token` at position `pos` of KV-cache row `cache_row`."""
    return decoder.decode(torch.tensor([token]), torch.tensor([pos]), torch.tensor([cache_row]))[0]


def sample(logits: torch.Tensor, params: SamplingParams, history: Iterable[int] = (),
           generator: torch.Generator | None = None) -> int:
    """Pick the next token from logits (V,) with repetition penalty, temperature, top-k and top-p.

    Whatever the settings, the logits stay finite (a huge penalty or a tiny temperature would
    overflow float32 to inf, and inf - inf is NaN in the softmax); NaN logits count as impossible.
    """
    penalized = _penalized(params, history)
    if params.temperature < GREEDY_BELOW and params.repetition_penalty >= 1.0:
        value, index = torch.max(logits, 0)
        if _raw_maximum_wins(params, int(index), float(value), penalized):
            return int(index)
    logits = _finite(logits.float())
    if penalized:
        seen = torch.tensor(sorted(penalized), dtype=torch.long)
        logits = logits.clone()
        picked = logits[seen]
        # as in CTRL and Hugging Face: shrink positive logits, push negative ones further down
        logits[seen] = _finite(torch.where(picked > 0, picked / params.repetition_penalty,
                                           picked * params.repetition_penalty))
    if params.temperature < GREEDY_BELOW:
        return int(torch.argmax(logits))
    logits = _finite(logits / params.temperature)
    ids = None  # candidates' token ids, most likely first; None: the whole vocabulary in order
    if params.top_k:
        logits, ids = torch.topk(logits, min(params.top_k, logits.numel()))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        if ids is None:
            probs, ids = _most_likely(probs, params.top_p)
        # drop a token once the mass before it already reaches top_p; the first always stays
        probs = probs.masked_fill((torch.cumsum(probs, 0) - probs) >= params.top_p, 0)
    # inverse CDF: one cumsum and one search, where torch.multinomial draws an exponential per
    # token of the vocabulary (0.7 ms a token for 49152, measured)
    cdf = torch.cumsum(probs, 0)
    u = torch.rand((), generator=generator) * cdf[-1]
    pick = min(int(torch.searchsorted(cdf, u, right=True)), probs.numel() - 1)
    return int(ids[pick]) if ids is not None else pick


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], histories: list[list[int]],
                generators: list[torch.Generator | None]) -> list[int]:
    """sample() for each row of logits (B, V), with row b's params, history and generator: the
    same picks. The greedy rows whose raw maximum the penalty leaves alone (as in sample) are
    picked together, one op for the batch (a server's decode thread takes the GIL back after each)."""
    values, indices = torch.max(logits, dim=1)
    values, indices = values.tolist(), indices.tolist()
    picks = []
    for b, p in enumerate(params):
        if _raw_maximum_wins(p, indices[b], values[b], _penalized(p, histories[b])):
            picks.append(indices[b])
        else:
            picks.append(sample(logits[b], p, histories[b], generators[b]))
    return picks


def _raw_maximum_wins(params: SamplingParams, best: int, top: float, penalized: set[int]) -> bool:
    """Whether greedy picks the logits' first raw maximum (`best`, of value `top`) without the
    penalty's arithmetic: a penalty >= 1 only lowers the tokens it touches, so that maximum wins
    unless it is one of them, or not finite (where _finite's mapping could make a tie). One op
    instead of a dozen, each a hand-over of the GIL to whatever Python thread runs beside."""
    return (params.temperature < GREEDY_BELOW and params.repetition_penalty >= 1.0
            and best not in penalized and _LOWEST < top < math.inf)


def _penalized(params: SamplingParams, history: Iterable[int]) -> set[int]:
    """The token ids the repetition penalty touches: the last repeat_last_n of `history`."""
    if params.repetition_penalty == 1.0 or params.repeat_last_n == 0:
        return set()
    recent = history if params.repeat_last_n < 0 else list(history)[-params.repeat_last_n:]
    return set(recent) - params.penalty_exempt


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """inf to the largest float32, -inf and NaN to the lowest: a softmax over them is defined."""
    info = torch.finfo(logits.dtype)
    return torch.nan_to_num(logits, nan=info.min, posinf=info.max, neginf=info.min)


def _most_likely(probs: torch.Tensor, mass: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The fewest most likely tokens, sorted, that hold at least `mass` (a whole-vocabulary sort
    costs ~0.5 ms a token; the nucleus is nearly always in the top few hundred)."""
    k = min(64, probs.numel())
    while True:
        top, ids = torch.topk(probs, k)
        if float(top.sum()) >= mass or k == probs.numel():
            return top, ids
        k = min(k * 4, probs.numel())


def generate(model: Transformer, prompt: list[int], max_new_tokens: int, stop_ids: set[int] = frozenset(),
             params: SamplingParams | None = None, cancel: threading.Event | None = None,
             start_pos: int = 0, decoder: Decoder | None = None, cache_row: int = 0) -> Iterator[int]:
    """Yield new token ids until a stop id (not yielded), max_new_tokens, the cache end or cancel.

    `prompt` holds the tokens from `start_pos` on; positions before it must already be in
    KV-cache row `cache_row` (a chat reuses the conversation it has already seen). Tokens after
    the first run through `decoder` (default: the eager blocks), and the prompt's chunks too
    where it has a prefill_chunk (prefill).
    """
    decoder = decoder or EagerDecoder(model)
    params = params or SamplingParams()
    if not prompt:
        raise ValueError("the prompt is empty")
    end = start_pos + len(prompt)
    if end > model.max_cache_len:
        raise ValueError(f"the prompt needs {end} tokens of context, only {model.max_cache_len} are set up")
    generator = None
    if params.seed is not None:
        generator = torch.Generator().manual_seed(params.seed)
    # the repetition penalty looks at the reply alone: an answer repeats the user's words on
    # purpose ("The capital of France is..."), and penalizing them drove the default model to
    # answer an English question in French at the default settings (penalty 1.1)
    reply: list[int] = []
    logits = prefill(model, prompt, start_pos, cache_row=cache_row, cancel=cancel, decoder=decoder)
    if logits is None:  # stopped during the prompt
        return
    pos = end
    for _ in range(max_new_tokens):
        if cancel is not None and cancel.is_set():
            return
        token = sample(logits, params, reply, generator)
        if token in stop_ids:
            return
        yield token
        reply.append(token)
        if pos >= model.max_cache_len:
            return
        logits = decode_one_token(decoder, token, pos, cache_row)
        pos += 1
