"""One decode step with static shapes: compiled by torch.compile, replayed as a CUDA graph.

On a GPU an 8B model's token takes a few milliseconds of kernels, and launching its ~600 kernels
one by one from Python takes longer than that: the step must be replayed, not re-launched. A CUDA
graph replays fixed kernels on fixed addresses, so here nothing in the step depends on the
position but data: the position is a tensor, the KV cache is written with index_copy_, and
attention reads the whole cache under a mask. One compiled function runs every block (the
blocks differ only in their tensors), fusing norms, RoPE, SwiGLU and the cache write.

    decoder = StaticDecode(model, compile=True, graph=True)   # model/generate.py's Decoder
    generate(model, ids, n, decoder=decoder)

On the CPU the same step runs without a graph (tests check it against the eager blocks).
"""
from __future__ import annotations

import torch

from .model import Transformer


def _block(layer, h, pos, rope, mask):
    return layer(h, pos, rope, mask)


def _head(model, h):
    return model.output(model.norm(h))


class StaticDecode:
    """`step(h, pos)` runs every block and the head for one token h (1, 1, D) at position pos;
    `decode` is model/generate.py's Decoder over it, for one sequence in KV-cache row 0 (the graph
    is captured on fixed addresses: one row)."""

    def __init__(self, model: Transformer, compile: bool = True, graph: bool | None = None):
        if model.rope is None:
            raise ValueError("call model.setup_caches before building the decode step")
        self.model = model
        self.device = model.rope.device
        graph = self.device.type == "cuda" if graph is None else graph
        dtype = model.norm.weight.dtype
        self.h = torch.zeros(1, 1, model.args.dim, dtype=dtype, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.positions = torch.arange(model.max_cache_len, device=self.device)
        self.rope = torch.view_as_real(model.rope)  # (S, hd/2, 2) cos, sin
        # every block is the same code on other tensors: one compiled graph serves all of them
        self.compiled = compile
        if compile and self.device.type == "cuda":
            # tunes the block sizes of the generated GEMV reductions (int8's fused dequant), as
            # gpt-fast does: a longer first compile, kept on disk like the rest
            import torch._inductor.config as inductor_config

            inductor_config.coordinate_descent_tuning = True
        self.block = torch.compile(_block, dynamic=False) if compile else _block
        # the head too: a packed head read as a plain matmul would first be written out unpacked
        self.head = torch.compile(_head, dynamic=False) if compile else _head
        self.out: torch.Tensor | None = None
        self.graph = None
        if graph:
            self._capture()

    def _run(self) -> torch.Tensor:
        rope = self.rope.index_select(0, self.pos)  # (1, hd/2, 2)
        mask = (self.positions <= self.pos)[None]  # (1, S)
        h = self.h
        for layer in self.model.layers:
            h = self.block(layer, h, self.pos, rope, mask)
        return self.head(self.model, h)

    @torch.inference_mode()
    def _capture(self) -> None:
        # warm-up runs compile and let the allocator settle; they write the cache's last position,
        # which is read only after a prefill or step has written it again
        self.pos.fill_(self.model.max_cache_len - 1)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._run()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._run()

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """tokens, positions, rows (1,) -> logits (1, V); the step's graph decodes row 0 alone."""
        if tokens.shape[0] != 1 or int(rows[0]) != 0:
            raise ValueError("the static decode step runs one sequence, in KV-cache row 0")
        table = self.model.tok_embeddings
        first = next(iter(table.buffers()), None)  # the table may stay in CPU RAM
        table_device = (first if first is not None else table.weight).device
        h = table(tokens.view(1, 1).to(table_device)).to(self.device)  # (1, 1, D)
        return self.step(h, int(positions[0]))[0].clone()  # (1, V): the graph's output is overwritten next step

    def step(self, h: torch.Tensor, pos: int) -> torch.Tensor:
        if pos >= self.model.max_cache_len:
            raise ValueError(f"position {pos} is past the cache of {self.model.max_cache_len}")
        self.h.copy_(h, non_blocking=True)
        self.pos.fill_(pos)
        if self.graph is None:
            return self._run()
        self.graph.replay()
        return self.out
