"""Read a LLaMA checkpoint tensor by tensor, in Meta's names, whatever format it came in.

Three formats, detected from what is on disk:
  - Hugging Face: a folder with config.json and model.safetensors (or sharded, with an index);
  - Meta: a folder with params.json and consolidated.NN.pth (one per model-parallel shard);
  - GGUF: one .gguf file (llama.cpp's format, possibly quantized).
`open_checkpoint` reads only headers and checks every tensor's name and shape against the config,
so a broken download fails at once with one `CheckpointError` naming the file; `tensors()` then
reads the weights one at a time, so loading never holds two copies of the model.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import gguf
import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from .args import LLAMA31_ROPE_SCALING, ConfigError, ModelArgs, from_gguf_metadata, from_hf_config, from_meta_params
from .model import rope_frequencies


class CheckpointError(ValueError):
    """A checkpoint we cannot load; the message names the file and what is wrong with it."""


# ---------------------------------------------------------------- foreign names -> Meta names
# "{i}" stands for the layer number.
_HF_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attention.wk.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attention.wv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}

_GGUF_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attention.wq.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attention.wk.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attention.wv.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attention.wo.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.feed_forward.w1.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.feed_forward.w2.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.feed_forward.w3.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.attention_norm.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}

# Meta's model-parallel shards split each matrix along the dim its parallel layer splits:
# column-parallel layers by output rows, row-parallel ones by input columns; norms are replicated.
_META_SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}

# the GGUF types a checkpoint may hold: floats, and the block types quant.ggml keeps as they are
GGUF_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
_SPLIT_NAME = re.compile(r"-\d{5}-of-(\d{5})\.gguf$", re.IGNORECASE)  # llama-gguf-split's names

_TORCH_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


# ---------------------------------------------------------------- the checkpoint
@dataclass
class Checkpoint:
    path: Path  # what the user gave
    format: str  # "hf" | "meta" | "gguf"
    args: ModelArgs
    metadata: dict  # config.json, params.json, or every GGUF key/value as plain Python values
    files: list[Path]  # the weight files
    source_types: dict[str, str]  # Meta name -> stored type ("BF16", "F32", "Q4_1", ...), in load order
    tokenizer_files: list[Path] = field(default_factory=list)
    _read: Callable[[str], torch.Tensor] = field(default=None, repr=False, compare=False)
    _release: Callable[[str], None] = field(default=lambda name: None, repr=False, compare=False)

    def tensor_names(self) -> list[str]:
        return list(self.source_types)

    def tensors(self, stored: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """(Meta name, tensor) one at a time: HF and Meta in their stored dtype, GGUF as float32.

        `stored`: GGUF tensors as the file holds them, never widened: F32 / F16 / BF16 in their
        own dtype, a block type (source_types[name], e.g. "Q4_K") as its raw bytes, a
        (N, K / block_size * type_size) uint8 tensor (quant.ggml reads them).
        """
        shapes = expected_shapes(self.args)
        for name in self.source_types:
            tensor = self._read(name, stored)
            shape = tuple(tensor.shape)
            if tensor.dtype == torch.uint8:  # raw blocks (read checked the bytes per row): rows
                shape = shape[:1] + shapes[name][1:]
            if shape != shapes[name]:  # the file changed since it was opened
                raise CheckpointError(f"{self.path}: {name} has shape {tuple(tensor.shape)}, expected {shapes[name]}")
            yield name, tensor
            del tensor
            self._release(name)

    def fingerprint(self) -> str:
        """A cheap, stable id of the source: the shape, and each file's name, size, first and last MiB."""
        mib = 1 << 20
        h = hashlib.sha256(json.dumps([self.format, self.args.to_dict()], sort_keys=True).encode())
        for file in self.files:
            size = file.stat().st_size
            h.update(f"{file.name}\0{size}\0".encode())
            with open(file, "rb") as f:
                h.update(f.read(mib))
                if size > mib:
                    f.seek(max(mib, size - mib))
                    h.update(f.read())
        return h.hexdigest()


def open_checkpoint(path) -> Checkpoint:
    """Detect the format from what is at `path`, read its headers and check every tensor's shape."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix == ".gguf" or _starts_with(path, b"GGUF"):
            return _open_gguf(path)
        raise CheckpointError(f"{path}: not a GGUF file; a Hugging Face or Meta checkpoint is the folder holding it")
    if (path / "config.json").exists():
        return _open_hf(path)
    if (path / "params.json").exists():
        return _open_meta(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _open_gguf(ggufs[0], given=path)
    if ggufs:
        raise CheckpointError(f"{path}: holds {len(ggufs)} GGUF files; name the one to load")
    raise CheckpointError(
        f"{path}: no checkpoint found; expected config.json with model.safetensors (Hugging Face), "
        "params.json with consolidated.00.pth (Meta), or a .gguf file"
    )


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every weight a LLaMA of this shape has, in Meta names, in load order."""
    q_dim, kv_dim = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    shapes = {"tok_embeddings.weight": (args.vocab_size, args.dim)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes[p + "attention.wq.weight"] = (q_dim, args.dim)
        shapes[p + "attention.wk.weight"] = (kv_dim, args.dim)
        shapes[p + "attention.wv.weight"] = (kv_dim, args.dim)
        shapes[p + "attention.wo.weight"] = (args.dim, q_dim)
        shapes[p + "feed_forward.w1.weight"] = (args.ffn_dim, args.dim)
        shapes[p + "feed_forward.w2.weight"] = (args.dim, args.ffn_dim)
        shapes[p + "feed_forward.w3.weight"] = (args.ffn_dim, args.dim)
        shapes[p + "attention_norm.weight"] = (args.dim,)
        shapes[p + "ffn_norm.weight"] = (args.dim,)
    shapes["norm.weight"] = (args.dim,)
    if not args.tie_embeddings:
        shapes["output.weight"] = (args.vocab_size, args.dim)
    return shapes


def load_state_dict_into(model: nn.Module, ckpt: Checkpoint, dtype: torch.dtype | None = None) -> None:
    """Assign each checkpoint tensor to `model` (which may live on the meta device), then tie.

    Tensors are assigned, not copied into existing storage, so a model built under
    `torch.device("meta")` never allocates its random init and peak memory stays one model.
    """
    wanted = {name for name, _ in model.named_parameters()}
    if ckpt.args.tie_embeddings:
        wanted.discard("output.weight")
    if wanted != set(ckpt.source_types):
        raise ValueError(f"model and checkpoint disagree on {sorted(wanted ^ set(ckpt.source_types))[:3]}")
    for name, tensor in ckpt.tensors():
        module_name, _, attr = name.rpartition(".")
        if dtype is not None:
            tensor = tensor.to(dtype)
        setattr(model.get_submodule(module_name), attr, nn.Parameter(tensor, requires_grad=False))
    if ckpt.args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight


# ---------------------------------------------------------------- Hugging Face
def _open_hf(folder: Path) -> Checkpoint:
    config_file = folder / "config.json"
    config = _read_json(config_file)
    model_type = config.get("model_type", "llama")
    if model_type != "llama":
        raise CheckpointError(f"{config_file}: model_type {model_type} is not supported; llamadesk runs LLaMA models")
    args = _build_args(config_file, from_hf_config, config)

    index_file = folder / "model.safetensors.index.json"
    if index_file.exists():
        weight_map = _read_json(index_file).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_file}: has no weight_map")
        files = [folder / name for name in sorted(set(weight_map.values()))]
    elif (folder / "model.safetensors").exists():
        files = [folder / "model.safetensors"]
    else:
        raise CheckpointError(f"{folder}: has config.json but no model.safetensors or model.safetensors.index.json")

    located: dict[str, tuple[Path, str]] = {}  # Meta name -> (file, HF name)
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    types: dict[str, str] = {}
    for file in files:
        if not file.exists():
            raise CheckpointError(f"{file}: listed in {index_file.name} but missing")
        for hf_name, (shape, dtype) in _safetensors_header(file).items():
            # Old transformers saved the RoPE table; a tied lm_head just repeats the embedding.
            if hf_name.endswith("rotary_emb.inv_freq") or (hf_name == "lm_head.weight" and args.tie_embeddings):
                continue
            name = _rename(hf_name, _HF_NAMES, file)
            located[name] = (file, hf_name)
            found[name] = (shape, f"{file} ({hf_name})")
            types[name] = dtype
    order = _check_shapes(folder, args, found, "config.json")

    def read(name: str, stored: bool = False) -> torch.Tensor:
        file, hf_name = located[name]
        with safe_open(file, framework="pt") as f:
            w = f.get_tensor(hf_name)
        if name.endswith("attention.wq.weight"):
            w = _hf_to_meta_rope_order(w, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            w = _hf_to_meta_rope_order(w, args.n_kv_heads)
        return w

    tokenizer_files = [folder / n for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")]
    return Checkpoint(
        path=folder, format="hf", args=args, metadata=config, files=files,
        source_types={name: types[name] for name in order},
        tokenizer_files=[f for f in tokenizer_files if f.exists()], _read=read,
    )


def _safetensors_header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, dtype)} from a safetensors header, reading no weights."""
    _check_readable(file)
    try:
        with safe_open(file, framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def _hf_to_meta_rope_order(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo the permutation HF's converter applies to wq/wk.

    HF rotates each head's first half against its second half (x_j with x_{j + hd/2}); Meta rotates
    neighbours (x_2j with x_2j+1). Reordering the rows of wq/wk turns one into the other.
    """
    out_dim, in_dim = w.shape
    w = w.view(n_heads, 2, out_dim // n_heads // 2, in_dim)  # (nh, half, hd/2, dim)
    return w.transpose(1, 2).reshape(out_dim, in_dim)  # (nh * hd, dim), pairs adjacent


# ---------------------------------------------------------------- Meta
def _open_meta(folder: Path) -> Checkpoint:
    params_file = folder / "params.json"
    params = _read_json(params_file)
    files = sorted(folder.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"{folder}: has params.json but no consolidated.00.pth")
    shards = [_torch_load(f) for f in files]

    # Llama 1 and 2 saved the RoPE table as rope.freqs; we compute it.
    names = [n for n in shards[0] if n != "rope.freqs"]
    for file, shard in zip(files[1:], shards[1:]):
        missing = set(names) - set(shard)
        if missing:
            raise CheckpointError(f"{file}: lacks {sorted(missing)[0]}, which {files[0].name} has")

    dim = params.get("dim")
    split = {n: _meta_split_dim(n, shards[0][n], dim) if len(shards) > 1 else None for n in names}
    emb = shards[0].get("tok_embeddings.weight")
    vocab = None if emb is None else emb.shape[0] * (len(shards) if split["tok_embeddings.weight"] == 0 else 1)
    args = _build_args(params_file, lambda p: from_meta_params(p, vocab_size=vocab), params)
    # Meta's llama code always has its own output layer; without one, the embedding serves.
    args.tie_embeddings = "output.weight" not in names

    found, types = {}, {}
    for name in names:
        shape = list(shards[0][name].shape)
        if split[name] is not None:
            shape[split[name]] = sum(s[name].shape[split[name]] for s in shards)
        found[name] = (tuple(shape), f"{files[0]} ({name})")
        types[name] = _TORCH_DTYPE_NAMES.get(shards[0][name].dtype, str(shards[0][name].dtype))
    order = _check_shapes(folder, args, found, "params.json")

    def read(name: str, stored: bool = False) -> torch.Tensor:
        if split[name] is None:
            return shards[0][name]
        return torch.cat([s[name] for s in shards], dim=split[name])

    tokenizer = folder / "tokenizer.model"
    return Checkpoint(
        path=folder, format="meta", args=args, metadata=params, files=files,
        source_types={name: types[name] for name in order},
        tokenizer_files=[tokenizer] if tokenizer.exists() else [], _read=read,
    )


def _meta_split_dim(name: str, shard: torch.Tensor, dim: int | None) -> int | None:
    layer = name.split(".")[-2]
    # Llama 2's ParallelEmbedding splits the embedding's columns, Llama 3's VocabParallelEmbedding its rows.
    if layer == "tok_embeddings" and shard.shape[1] == dim:
        return 0
    return _META_SHARD_DIM.get(layer)


def _check_readable(file: Path) -> None:
    """CheckpointError in the OS's words for a file that cannot be opened (safetensors says "No such
    file or directory" of a file it may not read)."""
    try:
        with open(file, "rb"):
            pass
    except OSError as e:
        raise CheckpointError(f"{file}: cannot be read ({e.strerror or e})") from None


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    _check_readable(file)
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "_use_new_zipfile_serialization" not in str(e):
                raise
            # torch's format before 1.6 cannot be mapped: read whole, as safely (weights only)
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False, the very thing that would run the code: name the culprit only.
        culprit = re.search(r"GLOBAL (\S+)", str(e))
        named = f" (it refers to {culprit[1]})" if culprit else ""
        raise CheckpointError(
            f"{file}: holds Python objects besides tensors, which could run code when loaded{named}; "
            "refusing to load it"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: is not a flat dict of tensors")
    return state


# ---------------------------------------------------------------- GGUF
def _open_gguf(file: Path, given: Path | None = None) -> Checkpoint:
    _check_readable(file)
    with open(file, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{file}: not a GGUF file (a GGUF file starts with the bytes 'GGUF')")
    try:
        reader = gguf.GGUFReader(file)
    except Exception as e:  # the reader raises whatever numpy or struct raise on bad bytes: no words for a user
        unknown = re.fullmatch(r"(?:np\.uint32\()?(\d+)\)? is not a valid GGMLQuantizationType", str(e))
        why = (f"a tensor has type number {unknown[1]}, which no GGUF type has (from a newer llama.cpp?)"
               if unknown else f"its header or tensors run past its {file.stat().st_size:,} bytes or hold values "
               "no GGUF writer makes (truncated or corrupt?)")
        raise CheckpointError(f"{file}: not a readable GGUF file: {why}") from None
    # GGUF.* are the reader's view of the header (version, counts), not key/values in the file.
    metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{file}: architecture {arch} is not supported; llamadesk runs LLaMA models ('llama')")

    _refuse_split(file, metadata)
    by_name: dict[str, gguf.ReaderTensor] = {}
    rope_freqs = None
    for t in reader.tensors:
        if t.tensor_type.name not in GGUF_TYPES:
            raise CheckpointError(f"{file}: {t.name} is {t.tensor_type.name}, a type llamadesk does not hold "
                                  f"(it holds {', '.join(GGUF_TYPES)})")
        if t.name == "rope_freqs.weight":
            rope_freqs = t
            continue
        by_name[_rename(t.name, _GGUF_NAMES, file)] = t
    tied = "output.weight" not in by_name  # llama.cpp drops output.weight when it equals the embedding
    fallback_vocab = {}
    if "tok_embeddings.weight" in by_name and "tokenizer.ggml.tokens" not in metadata:
        fallback_vocab["llama.vocab_size"] = int(by_name["tok_embeddings.weight"].shape[1])
    args = _build_args(file, from_gguf_metadata, {**fallback_vocab, **metadata, "_tied_embeddings": tied})
    rope_dims = metadata.get("llama.rope.dimension_count", args.head_dim)
    if rope_dims != args.head_dim:
        raise CheckpointError(f"{file}: rotates {rope_dims} of {args.head_dim} head dims; only full RoPE is supported")
    if rope_freqs is not None:
        args.rope_scaling = _llama31_scaling(file, args, rope_freqs,
                                             metadata.get("llama.rope.scaling.original_context_length"))

    # GGUF lists dims fastest first (ne0 = row length); torch lists them slowest first.
    found = {name: (tuple(int(n) for n in reversed(t.shape)), f"{file} ({t.name})") for name, t in by_name.items()}
    order = _check_shapes(file, args, found, "its metadata")

    def read(name: str, stored: bool = False) -> torch.Tensor:
        t = by_name[name]
        if stored:
            return _stored_gguf_tensor(file, t, found[name][0])
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise CheckpointError(f"{file}: {t.name} is {t.tensor_type.name}, which cannot be dequantized") from None
        w = w.reshape(found[name][0])  # quantized rows come back flat: (rows, ne0) -> torch order
        if not w.flags.writeable:  # F32 comes back as a view of the read-only memory map
            w = w.copy()
        return torch.from_numpy(w)

    # llama.cpp's converter already reorders wq/wk to Meta's interleaved RoPE, so nothing to undo.
    return Checkpoint(
        path=given or file, format="gguf", args=args, metadata=metadata, files=[file],
        source_types={name: by_name[name].tensor_type.name for name in order}, _read=read,
        _release=lambda name: _release_gguf_pages(reader, by_name[name]),
    )


def _refuse_split(file: Path, metadata: dict) -> None:
    named = _SPLIT_NAME.search(file.name)
    count = metadata.get("split.count", int(named.group(1)) if named else 1)
    if count > 1:  # "-00001-of-00001.gguf" is a whole model
        raise CheckpointError(f"{file}: is one part of a split GGUF ({count} parts); "
                              "join them first with llama.cpp's `llama-gguf-split --merge`")


def _stored_gguf_tensor(file: Path, t, shape: tuple[int, ...]) -> torch.Tensor:
    """A GGUF tensor as the file holds it (see Checkpoint.tensors): a read-only view of the
    file's mapping, no copy (a writer streams it out; nothing may write into it)."""
    data = np.asarray(t.data)
    with warnings.catch_warnings():  # torch warns that the array is not writable: it is not written
        warnings.simplefilter("ignore", UserWarning)
        return _stored_view(file, t, data, shape)


def _release_gguf_pages(reader, t) -> None:
    """Drop the file's pages up to the end of a tensor just read from this process's resident
    memory: the mapping stays valid (a later read faults them back in from the page cache), but
    the pages stop adding up in RSS as an import walks through a file of many GB. Everything up
    to here, not the tensor alone: a writer that holds earlier tensors until its shard is full
    reads them again then, and those pages go at the next release."""
    end = t.data_offset + t.n_bytes
    try:
        reader.data._mmap.madvise(mmap.MADV_DONTNEED, 0, end)
    except (AttributeError, OSError, ValueError):  # not a plain mmap, or no madvise here: RSS only
        pass


def _stored_view(file: Path, t, data: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    if t.tensor_type.name in ("F32", "F16"):
        return torch.from_numpy(data).reshape(shape)
    if t.tensor_type.name == "BF16":  # the reader gives BF16 as bytes
        return torch.from_numpy(data).view(torch.bfloat16).reshape(shape)
    block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
    row = shape[-1] // block * size
    if len(shape) != 2 or shape[-1] % block or data.size != shape[0] * row:
        raise CheckpointError(f"{file}: {t.name} holds {data.size} bytes, which is not {shape} in "
                              f"{t.tensor_type.name} blocks (truncated?)")
    return torch.from_numpy(data).reshape(shape[0], row)


def _llama31_scaling(file: Path, args: ModelArgs, rope_freqs, original: int | None) -> dict:
    """llama.cpp stores Llama 3.1's RoPE scaling as per-frequency divisors; recover and check the recipe.

    Llama 3.1 and 3.2 differ only in `factor` (8 and 32), which is the largest divisor; the
    original context is 8192 unless the file says otherwise.
    """
    got = torch.from_numpy(gguf.quants.dequantize(rope_freqs.data, rope_freqs.tensor_type).reshape(-1).copy())
    scaling = args.rope_scaling or dict(LLAMA31_ROPE_SCALING, factor=float(got.max()))
    if original and args.rope_scaling is None:
        scaling["original_max_position_embeddings"] = int(original)
    plain = rope_frequencies(args.head_dim, args.rope_theta, None)
    want = plain / rope_frequencies(args.head_dim, args.rope_theta, scaling)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4):
        raise CheckpointError(f"{file}: rope_freqs.weight is not Llama 3.1's RoPE scaling, which is all we support")
    return scaling


# ---------------------------------------------------------------- shared
def _rename(foreign: str, table: dict[str, str], file: Path) -> str:
    layer = re.search(r"\.(\d+)\.", foreign)  # "model.layers.3.mlp.up_proj.weight", "blk.3.ffn_up.weight"
    key = foreign if layer is None else f"{foreign[:layer.start()]}.{{i}}.{foreign[layer.end():]}"
    if key not in table:
        raise CheckpointError(f"{file}: unknown tensor {foreign!r}; is this a LLaMA?")
    return table[key].format(i=layer[1] if layer else "")


def _check_shapes(where: Path, args: ModelArgs, found: dict[str, tuple[tuple[int, ...], str]], config: str):
    """Compare every tensor with what the config implies; return the names in load order.

    `found` maps each Meta name to (shape, where it came from) for the messages.
    """
    shapes = expected_shapes(args)
    for name, (shape, source) in found.items():
        if name not in shapes:
            raise CheckpointError(f"{source}: unexpected tensor {name} for this config")
    for name, want in shapes.items():  # in load order, so the first complaint is the most telling one
        if name in found and found[name][0] != want:
            shape, source = found[name]
            raise CheckpointError(f"{source}: {name} has shape {shape}, but {config} implies {want}")
    missing = [name for name in shapes if name not in found]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: missing tensor {missing[0]}{more}")
    return list(shapes)


def _build_args(file: Path, builder, config: dict) -> ModelArgs:
    try:
        return builder(config)
    except ConfigError as e:
        raise CheckpointError(f"{file}: {e}") from None


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not readable JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return data


def _starts_with(file: Path, magic: bytes) -> bool:
    with open(file, "rb") as f:
        return f.read(len(magic)) == magic
