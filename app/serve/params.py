"""One table from each API's request fields onto sampling, and the checks on them.

OpenAI's endpoints use OpenAI's defaults (temperature 1, top_p 1, no penalty); Ollama's use the
app's own (those of `llamadesk chat`). A field we do not support is refused by name (400), never
ignored, unless it carries its neutral value (`n: 1`, `logprobs: false`, `tools: []`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from model.generate import SamplingParams


class BadRequest(Exception):
    """A request the client can fix; `param` names the field at fault (OpenAI's error shape)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


@dataclass
class Sampling:
    params: SamplingParams
    max_tokens: int | None  # None: up to the context's end
    stop: list[str] = field(default_factory=list)


# API field -> our name. Names in SamplingParams go there; max_tokens and stop go beside it.
OPENAI_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "max_tokens": "max_tokens",
    "max_completion_tokens": "max_tokens",
    "stop": "stop",
}
OLLAMA_OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "repeat_penalty": "repetition_penalty",
    "seed": "seed",
    "num_predict": "max_tokens",
    "stop": "stop",
}
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
OLLAMA_DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "top_k": 0, "repetition_penalty": 1.0}

# fields that change nothing at their neutral value, and that we refuse at any other
OPENAI_NEUTRAL = {"n": (1,), "logprobs": (False,), "top_logprobs": (0,), "presence_penalty": (0, 0.0),
                  "frequency_penalty": (0, 0.0), "tools": ([],), "functions": ([],), "tool_choice": ("none",),
                  "logit_bias": ({},), "response_format": ({"type": "text"},), "parallel_tool_calls": (False, True),
                  "echo": (False,), "best_of": (1,), "suffix": ("",)}
# fields that do not touch the text: the request's shape, the caller's id, where the model runs
OPENAI_IGNORED = {"model", "messages", "prompt", "stream", "stream_options", "user", "store", "metadata",
                  "service_tier"}
OLLAMA_IGNORED_OPTIONS = {"num_ctx", "num_thread", "num_gpu", "num_batch", "main_gpu", "use_mmap", "use_mlock",
                          "numa", "low_vram", "num_keep"}


def unsupported(body: dict, known: set[str], neutral: dict) -> list[str]:
    """The fields of `body` we would have to ignore to answer it."""
    bad = []
    for key, value in body.items():
        if key in known or value is None:
            continue
        if key in neutral and value in neutral[key]:
            continue
        bad.append(key)
    return bad


def refuse_unsupported(bad: list[str]) -> None:
    if bad:
        raise BadRequest(f"unsupported field{'s' if len(bad) > 1 else ''}: {', '.join(sorted(bad))} "
                         f"(llamadesk does not implement {'them' if len(bad) > 1 else 'it'})", param=sorted(bad)[0])


def sampling_from(values: dict, table: dict, defaults: dict, where: str = "") -> Sampling:
    """Map an API's fields through `table` onto sampling, checking each value's type and range."""
    got = dict(defaults)
    max_tokens = None
    stop: list[str] = []
    sent_as: dict[str, str] = {}  # our name -> the field the client sent it in
    for key, value in values.items():
        name = table.get(key)
        if name is None or value is None:
            continue
        param = sent_as[name] = f"{where}{key}"
        if name == "stop":
            stop = [value] if isinstance(value, str) else value
            if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 16:
                raise BadRequest(f"{param} must be a string or a list of at most 16 strings", param)
        elif name == "max_tokens":
            if isinstance(value, bool) or not isinstance(value, int):
                raise BadRequest(f"{param} must be an integer", param)
            if value >= 0 or table is not OLLAMA_OPTIONS:  # Ollama: a negative num_predict means no limit
                if value < 1:
                    raise BadRequest(f"{param} must be at least 1", param)
                max_tokens = value
        elif name in ("seed", "top_k"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise BadRequest(f"{param} must be an integer", param)
            got[name] = value
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise BadRequest(f"{param} must be a number", param)
            got[name] = float(value)
    if got.get("temperature", 0) > 2:
        raise BadRequest(f"{where}temperature must be between 0 and 2", f"{where}temperature")
    try:
        params = SamplingParams(**got)
    except ValueError as e:
        # SamplingParams says its own name first ("repetition_penalty must be > 0"): say the
        # client's (options.repeat_penalty), and name it as the type errors above do
        ours, _, rest = str(e).partition(" ")
        param = sent_as.get(ours)
        raise BadRequest(f"{param} {rest}" if param else str(e), param) from None
    return Sampling(params, max_tokens, stop)


def stream_flag(body: dict, default: bool) -> bool:
    """The request's `stream`: JSON true or false only, since any other value ("no") is truthy."""
    value = body.get("stream")
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest("stream must be true or false", "stream")
    return value


def parse_duration(value) -> float | None:
    """Seconds from a number or a duration ("500ms", "30s", "5m", "1h"), as Ollama's keep_alive
    takes it; a negative one means forever (None). ValueError says what was wrong."""
    if isinstance(value, str):
        text = value.strip()
        unit = next((u for u in ("ms", "s", "m", "h") if text.endswith(u)), "")
        try:
            value = float(text[:len(text) - len(unit)]) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "": 1}[unit]
        except ValueError:
            raise ValueError(f"{value!r} is not a duration like 30s, 5m or -1") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("a duration is a number of seconds or a string like 5m")
    return None if value < 0 else float(value)
