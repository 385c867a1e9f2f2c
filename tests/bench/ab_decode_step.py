"""Two versions of quant/csrc/decode_cpu.cpp side by side in one process, on the default model.

    LLAMADESK_HOME=... LLAMADESK_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 \
        python tests/bench/ab_decode_step.py BASE.cpp NEW.cpp [ROUNDS [KV_DTYPE]]

Both sources are compiled with the flags of the chosen path (under /tmp) and bound to the same
weights and KV cache (filled with random values: the timing does not depend on them). Each
round times the step at 512 and at 16 keys (their difference is attention's), the int4 layers
alone and the int8 head, alternating which source goes first; the table gives the fastest and
the median round. On a machine shared with other work, compare only figures of one run.
AB_THREADS (default 1) sets torch's threads: two threads on two busy cores measure the
scheduler, not the kernels.
"""
import hashlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

from app import store  # noqa: E402
from app.engine import load_model  # noqa: E402
from quant import extension  # noqa: E402
from quant.linear import prepared_weights  # noqa: E402
from quant.linear import Int4Linear, Int8Linear  # noqa: E402


def build(src: str):
    """The extension compiled from `src` with the chosen path's flags."""
    flags, ld = extension._flag_sets()[0]
    h = hashlib.sha256(Path(src).read_bytes() + " ".join(flags).encode()).hexdigest()[:10]
    name = f"ab_{h}"
    d = Path("/tmp/llamadesk-ab-build") / name
    d.mkdir(parents=True, exist_ok=True)
    # the headers decode_cpu.cpp includes (gguf_gemv.h) come from the repository's csrc/
    return cpp_extension.load(name=name, sources=[src], build_directory=str(d), extra_cflags=flags,
                              extra_ldflags=ld, extra_include_paths=[str(extension.SOURCE.parent)], verbose=False)


def decoder(ext, model):
    """ext's Decoder over `model`'s weights and caches, as decode_cpu.build_decoder binds them (a
    source from before 2026-11-30 takes each layer as a (kind, a, b, group, n, k) tuple instead of
    its PreparedWeights record)."""
    a = model.args
    rope = torch.view_as_real(model.rope).contiguous()
    dec = ext.Decoder(a.dim, a.n_heads, a.n_kv_heads, a.head_dim, a.ffn_dim, a.norm_eps, rope)
    kinds = {"dense": 0, "int4": 1, "int8": 2, "fp16": 3}
    for layer in model.layers:
        attn, ffn = layer.attention, layer.feed_forward
        c = attn.kv_cache
        records = [prepared_weights(m) for m in (attn.wqkv, attn.wo, ffn.w13, ffn.w2)]
        tuples = [(kinds[r.kind], r.weight, r.scales if r.scales is not None else torch.empty(0),
                   r.group_size if r.kind == "int4" else 0, r.out_features, r.in_features) for r in records]
        head = (layer.attention_norm.weight.detach(), layer.ffn_norm.weight.detach(), c.k, c.v,
                getattr(c, "k_scale", None), getattr(c, "v_scale", None))
        try:
            dec.add_block(*head, *records)
        except TypeError:
            dec.add_block(*head, *tuples)
    return dec


def mean_time(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


@torch.inference_mode()
def main():
    srcs = sys.argv[1:3]
    torch.set_num_threads(int(os.environ.get("AB_THREADS", "1")))
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 7
    kv = sys.argv[4] if len(sys.argv) > 4 else "bf16"
    exts = [build(s) for s in srcs]
    print("isa", [e.isa() for e in exts], "torch", torch.backends.cpu.get_cpu_capability(), "threads", torch.get_num_threads(), "kv", kv)
    model = load_model(store.find("smollm2-135m-instruct:int4"), 1024, kv_dtype=kv)
    g = torch.Generator().manual_seed(0)
    for layer in model.layers:
        for name, t in layer.attention.kv_cache.named_buffers():
            if t.dtype == torch.int8:
                t.copy_(torch.randint(-127, 128, t.shape, generator=g, dtype=torch.int8))
            elif "scale" in name:
                t.copy_(torch.rand(t.shape, generator=g) * 0.02)
            else:
                t.copy_(torch.randn(t.shape, generator=g))
    decs = [decoder(e, model) for e in exts]
    h = torch.randn(1, 1, model.args.dim, generator=g) * 0.1
    int4 = [m for m in model.modules() if isinstance(m, Int4Linear)]
    xs = {m: torch.randn(1, m.in_features, generator=g) for m in int4}
    head = model.output
    xh = torch.randn(1, model.args.dim, generator=g)
    parts = {}
    for i, (e, d) in enumerate(zip(exts, decs)):
        p = {"step 512 keys": (lambda d=d: d.step(h, 511), 10),
             "step 16 keys": (lambda d=d: d.step(h, 15), 10),
             f"int4 alone ({len(int4)})": (lambda e=e: [e.int4_linear(xs[m], m.packed, m.scales_and_zeros, m.group_size, m.out_features) for m in int4], 10)}
        if isinstance(head, Int8Linear) and head.kernel == "int8group":
            p["head int8 group"] = (lambda e=e: e.int8_group_linear(xh, head.qweight, head.scales), 10)
        parts[i] = p
    # same numbers from both
    a, b = decs[0].step(h, 300), decs[1].step(h, 300)
    print("step max |diff| at 300 keys:", (a - b).abs().max().item(), "scale", a.abs().max().item())
    res = {i: {k: [] for k in parts[i]} for i in parts}
    for r in range(rounds):
        for k in parts[0]:
            for i in (0, 1) if r % 2 == 0 else (1, 0):
                fn, n = parts[i][k]
                res[i][k].append(mean_time(fn, n))
    print(f"{'ms (min / median of ' + str(rounds) + ')':28s} {'base':>16s} {'new':>16s}  new/base(min)")
    for k in parts[0]:
        a, b = sorted(res[0][k]), sorted(res[1][k])
        print(f"{k:28s} {a[0]*1e3:7.3f} /{a[len(a)//2]*1e3:7.3f} {b[0]*1e3:7.3f} /{b[len(b)//2]*1e3:7.3f}  {b[0]/a[0]:.3f}")


if __name__ == "__main__":
    main()
