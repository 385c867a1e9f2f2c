"""The fused CPU decode step: every block of one token in C++ (csrc/decode_cpu.cpp), and the token
lookup and the head with them where the extension reads those weights (one call a token).

On a small model a decode step in Python spends more time dispatching ~45 small ops per block
than in its matmuls. The C++ step does the same arithmetic as the eager blocks (fp32 residual,
norms, RoPE, cache and attention; the same int8/fp16/fp32 kernels for the linear layers; an fp32,
bf16 or int8 KV cache) with four kernel calls per block, reading each layer's prepared weights
(quant.linear.prepared_weights) in place. Int4 layers run the extension's own GEMV over the
tensors torch's kernel takes (no copy): fp32 from the unrounded input where torch's rounds it to
bf16, so the step is closer to the dequantized weight than the eager blocks are, and ~1.6x
faster per call; `set_int4_kernel("torch")` goes back to torch's kernel (comparisons).

    decoder = build_decoder(model, cache)   # a model/generate.py Decoder, or None
    generate(model, ids, n, decoder=decoder)
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn

from .extension import load_extension
from .linear import prepared_embedding, prepared_weights

log = logging.getLogger(__name__)
CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.int8)


class CpuStepDecoder:
    """model/generate.py's Decoder through the compiled step: the token table stays the model's
    own module; every block, and the final norm and head where the extension has a kernel for the
    head's weights, run in C++. The B rows go through each layer together (one read of an int4
    weight serves them all), and a row's arithmetic is the same whatever else is in the batch, so
    its logits do not depend on the others.

    The head in C++ is for the GIL's sake: each torch op in Python lets go of it, and a decode
    thread beside a busy Python thread (the chat app's screen, the server's event loop) waits up
    to the switch interval to get it back, op after op."""

    def __init__(self, model: nn.Module, step, fused_head: bool = False, fused_embedding: bool = False,
                 prompts: bool = False):
        self.model = model
        self.blocks = step  # the extension's Decoder: every block, bound to the model's caches
        self.fused_head = fused_head  # the step ends with the final norm and the head
        self.fused_embedding = fused_embedding and fused_head  # ... and starts with the token table
        self.prompts = prompts  # prompts' chunks through the step too (prefill_chunk)

    @property
    def prefill_chunk(self):
        """run_prompt_chunk where prompts go through the step (model/generate.py's PromptRunner):
        on AVX-512 (`prompts`) and while every layer's kernel reads its weights once for a chunk's
        rows (r16, Q6_K, the step's int4); else None, and the model's forward runs them."""
        return self.run_prompt_chunk if self.prompts and self.blocks.prompts_in_one_pass() else None

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if self.fused_embedding:
            return self.blocks.step_tokens(tokens.view(-1).tolist(), positions.tolist(), rows.tolist())  # (B, V)
        h = self.model.tok_embeddings(tokens.view(-1, 1)).float()  # (B, 1, D)
        if self.fused_head:
            return self.blocks.step_logits(h, positions.tolist(), rows.tolist())  # (B, V)
        h = self.blocks.step_rows(h, positions.tolist(), rows.tolist())  # (B, 1, D)
        return self._head(h)

    @torch.inference_mode()
    def run_prompt_chunk(self, tokens: list[int], start_pos: int, row: int, before_layer) -> torch.Tensor:
        """A prompt's chunk as rows of one cache row (model/generate.py's PromptRunner): the T
        tokens at positions start_pos.. through the step a layer at a time (each layer's linear
        layers once for the T rows; every row's k and v stored before any row attends, each to the
        keys up to its own position), then the final norm and the head on the last row: logits
        (V,). Against the model's forward over the chunk: the same arithmetic as the step's for
        a token (logits within ~1e-5 of the scale on a 1.2B Llama), without SDPA's mask over the
        whole chunk and ~45 torch calls a layer."""
        T = len(tokens)
        h = self.model.tok_embeddings(torch.tensor(tokens, dtype=torch.long).view(T, 1)).float()  # (T, 1, D)
        positions, rows = list(range(start_pos, start_pos + T)), [row] * T
        for layer in range(len(self.model.layers)):
            before_layer()
            h = self.blocks.step_rows(h, positions, rows, layer, layer + 1)
        return self._head(h[-1:])[0]  # (V,)

    def set_activation_bits(self, bits: int) -> int:
        """8: from the next step on, the r16 layers (GGUF Q4_0, Q4_1, Q8_0, Q4_K and grouped int8)
        and an r16 head round each row's activations to 8-bit integers per 32 values (Q8_0-style,
        as llama.cpp's: one integer product a weight, about half a row's vector work in a batched
        step; on SmolLM2 logits up to ~3 off exact, KL 0.012, where 15 bits keep them within ~0.04:
        docs/BENCHMARKS.md); 15: 15-bit
        integers (the default). Other layer kinds keep their own. Every row of every step alike, so
        a row's logits still do not depend on the rows beside it. Returns the previous setting."""
        return self.blocks.set_activation_bits(bits)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """(B, 1, D) -> logits (B, V). A head run by our kernels (grouped int8, a GGUF type with a
        native kernel) takes up to 8 rows on one weight read, a row's sums independent of the
        others; torch's kernels may block their sums by the number of rows, so any other head
        runs a row at a time."""
        norm, output = self.model.norm, self.model.output
        rows = getattr(output, "invariant_rows", 1)
        return torch.cat([output(norm(h[i : i + rows]))[:, -1] for i in range(0, h.shape[0], rows)])  # (B, V)


def build_decoder(model: nn.Module, cache: Path, build: bool = True) -> CpuStepDecoder | None:
    """The compiled step bound to `model`'s weights and KV cache, or None if it cannot run this
    model (not on the CPU, NF4 or precise layers, an unfused block, an fp16 KV cache) or this
    machine has no compiler."""
    reason = unsupported(model)
    if reason:
        log.info("fused decode step not used: %s", reason)
        return None
    ext = load_extension(cache, build)
    if ext is None:
        return None
    a = model.args
    rope = torch.view_as_real(model.rope).contiguous()  # (S, hd/2, 2) cos, sin
    step = ext.Decoder(a.dim, a.n_heads, a.n_kv_heads, a.head_dim, a.ffn_dim, a.norm_eps, rope)
    for layer in model.layers:
        attn, ffn = layer.attention, layer.feed_forward
        cache = attn.kv_cache
        step.add_block(layer.attention_norm.weight.detach(), layer.ffn_norm.weight.detach(),
                       cache.k, cache.v, getattr(cache, "k_scale", None), getattr(cache, "v_scale", None),
                       *(prepared_weights(m) for m in (attn.wqkv, attn.wo, ffn.w13, ffn.w2)))
    fused = []
    for part, attach in (("head", lambda: step.set_head(model.norm.weight.detach(), prepared_weights(model.output))),
                         ("token table", lambda: step.set_embedding(prepared_embedding(model.tok_embeddings)))):
        try:
            attach()
            fused.append(True)
        except (ValueError, RuntimeError) as e:  # no record for its kind; a kind the extension lacks
            log.info("the %s runs in Python: %s", part, e)
            fused.append(False)
    # Prompts through the step where its attention (one query at a time, as a decode step's) is
    # 16 lanes wide: on AVX-512 a 1.2B Llama's 128-token chunk took 8-14% less time than the
    # model's forward and the default model's 512-token one 6-12% less; the AVX2 build's 8 lanes
    # gained 2-3% on the first and lost 5-10% on the second to the forward's attention
    # (docs/BENCHMARKS.md, "A prompt through the step").
    return CpuStepDecoder(model, step, *fused, prompts=ext.isa() == "avx512")


def unsupported(model: nn.Module) -> str | None:
    """Why the fused step cannot run this model, or None if it can."""
    if model.rope is None or not model.layers:
        return "the caches are not set up"
    if model.norm.weight.device.type != "cpu" or model.norm.weight.dtype != torch.float32:
        return "it runs fp32 activations on the CPU only"
    for i, layer in enumerate(model.layers):
        attn, ffn = layer.attention, layer.feed_forward
        cache = attn.kv_cache
        if cache is None or getattr(cache, "k", None) is None or cache.k.dtype not in CACHE_DTYPES:
            return f"layer {i}: a KV cache in {getattr(cache, 'k', torch.empty(0)).dtype} has no fused kernel"
        if attn.wqkv is None or ffn.w13 is None:
            return f"layer {i}: projections are not fused"
        for name, mod in (("wqkv", attn.wqkv), ("wo", attn.wo), ("w13", ffn.w13), ("w2", ffn.w2)):
            try:
                prepared_weights(mod)
            except ValueError as e:
                return f"layer {i} {name}: {e}"
    return None
