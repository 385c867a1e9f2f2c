"""The sampling settings a reply gets when the user sets none: the model's own, else Ollama-like.

`SamplingParams` itself stays neutral (no penalty, no top-k cut) so that tests and library callers
get plain sampling; the CLI and the chat app start from these instead, because the neutral ones
loop on short prompts with small models. A model's own defaults come from the
`generation_config.json` its Hugging Face folder shipped (kept by `llamadesk import`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.generate import SamplingParams

# Ollama's defaults for the knobs it shares with llamadesk (temperature is llamadesk's own 0.7)
OLLAMA_LIKE = {"temperature": 0.7, "top_k": 40, "top_p": 0.9, "repeat_penalty": 1.1, "repeat_last_n": 64}
# generation_config.json's names -> ours
_HF_NAMES = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "repetition_penalty": "repeat_penalty"}


def model_defaults(folder: Path | None, suggested: dict | None = None) -> dict:
    """OLLAMA_LIKE, then the model's own suggestions (publisher_suggestions)."""
    return {**OLLAMA_LIKE, **publisher_suggestions(folder, suggested)}


def publisher_suggestions(folder: Path | None, suggested: dict | None = None) -> dict:
    """The knobs of OLLAMA_LIKE the model's publisher sets, under OLLAMA_LIKE's names: the
    catalog's `suggested` settings (from the model card), then what the model's
    generation_config.json sets (a config that does not sample, `do_sample: false`, sets none: it
    describes the model's greedy evaluation). `folder` is the source's: a packed variant's folder
    holds no generation_config."""
    out = {k: type(OLLAMA_LIKE[k])(v) for k, v in (suggested or {}).items() if k in OLLAMA_LIKE}
    try:
        config = json.loads((Path(folder) / "generation_config.json").read_text(encoding="utf-8")) if folder else {}
    except (OSError, ValueError):
        config = {}
    if not isinstance(config, dict) or config.get("do_sample") is False:
        return out
    for hf, ours in _HF_NAMES.items():
        value = config.get(hf)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[ours] = type(OLLAMA_LIKE[ours])(value)
    return out


def resolve(asked: dict, defaults: dict, seed: int | None = None) -> SamplingParams:
    """SamplingParams from the values the user `asked` for (None: not asked) over `defaults`.
    At a greedy temperature the repeat penalty stays off unless asked: greedy text is the model's
    own most likely text, which a penalty would change. Raises ValueError for a bad value."""
    from model.generate import GREEDY_BELOW, SamplingParams  # torch: here, so `show` loads none

    v = {k: (asked.get(k) if asked.get(k) is not None else defaults[k]) for k in OLLAMA_LIKE}
    if v["temperature"] < GREEDY_BELOW and asked.get("repeat_penalty") is None:
        v["repeat_penalty"] = 1.0
    return SamplingParams(temperature=v["temperature"], top_k=v["top_k"], top_p=v["top_p"],
                          repetition_penalty=v["repeat_penalty"], repeat_last_n=v["repeat_last_n"], seed=seed)


__all__ = ["OLLAMA_LIKE", "model_defaults", "publisher_suggestions", "resolve"]
