"""`llamadesk import`: a Hugging Face folder, a Meta folder or a GGUF file into the store.

Tensors stream from the source one at a time into safetensors shards written as soon as they
are full, so the model is never in memory. Everything is written into a staging folder that
only becomes visible in the store once complete.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from model.checkpoints import Checkpoint, open_checkpoint
from model.tokenizer import TokenizerError, gguf_tokenizer_files, load_tokenizer, merged_generation_config
from quant.formats import FORMAT_VERSION
from quant.ggml import GGUF_SCHEMES
from quant.quantize import ShardWriter, shard_metadata

from . import store
from .errors import UserError

Progress = Callable[[int, int, str], None]


def import_checkpoint(path: Path, name: str | None = None, replace: bool = False,
                      progress: Progress = lambda done, total, what: None,
                      hub: dict | None = None, say: Callable[[str], None] = lambda line: None) -> store.ModelEntry:
    """Install a checkpoint as `name:source`, every tensor as the file holds it.

    Floats keep their own dtype (bf16 stays bf16); a GGUF's block types (Q4_K, Q6_K, ...) keep
    their own bytes as packed schemes of quant.ggml, so the entry is about the file's size and
    its values are exactly the file's. `hub` ({"alias", "url", "repo", "commit", "files"}) says where
    `llamadesk pull` fetched it; `--model` then takes the alias. Raises UserError for a
    checkpoint it cannot take. Replacing a source removes the variants packed from the old one
    (each said through `say`).
    """
    path = Path(path).expanduser()
    ckpt = open_checkpoint(path)
    name = name or store.name_from_path(path)
    with store.staging(name, store.SOURCE, replace=replace) as tmp:
        try:
            write_tokenizer(ckpt, tmp)
            tokenizer = load_tokenizer(tmp)
        except TokenizerError as e:  # said of the store's temporary folder: the user knows their own path
            said = str(e).replace(str(tmp), str(path))
            raise UserError(said if str(path) in said else f"{path}: {said}") from None
        if tokenizer.vocab_size > ckpt.args.vocab_size:
            raise UserError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the "
                            f"embedding only {ckpt.args.vocab_size} rows")
        weight_files, layout = write_weights(ckpt, tmp, progress)
        manifest = {
            "format_version": store.FORMAT_VERSION,
            "name": name,
            "variant": store.SOURCE,
            "args": ckpt.args.to_dict(),
            "weights": weight_files,
            "source": {
                "path": hub["url"] if hub else str(path.resolve()),  # a pull's copy is gone afterwards
                "format": ckpt.format,
                "fingerprint": ckpt.fingerprint(),
                "types": ckpt.source_types,
                **({"hub": hub} if hub else {}),
            },
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if layout:  # the file's own blocks: the source is packed, exactly
            manifest["quant"] = {"scheme": "gguf", "exact": True, "format_version": FORMAT_VERSION,
                                 "layout": layout}
        store.write_json(tmp / store.MANIFEST, manifest)
    source = store.find(f"{name}:{store.SOURCE}")
    for stale in store.remove_packed_from_other_sources(source):
        say(f"Removed {stale.ref}: it was packed from the {name}:{store.SOURCE} this import replaced")
    return source


def write_weights(ckpt: Checkpoint, folder: Path, progress: Progress) -> tuple[list[str], dict]:
    """Stream the stored tensors into shards; return the file names and the packed layout
    ({module: {"scheme", "shape", "group_size"}} of the tensors kept as GGUF blocks; {} if none).

    A tied table kept as blocks is written once: the layout's "output" entry says `tied`, and
    the loader hands the head the table's tensor (quant.linear.tie_output).
    """
    names = ckpt.tensor_names()
    layout: dict[str, dict] = {}
    writer = ShardWriter(folder, metadata=lambda: shard_metadata(layout))
    for i, (tname, tensor) in enumerate(ckpt.tensors(stored=True)):
        progress(i, len(names), tname)
        if tensor.dtype == torch.uint8:
            module, scheme = tname[: -len(".weight")], ckpt.source_types[tname].lower()
            block, size = GGUF_SCHEMES[scheme]
            layout[module] = {"scheme": scheme, "shape": [tensor.shape[0], tensor.shape[1] // size * block],
                              "group_size": block}
            writer.add({f"{module}.blocks": tensor})
        else:
            writer.add({tname: tensor})
    if ckpt.args.tie_embeddings and "tok_embeddings" in layout:
        layout["output"] = dict(layout["tok_embeddings"], tied=True)
    writer.flush()
    progress(len(names), len(names), "done")
    return writer.files, layout


def write_tokenizer(ckpt: Checkpoint, folder: Path) -> None:
    """The store keeps a tokenizer as Hugging Face files: tokenizer.json, or a tokenizer.model
    (SentencePiece's, or Llama 3's tiktoken ranks), with tokenizer_config.json."""
    if ckpt.format == "gguf":
        for fname, content in gguf_tokenizer_files(ckpt.metadata).items():
            if isinstance(content, bytes):
                (folder / fname).write_bytes(content)
            else:
                store.write_json(folder / fname, content)
        return
    for f in ckpt.tokenizer_files:
        shutil.copyfile(f, folder / f.name)
    if ckpt.format == "hf":  # EOS ids and sampling suggestions, from config.json and generation_config.json
        generation = merged_generation_config(ckpt.metadata, ckpt.path / "generation_config.json")
        if generation:
            store.write_json(folder / "generation_config.json", generation)
