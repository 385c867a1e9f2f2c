"""`llamadesk quantize` and `llamadesk eval`: packed variants beside their source in the store."""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from model.args import ModelArgs
from model.tokenizer import load_tokenizer
from quant.formats import FORMAT_VERSION
from quant.quality import Comparison, compare, default_text, perplexity
from quant.quantize import QuantOptions, quantize_stream, write_packed

from . import store
from .devices import release_freed_memory
from .errors import UserError

REPORT_TOKENS = 2048  # the quality report's text: enough for a stable KL and top-1, quick to run
Progress = Callable[[int, int, str], None]


def source_tensors(entry: store.ModelEntry):
    """The source variant's tensors one at a time, memory-mapped.

    A handle (or any tensor from it) keeps the whole file mapped, and every page read stays in
    RSS while it is: a handle per tensor lets the pages of packed tensors go (measured on a 1B
    model: 2.0 GiB of a shard stayed resident with one handle per file).
    """
    for fname in entry.manifest["weights"]:
        path = str(entry.path / fname)
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
        for k in keys:
            with safe_open(path, framework="pt") as f:
                tensor = f.get_tensor(k)
            yield k, tensor
            del tensor


def quantize_variant(ref: str, opts: QuantOptions, out: str | None = None, replace: bool = False,
                     progress: Progress = lambda d, t, w: None, report_tokens: int = REPORT_TOKENS) -> store.ModelEntry:
    name, variant = store.parse_ref(ref)
    source = store.find(f"{name}:{variant or store.SOURCE}")
    if source.manifest.get("quant"):
        raise UserError(f"{source.ref} is already packed ({source.manifest['quant']['scheme']}); quantize the source")
    tag = out or opts.scheme
    if tag == store.SOURCE:
        raise UserError("'source' is the name of the full-precision variant; choose another --out")
    args = ModelArgs.from_dict(source.manifest["args"])
    release_freed_memory()
    header = {"scheme": opts.scheme, "options": dataclasses.asdict(opts), "format_version": FORMAT_VERSION,
              "source_fingerprint": source.manifest["source"]["fingerprint"], "source_variant": source.ref}
    with store.staging(name, tag, replace=replace) as tmp:
        n = len(_tensor_names(source))
        stream = quantize_stream(source_tensors(source), args, opts, n, progress,
                                 source.manifest["source"].get("types"))
        files, layout, report = write_packed(tmp, stream, header)
        for f in source.path.iterdir():
            if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
                shutil.copyfile(f, tmp / f.name)
        manifest = dict(source.manifest, variant=tag, weights=files,
                        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        quant=dict(header, layout=layout))
        store.write_json(tmp / store.MANIFEST, manifest)
        if report_tokens:
            packed = store.ModelEntry(name, tag, tmp, manifest)
            report.quality = compare_variants(source, packed, report_tokens).to_dict()
        manifest["quant"]["report"] = report.to_dict()
        store.write_json(tmp / store.MANIFEST, manifest)
    return store.find(f"{name}:{tag}")


def _tensor_names(entry: store.ModelEntry) -> list[str]:
    names = []
    for fname in entry.manifest["weights"]:
        with safe_open(str(entry.path / fname), framework="pt") as f:
            names.extend(f.keys())
    return names


def text_ids(entry: store.ModelEntry, text: str | None, tokens: int) -> list[int]:
    tok = load_tokenizer(entry.path)
    ids = tok.encode(text if text is not None else default_text(), allowed_special=set())
    if len(ids) < 2:
        raise UserError("the text is too short to measure perplexity (fewer than 2 tokens)")
    return ids[:tokens]


def compare_variants(reference: store.ModelEntry, candidate: store.ModelEntry, tokens: int,
                     window: int = 512, text: str | None = None) -> Comparison:
    from .engine import load_model

    ids = text_ids(reference, text, tokens)
    ref_model = load_model(reference, window)
    cand_model = load_model(candidate, window)
    return compare(ref_model, cand_model, ids, window)


def eval_model(ref: str, text_file: Path | None, tokens: int, window: int = 512) -> tuple[store.ModelEntry, int, float]:
    """Perplexity of an installed variant on a text (default: Python's own English reference)."""
    from .engine import load_model

    entry = store.find(ref)
    text = None
    if text_file is not None:
        try:
            text = Path(text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{text_file}: cannot read the text ({e})") from None
    ids = text_ids(entry, text, tokens)
    model = load_model(entry, min(window, len(ids)))
    with torch.inference_mode():
        return entry, len(ids), perplexity(model, ids, window)
