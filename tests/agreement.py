"""The rule every fast-path equality test uses: teacher-forced logits within a stated tolerance,
and the same greedy token wherever the reference's top-2 margin exceeds that tolerance.

Exact greedy equality of two runtimes breaks on near-ties: a logit moved by fp32 rounding (other
kernels, another CPU's vector width, bf16 inputs) picks the other of two tokens a hair apart, and
every later step differs. So both runtimes read the same tokens (the reference's own greedy
answer), and each step's logits are compared.
"""
from __future__ import annotations

import torch

from model.generate import EagerDecoder, SamplingParams, decode_one_token, generate, prefill


@torch.inference_mode()
def forced_logits(model, prompt: list[int], answer: list[int], decoder=None, row: int = 0) -> torch.Tensor:
    """Logits (N, V) before each of the N answer tokens: the prompt as one prefill through the
    model into KV-cache row `row`, then the answer one token at a time through `decoder` (a
    model/generate.py Decoder; default the eager blocks)."""
    decoder = decoder or EagerDecoder(model)
    rows = [prefill(model, prompt, cache_row=row)]
    for i, t in enumerate(answer[:-1]):
        rows.append(decode_one_token(decoder, t, len(prompt) + i, row))
    return torch.stack(rows).float()


def greedy_answer(model, prompt: list[int], n: int, decoder=None) -> list[int]:
    return list(generate(model, prompt, n, params=SamplingParams(temperature=0), decoder=decoder))


def assert_agree(reference: torch.Tensor, candidate: torch.Tensor, tol: float) -> None:
    """reference, candidate (N, V) logits of the same steps. Every logit within `tol` (absolute,
    in logit units), and the same argmax at every step where the reference's best token leads
    the next by more than `tol`: a runtime may only change its mind where the two were near-tied."""
    assert reference.shape == candidate.shape and reference.dim() == 2
    diff = (candidate - reference).abs().amax(-1)  # (N,)
    worst = int(diff.argmax())
    assert diff[worst] <= tol, f"step {worst}: logits differ by {diff[worst]:.4f} > {tol}"
    top2 = reference.topk(2, dim=-1).values  # (N, 2)
    clear = (top2[:, 0] - top2[:, 1]) > tol
    parted = clear & (candidate.argmax(-1) != reference.argmax(-1))
    assert not parted.any(), f"steps {parted.nonzero().flatten().tolist()}: another token despite a clear lead"
