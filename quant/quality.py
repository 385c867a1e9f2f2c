"""How much a packed model lost: perplexity, KL divergence and top-1 agreement against its source.

All measures run over the same non-overlapping windows of one token sequence, so two models are
compared on exactly the same predictions. The default text is the English reference in
`pydoc_data.topics`, which ships with every Python: the report can be made offline anywhere.

A packed model loses twice: its weights are rounded, and its kernels compute in bf16 (activations,
scales and outputs). `run_unpacked` runs a packed model's own weights with the source's fp32
arithmetic, so a report can give both: what the weights alone cost, and what a user gets.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .formats import Packed, unpack
from .linear import Fp16Linear, Int4Linear, Int8Embedding, Int8Linear, NF4Linear


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


Progress = Callable[[int, int, str], None]  # (tokens scored, tokens in all, what)


def perplexity(model, ids: list[int], window: int = 512, progress: Progress = lambda d, t, w: None) -> float:
    nll, n = 0.0, 0
    chunks = list(windows(ids, window))
    total = sum(c.shape[1] - 1 for c in chunks)  # each window predicts all its tokens but the first
    for chunk in chunks:
        progress(n, total, "perplexity")
        logits = window_logits(model, chunk)
        nll += F.cross_entropy(logits[:-1], chunk[0, 1:], reduction="sum").item()
        n += chunk.shape[1] - 1
    progress(n, total, "perplexity")
    return math.exp(nll / n)


def compare(reference, candidate, ids: list[int], window: int = 512) -> Comparison:
    """Score both models window by window; only one window's logits of each are in memory."""
    return compare_all(reference, [candidate], ids, window)[0]


def compare_all(reference, candidates: list, ids: list[int], window: int = 512,
                progress: Progress = lambda d, t, w: None) -> list[Comparison]:
    """`compare` for several candidates against one reference, which runs once per window."""
    scores = Agreement(len(candidates))
    chunks = list(windows(ids, window))
    total = sum(c.shape[1] - 1 for c in chunks)
    for chunk in chunks:
        progress(scores.tokens, total, "perplexity, KL, top-1")
        scores.reference(chunk[0, 1:], window_logits(reference, chunk)[:-1])
        for i, candidate in enumerate(candidates):
            scores.candidate(i, window_logits(candidate, chunk)[:-1])
    progress(scores.tokens, total, "perplexity, KL, top-1")
    return scores.results()


class Agreement:
    """Perplexity, KL and top-1 agreement of candidates against a reference, summed window by
    window: give each window's reference logits, then each candidate's, (T-1, V) fp32 each, so
    only one candidate's logits are held beside the reference's log-probabilities."""

    def __init__(self, candidates: int):
        self.tokens, self.nll_ref = 0, 0.0
        self.nll, self.kl, self.agree = [0.0] * candidates, [0.0] * candidates, [0] * candidates
        self._targets = self._ref_logp = self._ref_top = None

    def reference(self, targets: torch.Tensor, logits: torch.Tensor) -> None:
        self._targets = targets
        self.nll_ref += F.cross_entropy(logits, targets, reduction="sum").item()
        self._ref_logp, self._ref_top = F.log_softmax(logits, -1), logits.argmax(-1)
        self.tokens += len(targets)

    def candidate(self, i: int, logits: torch.Tensor) -> None:
        self.nll[i] += F.cross_entropy(logits, self._targets, reduction="sum").item()
        self.kl[i] += F.kl_div(F.log_softmax(logits, -1), self._ref_logp, log_target=True, reduction="sum").item()
        self.agree[i] += int((self._ref_top == logits.argmax(-1)).sum())

    def results(self) -> list[Comparison]:
        n = self.tokens
        return [Comparison(n, math.exp(self.nll_ref / n), math.exp(self.nll[i] / n), self.kl[i] / n,
                           self.agree[i] / n) for i in range(len(self.nll))]


# ---------------------------------------------------------------- the weights alone
class UnpackedLinear(nn.Module):
    """A packed layer run as F.linear on its unpacked fp32 weight, as the source runs.

    The weight is unpacked at each call, so only one layer's fp32 copy is ever in memory, and of
    a layer with more than ROWS outputs (a vocabulary-sized head) only ROWS rows at a time: a
    49152 x 2048 head is 400 MB in fp32, twice that while unpacking."""

    ROWS = 8192

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer  # loaded, not prepared: it still holds the portable tensors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N = self.layer.out_features
        if N <= self.ROWS or isinstance(self.layer, NF4Linear):  # NF4's blocks run across rows
            return F.linear(x.float(), unpacked_weight(self.layer)).to(x.dtype)
        parts = [F.linear(x.float(), unpacked_weight(self.layer, slice(r, r + self.ROWS))) for r in range(0, N, self.ROWS)]
        return torch.cat(parts, -1).to(x.dtype)


def unpacked_weight(layer: nn.Module, rows: slice = slice(None)) -> torch.Tensor:
    """The fp32 (N, K) weight of a loaded, unprepared packed layer, or the `rows` of it (int8,
    int4 and fp16 keep their tensors row by row; NF4 takes the whole weight only)."""
    if isinstance(layer, Fp16Linear):
        return layer.weight[rows].float()
    if isinstance(layer, Int8Linear):
        qweight, scales = layer.qweight[rows], layer.scales[rows]
        return unpack(Packed("int8", (qweight.shape[0], layer.in_features), layer.group_size,
                             {"qweight": qweight, "scales": scales}))
    if isinstance(layer, Int4Linear):
        tensors = {"qweight": layer.qweight[rows], "scales": layer.scales[rows], "mins": layer.mins[rows]}
        return unpack(Packed("int4", (tensors["qweight"].shape[0], layer.in_features), layer.group_size, tensors))
    shape = (layer.out_features, layer.in_features)
    if isinstance(layer, NF4Linear):
        tensors = {"qweight": layer.qweight, **layer.quant_state.as_dict(packed=True)}
        return unpack(Packed("nf4", shape, layer.quant_state.blocksize, tensors))
    raise TypeError(f"{type(layer).__name__} is not a packed layer")


def run_unpacked(model: nn.Module) -> nn.Module:
    """Swap each packed layer of a loaded (not prepared) model for its UnpackedLinear, in place.

    The model then computes in fp32 like its source, with the packed model's weights."""
    for name, module in list(model.named_modules()):
        if isinstance(module, (Int8Linear, Int4Linear, NF4Linear, Fp16Linear)):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, UnpackedLinear(module))
        elif isinstance(module, Int8Embedding):
            module.prepare("cpu")  # its lookup already computes q * scale in fp32
    return model
