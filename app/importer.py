"""`llamadesk import`: a Hugging Face folder, a Meta folder or a GGUF file into the store.

Tensors stream from the source one at a time into safetensors shards of at most `SHARD_BYTES`,
so the model is never in memory twice. Everything is written into a staging folder that only
becomes visible in the store once complete.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from model.checkpoints import Checkpoint, open_checkpoint
from model.tokenizer import load_tokenizer, tokenizer_files_from_gguf

from . import store

SHARD_BYTES = 2 << 30
Progress = Callable[[int, int, str], None]


def import_checkpoint(path: Path, name: str | None = None, replace: bool = False,
                      progress: Progress = lambda done, total, what: None) -> store.ModelEntry:
    path = Path(path).expanduser()
    ckpt = open_checkpoint(path)
    name = name or store.name_from_path(path)
    with store.staging(name, store.SOURCE, replace=replace) as tmp:
        weight_files = write_weights(ckpt, tmp, progress)
        write_tokenizer(ckpt, tmp)
        tokenizer = load_tokenizer(tmp)
        if tokenizer.vocab_size > ckpt.args.vocab_size:
            raise ValueError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the "
                             f"embedding only {ckpt.args.vocab_size} rows")
        manifest = {
            "format_version": store.FORMAT_VERSION,
            "name": name,
            "variant": store.SOURCE,
            "args": ckpt.args.to_dict(),
            "weights": weight_files,
            "source": {
                "path": str(path.resolve()),
                "format": ckpt.format,
                "fingerprint": ckpt.fingerprint(),
                "types": ckpt.source_types,
            },
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        store.write_json(tmp / store.MANIFEST, manifest)
    return store.find(f"{name}:{store.SOURCE}")


def write_weights(ckpt: Checkpoint, folder: Path, progress: Progress) -> list[str]:
    """Stream tensors into model-NNNNN.safetensors shards; return the file names."""
    names = ckpt.tensor_names()
    files, shard, shard_bytes = [], {}, 0

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            fname = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(folder / fname), metadata={"format": "pt"})
            files.append(fname)
            shard, shard_bytes = {}, 0

    for i, (tname, tensor) in enumerate(ckpt.tensors()):
        progress(i, len(names), tname)
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > SHARD_BYTES:
            flush()
        shard[tname] = tensor.contiguous() if tensor.is_contiguous() else tensor.contiguous().clone()
        shard_bytes += size
    flush()
    progress(len(names), len(names), "done")
    return files


def write_tokenizer(ckpt: Checkpoint, folder: Path) -> None:
    """The store keeps a tokenizer as Hugging Face files (tokenizer.json or a tiktoken tokenizer.model)."""
    if ckpt.format == "gguf":
        tok_json, tok_config = tokenizer_files_from_gguf(ckpt.metadata)
        store.write_json(folder / "tokenizer.json", tok_json)
        store.write_json(folder / "tokenizer_config.json", tok_config)
        return
    for f in ckpt.tokenizer_files:
        shutil.copyfile(f, folder / f.name)
    # the model's own sampling defaults (app.sampling_defaults reads them)
    if ckpt.format == "hf" and (ckpt.path / "generation_config.json").is_file():
        shutil.copyfile(ckpt.path / "generation_config.json", folder / "generation_config.json")
