"""The memory plan: which model, which variant and how long a context fit this device, and why.

Cost model (bytes resident once loaded and warmed up):
    weights    packed tensor bytes as read from the variant's files, converted to what the device
               really keeps (full-precision weights run in the activation dtype). On a GPU the
               token-embedding table stays in CPU RAM, as llama.cpp keeps it: a lookup needs one
               row per token, not the GPU's bandwidth
    kv_cache   2 (k and v) x layers x kv_heads x head_dim x bytes per element, per token; an int8
               cache adds one fp32 scale per (kv head, position) for keys and for values
    workspace  activations of one prefill chunk: hidden states, q/k/v, the (heads x chunk x ctx)
               attention scores, the SwiGLU intermediates, one row of logits; with a cache kept in
               another dtype than the activations (bf16 on the CPU, int8), one layer's prefix read
               back converted
    overhead   the runtime before any weight is loaded: the CUDA context and allocator slack on a
               GPU, the Python + PyTorch process on the CPU
    margin     a GPU: max(1 GiB, 10% of free), like llama.cpp's --fit and transformers' 0.9 factor.
               The CPU: max(512 MiB, 10% of available RAM), since other programs share the RAM
               and the OS pages files in and out of it.

Policy: the largest installed model first; for it (on a CPU, packed variants before the source,
which runs slower at the same context) the most bits that still allow the target
context (min of its trained context and 8192), and that context (`--ctx` asks for a longer one);
where no variant reaches it, the longest context that fits, a multiple of 256, never below 2048
(or the model's own maximum if smaller). The KV cache is kept in bf16
(float_kv_dtype) when that lets the largest model reach its target; otherwise each variant that
falls short of its target takes an int8 cache where that gives it a longer context, and the same
policy runs again (so int8 may let a larger model, more bits or a longer context fit); `why` and
the table say so. What the user fixed (model, variant, context, KV dtype) is kept; if it cannot
fit, nothing is chosen and `why` says what would fit instead.
"""
from __future__ import annotations

import re

from dataclasses import asdict, dataclass, field, replace

from model.args import ModelArgs

from .devices import Device, format_bytes
from .errors import UserError

TARGET_CTX = 8192
MIN_CTX = 2048
CTX_STEP = 256
PREFILL_CHUNK = 512
# cuBLAS workspaces and allocator rounding. The CUDA context itself is not counted: the probe has
# already created it when it reads the free memory, and per-process caps exclude it too.
# Measured on an H100 with 8B-shaped variants: peaks within -9%..-2% of the estimate with this
# overhead (tests/bench/gpu_decode.py, docs/BENCHMARKS.md).
CUDA_OVERHEAD = 256 << 20
CPU_OVERHEAD = 420 << 20  # RSS of `import torch` + tokenizer + app before any weight
BITS = {"source": 16, "int8": 8, "nf4": 4, "int4": 4}
KV_DTYPES = ("auto", "fp32", "bf16", "fp16", "int8")  # auto: bf16, or int8 where it helps
_KV_ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}
KV_SCALE_BYTES = 4  # the int8 cache's fp32 scale of each key and value vector (model.model.quantize_kv)


def activation_bytes(device: Device) -> int:
    """Bytes per activation element: fp32 on the CPU, bf16 (or fp16) on a GPU."""
    return 4 if device.kind == "cpu" else 2


def activation_kv_dtype(device: Device | None) -> str:
    """The KV cache dtype that is the activations' own: no conversion when attention reads it."""
    if device is not None and activation_bytes(device) == 4:
        return "fp32"
    return float_kv_dtype(device)  # a GPU's bf16, or fp16 before Ampere


def float_kv_dtype(device: Device | None) -> str:
    """The KV cache's dtype unless int8 is needed: bf16 everywhere. On the CPU it is not the
    activations' fp32, but half the bytes to store and to read every token (at 4000 tokens of
    context fp32 keys and values are 184 MB a token for the default model, more than its
    weights) at no measurable cost: perplexity 14.9426 against 14.9429 with fp32 (default
    model, int4, 8192 tokens). The compiled CPU step reads it as it is. A GPU without bf16 keeps
    its fp16 activations' own."""
    return "bf16" if device is None or device.bf16_ok else "fp16"


def kv_bytes_per_token(args: ModelArgs, kv_dtype: str = "auto", device: Device | None = None) -> int:
    if kv_dtype == "auto":
        kv_dtype = float_kv_dtype(device)
    elem = _KV_ELEMENT_BYTES.get(kv_dtype)
    if elem is None:
        raise ValueError(f"unknown KV cache dtype {kv_dtype!r} (known: {', '.join(KV_DTYPES)})")
    scale = KV_SCALE_BYTES if kv_dtype == "int8" else 0
    return 2 * args.n_layers * args.n_kv_heads * (args.head_dim * elem + scale)


def workspace_bytes(args: ModelArgs, ctx: int, device: Device, kv_dtype: str = "auto") -> int:
    a = activation_bytes(device)
    c = min(PREFILL_CHUNK, ctx)
    hidden = c * args.dim * 4  # residual, normed input, attention output, block output
    qkv = c * (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
    # the attention matrix of one chunk against the whole context; the CPU's flash kernel
    # works in blocks and never holds it (measured: no trace of it in RSS at 8192 tokens)
    scores = args.n_heads * c * ctx if device.kind == "cuda" else 0
    ffn = c * args.ffn_dim * 3  # gate, up and their product
    logits = args.vocab_size * 4
    # attention reads a cache in another dtype through a converted copy of one layer's k and v
    converted = 0
    if (float_kv_dtype(device) if kv_dtype == "auto" else kv_dtype) != activation_kv_dtype(device):
        converted = 2 * ctx * args.n_kv_heads * args.head_dim
    return (hidden + qkv + scores + ffn + converted) * a + logits


def overhead_bytes(device: Device) -> int:
    return CUDA_OVERHEAD if device.kind == "cuda" else CPU_OVERHEAD


def margin_bytes(device: Device) -> int:
    if device.kind == "cuda":
        return max(1 << 30, device.free_bytes // 10)
    if device.cgroup_limit is not None:
        # a cgroup's room is this service's alone and measured net of what it already uses: a
        # tenth of the limit (the host's 512 MiB floor alone would refuse every model under 1 GiB,
        # where the default model peaks at 464 MiB, measured)
        return max(64 << 20, device.cgroup_limit // 10)
    return max(512 << 20, device.free_bytes // 10)


@dataclass
class Candidate:
    model: str
    variant: str
    args: ModelArgs
    weight_bytes: int  # resident on the device after load
    bits: float
    # a source kept as a GGUF file's blocks, all of types the compiled CPU step multiplies
    # natively (native_gguf_blocks): on a CPU as fast per byte as a packed variant
    native_blocks: bool = False
    slots: int = 1  # KV-cache rows of the planned context: a server's parallel requests, all full at once
    # what the variant holds, whatever its name (`quantize --out NAME`): int4, int8, nf4, "source"
    # or "float" (a float copy of a GGUF's blocks); the variant's name where empty (the catalog's)
    kind: str = ""

    def __post_init__(self):
        self.kind = self.kind or self.variant

    @property
    def max_ctx(self) -> int:
        return self.args.max_seq_len


@dataclass
class Row:
    model: str
    variant: str
    weight_bytes: int
    kv_dtype: str
    kv_bytes_per_token: int
    max_ctx_fits: int  # 0: does not fit at all
    verdict: str


@dataclass
class Plan:
    model: str
    variant: str
    device: str
    ctx: int
    kv_dtype: str
    bytes: dict = field(default_factory=dict)  # weights, kv_cache, workspace, overhead, margin
    why: str = ""

    @property
    def ref(self) -> str:
        return f"{self.model}:{self.variant}"

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


@dataclass
class PlanResult:
    device: Device
    chosen: Plan | None
    candidates: list[Row]
    why: str

    def to_dict(self) -> dict:
        return {
            "device": self.device.to_dict(),
            "chosen": asdict(self.chosen) if self.chosen else None,
            "candidates": [asdict(r) for r in self.candidates],
            "why": self.why,
        }


def breakdown(c: Candidate, ctx: int, device: Device, kv_dtype: str = "auto") -> dict:
    return {
        "weights": c.weight_bytes,
        "kv_cache": kv_bytes_per_token(c.args, kv_dtype, device) * ctx * c.slots,
        "workspace": workspace_bytes(c.args, ctx, device, kv_dtype),
        "overhead": overhead_bytes(device),
        "margin": margin_bytes(device),
    }


def fits(c: Candidate, ctx: int, device: Device, kv_dtype: str = "auto") -> bool:
    return sum(breakdown(c, ctx, device, kv_dtype).values()) <= device.free_bytes


def longest_context(c: Candidate, device: Device, kv_dtype: str = "auto") -> int:
    """The longest context (a multiple of 256, up to the model's maximum) that fits; 0 if none."""
    best, ctx = 0, CTX_STEP
    top = c.max_ctx
    while ctx <= top and fits(c, ctx, device, kv_dtype):
        best, ctx = ctx, ctx + CTX_STEP
    if best and best < top and top % CTX_STEP and fits(c, top, device, kv_dtype):
        best = top
    if not best and top < CTX_STEP and fits(c, top, device, kv_dtype):
        best = top
    return best


def variant_usable(c: Candidate, device: Device) -> bool:
    if c.kind == "int4":
        return device.int4_ok
    if c.kind == "nf4":
        return device.kind == "cuda"  # bitsandbytes NF4 on the CPU is ~8x slower than int4
    return True


def _kv_for(c: Candidate, device: Device, kv_dtype: str, target: int) -> tuple[str, int]:
    """The KV cache dtype for `c` and the longest context it then allows.

    "auto" keeps bf16 (float_kv_dtype) when that reaches `target`; short of it, int8 wherever
    int8 gives a longer context.
    """
    if kv_dtype != "auto":
        return kv_dtype, longest_context(c, device, kv_dtype)
    kv = float_kv_dtype(device)
    longest = longest_context(c, device, kv)
    if longest < target:
        longest_int8 = longest_context(c, device, "int8")
        if longest_int8 > longest:
            return "int8", longest_int8
    return kv, longest


def plan_memory(candidates: list[Candidate], device: Device, model: str | None = None,
                variant: str | None = None, ctx: int | None = None, kv_dtype: str = "auto") -> PlanResult:
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"unknown KV cache dtype {kv_dtype!r} (known: {', '.join(KV_DTYPES)})")
    if kv_dtype != "auto":
        return _plan_with(candidates, device, model, variant, ctx, kv_dtype, asked=True)[0]
    # the float cache first; an int8 cache only where that misses the largest model or the
    # target context, since int8 keys and values cost a little accuracy
    result, pool = _plan_with(candidates, device, model, variant, ctx, float_kv_dtype(device), asked=False)
    if _largest_at_target(result.chosen, pool, ctx):
        return result
    with_int8, _ = _plan_with(candidates, device, model, variant, ctx, "auto", asked=False)
    return with_int8 if with_int8.chosen or not result.chosen else result


def _largest_at_target(chosen: Plan | None, pool, ctx: int | None) -> bool:
    if chosen is None:
        return False
    c = next(c for c, _, _ in pool if (c.model, c.variant) == (chosen.model, chosen.variant))
    biggest = max(x.args.n_params for x, _, _ in pool)
    return c.args.n_params == biggest and chosen.ctx >= (ctx or min(c.max_ctx, TARGET_CTX))


def _plan_with(candidates: list[Candidate], device: Device, model: str | None, variant: str | None,
               ctx: int | None, kv_dtype: str, asked: bool) -> tuple[PlanResult, list]:
    """The plan with the KV cache in `kv_dtype` ("auto": int8 per candidate where it helps), and
    the pool chosen from: (candidate, longest context, KV dtype) of what the user's choice allows.
    `asked`: the user fixed `kv_dtype`."""
    float_kv = float_kv_dtype(device)
    rows, pool = [], []
    for c in sorted(candidates, key=lambda c: (-c.args.n_params, *_rank(c, device), c.kind == "source", c.variant)):
        usable = variant_usable(c, device)
        target = ctx or min(c.max_ctx, TARGET_CTX)
        if usable or c.variant == variant:
            kv, longest = _kv_for(c, device, kv_dtype, target)
        else:
            kv, longest = (float_kv if kv_dtype == "auto" else kv_dtype), 0
        floor = min(MIN_CTX, c.max_ctx)
        if not usable:
            verdict = f"{c.variant}{'' if c.kind == c.variant else f' ({c.kind})'} does not run well on {device.kind}"
        elif longest >= floor:
            verdict = f"fits up to {longest} tokens"
        elif longest:
            verdict = f"only {longest} tokens fit (below {floor})"
        else:
            verdict = "does not fit"
        if kv != kv_dtype and kv == "int8":
            verdict += f" with an int8 KV cache ({longest_context(c, device, float_kv) or 'none'} with {float_kv})"
        rows.append(Row(c.model, c.variant, c.weight_bytes, kv, kv_bytes_per_token(c.args, kv, device), longest,
                        verdict))
        # a variant the user names is loaded even where it is slow (NF4 on the CPU)
        if (model is None or c.model == model) and (variant is None or c.variant == variant) and (usable or variant):
            pool.append((c, longest, kv))
    if not pool:
        what = " ".join(x for x in (model and f"model {model}", variant and f"variant {variant}") if x)
        return PlanResult(device, None, rows, f"no installed {what or 'model'} can run on {device.kind}"), pool
    # the models named in the why and the table: every installed one, unless the user asked for one
    n_models = 0 if model else len({r.model for r in rows})
    rows = [r for r in rows if model is None or r.model == model]
    chosen = _choose(pool, device, ctx, kv_dtype if asked else None, n_models)
    if isinstance(chosen, str):
        why = chosen + _alternative(rows, ctx, asked)
        if asked:
            why += _int8_alternative(pool, device, ctx, kv_dtype)
        if why == chosen:  # no variant fits that context with any KV cache
            why += _shorter_or_more_memory(pool, device, ctx, kv_dtype if asked else None)
        return PlanResult(device, None, rows, why), pool
    return PlanResult(device, chosen, rows, chosen.why), pool


def _slow_float(c: Candidate, device: Device) -> bool:
    """A variant that runs slower than a packed one of the same model: any float copy of a
    GGUF's blocks (variant "float"), and on a CPU the source, whether float (its fp32 matmuls read
    2-4x the bytes of int8 per token) or a GGUF's blocks of a type without a native kernel (Q2_K,
    Q3_K, Q5_1, Q5_K: dequantized in torch at every step). A GGUF source whose blocks the CPU step
    multiplies natively (a Q4_K_M, Q6_K or Q8_0 file) is not slow: it reads its file's bytes per
    token, fewer than int8's, and then ranks by its bits like any variant."""
    return c.kind == "float" or (device.kind == "cpu" and c.kind == "source" and not c.native_blocks)


def _rank(c: Candidate, device: Device) -> tuple:
    """How the policy orders the variants of one model: packed before slow floats, then most bits,
    then on a CPU fewer bytes (a Q4_0 or Q4_1 source before the int4 that re-packs its values
    exactly: it reads 74% of the bytes a token, and its r16 kernel is as fast per byte)."""
    return (_slow_float(c, device), -c.bits, c.weight_bytes if device.kind == "cpu" else 0)


def _choose(pool, device: Device, ctx: int | None, kv_asked: str | None, n_models: int) -> Plan | str:
    biggest = max(c.args.n_params for c, _, _ in pool)
    free = format_bytes(device.free_bytes) + (f" (bounded by {device.limit})" if device.limit else "")
    # models from the largest down; for each, variants from the most bits down
    for n_params in sorted({c.args.n_params for c, _, _ in pool}, reverse=True):
        same_model = [(c, longest, kv) for c, longest, kv in pool if c.args.n_params == n_params]
        for c, longest, kv in same_model:
            target = ctx or min(c.max_ctx, TARGET_CTX)
            if ctx is not None:
                if ctx > c.max_ctx:
                    return f"{c.model} was trained for at most {c.max_ctx} tokens, not {ctx}"
                if longest >= ctx:
                    return _plan(c, ctx, device, kv, f"{c.model}:{c.variant} is the largest, most precise variant "
                                 f"that fits the asked {ctx}-token context in {free} of {device.kind} memory"
                                 + _kv_why(c, ctx, kv, kv_asked, device))
                continue
            if longest >= target:
                # the target, not all that fits: a 128k-token cache would cost memory every load and,
                # on a GPU, time every token (the CUDA-graph step reads the whole cache); --ctx asks for more
                return _plan(c, target, device, kv, _why(c, target, same_model, n_params < biggest, free, device,
                                                         longest, n_models)
                             + _kv_why(c, target, kv, kv_asked, device))
        # no variant of this model reaches its target: take the most precise that reaches the floor,
        # of equally precise ones the longest context
        for c, longest, kv in sorted(same_model, key=lambda e: (*_rank(e[0], device), -e[1])):
            if ctx is None and longest >= min(MIN_CTX, c.max_ctx):
                return _plan(c, longest, device, kv,
                             f"{c.model}:{c.variant} fits only {longest} tokens of context in {free}; "
                             f"no variant of {c.model} fits {min(c.max_ctx, TARGET_CTX)}"
                             + _kv_why(c, longest, kv, kv_asked, device))
    with_kv = f" with the KV cache in {kv_asked}" if kv_asked else ""
    if ctx is not None:
        return f"nothing installed fits a {ctx}-token context{with_kv} in {free} of {device.kind} memory"
    return (f"nothing installed fits in {free} of {device.kind} memory with at least {MIN_CTX} tokens of "
            f"context{with_kv}")


def _why(c: Candidate, ctx: int, same_model, smaller: bool, free: str, device: Device, longest: int,
         n_models: int) -> str:
    """Why `c`: first the model (among `n_models` installed ones; 0: the one the user asked
    for), then its variant."""
    more_bits = [x for x, _, _ in same_model if x.bits > c.bits and not _slow_float(x, device)]
    slow = [x for x, _, _ in same_model if x.bits > c.bits and _slow_float(x, device)]
    where = f"in {free} of {device.kind} memory"
    if n_models == 0:
        parts = [f"{c.model}, as asked, fits {where},"]
    elif smaller:
        parts = [f"{c.model} is the largest model that fits {where},"]
    elif n_models == 1:
        parts = [f"{c.model} is the only model installed and fits {where},"]
    else:
        parts = [f"{c.model} is the largest of the {n_models} installed models and fits {where},"]
    if more_bits:
        parts.append(f"{c.variant} its most bits that still allow {min(c.max_ctx, TARGET_CTX)} tokens "
                     f"({', '.join(x.variant for x in more_bits)} would not)")
    elif len(same_model) > 1:
        parts.append(f"{c.variant} its most precise variant")
    else:
        parts.append(f"{c.variant} its only variant that runs here")
    if slow and not _slow_float(c, device):
        parts.append(f"({', '.join(x.variant for x in slow)} runs slower on the {device.kind})")
    more = f" (up to {longest} would fit: --ctx)" if longest > ctx else ""
    parts[-1] += f"; the context is {ctx} tokens{more}"
    tied = [x for x, _, _ in same_model if x.variant == "source" and x.bits == c.bits and x is not c]
    if tied:
        parts[-1] += (f"; it holds the source's own {c.bits:g}-bit values in "
                      f"{c.weight_bytes / tied[0].weight_bytes:.0%} of the source's bytes")
    return " ".join(parts)


def _kv_why(c: Candidate, ctx: int, kv: str, kv_asked: str | None, device: Device) -> str:
    if kv_asked:
        return f"; the KV cache is {kv}, as asked"
    if kv != "int8":
        return ""
    float_kv = float_kv_dtype(device)
    with_float = longest_context(c, device, float_kv)
    if with_float >= min(MIN_CTX, c.max_ctx):
        return f"; an int8 KV cache lets it reach {ctx} tokens, where {float_kv} would allow only {with_float}"
    return f"; it fits only with an int8 KV cache ({float_kv} would allow {with_float or 'no'} tokens)"


def _plan(c: Candidate, ctx: int, device: Device, kv_dtype: str, why: str) -> Plan:
    if c.slots > 1:
        why += f"; the KV cache holds {c.slots} parallel requests of {ctx} tokens each"
    return Plan(c.model, c.variant, device.kind, ctx, kv_dtype, breakdown(c, ctx, device, kv_dtype), why)


def _alternative(rows: list[Row], ctx: int | None, kv_asked: bool) -> str:
    fitting = [r for r in rows if r.max_ctx_fits >= min(ctx or MIN_CTX, MIN_CTX)]
    if not fitting:
        return ""
    r = fitting[0]
    with_int8 = " and an int8 KV cache" if r.kv_dtype == "int8" and not kv_asked else ""
    return f"; {r.model}:{r.variant} would fit with up to {r.max_ctx_fits} tokens{with_int8}"


def _int8_alternative(pool, device: Device, ctx: int | None, kv_asked: str) -> str:
    """Where a float KV cache was asked for and does not fit: what an int8 one would allow."""
    if kv_asked == "int8":
        return ""
    for c, _, _ in pool:
        need = ctx or min(MIN_CTX, c.max_ctx)
        longest = longest_context(c, device, "int8")
        if need <= c.max_ctx and longest >= need:
            return f"; with --kv-dtype int8, {c.model}:{c.variant} would fit with up to {longest} tokens"
    return ""


def _shorter_or_more_memory(pool, device: Device, ctx: int | None, kv_asked: str | None) -> str:
    """Where nothing fits the asked context (or MIN_CTX): the longest shorter context that would
    fit, else the free memory the least demanding variant needs. Unless the user fixed the KV
    dtype, both count with an int8 cache: at a fixed --ctx the plan takes one where it helps."""
    if not pool:
        return ""
    kv = kv_asked or "int8"
    with_kv = "" if kv_asked else " (an int8 KV cache)"
    shorter = [(n, c) for n, c in ((longest_context(c, device, kv), c) for c, _, _ in pool) if n]
    if shorter:
        n, c = max(shorter, key=lambda e: (e[0], e[1].bits))
        return f"; {c.model}:{c.variant} would run with --ctx {n}{with_kv}"
    least = [(free_bytes_needed(c, min(ctx or MIN_CTX, c.max_ctx), device, kv), c) for c, _, _ in pool]
    need, c = min(least, key=lambda e: e[0])
    return (f"; the least it takes is {c.model}:{c.variant} with {min(ctx or MIN_CTX, c.max_ctx)} tokens of context"
            f"{with_kv}: {format_bytes(need)} free")


def free_bytes_needed(c: Candidate, ctx: int, device: Device, kv_dtype: str = "auto") -> int:
    """The least free memory (to 1 MiB) at which `c` fits `ctx` tokens on a device like this one:
    the margin grows with the free memory, so it is searched, not added."""
    lo, hi = 0, 1 << 50  # 1 PiB: more than any machine this plans for
    while hi - lo > 1 << 20:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(c, ctx, replace(device, free_bytes=mid), kv_dtype) else (mid, hi)
    return hi


# ---------------------------------------------------------------- candidates
def estimated_weight_bytes(args: ModelArgs, variant: str, device: Device, group_size: int = 32) -> int:
    """Resident weight bytes of a variant that is not on disk (catalog entries, what-if plans).

    Norms stay in full precision; the embedding and the output head are int8 in packed variants,
    as the quantizer writes them.
    """
    emb = args.vocab_size * args.dim
    heads = 1 if args.tie_embeddings else 2
    body = args.n_params - heads * emb - (2 * args.n_layers + 1) * args.dim
    norms = (2 * args.n_layers + 1) * args.dim * 4
    on_gpu = device.kind == "cuda"
    if variant == "source":
        resident = args.n_params - (2 * args.n_layers + 1) * args.dim
        if on_gpu and not args.tie_embeddings:
            resident -= emb
        return resident * activation_bytes(device) + norms
    # int8 output head, plus the int8 embedding unless it stays in CPU RAM: one fp16 scale per 32
    # weights, as every int8 tensor the quantizer writes (quant.quantize.INT8_GROUP)
    # on the CPU the grouped int8 kernel holds the linear layers' scales in fp32 (Int8Linear.prepare)
    scale_bytes = 2 if on_gpu else 4
    head_bytes = (1 if on_gpu else 2) * emb + emb // 32 * 2 + (0 if on_gpu else emb // 32 * scale_bytes)
    if variant == "int8":
        return body + body // 32 * scale_bytes + head_bytes + norms
    if variant == "int4":
        return body // 2 + body // group_size * 4 + head_bytes + norms
    if variant == "nf4":
        # 4-bit codes plus one fp32 absmax per 64 (double quantization would make it ~0.5 byte / 256)
        return body // 2 + body // 64 * 4 + head_bytes + norms
    raise ValueError(f"unknown variant {variant!r}")


def catalog_candidate(model: str, args: ModelArgs, variant: str, device: Device, group_size: int = 32) -> Candidate:
    return Candidate(model, variant, args, estimated_weight_bytes(args, variant, device, group_size), BITS[variant])


def stored_weight_bytes(entry, device: Device) -> int:
    """Resident bytes of an installed variant, from its safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    args = ModelArgs.from_dict(entry.manifest["args"])
    act = activation_bytes(device)
    layout = (entry.manifest.get("quant") or {}).get("layout", {})  # packed modules run as stored
    total = table_bytes = 0
    for fname in entry.manifest["weights"]:
        try:
            f = safe_open(str(entry.path / fname), framework="numpy")  # headers only: no torch import
        except Exception as e:  # SafetensorError, OSError: a damaged or missing file
            raise UserError(f"{entry.path / fname}: the weights file cannot be read ({e}); remove the model with "
                            f"`llamadesk rm {entry.ref}`, then pull or import it again") from None
        with f:
            for key in f.keys():
                sl = f.get_slice(key)
                n = 1
                for d in sl.get_shape():
                    n *= d
                dtype = sl.get_dtype()
                if device.kind == "cuda" and key.startswith("tok_embeddings.") and not args.tie_embeddings:
                    continue  # stays in CPU RAM
                floating = dtype in ("F32", "F16", "BF16")
                is_norm = key.endswith("norm.weight")
                module = key.rsplit(".", 1)[0]
                if floating and not is_norm and key.endswith(".weight") and module not in layout:
                    total += n * act  # full-precision weights run in the activation dtype
                elif (device.kind == "cpu" and key.endswith(".scales") and dtype == "F16"
                      and (layout.get(module) or {}).get("scheme") == "int8" and not module.startswith("tok_")):
                    total += n * 4  # grouped int8's kernel holds its scales in fp32 (Int8Linear.prepare)
                elif (device.kind == "cpu" and (layout.get(module) or {}).get("scheme") in R16_GROWS
                      and not module.startswith("tok_")):
                    total += int(n * R16_GROWS[layout[module]["scheme"]])  # its r16 copy replaces the blocks
                else:
                    total += n * _DTYPE_BYTES.get(dtype, 4)
                if key.startswith("tok_embeddings."):
                    table_bytes += n * _DTYPE_BYTES.get(dtype, 4)
    table = layout.get("tok_embeddings") or {}
    if device.kind == "cpu" and args.tie_embeddings and table.get("scheme") in R16_SCHEMES:
        # the head's r16 copy of the tied table, beside the table it looks up
        total += int(table_bytes * R16_GROWS.get(table["scheme"], 1))
    return total


_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "I32": 4, "I64": 8, "F64": 8}


def installed_candidates(device: Device, damaged: dict[str, UserError] | None = None) -> list[Candidate]:
    """Every installed variant that can be read; one whose files cannot be goes into `damaged`
    (ref -> the error naming its file) instead of failing the plan for all the others."""
    from . import store

    entries = store.list_entries()
    sources = {e.name: source_bits(e.manifest) for e in entries if e.variant == store.SOURCE or not e.manifest.get("quant")}
    out = []
    for e in entries:
        args = ModelArgs.from_dict(e.manifest["args"])
        try:
            weight_bytes = stored_weight_bytes(e, device)
        except UserError as error:
            if damaged is None:
                raise
            damaged[e.ref] = error
            continue
        out.append(Candidate(e.name, e.variant, args, weight_bytes, variant_bits(e.manifest, sources.get(e.name, 16)),
                             native_gguf_blocks(e.manifest), kind=variant_kind(e.variant, e.manifest)))
    return out


def variant_kind(variant: str, manifest: dict) -> str:
    """What an installed variant holds (Candidate.kind): its packing scheme, "source", or "float"."""
    quant = manifest.get("quant") or {}
    if variant == "source":
        return "source"
    return quant["scheme"] if quant.get("scheme") and not quant.get("exact") else "float"


# quant.linear.NATIVE_GGUF_SCHEMES, here without importing torch (test_plan checks they agree)
NATIVE_GGUF_SCHEMES = ("q4_0", "q4_1", "q5_0", "q8_0", "q4_k", "q6_k")
# quant.linear.R16_SCHEMES: the types the CPU repacks into a copy at load (r16)
R16_SCHEMES = ("q4_0", "q4_1", "q8_0", "q4_k")
# bytes of an r16 copy per stored byte, where they differ: Q4_K's 6-bit scale and min codes take a
# byte each (148 bytes a row and super-block where the file holds 144; csrc/r16_gemm.h)
R16_GROWS = {"q4_k": 148 / 144}


def native_gguf_blocks(manifest: dict) -> bool:
    """Whether a variant keeps GGUF blocks whose every type the compiled CPU step runs natively
    (in its matmuls: the token table is looked up, a few rows a token, whatever its type)."""
    quant = manifest.get("quant") or {}
    schemes = {w.get("scheme") for m, w in (quant.get("layout") or {}).items() if m != "tok_embeddings"}
    return quant.get("scheme") == "gguf" and bool(schemes) and schemes <= set(NATIVE_GGUF_SCHEMES)


def variant_bits(manifest: dict, source: int) -> float:
    """What the policy ranks variants of one model by: a packed variant holds at most its
    source's bits, and half a bit less when its blocks did not keep the source's values (int8 or
    nf4 of a 4-bit source); a source ties with a variant that re-packs its grid exactly."""
    quant = manifest.get("quant")
    if not quant or quant.get("exact"):  # a GGUF source kept in its own blocks is still the source
        return source_bits(manifest)
    bits = min(BITS.get(quant["scheme"], 16), source)
    tensors = (quant.get("report") or {}).get("tensors") or []
    linear = [t for t in tensors if _LINEAR.search(t["name"] + ".weight")]
    exact = bool(linear) and all(t.get("sqnr_db") == float("inf") for t in linear)
    return bits - 0.5 if bits == source < 16 and not exact else bits


_LINEAR = re.compile(r"\.(attention\.w[qkvo]|feed_forward\.w[123])\.weight$")  # not norms, not the table
# bits per weight of the GGUF types a source may have been stored in (its blocks' values)
_GGUF_BITS = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "IQ4_NL": 4, "IQ4_XS": 4, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5,
              "Q6_K": 6, "Q8_0": 8, "Q8_K": 8, "Q2_K": 2, "Q3_K": 3}


def source_bits(manifest: dict) -> int:
    """The information a source variant holds: 16, or fewer when it was imported from a
    quantized GGUF, whose values it keeps exactly but in floats. The default model's source is
    its Q4_1 blocks in fp32: 4 bits, so a 4-bit variant on the same grid ties with it and wins
    as the smaller (4.2x less to read per token)."""
    types = (manifest.get("source") or {}).get("types") or {}
    block = [_GGUF_BITS.get(t, 16) for name, t in types.items() if _LINEAR.search(name)]
    return min(16, max(block)) if block else 16


def variants_worth_packing(source: Candidate, variants: list[str], device: Device) -> list[str]:
    """Of `variants` (a catalog's), those the plan would run on `device` before the installed
    `source`: usable there and ranked at least as high (_rank; a tie goes to the packed variant, as
    in _plan_with), with no more bits than the source holds. The default model's Q4_1 source on a
    CPU reads fewer bytes than the int4 that re-packs its values, so int4 is not worth making there;
    on a CUDA GPU (Ampere or newer) int4 ties with it on bits and runs tinygemm, so it is."""
    out = []
    for v in variants:
        c = catalog_candidate(source.model, source.args, v, device)
        c.bits = min(c.bits, source.bits)
        if variant_usable(c, device) and _rank(c, device) <= _rank(source, device):
            out.append(v)
    return out


def plan_installed(ref: str | None = None, ctx: int | None = None, kv_dtype: str = "auto",
                   device: Device | None = None, slots: int = 1) -> PlanResult:
    """The plan over what is installed, for `ref` (NAME or NAME:VARIANT) if given; `slots` KV-cache
    rows of the chosen context (`serve --parallel`: every slot full at once must still fit)."""
    from . import store
    from .devices import probe

    device = device or probe()
    model = variant = None
    if ref:
        model, variant = store.parse_ref(ref)
        store.find(ref)  # a clear "not installed" message before any planning
    damaged: dict[str, UserError] = {}
    candidates = [replace(c, slots=slots) for c in installed_candidates(device, damaged)]
    for bad_ref, error in damaged.items():
        name, bad_variant = store.parse_ref(bad_ref)
        # the variant asked for is damaged (or every variant of the model asked for): say which
        # file, never plan around it
        if name == model and (variant == bad_variant or not any(c.model == name for c in candidates)):
            raise error
    result = plan_memory(candidates, device, model, variant, ctx, kv_dtype)
    if result.chosen is None and damaged:
        raise next(iter(damaged.values()))
    return result
