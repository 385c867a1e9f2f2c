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
from quant.ggml import dequantize_rows
from quant.quality import default_text, perplexity
from quant.quantize import QuantOptions, ShardWriter, quantize_stream, write_packed

from . import store
from .devices import release_freed_memory
from .errors import UserError

REPORT_TOKENS = 2048  # the quality report's text: enough for a stable KL and top-1, quick to run
Progress = Callable[[int, int, str], None]


def source_tensors(entry: store.ModelEntry):
    """An entry's tensors one at a time, memory-mapped (the quantizer reads its source so);
    a source kept as GGUF blocks gives each weight's dequantized fp32 values as `<module>.weight`.

    A handle (or any tensor from it) keeps the whole file mapped, and every page read stays in
    RSS while it is: a handle per tensor lets the pages of packed tensors go (measured on a 1B
    model: 2.0 GiB of a shard stayed resident with one handle per file).
    """
    quant = entry.manifest.get("quant") or {}
    exact, layout = quant.get("exact", False), quant.get("layout", {})
    for fname in entry.manifest["weights"]:
        path = str(entry.path / fname)
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
        for k in keys:
            with safe_open(path, framework="pt") as f:
                tensor = f.get_tensor(k)
            module = k[: -len(".blocks")]
            if exact and module in layout:
                yield f"{module}.weight", dequantize_rows(tensor, layout[module]["scheme"])
            else:
                yield k, tensor
            del tensor


def quantize_variant(ref: str, opts: QuantOptions, out: str | None = None, replace: bool = False,
                     progress: Progress = lambda d, t, w: None, report_tokens: int = REPORT_TOKENS) -> store.ModelEntry:
    name, variant = store.parse_ref(ref)
    source = store.find(f"{name}:{variant or store.SOURCE}")
    if source.manifest.get("quant") and not source.manifest["quant"].get("exact"):
        raise UserError(f"{source.ref} is already packed ({source.manifest['quant']['scheme']}); quantize the source")
    tag = out or opts.scheme
    if tag in (store.SOURCE, FLOAT_COPY):  # names the plan reads as unpacked weights
        raise UserError(f"'{tag}' is the name of {'the full-precision variant' if tag == store.SOURCE else 'a float copy'}; "
                        f"choose another --out")
    args = ModelArgs.from_dict(source.manifest["args"])
    release_freed_memory()
    header = {"scheme": opts.scheme, "options": dataclasses.asdict(opts), "format_version": FORMAT_VERSION,
              "source_fingerprint": source.manifest["source"]["fingerprint"], "source_variant": source.ref}
    with store.staging(name, tag, replace=replace) as tmp:
        n = len(_tensor_names(source))
        stream = quantize_stream(source_tensors(source), args, opts, n, progress,
                                 source.manifest["source"].get("types"))
        files, layout, report = write_packed(tmp, stream, header)
        _copy_tokenizer(source, tmp)
        manifest = dict(source.manifest, variant=tag, weights=files,
                        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        quant=dict(header, layout=layout))
        store.write_json(tmp / store.MANIFEST, manifest)
        if report_tokens:
            packed = store.ModelEntry(name, tag, tmp, manifest)
            report.quality = quality_report(source, packed, report_tokens, progress=progress)
        manifest["quant"]["report"] = report.to_dict()
        store.write_json(tmp / store.MANIFEST, manifest)
    return store.find(f"{name}:{tag}")


def _copy_tokenizer(source: store.ModelEntry, folder: Path) -> None:
    for f in source.path.iterdir():
        if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
            shutil.copyfile(f, folder / f.name)


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


def quality_report(source: store.ModelEntry, packed: store.ModelEntry, tokens: int, window: int = 512,
                   progress: Progress = lambda d, t, w: None) -> dict:
    """The variant as it runs (bf16 kernels) against its source, and under it, as `weights_only`,
    the variant's own weights run with the source's fp32 arithmetic: what quantizing them costs.
    Run block by block (app.blockwise): one block's weights in memory, never a model.

    Measured on SmolLM2-135M (Q4_1 source): int4's exact weights agree with the source on 99.85%
    of top-1 tokens (100% but for the fp16 head), and its bf16 kernels bring that to ~98.5%. int8
    with one scale per row gave ~97%; int8 is now grouped (one fp16 scale per 32, as Q8_0), within
    0.1 point of top-1 and 0.001% of perplexity of llama.cpp's own Q8_0 (docs/BENCHMARKS.md).
    """
    from .blockwise import compare_blockwise

    ids = text_ids(source, None, tokens)
    as_run, weights_only = compare_blockwise(source, packed, ids, window, progress)
    return dict(as_run.to_dict(), weights_only=weights_only.to_dict())


def eval_model(ref: str, text_file: Path | None, tokens: int, window: int = 512,
               progress: Progress = lambda d, t, w: None) -> tuple[store.ModelEntry, int, float]:
    """Perplexity of an installed variant on a text (default: Python's own English reference);
    `progress(tokens scored, tokens, what)` after each window."""
    from .engine import load_model

    entry = store.find(ref)
    text = None
    if text_file is not None:
        try:
            text = Path(text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{text_file}: cannot read the text ({e})") from None
    ids = text_ids(entry, text, tokens)
    window, trained = min(window, len(ids)), ModelArgs.from_dict(entry.manifest["args"]).max_seq_len
    if window > trained:  # positions past it were never seen: a perplexity there measures nothing
        raise UserError(f"{entry.name} was trained for at most {trained} tokens, not a {window}-token window "
                        f"(--window {trained} or less)")
    model = load_model(entry, window)
    with torch.inference_mode():
        return entry, len(ids), perplexity(model, ids, window, progress)


# ---------------------------------------------------------------- what an import adds
FLOAT_COPY = "float"
QUICK_TOKENS = 256  # the import's quality line: at most this many tokens of the reference text,
QUICK_TOKEN_PARAMS = 4e11  # and at most this many tokens x parameters (see quick_tokens)


def write_float_copy(source: store.ModelEntry, replace: bool = False,
                     progress: Progress = lambda d, t, w: None) -> store.ModelEntry:
    """`name:float` beside a source kept as GGUF blocks: its exact values as plain float tensors,
    fp32 (a block's d * q - m needs more than fp16's or bf16's mantissa), written tensor by tensor."""
    quant = source.manifest.get("quant") or {}
    if not quant.get("exact"):
        raise UserError(f"{source.ref} is already a float source; it needs no float copy")
    names = _tensor_names(source)
    with store.staging(source.name, FLOAT_COPY, replace=replace) as tmp:
        writer = ShardWriter(tmp)
        for i, (name, tensor) in enumerate(source_tensors(source)):
            progress(i, len(names), name)
            writer.add({name: tensor.float() if tensor.is_floating_point() else tensor})
        writer.flush()
        _copy_tokenizer(source, tmp)
        manifest = {k: v for k, v in source.manifest.items() if k != "quant"}
        manifest.update(variant=FLOAT_COPY, weights=writer.files,
                        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        store.write_json(tmp / store.MANIFEST, manifest)
    return store.find(f"{source.name}:{FLOAT_COPY}")


def chat_variants(args: ModelArgs) -> list[str]:
    """The packed variants an import of a float source makes, so it is ready to chat as a pull is:
    int8 always, int4 too above 3B parameters (where int8 is slow on most machines)."""
    return ["int8", "int4"] if args.n_params > 3e9 else ["int8"]


def make_chat_variants(source: store.ModelEntry, replace: bool = False, say: Callable[[str], None] = lambda s: None,
                       progress: Progress = lambda d, t, w: None) -> list[store.ModelEntry]:
    """Pack `chat_variants` of a float source (a source kept as GGUF blocks already is packed),
    saying each before it starts."""
    if source.manifest.get("quant"):
        return []
    made = []
    for scheme in chat_variants(ModelArgs.from_dict(source.manifest["args"])):
        say(f"Packing {source.name}:{scheme}")
        made.append(quantize_variant(source.ref, QuantOptions(scheme), replace=replace, progress=progress,
                                     report_tokens=0))
    return made


def quick_tokens(args: ModelArgs) -> int:
    """How many tokens the import's quality line scores: its cost is about tokens x parameters
    (each block is read once and runs every token), so a bigger model gets fewer, 64 at least:
    256 up to 1.56B parameters, 64 for an 8B."""
    return max(64, min(QUICK_TOKENS, int(QUICK_TOKEN_PARAMS / args.n_params)))


def quick_quality(source: store.ModelEntry, packed: store.ModelEntry, tokens: int | None = None,
                  progress: Progress = lambda d, t, w: None) -> dict:
    """The variant as it runs against its source on `tokens` (default quick_tokens) tokens of
    the reference text, in one window, block by block (app.blockwise): perplexity both ways, KL,
    top-1 (quant.quality.Comparison.to_dict)."""
    from .blockwise import compare_blockwise

    tokens = tokens or quick_tokens(ModelArgs.from_dict(source.manifest["args"]))
    ids = text_ids(source, None, tokens)
    (result,) = compare_blockwise(source, packed, ids, len(ids), progress, weights_only=False)
    return result.to_dict()
