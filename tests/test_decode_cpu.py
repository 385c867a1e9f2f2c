"""The compiled CPU decode step (quant/decode_cpu.py) against the Python blocks it replaces.

Tiny random models with every kind of layer it runs: fp32, int4 (with rows padded for the
kernel), int8 through the int8 kernel and as a dense weight (K % 16 != 0), an fp16 head.
The step runs int4 layers through its own kernel, in fp32 from the unrounded input, where the
Python blocks call torch's, which rounds the input to bf16: against the step, the Python blocks'
int4 layers run their dequantized weight in fp32 (`fp32_int4`), what the step computes.
The real default model's greedy tokens are checked in test_fast_path.py.
"""
from types import SimpleNamespace

import gguf
import pytest
import torch
import torch.nn as nn

from agreement import assert_agree, forced_logits, greedy_answer
from app import pull
from app.engine import choose_decoder
from model.args import ModelArgs
from model.generate import EagerDecoder, SamplingParams, generate, prefill
from model.model import Transformer
from quant import decode_cpu, extension
from quant.formats import pack_int4, pack_int8
from quant.linear import (GGUFEmbedding, Int4Linear, Int8Embedding, fuse_projections, repack_for_device,
                          swap_linears)

# ffn_dim 100: w1/w3 fuse to 200 rows (the int4 kernel pads to 208); w2's K = 100 is no multiple
# of 16, so int8 runs it as a dense weight
ARGS = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=256, ffn_dim=100)
LAYER_SCHEMES = [
    {"wq": "int4", "wk": "int4", "wv": "int4", "wo": "int4", "w1": "int4", "w3": "int4", "w2": "int8"},
    {"wq": "int8", "wk": "int8", "wv": "int8", "wo": "int8", "w1": "int8", "w3": "int8", "w2": "int8"},
    {},  # fp32
]
PACK = {"int4": lambda w: pack_int4(w, 32)[0], "int8": lambda w: pack_int8(w)[0]}


def _module_name(layer: int, short: str) -> str:
    part = "attention" if short in ("wq", "wk", "wv", "wo") else "feed_forward"
    return f"layers.{layer}.{part}.{short}"


# head dims the step's vector attention runs (64, 128; 3 and 1 queries per KV head) and one it
# leaves to the plain loops (16). The larger models leave out the int8 kernel's layers: it rounds
# its input to bf16, so fp32-rounding differences in attention (keys summed in another order)
# would flip roundings there and compare the rounding, not the attention.
HEAD_DIMS = {16: ARGS, 64: dict(ARGS, dim=192, n_heads=3, n_kv_heads=1), 128: dict(ARGS, dim=256, n_heads=2, n_kv_heads=2)}
FP32_EXACT_SCHEMES = [LAYER_SCHEMES[0], {}, {}]


def tiny_packed_model(ctx: int = 64, kv_dtype=None, head_dim: int = 16) -> Transformer:
    args = HEAD_DIMS[head_dim]
    torch.manual_seed(0)
    reference = Transformer(ModelArgs(**args))
    for name, p in reference.named_parameters():
        nn.init.normal_(p, std=0.08) if p.dim() == 2 else nn.init.uniform_(p, 0.5, 1.5)
    sd = dict(reference.state_dict())
    precision = {}
    for i, schemes in enumerate(LAYER_SCHEMES if head_dim == 16 else FP32_EXACT_SCHEMES):
        for short, scheme in schemes.items():
            name = _module_name(i, short)
            precision[name] = scheme
            sd.update(PACK[scheme](sd.pop(f"{name}.weight")).state_dict(name))
    precision["output"] = "fp16"
    sd["output.weight"] = sd["output.weight"].half()
    with torch.device("meta"):
        model = Transformer(ModelArgs(**args))
    swap_linears(model, precision)
    model.load_state_dict(sd, assign=True)
    fuse_projections(model)
    repack_for_device(model, "cpu")
    model.setup_caches(ctx, kv_dtype=kv_dtype)
    return model.eval()


@pytest.fixture(scope="module")
def cache():
    if not extension.load_extension(pull.cache_dir()):
        pytest.fail("the decode kernel did not compile on this machine (a C++ compiler is needed for tests)")
    return pull.cache_dir()


def int4_weight(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group: int, n_out: int) -> torch.Tensor:
    """The (n_out, K) fp32 weight torch's CPU int4 tensors hold: (q - 8) * scale + zero, with q read
    back through torch's own kernel (unit scales, zero zeros and an identity input give q - 8,
    exact in bf16), whatever layout this torch packs in."""
    G, n_pad, _ = scales_and_zeros.shape
    K = G * group
    unit = torch.zeros(G, n_pad, 2, dtype=torch.bfloat16)
    unit[..., 0] = 1
    q8 = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(K, dtype=torch.bfloat16), packed, group, unit)
    sz = scales_and_zeros.float().repeat_interleave(group, 0)  # (K, n_pad, 2)
    return (q8.float() * sz[..., 0] + sz[..., 1]).T[:n_out].contiguous()


@pytest.fixture
def fp32_int4(monkeypatch):
    """Int4Linear runs x @ W^T in fp32 over its dequantized weight instead of torch's kernel."""
    def forward(self, x):
        if not hasattr(self, "_fp32_weight"):
            self._fp32_weight = int4_weight(self.packed, self.scales_and_zeros, self.group_size, self.out_features)
        return (x.float() @ self._fp32_weight.T).to(x.dtype)

    monkeypatch.setattr(Int4Linear, "forward", forward)


KV_DTYPES = [torch.float32, torch.bfloat16, torch.int8]


@pytest.fixture(params=[None, 4], ids=["keys-split-from-256", "keys-split-from-4"])
def split_keys(request, cache):
    """Where the step splits each KV head's keys over the threads (and merges their softmaxes)."""
    ext = extension.loaded_extension()
    if request.param is None:
        yield
        return
    old = ext.set_parallel_keys(request.param)
    yield
    ext.set_parallel_keys(old)


@pytest.mark.parametrize("head_dim", sorted(HEAD_DIMS))
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("past", [8, 300])  # short contexts and long ones (keys split over threads)
@torch.inference_mode()
def test_one_step_equals_the_python_blocks(cache, fp32_int4, split_keys, kv_dtype, past, head_dim):
    model = tiny_packed_model(ctx=512, kv_dtype=kv_dtype, head_dim=head_dim)
    D = model.args.dim
    decoder = decode_cpu.build_decoder(model, cache)
    tokens = torch.randint(0, 256, (1, past + 1), generator=torch.Generator().manual_seed(3))
    model(tokens[:, :past], 0)  # a prefill fills positions 0..past-1
    h = model.tok_embeddings(tokens[:, past:])  # (1, 1, D)
    expected = h
    for layer in model.layers:
        expected = layer(expected, past, model.rope[past : past + 1], None)
    written = [dict(layer.attention.kv_cache.named_buffers()) for layer in model.layers]
    written = [{k: t[:, :, past].clone() for k, t in bufs.items()} for bufs in written]
    got = decoder.blocks.step(h, past)  # writes position `past` of the same caches again
    assert got.shape == expected.shape == (1, 1, D)
    # bf16 and int8 caches: the step's k, v may round one value to the neighbouring bf16 step (2^-8
    # relative) or int8 code (1/127 of the vector's largest) where the blocks' did (fp32 summation
    # order, see below), and later layers read it back: half a step of either. Measured: 4.7e-4 on
    # 0.23 (bf16, 300 keys, head dim 16, the AVX2 build); AVX-512 builds round alike (1e-5 holds).
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.int8: 4e-3}[kv_dtype]
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    for layer, bufs in zip(model.layers, written):  # the cache holds what the Python blocks stored
        assert set(bufs) == ({"k", "v", "k_scale", "v_scale"} if kv_dtype == torch.int8 else {"k", "v"})
        for name, t in bufs.items():
            # the step's and the blocks' k, v differ by fp32 rounding, which can move a bf16 value
            # or an int8 code by one step, or by what a layer before read of the other rounding
            close = {torch.bfloat16: dict(rtol=2**-7, atol=tol), torch.int8: dict(rtol=0, atol=1)}.get(t.dtype)
            torch.testing.assert_close(getattr(layer.attention.kv_cache, name)[:, :, past].float(), t.float(),
                                       **(close or dict(rtol=1e-5, atol=1e-5)))


@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@torch.inference_mode()
def test_the_fused_step_follows_the_python_blocks_over_40_tokens(cache, kv_dtype, head_dim):
    """By tests/agreement.py's rule: the same arithmetic in another order (the step's int4 kernel
    reads the unrounded input where torch's rounds it to bf16: up to ~0.05 here)."""
    model = tiny_packed_model(kv_dtype=kv_dtype, head_dim=head_dim)
    prompt = [5, 17, 99, 3, 250]
    answer = greedy_answer(model, prompt, 40)
    python = forced_logits(model, prompt, answer)
    decoder = choose_decoder(model, "now")
    assert isinstance(decoder, decode_cpu.CpuStepDecoder) and len(set(answer)) > 3
    assert_agree(python, forced_logits(model, prompt, answer, decoder), 0.1)


def _token_table(kind: str, V: int, D: int) -> nn.Module:
    """A token table of `kind` with random rows of the size a trained one has."""
    g = torch.Generator().manual_seed(1)
    if kind == "int8_group":
        table = Int8Embedding(V, D, group_size=32)
        table.qweight = torch.randint(-127, 128, (V, D), dtype=torch.int8, generator=g)
        table.scales = torch.rand(V, D // 32, generator=g) * 1e-3
        return table
    scheme = kind.removeprefix("gguf_")
    table = GGUFEmbedding(V, D, scheme)
    if scheme in ("q4_0", "q8_0"):
        values = (torch.randn(V, D, generator=g) * 0.08).numpy()
        table.blocks = torch.from_numpy(gguf.quants.quantize(values, gguf.GGMLQuantizationType[scheme.upper()]))
        return table
    # gguf cannot write K-quants: random blocks whose fp16 scales are small finite numbers
    blocks = torch.randint(0, 256, (V * D // 256, {"q4_k": 144, "q6_k": 210}[scheme]), dtype=torch.uint8, generator=g)
    scale = torch.full((blocks.shape[0], 1), 1e-3, dtype=torch.float16).view(torch.uint8)  # (n, 2)
    for at in ((0, 2) if scheme == "q4_k" else (208,)):  # q4_k: d, dmin; q6_k: d, the block's last bytes
        blocks[:, at : at + 2] = scale
    table.blocks = blocks.reshape(V, -1)
    return table


@pytest.mark.parametrize("table", ["fp32", "int8_group", "gguf_q4_0", "gguf_q8_0", "gguf_q4_k", "gguf_q6_k"])
@torch.inference_mode()
def test_the_step_looks_up_tokens_and_runs_the_head_as_the_python_modules_do(cache, table):
    """The step starts from the token table and ends with the final norm and head (one call a
    token, for the GIL's sake): the same logits as the model's own lookup and head around the
    compiled blocks, for each kind of table, rows of a batch included."""
    model = tiny_packed_model(head_dim=128 if table.endswith("_k") else 16)  # K-quant blocks are 256 wide
    model.setup_caches(64, batch=2)
    if table != "fp32":
        model.tok_embeddings = _token_table(table, model.args.vocab_size, model.args.dim)
    decoder = decode_cpu.build_decoder(model, cache)
    assert decoder.fused_head and decoder.fused_embedding
    for row, prompt in enumerate(([5, 17, 99, 3], [250, 7])):
        prefill(model, prompt, cache_row=row)
    tokens, positions, rows = torch.tensor([41, 8]), torch.tensor([4, 2]), torch.tensor([0, 1])
    fused = decoder.decode(tokens, positions, rows)  # (B, V)
    decoder.fused_embedding = decoder.fused_head = False  # the same position again, through Python
    python = decoder.decode(tokens, positions, rows)
    assert fused.shape == (2, model.args.vocab_size)
    torch.testing.assert_close(fused, python, rtol=1e-4, atol=1e-4)
    assert not torch.equal(fused[0], fused[1])


def test_the_step_leaves_a_table_it_cannot_read_to_python(cache):
    model = tiny_packed_model()
    model.tok_embeddings = _token_table("gguf_q4_0", model.args.vocab_size, model.args.dim)
    model.tok_embeddings.dtype = torch.bfloat16  # the lookup would round to bf16: only Python does that
    decoder = decode_cpu.build_decoder(model, cache)
    assert decoder.fused_head and not decoder.fused_embedding


def test_what_the_fused_step_does_not_run_keeps_the_python_path(cache):
    model = tiny_packed_model()
    assert decode_cpu.unsupported(model) is None
    model.setup_caches(64, kv_dtype=torch.float16)
    assert "KV cache" in decode_cpu.unsupported(model)
    model.setup_caches(64)
    model.layers[1].attention.wo.precise = True
    assert "precise" in decode_cpu.unsupported(model)
    decoder = choose_decoder(model, "now")
    assert isinstance(decoder, EagerDecoder)
    assert len(list(generate(model, [1, 2, 3], 5, params=SamplingParams(temperature=0), decoder=decoder))) == 5


def test_no_compiler_means_the_python_path(cache, monkeypatch, tmp_path):
    monkeypatch.setattr(extension, "_extension", None)
    monkeypatch.setattr(extension, "_failed", None)
    monkeypatch.setattr(extension.shutil, "which", lambda name: None)
    monkeypatch.setattr(pull, "cache_dir", lambda: tmp_path)  # nothing compiled there
    model = tiny_packed_model()
    assert isinstance(choose_decoder(model, "now"), EagerDecoder)
    assert len(list(generate(model, [1, 2, 3], 5, params=SamplingParams(temperature=0)))) == 5


def test_a_lock_left_by_a_killed_build_is_cleared(tmp_path):
    build_dir = tmp_path / "kernels" / "x"
    build_dir.mkdir(parents=True)
    (build_dir / "lock").write_text("")  # torch's lock file, whose owner died mid-build
    with extension._build_lock(build_dir):
        assert not (build_dir / "lock").exists()


@pytest.mark.parametrize("precise", [True, False], ids=["precise", "r16"])
@pytest.mark.parametrize("rows", [1, 3, 7, 20])  # decode, a few rows, a window
@torch.inference_mode()
def test_a_q8_0_grid_head_runs_packed(cache, rows, precise):
    """Precise: the fp32 kernel, exact up to summation order (a window: dequantized in blocks).
    Otherwise the r16 kernel, x rounded to 15-bit integers per 32 values: within that rounding
    of the exact product. Either way no dense copy, and a decode batch's rows are
    exactly what each gets alone."""
    from quant.formats import unpack
    from quant.linear import Int8Linear

    w = torch.randn(1000, 96, generator=torch.Generator().manual_seed(5)) * 0.05
    packed = pack_int8(w, group_size=32)[0]  # one scale per 32 along a row: GGUF Q8_0's layout
    layer = Int8Linear(96, 1000, 32, device="meta")
    layer.load_state_dict({k.lstrip("."): v for k, v in packed.state_dict("").items()}, assign=True)
    layer.prepare("cpu", precise=precise)
    assert layer.kernel == "int8group" and layer.qweight.dtype == torch.int8  # no dense copy
    assert (layer.r16_weights() is None) == precise
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(6))
    expected = x.double() @ unpack(packed).double().T
    got = layer(x)
    assert got.shape == (rows, 1000)
    if precise:
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    else:
        assert (got.double() - expected).abs().max() < 0.01 * expected.abs().max()
    if rows <= 8 or not precise:  # a decode batch: a row's logits are exactly what it gets alone
        for m in range(rows):
            assert torch.equal(layer(x[m : m + 1]), got[m : m + 1])


def test_ctrl_c_during_the_compile_stops_the_command(monkeypatch, tmp_path):
    """ninja gets the terminal's Ctrl-C first and torch turns it into a build error; it must stay
    the user's stop, not a quiet fallback to the Python path."""
    from torch.utils import cpp_extension

    def interrupted(**kwargs):
        raise RuntimeError("Error building extension 'x': ninja: build stopped: interrupted by user.")

    monkeypatch.setattr(extension, "_extension", None)
    monkeypatch.setattr(extension, "_failed", None)
    monkeypatch.setattr(cpp_extension, "load", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extension.load_extension(tmp_path)
    assert extension._failed is None  # a later run compiles again


# N not a multiple of 16 (rows padded for the kernel) or of 64 (a short last block), groups of
# 32, 64 and 128, one block or a few (split over threads, also in halves of blocks)
INT4_SHAPES = [(64, 64, 32), (200, 64, 32), (9, 128, 32), (77, 256, 64), (40, 128, 128), (1000, 96, 32),
               (576, 576, 32), (96, 1536, 32), (32, 2560, 32)]


@pytest.mark.parametrize("portable", [False, True])  # the AVX-512 kernel, and the plain C++ one
@pytest.mark.parametrize("n, k, group", INT4_SHAPES)
@torch.inference_mode()
def test_int4_kernel_equals_the_fp32_dequantized_matmul(cache, n, k, group, portable):
    ext = extension.load_extension(cache)
    assert ext.int4_packing()[0] in (32, 64)  # the step reads this torch's packing itself
    gen = torch.Generator().manual_seed(n * k + group)
    n_pad = n + (-n) % 16
    q = torch.randint(0, 16, (n_pad, k), dtype=torch.int32, generator=gen)
    scales_and_zeros = (torch.randn(k // group, n_pad, 2, generator=gen) * 0.05).to(torch.bfloat16)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    x = torch.randn(7, k, generator=gen)  # the batched kernel runs rows 4, 2 and 1 at a time
    sz = scales_and_zeros.double().repeat_interleave(group, 0)  # (K, n_pad, 2)
    w = ((q.double() - 8) * sz[..., 0].T + sz[..., 1].T)[:n]  # (n, K)
    expected = x.double() @ w.T
    got = ext.int4_linear(x, packed, scales_and_zeros, group, n, portable)
    assert got.shape == (7, n) and got.dtype == torch.float32
    assert ((got.double() - expected).abs().max() / expected.abs().max()) < 1e-5
    # the helper the tests' Python blocks use reads the same weight
    torch.testing.assert_close(int4_weight(packed, scales_and_zeros, group, n).double(), w, rtol=0, atol=0)
    # seven rows on one weight read: each row's values are exactly its own single-row GEMV's
    for m in range(7):
        assert torch.equal(ext.int4_linear(x[m : m + 1], packed, scales_and_zeros, group, n, portable), got[m : m + 1])


CHECK_INT4_SCRIPT = """
import sys, torch
from app import pull
from quant import extension
sys.path.insert(0, "tests")
from test_decode_cpu import INT4_SHAPES
ext = extension.load_extension(pull.cache_dir())
print(torch.backends.cpu.get_cpu_capability(), *ext.int4_packing())
for n, k, group in INT4_SHAPES:
    gen = torch.Generator().manual_seed(n + k)
    n_pad = n + (-n) % 16
    q = torch.randint(0, 16, (n_pad, k), dtype=torch.int32, generator=gen)
    sz = (torch.randn(k // group, n_pad, 2, generator=gen) * 0.05).to(torch.bfloat16)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    x = torch.randn(2, k, generator=gen)
    s = sz.double().repeat_interleave(group, 0)
    expected = x.double() @ ((q.double() - 8) * s[..., 0].T + s[..., 1].T)[:n].T
    for portable in (False, True):
        got = ext.int4_linear(x, packed, sz, group, n, portable).double()
        err = ((got - expected).abs().max() / expected.abs().max()).item()
        assert err < 1e-5, (n, k, group, portable, err)
print("ok")
"""


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_int4_kernel_reads_the_other_packings_torch_makes(cache, capability):
    """torch packs int4 by the CPU capability it dispatches to (32-row blocks on AVX2, neighbour
    pairs without vector units); ATEN_CPU_CAPABILITY picks another one in a fresh process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("ATEN_CPU_CAPABILITY can only lower an x86 capability from AVX2 or AVX-512")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    env.pop("LLAMADESK_ISA", None)  # a path forced on this process may be one the lowered capability lacks
    out = subprocess.run([sys.executable, "-c", CHECK_INT4_SCRIPT], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0] == {"avx2": "AVX2 32 True", "default": "DEFAULT 32 False"}[capability]
    assert lines[-1] == "ok"


@torch.inference_mode()
def test_the_step_switches_to_torchs_int4_kernel_and_back(cache):
    """set_int4_kernel("torch") runs torch's bf16 kernel again (to compare the two in one process)."""
    ext = extension.load_extension(cache)
    model = tiny_packed_model()
    decoder = decode_cpu.build_decoder(model, cache)
    h = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(1))
    own = decoder.blocks.step(h, 0)
    assert ext.set_int4_kernel("torch") == "own"
    try:
        theirs = decoder.blocks.step(h, 0)
        expected = model.layers[0](h, 0, model.rope[0:1], None)  # the Python blocks: torch's kernel
        for layer in model.layers[1:]:
            expected = layer(expected, 0, model.rope[0:1], None)
    finally:
        assert ext.set_int4_kernel("own") == "torch"
    torch.testing.assert_close(theirs, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(own, theirs)  # bf16 rounding of the input: the kernels differ
    torch.testing.assert_close(own, theirs, rtol=0.05, atol=0.05)
    torch.testing.assert_close(decoder.blocks.step(h, 0), own, rtol=0, atol=0)


# ---------------------------------------------------------------- every ISA path this CPU has
def test_the_extension_runs_the_chosen_path(cache):
    assert extension.load_extension(cache).isa() == extension.chosen_isa()


def test_an_unknown_or_unsupported_path_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv("LLAMADESK_ISA", "sse9")
    with pytest.raises(ValueError, match="not a path"):
        extension.chosen_isa()
    if "avx512" not in extension.supported_isas():
        monkeypatch.setenv("LLAMADESK_ISA", "avx512")
        with pytest.raises(ValueError, match="this CPU runs only"):
            extension.chosen_isa()


@pytest.mark.parametrize("isa", list(extension.ISA_FLAGS))
def test_every_path_this_cpu_runs_passes_the_fast_path_tests(isa):
    """This file and the real model's fast-path tests again in a process forced onto each other
    path (LLAMADESK_ISA, and torch's own dispatch to match: its int4 packing follows it), so an
    AVX-512 machine also checks what AVX2 and plain-C++ machines run."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if isa not in extension.supported_isas():
        pytest.skip(f"this CPU cannot run the {isa} path")
    if isa == extension.chosen_isa() or os.environ.get("LLAMADESK_ISA"):
        pytest.skip("this process runs that path: the tests above are its run")
    root = Path(__file__).resolve().parents[1]
    capability = {"AVX512": "avx512", "AVX2": "avx2", "DEFAULT": "default"}[extension.TORCH_CAPABILITY[isa]]
    env = dict(os.environ, LLAMADESK_ISA=isa, ATEN_CPU_CAPABILITY=capability)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          "tests/test_decode_cpu.py", "tests/test_gguf_kernels.py", "tests/test_fast_path.py"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout.strip().splitlines()[-1]


# ---------------------------------------------------------------- the decoder seam, B rows
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@torch.inference_mode()
def test_four_sequences_decode_together_each_as_alone(cache, kv_dtype):
    """Four prompts of different lengths in KV-cache rows 0-3, decoded 12 steps together (each row
    at its own position): the compiled step follows the eager blocks by the tolerance rule, and a
    row's logits are bit-identical to decoding that row alone (no row reads another's data)."""
    model = tiny_packed_model(ctx=64, kv_dtype=kv_dtype)
    model.setup_caches(64, batch=4, kv_dtype=kv_dtype)
    prompts = [[5, 17, 99], [3, 250, 7, 7, 41, 8, 1], [200], [9, 9, 120, 33, 64]]
    steps = 12

    def run(decoder, rows):
        for r in rows:
            prefill(model, prompts[r], cache_row=r)
        tokens = torch.tensor([prompts[r][-1] for r in rows])
        positions = torch.tensor([len(prompts[r]) for r in rows])
        out = []
        for _ in range(steps):
            logits = decoder.decode(tokens, positions, torch.tensor(rows))  # (B, V)
            out.append(logits)
            tokens, positions = logits.argmax(-1), positions + 1
        return torch.stack(out, 1)  # (B, steps, V)

    fast = decode_cpu.build_decoder(model, cache)
    assert fast is not None
    together = run(fast, [0, 1, 2, 3])
    eager = run(EagerDecoder(model), [0, 1, 2, 3])
    for r in range(4):
        assert_agree(eager[r], together[r], 0.1)
        assert torch.equal(run(fast, [r])[0], together[r])
    assert not torch.equal(together[0], together[1])  # the rows did hold different sequences


# ---------------------------------------------------------------- a prompt through the step
@pytest.mark.parametrize("head_dim", [64, 128])  # the models without int8 layers (HEAD_DIMS)
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@torch.inference_mode()
def test_a_prompt_through_the_step_follows_the_models_forward(cache, fp32_int4, split_keys, kv_dtype, head_dim):
    """A 300-token prompt in chunks of 128 (the later chunks see the earlier ones' keys, past the
    256 keys from which the step splits them over the threads) through the step's
    run_prompt_chunk and through the model's forward: the same last logits and the same KV cache, by the one-step
    test's tolerances; and every chunk's tokens at their own positions of one cache row."""
    model = tiny_packed_model(ctx=512, kv_dtype=kv_dtype, head_dim=head_dim)
    decoder = decode_cpu.build_decoder(model, cache)
    # the step's prompt path whatever prefill_chunk would choose here (its fp32 layers run torch's
    # kernels a row at a time: the forward would be the faster)
    runner = SimpleNamespace(prefill_chunk=decoder.run_prompt_chunk)
    prompt = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(4)).tolist()
    got = prefill(model, prompt, chunk=128, decoder=runner)
    stepped = [{k: t[:, :, :300].clone() for k, t in layer.attention.kv_cache.named_buffers()} for layer in model.layers]
    expected = prefill(model, prompt, chunk=128)  # writes the same positions again
    assert got.shape == expected.shape == (256,)
    # the fp16 head rounds both to its grid: they may sit one of its steps apart (measured: at most
    # 2^-9 on logits up to 5.2)
    torch.testing.assert_close(got, expected, rtol=0, atol=2**-9 * float(expected.abs().max()))
    for layer, bufs in zip(model.layers, stepped):
        for name, t in bufs.items():
            # fp32 summation order over up to 300 keys (measured: 1.7e-5); a bf16 value or an int8
            # code one step apart where the two roundings straddle it, and in later layers what
            # reading the other rounding back moved (up to a bf16 step of the largest value)
            close = {torch.bfloat16: dict(rtol=0, atol=2**-7 * float(t.float().abs().max())),
                     torch.int8: dict(rtol=0, atol=1)}.get(t.dtype)
            torch.testing.assert_close(t.float(), getattr(layer.attention.kv_cache, name)[:, :, :300].float(),
                                       **(close or dict(rtol=1e-4, atol=1e-4)))


@torch.inference_mode()
def test_a_stop_during_a_prompt_through_the_step_lands_between_layers(cache):
    """prefill's stop check runs before every layer of a chunk the step runs, as the forward's
    hooks do on the eager path: a cancel set during layer 1 returns None before layer 2."""
    import threading

    model = tiny_packed_model(ctx=512)
    decoder = decode_cpu.build_decoder(model, cache)
    cancel, layers = threading.Event(), []
    step_rows = decoder.blocks.step_rows

    class Blocks:  # the extension's Decoder, counting the layers it is asked for
        def step_rows(self, h, positions, rows, first, last):
            layers.append(first)
            if first == 1:
                cancel.set()
            return step_rows(h, positions, rows, first, last)

    decoder.blocks = Blocks()
    runner = SimpleNamespace(prefill_chunk=decoder.run_prompt_chunk)
    assert prefill(model, list(range(40)), chunk=16, decoder=runner, cancel=cancel) is None
    assert layers == [0, 1]


def test_prompts_go_through_the_step_only_where_every_layer_reads_its_weights_once(cache):
    """torch's kernels (fp32, int8 here) run a chunk's rows one at a time in the step, where the
    forward gives them all rows at once: such a model's prompts keep the forward, on any path."""
    model = tiny_packed_model()
    decoder = decode_cpu.build_decoder(model, cache)
    decoder.prompts = True
    assert not decoder.blocks.prompts_in_one_pass() and decoder.prefill_chunk is None


def test_one_position_of_a_cache_row_twice_is_refused(cache):
    model = tiny_packed_model()
    decoder = decode_cpu.build_decoder(model, cache)
    with pytest.raises(RuntimeError, match="cache row 0 position 3 is given twice"):
        decoder.decode(torch.tensor([1, 2]), torch.tensor([3, 3]), torch.tensor([0, 0]))


def test_a_row_past_the_cache_is_refused(cache):
    model = tiny_packed_model()
    decoder = decode_cpu.build_decoder(model, cache)
    with pytest.raises(RuntimeError, match="cache row 1 is out of range"):
        decoder.decode(torch.tensor([1]), torch.tensor([0]), torch.tensor([1]))
