"""The quality report one block at a time, so it holds one block's weights, never a model.

`quantize`'s report compares three runs over the same windows of text: the source as it runs
(fp32 activations on a CPU), the variant as it runs (its kernels), and the variant's own weights
in the source's fp32 arithmetic (quant.quality.run_unpacked). Loading the three models at once
took 9.5 GB and 21 min on a 1.2B-parameter model. Here every window's hidden states of all three
go through block 0, then block 1, ...: each block is read from the store's files (one handle per
tensor, copied out, so no file mapping stays resident), run over every window and dropped. The
memory is one block's weights in fp32, the hidden states (3 x tokens x dim x 4 bytes) and, at
the end, one window's logits per run.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from model.args import ModelArgs
from model.model import KVCache, Transformer, rope_table
from quant.linear import fuse_projections, swap_linears
from quant.quality import Agreement, Comparison, run_unpacked, windows

from . import store
from .devices import release_freed_memory
from .engine import activation_dtype, prepare_loaded

Progress = Callable[[int, int, str], None]
HEAD_ROWS = 8192  # a float head is applied this many vocabulary rows at a time (bounded fp32 copies)
LOGIT_ROWS = 128  # positions whose logits are made at once: (128, V) fp32, 25 MB for a 49152 vocabulary


class BlockByBlock:
    """An installed variant built a part at a time: the token lookup, block i, the head.

    `unpacked`: a packed variant's layers run their unpacked fp32 weights, as load_unpacked's.
    `precise`: packed layers (a GGUF source's blocks) in fp32 arithmetic, the reference's."""

    def __init__(self, entry: store.ModelEntry, unpacked: bool = False, precise: bool = False):
        self.args = ModelArgs.from_dict(entry.manifest["args"])
        self.layout = (entry.manifest.get("quant") or {}).get("layout") or None
        self.unpacked, self.precise = unpacked, precise
        self.dtype = activation_dtype("cpu")
        self.files: dict[str, Path] = {}
        for fname in entry.manifest["weights"]:
            with safe_open(str(entry.path / fname), framework="pt") as f:
                self.files.update({k: entry.path / fname for k in f.keys()})

    # ------------------------------------------------------------ parts
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, dim) hidden states."""
        table = self._skeleton().tok_embeddings
        if type(table) is nn.Embedding:  # a float table: only the rows asked for are read
            return self._mapped("tok_embeddings.weight", lambda w: F.embedding(tokens, w).to(self.dtype))
        return self._load(table, "tok_embeddings.")(tokens)

    def block(self, i: int) -> nn.Module:
        block = self._skeleton().layers[i]
        self._load(block, f"layers.{i}.", ready=False)
        if not self.unpacked:  # as build_model runs it: q, k, v and w1, w3 fused
            fuse_projections(SimpleNamespace(layers=[block]))
        return self._ready(block)

    def head(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """(rows, dim) final hidden states -> (rows, V) fp32 logits."""
        skeleton = self._skeleton()
        norm = self._load(skeleton.norm, "norm.")
        prefix = "output." if any(k.startswith("output.") for k in self.files) else "tok_embeddings."  # tied
        if type(skeleton.output) is nn.Linear:
            name = prefix + "weight"
            return lambda h: self._mapped(name, lambda w: torch.cat(
                [F.linear(norm(h), w[r : r + HEAD_ROWS].to(self.dtype)) for r in range(0, w.shape[0], HEAD_ROWS)],
                -1).float())
        output = self._load(skeleton.output, prefix)
        return lambda h: output(norm(h)).float()

    # ------------------------------------------------------------ reading
    def _skeleton(self) -> Transformer:
        with torch.device("meta"):
            model = Transformer(self.args)
        if self.layout:
            swap_linears(model, {m: w["scheme"] for m, w in self.layout.items()},
                         group_size={m: w["group_size"] for m, w in self.layout.items() if "group_size" in w},
                         embedding_dtype=self.dtype)
        return model

    def _load(self, module: nn.Module, prefix: str, ready: bool = True) -> nn.Module:
        state = {}
        for k, path in self.files.items():
            if k.startswith(prefix):
                with safe_open(str(path), framework="pt") as f:
                    state[k[len(prefix):]] = f.get_tensor(k).clone()  # a copy: the mapping goes with the handle
        module.load_state_dict(state, assign=True, strict=True)
        return self._ready(module) if ready else module

    def _ready(self, module: nn.Module) -> nn.Module:
        if self.unpacked:  # run_unpacked swaps children: hold the part as one so it can be swapped too
            holder = nn.ModuleDict({"part": module})
            return run_unpacked(holder)["part"].eval()
        return prepare_loaded(module, bool(self.layout), "cpu", self.dtype, self.precise)

    def _mapped(self, name: str, use: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`use` of a float tensor read in place from its file (only the pages it touches)."""
        with safe_open(str(self.files[name]), framework="pt") as f:
            return use(f.get_tensor(name))


def run_block(block: nn.Module, hidden: list[torch.Tensor], args: ModelArgs) -> list[torch.Tensor]:
    """Each (B, T, dim) group of windows through one block, each window from position 0."""
    out = []
    for h in hidden:
        B, T, _ = h.shape
        block.attention.kv_cache = KVCache(B, args.n_kv_heads, T, args.head_dim, h.dtype)
        rope = rope_table(args.head_dim, T, args.rope_theta, args.rope_scaling)
        mask = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T): query i sees keys 0..i
        out.append(block(h, 0, rope, mask))
    return out


@torch.inference_mode()
def compare_blockwise(source: store.ModelEntry, packed: store.ModelEntry, ids: list[int], window: int = 512,
                      progress: Progress = lambda d, t, w: None, weights_only: bool = True) -> list[Comparison]:
    """[the variant as it runs, and with `weights_only` its weights alone] against the source, on
    `ids` in windows of `window` tokens: quant.quality.compare_all's figures, with one block in
    memory at a time."""
    runs = [BlockByBlock(source, precise=True), BlockByBlock(packed)] + ([BlockByBlock(packed, unpacked=True)] if weights_only else [])
    args = runs[0].args
    chunks = list(windows(ids, window))
    groups = [torch.cat([c for c in chunks if c.shape[1] == T]) for T in sorted({c.shape[1] for c in chunks})]  # (B, T)
    steps = len(runs) * args.n_layers + 2
    progress(0, steps, "embedding")
    hidden = [[run.embed(tokens) for tokens in groups] for run in runs]
    for i in range(args.n_layers):
        for r, run in enumerate(runs):
            progress(1 + len(runs) * i + r, steps, f"block {i + 1}/{args.n_layers}")
            block = run.block(i)
            hidden[r] = run_block(block, hidden[r], args)
            del block
            release_freed_memory()
    progress(steps - 1, steps, "logits")
    scores = Agreement(len(runs) - 1)
    heads = [run.head() for run in runs]
    for g, tokens in enumerate(groups):
        for b in range(tokens.shape[0]):
            # positions score independently: LOGIT_ROWS at a time bounds the (rows, V) logits
            for p in range(0, tokens.shape[1] - 1, LOGIT_ROWS):
                rows = slice(p, min(p + LOGIT_ROWS, tokens.shape[1] - 1))  # predicting tokens p+1..
                scores.reference(tokens[b, rows.start + 1 : rows.stop + 1], heads[0](hidden[0][g][b, rows]))
                for r in range(1, len(runs)):
                    scores.candidate(r - 1, heads[r](hidden[r][g][b, rows]))
    progress(steps, steps, "logits")
    return scores.results()
