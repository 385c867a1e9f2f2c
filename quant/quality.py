"""How much a packed model lost: perplexity, KL divergence and top-1 agreement against its source.

All measures run over the same non-overlapping windows of one token sequence, so two models are
compared on exactly the same predictions. The default text is the English reference in
`pydoc_data.topics`, which ships with every Python: the report can be made offline anywhere.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
import torch.nn.functional as F


def default_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@dataclass
class Comparison:
    tokens: int  # predictions scored
    ppl_reference: float
    ppl_candidate: float
    kl_mean: float  # mean KL(reference || candidate) of the next-token distributions, nats
    top1_agreement: float  # fraction of positions where both models' most likely token agree

    @property
    def ppl_change(self) -> float:
        return self.ppl_candidate / self.ppl_reference - 1

    def to_dict(self) -> dict:
        return {**asdict(self), "ppl_change": self.ppl_change}


def windows(ids: list[int], window: int) -> Iterator[torch.Tensor]:
    for s in range(0, len(ids) - 1, window):
        chunk = ids[s : s + window]
        if len(chunk) > 1:
            yield torch.tensor([chunk], dtype=torch.long)  # (1, T)


@torch.inference_mode()
def window_logits(model, chunk: torch.Tensor) -> torch.Tensor:
    """Logits (T, V) in fp32 for one window read from position 0."""
    if getattr(model, "max_cache_len", 0) < chunk.shape[1]:
        model.setup_caches(chunk.shape[1])
    return model(chunk, 0)[0].float()


def perplexity(model, ids: list[int], window: int = 512) -> float:
    nll, n = 0.0, 0
    for chunk in windows(ids, window):
        logits = window_logits(model, chunk)
        nll += F.cross_entropy(logits[:-1], chunk[0, 1:], reduction="sum").item()
        n += chunk.shape[1] - 1
    return math.exp(nll / n)


def compare(reference, candidate, ids: list[int], window: int = 512) -> Comparison:
    """Score both models window by window; only one window's logits of each are in memory."""
    nll_ref = nll_cand = kl = 0.0
    agree = n = 0
    for chunk in windows(ids, window):
        targets = chunk[0, 1:]
        ref = window_logits(reference, chunk)[:-1]  # (T-1, V)
        cand = window_logits(candidate, chunk)[:-1]
        nll_ref += F.cross_entropy(ref, targets, reduction="sum").item()
        nll_cand += F.cross_entropy(cand, targets, reduction="sum").item()
        ref_logp, cand_logp = F.log_softmax(ref, -1), F.log_softmax(cand, -1)
        kl += F.kl_div(cand_logp, ref_logp, log_target=True, reduction="sum").item()
        agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        n += len(targets)
    return Comparison(n, math.exp(nll_ref / n), math.exp(nll_cand / n), kl / n, agree / n)
