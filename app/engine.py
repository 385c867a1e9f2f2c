"""A loaded model with its tokenizer and chat format, streaming text for a conversation.

The engine is what the CLI and the chat app talk to: messages in, text pieces out, cancellable
through a `threading.Event`, with the numbers a status line wants (tokens/s, context used).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from typing import Iterator

import psutil
import torch
from safetensors import SafetensorError, safe_open

from model.args import ModelArgs
from model.chat_format import ChatFormat, choose_chat_format
from model.generate import Decoder, EagerDecoder, SamplingParams, generate, prefill
from model.model import Transformer
from model.tokenizer import StreamDecoder, Tokenizer, load_tokenizer, sampling_defaults
from quant import decode_cpu, extension
from quant.formats import FORMAT_VERSION
from quant.linear import PACKED_MODULES, fuse_projections, repack_for_device, swap_linears, tie_output
from quant.linear import set_activation_bits as set_layer_activation_bits

from . import pull, store
from .context import too_long_hint
from .devices import (format_bytes, inference_threads, probe, release_freed_memory, reuse_freed_memory, thread_ceiling,
                      trim_heap)
from .errors import UserError
from .plan import MIN_CTX, PREFILL_CHUNK, Plan, plan_installed
from .threads import ThreadGovernor

# the plan's KV cache dtypes as the model stores them (int8: codes and a scale per vector)
KV_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}


@dataclass
class ReplyStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0
    new_tokens: int = 0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    stopped: bool = False

    @property
    def tokens_per_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0


def activation_dtype(device: str) -> torch.dtype:
    """fp32 on the CPU (its bf16 matmuls are slower for one token), bf16 on a GPU, as the plan counts."""
    if not str(device).startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16


def load_model(entry: store.ModelEntry, ctx: int, device: str = "cpu", dtype=None,
               precise: bool = False, fuse: bool = True, kv_dtype: str | None = None) -> Transformer:
    """Read an installed variant's tensors and build the model from them (see build_model)."""
    args = ModelArgs.from_dict(entry.manifest["args"])
    quant = entry.manifest.get("quant")
    if quant:
        check_format_version(entry)
    release_freed_memory()
    state, files = {}, []
    for fname in entry.manifest["weights"]:
        path = entry.path / fname
        try:
            with safe_open(str(path), framework="pt") as f:  # maps the file; each tensor a view of it
                files.append(list(f.keys()))
                for k in files[-1]:
                    state[k] = f.get_tensor(k)
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:
            raise UserError(f"{path}: cannot read the weights ({e}); remove and re-import the model") from None
    try:
        return build_model(args, quant["layout"] if quant else None, state, ctx, device, dtype, precise, fuse,
                           kv_dtype, mapped_files=files)
    except _StateMismatch as e:
        raise UserError(f"{entry.path}: the stored weights do not match the model ({e}); "
                        f"the files were changed or are damaged: remove and re-create {entry.ref}") from None


class _StateMismatch(Exception):
    pass


def build_model(args: ModelArgs, layout: dict | None, state: dict[str, torch.Tensor], ctx: int,
                device: str = "cpu", dtype=None, precise: bool = False, fuse: bool = True,
                kv_dtype: str | None = None, mapped_files: list[list[str]] = ()) -> Transformer:
    """Build the model on the meta device, swap in packed layers, assign `state`'s tensors.

    `layout` is a packed variant's per-module {"scheme", "group_size"} (None: full precision).
    `dtype` is the activations' (None: activation_dtype(device)). `precise` runs packed layers
    at fp32-level accuracy for ~3x their matmul time. `kv_dtype` is the plan's name for the KV
    cache's dtype (None: the activations'). `fuse` merges projections (one matmul for q, k, v
    and one for w1, w3), which the fast decoders need (see choose_decoder); fuse=False is the
    plain eager model. `mapped_files`: the keys of `state` each mapped file holds (see
    _own_mapped_tensors).
    """
    dtype = dtype or activation_dtype(device)
    with torch.device("meta"):
        model = Transformer(args)
    if layout:
        swap_linears(model, {m: w["scheme"] for m, w in layout.items()},
                     group_size={m: w["group_size"] for m, w in layout.items() if "group_size" in w},
                     embedding_dtype=dtype)
    if args.tie_embeddings:
        tie_output(state)
    try:
        model.load_state_dict(state, assign=True, strict=True)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()
        raise _StateMismatch(" ".join(first[:3])[:300]) from None
    if fuse:
        fuse_projections(model)
    # on a GPU the table stays in CPU RAM, as llama.cpp does and as the plan counts: a lookup
    # needs one row per token, not VRAM (a table tied to the head is the head's weight)
    table = "cpu" if str(device).startswith("cuda") and not (args.tie_embeddings and not layout) else device
    prepare_loaded(model, bool(layout), device, dtype, precise, table)
    _own_mapped_tensors(model, [[state[k] for k in keys] for keys in mapped_files])
    state.clear()
    model.setup_caches(ctx, dtype=dtype, device=device, kv_dtype=KV_TORCH_DTYPES[kv_dtype] if kv_dtype else None)
    reuse_freed_memory()
    return model


def prepare_loaded(model: torch.nn.Module, packed: bool, device, dtype, precise: bool = False,
                   table_device=None) -> torch.nn.Module:
    """A loaded model, or a loaded part of one (a block, the head), as it runs: packed modules in
    `device`'s kernel layout, the rest in the activations' `dtype`; the token table on
    `table_device` (default: `device`)."""
    table_device = table_device or device
    if packed:
        repack_for_device(model, device, precise, elsewhere={"tok_embeddings": table_device})
        _float_to(model, device, dtype, table_device)
    else:
        for name, child in dict(model.named_children()).items() or [("", model)]:  # a bare norm has no children
            child.to(device=table_device if name == "tok_embeddings" else device, dtype=dtype)
    return model.eval()


def _float_to(model: torch.nn.Module, device, dtype, table_device) -> None:
    """A packed model's modules that are not packed (norms; a head or table the quantizer left in
    float) to `device` and the activations' `dtype`, as they run and as the plan counts them: a
    norm or head in fp32 would turn a bf16 residual stream into fp32. The token table goes to
    `table_device`."""
    for name, module in model.named_modules():
        if isinstance(module, PACKED_MODULES):
            continue
        where = table_device if name == "tok_embeddings" else device
        for key, t in list(module._parameters.items()):
            if t is not None:
                module._parameters[key] = torch.nn.Parameter(t.to(where, dtype if t.is_floating_point() else None),
                                                              requires_grad=False)
        for key, t in list(module._buffers.items()):
            if t is not None:
                module._buffers[key] = t.to(where)


def compile_decode_kernel(say=None) -> bool:
    """Compile the fused CPU decode step if this machine has not yet; False if it cannot be."""
    try:
        extension.chosen_isa()
    except ValueError as e:  # LLAMADESK_ISA: the user asked for a path this CPU cannot run
        raise UserError(str(e)) from None
    cache = pull.cache_dir()
    if not extension.is_built(cache) and say:
        say("Compiling the fast decode step for this CPU (once per machine: ~30 s idle, minutes when busy)")
    return extension.load_extension(cache) is not None


def choose_decoder(model: Transformer, compile_kernel: str = "now", say=None, on_ready=None) -> Decoder:
    """The fastest decoder (model/generate.py's seam) that runs `model` here, over its weights and
    current KV cache: the compiled CPU step (quant/decode_cpu.py), a CUDA graph on a GPU (see
    static_decoder), else the eager blocks.

    The CPU step is compiled once per machine: "now" compiles it here if needed; "background"
    compiles it in a thread and hands the new decoder to `on_ready(decoder)` when done (the
    eager blocks answer meanwhile, so a first reply never waits); "never" uses it only if
    already compiled."""
    if model.rope is not None and model.rope.device.type == "cuda":
        if model.layers[0].attention.kv_cache.k.shape[0] > 1:  # the graph is captured for cache row 0
            return EagerDecoder(model)
        return static_decoder(model, compile_kernel != "never", say)
    if decode_cpu.unsupported(model) is not None:
        return EagerDecoder(model)
    cache = pull.cache_dir()
    if compile_kernel == "now" or extension.is_built(cache):
        compile_decode_kernel(say)
        return decode_cpu.build_decoder(model, cache) or EagerDecoder(model)
    if compile_kernel == "background" and on_ready is not None:
        def build() -> None:
            decoder = decode_cpu.build_decoder(model, cache)
            if decoder is not None:
                on_ready(decoder)

        threading.Thread(target=build, name="llamadesk-compile", daemon=True).start()
    return EagerDecoder(model)


def use_activation_bits(model: Transformer, decoder: Decoder, bits: int) -> bool:
    """Round activations to `bits` (8 or 15) in `model`'s r16 layers (prompts) and in `decoder`
    if it is the compiled CPU step (under a ThreadGovernor or not). Whether anything took them:
    False where nothing rounds x to integers (no compiled kernels, a GPU)."""
    taken = set_layer_activation_bits(model, bits) > 0
    inner = decoder.inner if isinstance(decoder, ThreadGovernor) else decoder
    if hasattr(inner, "set_activation_bits"):  # the compiled CPU step
        inner.set_activation_bits(bits)
        taken = True
    return taken


def static_decoder(model: Transformer, compile: bool = True, say=None) -> Decoder:
    """On a GPU: the decode step as a CUDA graph (model/static_decode.py), its blocks compiled.

    torch.compile keeps what it compiled on disk, so only a machine's first load waits the
    whole compile. bitsandbytes' NF4 kernels run uncompiled inside the graph. Where compiling or
    capturing fails, the step falls back to a graph of the uncompiled blocks, then to no graph.
    """
    from model.static_decode import StaticDecode
    from quant.linear import NF4Linear

    compile = compile and not any(isinstance(m, NF4Linear) for m in model.modules())
    if compile and say:
        say("Compiling the decode step for the GPU (kept on disk after the first time)...")
    for compiled in (True, False) if compile else (False,):
        try:
            return StaticDecode(model, compiled)
        except Exception as e:  # a compiler or capture failure costs speed, not the answer
            if say:
                say(f"decode step {'compiled' if compiled else 'as a CUDA graph'} failed ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200] if str(e) else ''}); falling back")
            torch.cuda.synchronize()
    return EagerDecoder(model)


def _own_mapped_tensors(model: torch.nn.Module, files: list[list[torch.Tensor]]) -> None:
    """Keep a file mapped where the model reads all of its tensors in place; elsewhere copy the
    tensors still on the mapping (those neither fused nor repacked), and let it go.

    `files` holds each mapped file's tensors as read (safe_open maps a file whole; each tensor
    is a view of it). Mapped, a weight's pages are the page cache's, read from disk once and
    shared, as llama.cpp maps a GGUF. But one live tensor keeps its whole file mapped, and
    every page read stays resident: where fusing or repacking already copied some weights,
    their pages would count twice, so the rest is copied too and the file unmapped.
    """
    held = {t.data_ptr() for t in (*model.parameters(), *model.buffers())}
    to_copy: set[int] = set()
    for tensors in files:
        ptrs = {t.data_ptr() for t in tensors}
        if not ptrs <= held:
            to_copy |= ptrs
    copies: dict[int, torch.Tensor] = {}  # a tied table stays one tensor
    for module in model.modules():
        for name, t in list(module._parameters.items()):
            if t is not None and t.data_ptr() in to_copy:
                own = copies.setdefault(t.data_ptr(), t.detach().clone())
                module._parameters[name] = torch.nn.Parameter(own, requires_grad=False)
        for name, t in list(module._buffers.items()):
            if t is not None and t.data_ptr() in to_copy:
                module._buffers[name] = copies.setdefault(t.data_ptr(), t.clone())


def check_format_version(entry: store.ModelEntry) -> None:
    version = int(entry.manifest.get("quant", {}).get("format_version", 0))
    if version > FORMAT_VERSION:
        raise UserError(f"{entry.ref} was made by a newer llamadesk (packed format {version}, this one reads "
                        f"up to {FORMAT_VERSION}); upgrade llamadesk or re-quantize")


class Engine:
    def __init__(self, entry: store.ModelEntry, model: Transformer, tokenizer: Tokenizer,
                 chat_format: ChatFormat, ctx: int, device: str, thread_ceiling: int | None = None):
        self.entry, self.model, self.tokenizer, self.chat_format = entry, model, tokenizer, chat_format
        self.ctx, self.device = ctx, device
        # on the CPU the decoder runs under the thread governor, which may go up to this many
        self.thread_ceiling = thread_ceiling or torch.get_num_threads()
        # what the r16 layers and the compiled CPU step round activations to (set_activation_bits);
        # 15 unless a server or `--activation-bits 8` asks
        self.activation_bits = 15
        self.decoder = EagerDecoder(model)
        # a faster decoder compiled in the background waits here until the reply in flight ends
        self._next_decoder: Decoder | None = None
        self.stop_ids = chat_format.stop_ids(tokenizer)
        self.sampling_defaults = sampling_defaults(entry.path)  # the model's own suggestions, for the app
        self.last = ReplyStats()
        self.plan: Plan | None = None
        self.measured_bytes: int | None = None
        # the tokens whose keys and values sit in the KV cache, so a chat turn re-reads only what is new
        self._cached: list[int] = []
        # special-token text in messages stays text unless the user opts in (ask --parse-special)
        self.parse_special = False
        self.chat_format_source = "the model's own template"

    @classmethod
    def load(cls, ref: str | None = None, ctx: int | None = None, device: str | None = None,
             verify: bool = False, say=None, precise: bool = False, threads: int | None = None,
             kv_dtype: str = "auto", compile_kernel: str = "now", chat_format: str | None = None,
             slots: int = 1, ui: bool = False) -> "Engine":
        """Load what the memory plan chooses for `ref` (any installed model if None).

        `chat_format` (a built-in name) overrides the model's own for this run (see
        model.chat_format.choose_chat_format); `engine.chat_format_source` says where it came from.

        `kv_dtype` ("auto", or one the user fixed: fp32, bf16, fp16, int8) goes to the plan; the
        plan's choice is what the cache holds. `slots`: the plan leaves room for that many KV-cache
        rows of its context (a server's parallel requests; `use_cache_rows` makes them).

        An out-of-memory error during load or warm-up steps down once: a quarter less context,
        then the next plan the smaller context allows, and says so.
        """
        say = say or (lambda msg: None)
        target = probe(device) if device else probe()
        ceiling = None
        if target.kind == "cpu":  # the one thread rule (`ui`: the chat app's screen has a core of its own)
            torch.set_num_threads(inference_threads(threads, ui=ui))
            ceiling = thread_ceiling(threads)
        result = plan_installed(ref, ctx, kv_dtype, device=target, slots=slots)
        if result.chosen is None:
            raise UserError(result.why)
        plan = result.chosen
        say(f"Plan: {plan.ref}, {plan.ctx}-token context on {plan.device} ({torch.get_num_threads()} threads), "
            f"KV cache {plan.kv_dtype}. {plan.why}")
        try:
            return cls._load_planned(plan, verify, precise, compile_kernel, say, chat_format, ceiling)
        except (torch.OutOfMemoryError, MemoryError) as e:
            smaller = max(min(MIN_CTX, plan.ctx), plan.ctx * 3 // 4 // 256 * 256)
            if ctx is not None or smaller >= plan.ctx:
                raise UserError(f"out of memory loading {plan.ref} with {plan.ctx} tokens of context ({e})") from None
            say(f"Out of memory at {plan.ctx} tokens; stepping down to {smaller}.")
            fallback = plan_installed(ref, smaller, kv_dtype, device=target, slots=slots).chosen
            if fallback is None:
                raise UserError(f"out of memory loading {plan.ref}; nothing smaller fits") from None
            return cls._load_planned(fallback, verify, precise, compile_kernel, say, chat_format, ceiling)

    @classmethod
    def _load_planned(cls, plan: Plan, verify: bool, precise: bool = False, compile_kernel: str = "now",
                      say=None, chat_format_flag: str | None = None, ceiling: int | None = None) -> "Engine":
        entry = store.find(plan.ref)
        tokenizer = load_tokenizer(entry.path)
        chat_format, chat_source = choose_chat_format(tokenizer, entry.name, chat_format_flag,
                                                      store.settings(entry.name).get("chat-format"))
        trim_heap()  # what earlier work in this process freed (a pull, a quantize) is not a baseline
        rss0 = _rss()
        model = load_model(entry, plan.ctx, plan.device, precise=precise, kv_dtype=plan.kv_dtype)
        engine = cls(entry, model, tokenizer, chat_format, plan.ctx, plan.device, ceiling)
        engine.decoder = choose_decoder(model, compile_kernel, say, on_ready=engine.hand_over)
        engine.plan = plan
        engine.chat_format_source = chat_source
        if verify:
            engine.warm_up()
            engine.measured_bytes = _rss() - rss0
        return engine

    def warm_up(self) -> None:
        """One prefill chunk at the far end of the context, through the decoder's prompt path where
        it has one: the most memory the plan allows for."""
        chunk = min(PREFILL_CHUNK, self.ctx)
        prefill(self.model, [0] * chunk, self.ctx - chunk, chunk=chunk, decoder=self.decoder)
        trim_heap()
        self._cached = []

    def memory_report(self) -> str:
        if self.plan is None or self.measured_bytes is None:
            return ""
        b = self.plan.bytes
        estimate = b["weights"] + b["kv_cache"] + b["workspace"]
        return (f"memory: planned {format_bytes(estimate)} (weights {format_bytes(b['weights'])}, KV cache "
                f"{format_bytes(b['kv_cache'])}, workspace {format_bytes(b['workspace'])}); measured RSS growth "
                f"{format_bytes(self.measured_bytes)} ({(self.measured_bytes / estimate - 1) * 100:+.1f}%)")

    def use_cache_rows(self, rows: int) -> None:
        """`rows` KV-cache rows of the planned context each (a server's parallel requests), in the
        cache's dtype; the decoder is built again over them. Each row costs the plan's KV cache."""
        cache = self.model.layers[0].attention.kv_cache
        self.model.setup_caches(self.ctx, batch=rows, dtype=self.model.norm.weight.dtype,
                                device=cache.k.device, kv_dtype=cache.k.dtype)
        self.decoder = choose_decoder(self.model, "never")
        self._next_decoder, self._cached = None, []

    @property
    def decoder(self) -> Decoder:
        return self._decoder

    @decoder.setter
    def decoder(self, decoder: Decoder) -> None:
        inner = decoder.inner if isinstance(decoder, ThreadGovernor) else decoder
        if hasattr(inner, "set_activation_bits"):  # the compiled CPU step
            inner.set_activation_bits(self.activation_bits)
        if self.device == "cpu" and not isinstance(decoder, ThreadGovernor):
            decoder = ThreadGovernor(decoder, self.thread_ceiling)
        self._decoder = decoder

    def set_activation_bits(self, bits: int) -> int | None:
        """8 or 15: the integer bits activations are rounded to in the r16 layers, in prompts
        (quant.linear.set_activation_bits) and in the compiled CPU step, this one and any built
        later (quant.decode_cpu.CpuStepDecoder.set_activation_bits). 8 is llama.cpp's Q8_0
        rounding: one integer product a weight, prompts ~1.2-1.35x faster on AVX-512 (1.0-1.35x on
        AVX2) and a batched step cheaper
        (`llamadesk serve`'s default; `ask --activation-bits 8`); 15 keeps the logits within
        ~0.03 of exact arithmetic. Returns `bits` where a layer or the step takes them, None where
        nothing does (no compiled kernels, a GPU: they keep their own arithmetic)."""
        if bits not in (8, 15):
            raise UserError(f"activations are rounded to 8 or 15 bits, not {bits}")
        self.activation_bits = bits  # for decoders handed over later (the setter applies it)
        return bits if use_activation_bits(self.model, self._decoder, bits) else None

    @staticmethod
    def activation_bits_unused(bits: int) -> str:
        """What to tell a user whose --activation-bits set_activation_bits could not apply."""
        return f"--activation-bits {bits} has no effect here: only the compiled CPU kernels round activations to integers"

    @property
    def step_activation_bits(self) -> int | None:
        """What the decoder in use rounds activations to: 8 or 15 (the CPU step), else None."""
        inner = self._decoder.inner if isinstance(self._decoder, ThreadGovernor) else self._decoder
        return self.activation_bits if hasattr(inner, "set_activation_bits") else None

    def hand_over(self, decoder: Decoder) -> None:
        """Use `decoder` from the next reply on (a background compile's result; any thread)."""
        self._next_decoder = decoder

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.chat_format.encode(self.tokenizer, messages, parse_special=self.parse_special)

    def count_tokens(self, messages: list[dict]) -> int:
        return len(self.prompt_ids(messages))

    def stream(self, messages: list[dict], params: SamplingParams | None = None, max_tokens: int = 512,
               cancel: threading.Event | None = None) -> Iterator[str]:
        """Yield the reply's text piece by piece; `self.last` holds its numbers afterwards."""
        ids = self.prompt_ids(messages)
        if len(ids) >= self.ctx:
            raise UserError(f"the prompt is {len(ids)} tokens, which leaves no room for a reply in the "
                            f"{self.ctx}-token context; "
                            + too_long_hint(self.ctx, self.max_ctx, "raise --ctx"))
        if self._next_decoder is not None:  # between replies: no step is running
            self.decoder, self._next_decoder = self._next_decoder, None
        params, reuse = self._sampling(params), _common_prefix(self._cached, ids)
        if params.seed is not None:
            # a seed promises the same text for the same prompt whatever ran before: the cached
            # prefix (written by an earlier reply's decode steps, rounded to the KV dtype) gives
            # logits a little off a fresh prefill's, enough to change a sampled token
            reuse = 0
        reuse = min(reuse, len(ids) - 1)  # the last prompt token must run to give the first logits
        stats = self.last = ReplyStats(prompt_tokens=len(ids), reused_tokens=reuse)
        decoder = StreamDecoder(self.tokenizer)
        out: list[int] = []
        t0 = time.perf_counter()
        t_first = None
        self._cached = ids[:reuse]
        try:
            for token in generate(self.model, ids[reuse:], max_tokens, self.stop_ids, params, cancel, start_pos=reuse,
                                  decoder=self.decoder):
                if t_first is None:
                    t_first = time.perf_counter()
                    stats.ttft_s = t_first - t0
                    trim_heap()  # the prompt's temporaries: a chat's RSS stays what the plan says
                out.append(token)
                stats.new_tokens = len(out)
                stats.decode_s = time.perf_counter() - t_first
                piece = decoder.push(token)
                if piece:
                    yield piece
            tail = decoder.flush()
            if tail:
                yield tail
        finally:
            stats.stopped = bool(cancel is not None and cancel.is_set())
            if t_first is not None:
                # the prompt has run, and every yielded token but the last has been fed back
                self._cached = ids + out[:-1]

    @property
    def max_ctx(self) -> int:
        """The longest context the model was trained for (its config's max_seq_len), in tokens."""
        return self.model.args.max_seq_len

    def context_used(self) -> int:
        return len(self._cached)

    def _sampling(self, params: SamplingParams | None) -> SamplingParams:
        """`params` with the tokenizer's special tokens exempt from the repetition penalty."""
        params = params or SamplingParams()
        exempt = frozenset(self.tokenizer.special_tokens.values()) | frozenset(self.stop_ids)
        return replace(params, penalty_exempt=params.penalty_exempt | exempt)


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
