"""Write Llama-3-8B-shaped int8 and int4 variants with random packed weights into a store.

For planning questions (`llamadesk plan --vram 6GiB --json`) and GPU memory checks: the files have
the real tensor names, shapes, dtypes and metadata of quantized 8B variants, without an 8B source
(no download, ~14 GB of disk). Tensors are written shard by shard; memory stays near one shard.

    python tests/bench/make_llama3_8b_variants.py --home /tmp/plan8b --int4-group 64
    LLAMADESK_HOME=/tmp/plan8b llamadesk plan --vram 6GiB --json
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from app import store  # noqa: E402
from model.args import ModelArgs  # noqa: E402
from quant.formats import FORMAT_VERSION  # noqa: E402
from quant.quantize import QuantOptions, precision_map  # noqa: E402

LLAMA3_8B = ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim=14336,
                      rope_theta=500000.0, max_seq_len=8192)
SHARD = 1 << 30


def shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    hd = args.head_dim
    out = {"tok_embeddings": (args.vocab_size, args.dim), "output": (args.vocab_size, args.dim)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        out.update({p + "attention.wq": (args.n_heads * hd, args.dim), p + "attention.wk": (args.n_kv_heads * hd, args.dim),
                    p + "attention.wv": (args.n_kv_heads * hd, args.dim), p + "attention.wo": (args.dim, args.n_heads * hd),
                    p + "feed_forward.w1": (args.ffn_dim, args.dim), p + "feed_forward.w2": (args.dim, args.ffn_dim),
                    p + "feed_forward.w3": (args.ffn_dim, args.dim)})
    return out


def random_packed(scheme: str, n: int, k: int, group: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Random tensors of one packed weight, made on the generator's device."""
    d = g.device
    if scheme == "int8":
        return {"qweight": torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g, device=d),
                "scales": torch.rand(n, 1, generator=g, device=d) * 1e-3 + 1e-4}
    return {"qweight": torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g, device=d),
            "scales": (torch.rand(n, k // group, generator=g, device=d) * 1e-3 + 1e-4).half(),
            "mins": (torch.rand(n, k // group, generator=g, device=d) * -8e-3).half()}


def write_variant(args: ModelArgs, name: str, scheme: str, group: int) -> store.ModelEntry:
    opts = QuantOptions(scheme, group_size=group if scheme == "int4" else 32, head="int8")
    pmap = precision_map(args, opts)
    g = torch.Generator().manual_seed(0)
    layout, files, shard, size = {}, [], {}, 0
    with store.staging(name, scheme, replace=True) as tmp:
        def flush():
            nonlocal shard, size
            if shard:
                fname = f"model-{len(files) + 1:05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt", "llamadesk_format_version": str(FORMAT_VERSION)})
                files.append(fname)
                shard, size = {}, 0

        for module, (n, k) in shapes(args).items():
            s = pmap[module]
            grp = group if s == "int4" else k
            for suffix, t in random_packed(s, n, k, grp, g).items():
                shard[f"{module}.{suffix}"] = t
                size += t.numel() * t.element_size()
            layout[module] = {"scheme": s, "group_size": grp, "shape": [n, k]}
            if size >= SHARD:
                flush()
        for i in range(args.n_layers):
            shard[f"layers.{i}.attention_norm.weight"] = torch.ones(args.dim)
            shard[f"layers.{i}.ffn_norm.weight"] = torch.ones(args.dim)
        shard["norm.weight"] = torch.ones(args.dim)
        flush()
        store.write_json(tmp / store.MANIFEST, {
            "format_version": store.FORMAT_VERSION, "name": name, "variant": scheme, "args": args.to_dict(),
            "weights": files, "source": {"format": "random", "fingerprint": "random-llama3-8b", "types": {}},
            "quant": {"scheme": scheme, "format_version": FORMAT_VERSION, "layout": layout,
                      "options": {"group_size": group}},
        })
    return store.find(f"{name}:{scheme}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", required=True, help="the LLAMADESK_HOME to write into")
    ap.add_argument("--name", default="llama3-8b-random")
    ap.add_argument("--int4-group", type=int, default=32, choices=(32, 64, 128))
    ap.add_argument("--schemes", default="int8,int4")
    a = ap.parse_args()
    os.environ["LLAMADESK_HOME"] = a.home
    for scheme in a.schemes.split(","):
        e = write_variant(LLAMA3_8B, a.name, scheme, a.int4_group)
        print(f"{e.ref}: {e.size_bytes / 2**30:.2f} GiB in {e.path}")


if __name__ == "__main__":
    main()
