"""Offline quantization: stream a full-precision source tensor by tensor into packed safetensors.

Peak memory is about one tensor (big ones are packed a block of rows at a time) plus one output
shard, never the model. Every packed file records in its metadata the format version, the
scheme, the per-tensor precision map and group sizes, the source's fingerprint and the quality
report, so the loader reads what a file holds instead of guessing it from a name.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from model.args import ModelArgs

from .formats import (FORMAT_VERSION, GGUF_BLOCK, INT4_GROUP_SIZES, SCHEMES, Packed, choose_int4_group, pack_error,
                      pack_int4, pack_int8, pack_nf4, unpack)

SHARD_BYTES = 128 << 20  # an output shard is held in memory until written
ROW_BLOCK_ELEMS = 4 << 20  # pack at most this many weights at once: bounded fp32 temporaries
INT8_GROUP = 32  # int8 weights per fp16 scale, as llama.cpp's Q8_0
Progress = Callable[[int, int, str], None]


@dataclass
class QuantOptions:
    scheme: str  # int8 | int4 | nf4: the transformer blocks' linear layers
    group_size: int = 32  # int4 only
    embeddings: str = "int8"  # int8 | fp32: the token embedding table
    # the output projection: int8 | int4 | fp16 | fp32, or "auto": int8
    head: str = "auto"
    double_quant: bool = True  # nf4 only: quantize the absmax statistics too

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {self.scheme!r}; choose one of {', '.join(SCHEMES)}")
        if self.scheme == "int4" and self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, not {self.group_size}")
        if self.embeddings not in ("int8", "fp32"):
            raise ValueError(f"embeddings can be int8 or fp32, not {self.embeddings!r}")
        if self.head not in ("auto", "int8", "int4", "fp16", "fp32"):
            raise ValueError(f"the head can be auto, int8, int4, fp16 or fp32, not {self.head!r}")


@dataclass
class TensorReport:
    name: str
    scheme: str
    group_size: int
    sqnr_db: float
    rel_err: float
    note: str = ""


@dataclass
class QuantReport:
    tensors: list[TensorReport] = field(default_factory=list)
    quality: dict | None = None  # perplexity / KL / top-1, filled after packing

    def to_dict(self) -> dict:
        return {"tensors": [asdict(t) for t in self.tensors], "quality": self.quality}

    @property
    def fallbacks(self) -> list[TensorReport]:
        return [t for t in self.tensors if t.note]


def precision_map(args: ModelArgs, opts: QuantOptions) -> dict[str, str]:
    """Module name -> scheme; norms are absent (they stay fp32)."""
    linear = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
              "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
    out = {f"layers.{i}.{m}": opts.scheme for i in range(args.n_layers) for m in linear}
    out["tok_embeddings"] = opts.embeddings
    head = opts.head
    out["output"] = "int8" if head == "auto" else head
    return out


def _in_features(args: ModelArgs, module: str) -> int:
    if module.endswith("wo"):
        return args.n_heads * args.head_dim
    if module.endswith("w2"):
        return args.ffn_dim
    return args.dim


def pack_tensor(name: str, w: torch.Tensor, scheme: str, opts: QuantOptions, args: ModelArgs,
                source_type: str | None = None) -> tuple[str, Packed | torch.Tensor, TensorReport]:
    """Pack one weight; returns the scheme used (after fallbacks), the result and its report row.

    `source_type` is how the source stored it ("Q4_0", "Q4_1", "F32", ...): int4 group 32 of a
    GGUF Q4_0 tensor takes Q4_0's zero point of 8, so the source's values come back exactly (the
    default, asymmetric grid already reproduces Q4_1 exactly).
    """
    module = name[: -len(".weight")]
    note = ""
    if scheme in ("fp32", "fp16"):
        dtype = torch.float32 if scheme == "fp32" else torch.float16
        cast = w.to(dtype).contiguous()
        err = pack_error(w, cast)
        return scheme, cast, TensorReport(module, scheme, 0, err.sqnr_db, err.rel_err)
    if scheme == "int4":
        K = _in_features(args, module) if module != "output" else args.dim
        group = choose_int4_group(K, opts.group_size)
        if group is None:
            scheme, note = "int8", f"no int4 group <= {opts.group_size} divides {K}: int8 instead"
        elif group != opts.group_size:
            note = f"group {opts.group_size} does not divide {K}: group {group} instead"
    if scheme == "int4":
        symmetric = source_type == "Q4_0" and group == GGUF_BLOCK
        packed, sq, rel = _pack_in_row_blocks(w, lambda b: pack_int4(b, group, symmetric))
    elif scheme == "int8":
        # one fp16 scale per 32 weights, as llama.cpp's Q8_0 (a Q8_0 source comes back exactly;
        # one scale per row loses ~1% of top-1 on SmolLM2); the CPU step and the GPU have grouped
        # kernels. A row that 32 does not divide keeps one scale per row.
        g = INT8_GROUP if w.shape[1] % INT8_GROUP == 0 else None
        packed, sq, rel = _pack_in_row_blocks(w, lambda b: pack_int8(b, g))
    else:
        packed, err = pack_nf4(w.float(), compress_statistics=opts.double_quant)
        sq, rel = err.sqnr_db, err.rel_err
    return scheme, packed, TensorReport(module, scheme, packed.group_size, sq, rel, note)


def _pack_in_row_blocks(w: torch.Tensor, pack) -> tuple[Packed, float, float]:
    """int8 and int4 pack rows independently: a block of rows at a time bounds the fp32 copies."""
    N, K = w.shape
    rows = max(1, ROW_BLOCK_ELEMS // K)
    tensors, first, signal, noise = {}, None, 0.0, 0.0
    for s in range(0, N, rows):
        block = w[s : s + rows].float()
        p, err = pack(block)
        s2 = block.pow(2).sum(dtype=torch.float64).item()
        signal += s2
        noise += s2 * err.rel_err**2 if math.isfinite(err.rel_err) else 0.0
        if first is None:  # the output is filled in place: no list of parts to concatenate
            first = p
            tensors = {k: torch.empty((N, *t.shape[1:]), dtype=t.dtype) for k, t in p.tensors.items()}
        for k, t in p.tensors.items():
            if t.dtype != tensors[k].dtype:  # Q4_0 mins turn fp32 where -8d overflows fp16
                tensors[k] = tensors[k].to(torch.promote_types(t.dtype, tensors[k].dtype))
            tensors[k][s : s + t.shape[0]] = t
        del block, p
    packed = Packed(first.scheme, (N, K), first.group_size, tensors)
    sqnr = math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal else -math.inf
    rel = math.sqrt(noise / signal) if signal else 0.0
    return packed, sqnr, rel


def quantize_stream(tensors: Iterator[tuple[str, torch.Tensor]], args: ModelArgs, opts: QuantOptions,
                    total: int, progress: Progress, source_types: dict[str, str] | None = None) -> Iterator[tuple[dict[str, torch.Tensor], dict, TensorReport | None]]:
    """Yield (safetensors entries, per-weight metadata, report row) for each source tensor.

    A tied model's table is packed twice: once as the embedding, once as the output head.
    """
    pmap = precision_map(args, opts)
    types = source_types or {}
    done = 0
    for name, w in tensors:
        progress(done, total, name)
        module = name[: -len(".weight")]
        if module not in pmap:  # norms
            yield {name: w.float().contiguous()}, {}, None
        else:
            targets = [module]
            if module == "tok_embeddings" and args.tie_embeddings:
                targets.append("output")
            for target in targets:
                scheme, packed, row = pack_tensor(f"{target}.weight", w, pmap[target], opts, args,
                                                  source_type=types.get(name))
                row.name = target
                if isinstance(packed, torch.Tensor):
                    yield {f"{target}.weight": packed}, {target: {"scheme": scheme}}, row
                else:
                    yield packed.state_dict(target), {target: packed.metadata()}, row
        done += 1
    progress(total, total, "done")


class ShardWriter:
    """Tensors into model-NNNNN.safetensors files of about `shard_bytes` each, every file written
    as soon as it is full (so at most one shard is in memory), its metadata asked of `metadata()`
    at that moment. `files` lists the names written, in order."""

    def __init__(self, folder: Path, shard_bytes: int = SHARD_BYTES, metadata: Callable[[], dict] = dict):
        self.folder, self.shard_bytes, self.metadata = Path(folder), shard_bytes, metadata
        self.files: list[str] = []
        self._shard: dict[str, torch.Tensor] = {}
        self._bytes = 0

    def add(self, entries: dict[str, torch.Tensor]) -> None:
        self._shard.update(entries)
        self._bytes += sum(t.numel() * t.element_size() for t in entries.values())
        if self._bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._shard:
            return
        fname = f"model-{len(self.files) + 1:05d}.safetensors"
        write_safetensors(self.folder / fname, self._shard, {"format": "pt", **self.metadata()})
        self.files.append(fname)
        self._shard, self._bytes = {}, 0


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                       torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
                       torch.int64: "I64", torch.bool: "BOOL"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file written tensor by tensor from the tensors' own memory.

    safetensors' save_file first copies every tensor into one bytes object: the whole shard
    twice in memory, three times when the tensors are views of a memory-mapped source (a GGUF's
    blocks). Here the header goes first (8-byte little-endian length, JSON padded to 8 bytes),
    then each tensor's bytes straight from the tensor, in the header's order."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for t in tensors.values():
            t = t.contiguous()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def write_packed(folder: Path, stream, header: dict) -> tuple[list[str], dict, QuantReport]:
    """Write the stream into shards; every shard's metadata carries the whole header."""
    layout, report = {}, QuantReport()
    writer = ShardWriter(folder, metadata=lambda: shard_metadata(layout, header))
    for entries, meta, row in stream:
        layout.update(meta)
        if row is not None:
            report.tensors.append(row)
        writer.add(entries)  # written as soon as it is full, before the next tensor is packed beside it
    writer.flush()
    return writer.files, layout, report


def shard_metadata(layout: dict, header: dict | None = None) -> dict[str, str]:
    """What a packed shard's safetensors metadata records: format version, header, layout so far."""
    meta = {"llamadesk_format_version": str(FORMAT_VERSION), "llamadesk_layout": json.dumps(layout)}
    if header is not None:
        meta["llamadesk_quant"] = json.dumps(header)
    return meta


def dequantized(packed_entries: dict[str, torch.Tensor], module: str, scheme: str) -> torch.Tensor:
    """The fp32 weight a module's packed entries stand for (used by tests and the report)."""
    return unpack(Packed.from_state_dict(module, packed_entries, scheme))
