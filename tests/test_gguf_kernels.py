"""The compiled step's GEMV over GGUF blocks and grouped int8 (quant/csrc/gguf_gemv.h) against an
independent oracle: gguf-py's own dequantization (the format's reference in Python) times x, in
float64. Random blocks with finite fp16 scales in 256-aligned shapes; the kernel of this build's
vector path and the plain C++ one, 1 to 9 activation rows (one weight pass per 4 rows).
test_decode_cpu.py's ISA matrix reruns this file on every path the CPU has.
"""
import gguf
import numpy as np
import pytest
import torch

from app import pull
from quant import extension
from tiny_checkpoints import random_blocks

NATIVE = ["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q6_K"]
# (N, K): one K-quant super-block, a few, N not a multiple of anything; enough rows to thread
SHAPES = [(16, 256), (100, 512), (3, 768), (576, 1536)]


@pytest.fixture(scope="module")
def ext():
    built = extension.load_extension(pull.cache_dir())
    if not built:
        pytest.fail("the decode kernel did not compile on this machine (a C++ compiler is needed for tests)")
    return built


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("portable", [False, True], ids=["vector", "portable"])
@pytest.mark.parametrize("rows", [1, 3, 9])
@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("qtype", NATIVE)
@torch.inference_mode()
def test_gguf_gemv_equals_gguf_dequantize_times_x(ext, qtype, n, k, rows, portable):
    rng = np.random.default_rng(n * k + rows)
    blocks = random_blocks(rng, qtype, (n, k))  # (N, row bytes)
    w = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype])  # (N, K) fp32, the reference
    assert np.isfinite(w).all() and np.abs(w).max() > 0
    x = torch.from_numpy(rng.normal(size=(rows, k)).astype(np.float32))
    expected = x.double() @ torch.from_numpy(w).double().T  # (rows, N)
    got = ext.gguf_linear(x, torch.from_numpy(blocks), qtype.lower(), portable)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    # fp32 sums of K products in another order than float64's: ~1e-6 of the largest output
    assert relative_error(got, expected) < 1e-5
    # batch invariance (the server's promise): a row's values are exactly what it gets alone
    for r in range(rows):
        assert torch.equal(ext.gguf_linear(x[r : r + 1], torch.from_numpy(blocks), qtype.lower(), portable), got[r : r + 1])


@pytest.mark.parametrize("portable", [False, True], ids=["vector", "portable"])
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("n, k", [(64, 96), (300, 576)])
@torch.inference_mode()
def test_grouped_int8_gemv_equals_codes_times_scales(ext, n, k, rows, portable):
    gen = torch.Generator().manual_seed(n + k)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    scales = torch.rand(n, k // 32, generator=gen) * 1e-3
    x = torch.randn(rows, k, generator=gen)
    w = q.double().view(n, k // 32, 32) * scales.double()[..., None]  # (N, G, 32)
    expected = x.double() @ w.view(n, k).T
    got = ext.int8_group_linear(x, q, scales, portable)
    assert got.shape == (rows, n)
    assert relative_error(got, expected) < 1e-5
    for r in range(rows):
        assert torch.equal(ext.int8_group_linear(x[r : r + 1], q, scales, portable), got[r : r + 1])


def test_types_without_a_kernel_and_misshapen_blocks_are_refused(ext):
    x = torch.randn(1, 256)
    blocks = torch.from_numpy(random_blocks(np.random.default_rng(0), "Q4_K", (4, 256)))
    with pytest.raises(RuntimeError, match="no native kernel for GGUF blocks of type q2_k"):
        ext.gguf_linear(x, blocks, "q2_k")
    with pytest.raises(RuntimeError, match="row bytes"):
        ext.gguf_linear(torch.randn(1, 512), blocks, "q4_k")


# ---------------------------------------------------------------- a model of GGUF blocks, decoded
# Fp16 scales per type that keep random weights near 0.2 (a code times a sub-scale can reach
# 63 * 15 in Q4_K, 127 * 32 in Q6_K): activations in range, and greedy answers that vary
# (at a quarter of these the tied table's own token wins every step).
TYPE_SCALE = {"Q4_0": 0.036, "Q4_1": 0.024, "Q5_0": 0.018, "Q8_0": 2.4e-3, "Q4_K": 6e-4, "Q6_K": 9e-5}
# A Q4_K_M-like mix (wv and w2 in Q6_K: the fused q, k, v stack two types) and the
# other types; the table Q8_0 and the head Q6_K, as llama.cpp writes them.
GGUF_LAYERS = [
    {"wq": "Q4_K", "wk": "Q4_K", "wv": "Q6_K", "wo": "Q4_K", "w1": "Q4_K", "w3": "Q4_K", "w2": "Q6_K"},
    {"wq": "Q4_0", "wk": "Q4_0", "wv": "Q4_0", "wo": "Q4_1", "w1": "Q5_0", "w3": "Q5_0", "w2": "Q8_0"},
]


def tiny_gguf_model(ctx: int = 128) -> "Transformer":
    from model.args import ModelArgs
    from model.model import Transformer
    from quant.linear import fuse_projections, repack_for_device, swap_linears, tie_output

    args = ModelArgs(dim=256, n_layers=len(GGUF_LAYERS), n_heads=4, n_kv_heads=2, vocab_size=512, ffn_dim=512)
    with torch.device("meta"):
        model = Transformer(args)
    rng = np.random.default_rng(7)
    precision = {"tok_embeddings": "q8_0"}  # a tied head: the output reads the table's Q8_0 blocks
    state = {}
    for name, t in model.state_dict().items():
        if t.dim() == 1:  # the norms
            state[name] = torch.from_numpy(rng.uniform(0.5, 1.5, size=tuple(t.shape)).astype(np.float32))
    shapes = {"wq": (256, 256), "wk": (128, 256), "wv": (128, 256), "wo": (256, 256), "w1": (512, 256),
              "w3": (512, 256), "w2": (256, 512)}
    for i, layer in enumerate(GGUF_LAYERS):
        for short, qtype in layer.items():
            name = f"layers.{i}.{'attention' if short in ('wq', 'wk', 'wv', 'wo') else 'feed_forward'}.{short}"
            precision[name] = qtype.lower()
            state[f"{name}.blocks"] = torch.from_numpy(random_blocks(rng, qtype, shapes[short], TYPE_SCALE[qtype]))
    state["tok_embeddings.blocks"] = torch.from_numpy(random_blocks(rng, "Q8_0", (512, 256), 3e-4))
    precision["output"] = "q8_0"
    tie_output(state)
    swap_linears(model, precision)
    model.load_state_dict(state, assign=True)
    fuse_projections(model)
    repack_for_device(model, "cpu")
    model.setup_caches(ctx)
    return model.eval()


@torch.inference_mode()
def test_a_model_of_gguf_blocks_decodes_through_the_step_as_the_dequantized_model(ext, monkeypatch):
    """The step (every block in C++, the GGUF GEMV for each layer, the native head) against the
    eager model over dequantized weights (GGUFLinear's tiles: NATIVE_ROWS = 0), by
    tests/agreement.py's rule."""
    from agreement import assert_agree, forced_logits, greedy_answer
    from app.engine import choose_decoder
    from quant import decode_cpu
    from quant.linear import GGUFLinear, StackedRows

    model = tiny_gguf_model()
    # each projection keeps its own blocks (q, k in Q4_K, v in Q6_K in layer 0), one fused call
    for layer in model.layers:
        assert isinstance(layer.attention.wqkv, StackedRows) and isinstance(layer.feed_forward.w13, StackedRows)
    assert [p.scheme for p in model.layers[0].attention.wqkv.parts] == ["q4_k", "q4_k", "q6_k"]
    assert decode_cpu.unsupported(model) is None
    prompt = [5, 17, 99, 3, 250]
    monkeypatch.setattr(GGUFLinear, "NATIVE_ROWS", 0)  # the reference: dequantized weights, fp32 matmul
    answer = greedy_answer(model, prompt, 24)
    reference = forced_logits(model, prompt, answer)
    monkeypatch.undo()
    decoder = choose_decoder(model, "now")
    assert isinstance(decoder, decode_cpu.CpuStepDecoder) and len(set(answer)) > 3
    step = forced_logits(model, prompt, answer, decoder)
    assert_agree(reference, step, 1e-3)
    assert reference.std() > 0.1  # logits that tell tokens apart, not a model gone flat


@torch.inference_mode()
def test_stacked_layers_of_one_r16_type_run_as_one_with_the_same_outputs(ext):
    """q, k, v (or w1, w3) in one r16 type are one buffer and one kernel call, the parts' bytes
    views into it (one copy in memory); their outputs bit for bit the parts' own, since each
    output row reads only its own weights. Mixed or non-r16 types stay a stack of parts."""
    from quant.linear import prepared_weights

    model = tiny_gguf_model()
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(3))
    for stack in (model.layers[1].attention.wqkv, model.layers[0].feed_forward.w13):  # q4_0 x 3, q4_k x 2
        separate = torch.cat([part(x) for part in stack.parts], dim=-1)
        assert prepared_weights(stack).kind == "r16"
        assert torch.equal(stack(x), separate) and torch.equal(torch.cat([p(x) for p in stack.parts], -1), separate)
        assert stack.parts[0].r16.data_ptr() == stack.r16.data_ptr()
    assert prepared_weights(model.layers[0].attention.wqkv).kind == "rows"  # q4_k, q4_k and q6_k
    assert prepared_weights(model.layers[1].feed_forward.w13).kind == "rows"  # q5_0 has no r16 layout


def grouped_int8_model(args, precise: bool = False, ctx: int = 64, batch: int = 1, kv_dtype=None):
    """What `quantize --scheme int8` makes (one scale per 32, the head too) of a random model of
    `args` (seed 0), built for the CPU."""
    from model.model import Transformer
    from quant.formats import pack_int8
    from quant.linear import fuse_projections, repack_for_device, swap_linears

    torch.manual_seed(0)
    reference = Transformer(args)
    for name, p in reference.named_parameters():
        torch.nn.init.normal_(p, std=0.1) if p.dim() == 2 else torch.nn.init.uniform_(p, 0.5, 1.5)
    state, precision = dict(reference.state_dict()), {}
    for name in [k[: -len(".weight")] for k, v in reference.state_dict().items() if v.dim() == 2]:
        if name != "tok_embeddings":
            precision[name] = "int8"
            state.update(pack_int8(state.pop(f"{name}.weight"), 32)[0].state_dict(name))
    with torch.device("meta"):
        model = Transformer(args)
    swap_linears(model, precision, group_size={name: 32 for name in precision})
    model.load_state_dict(state, assign=True)
    fuse_projections(model)
    repack_for_device(model, "cpu", precise)
    model.setup_caches(ctx, batch=batch, kv_dtype=kv_dtype)
    return model


@torch.inference_mode()
def test_a_grouped_int8_model_decodes_through_the_step_as_its_dequantized_weights(ext, monkeypatch):
    """What `quantize --scheme int8` makes (one fp16 scale per 32, the head too) runs in the step
    as kind "r16" (x as 15-bit integers) and follows the eager model over its dequantized
    weights (a precise model: its layers run in Python)."""
    from agreement import assert_agree, forced_logits, greedy_answer
    from app.engine import choose_decoder
    from model.args import ModelArgs
    from quant import decode_cpu
    from quant.linear import Int8Linear, int8_dequant_linear, prepared_weights

    args = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_dim=256)

    def build(precise: bool):
        return grouped_int8_model(args, precise)

    exact = build(precise=True)  # the eager blocks over the dequantized weights: the reference
    monkeypatch.setattr(Int8Linear, "_grouped", lambda self, x: int8_dequant_linear(x, self.qweight, self.scales))
    prompt = [5, 17, 99, 3, 250]
    answer = greedy_answer(exact, prompt, 24)
    expected = forced_logits(exact, prompt, answer)
    monkeypatch.undo()
    model = build(precise=False)
    assert prepared_weights(model.layers[0].attention.wqkv).kind == "r16"
    assert prepared_weights(model.output).kind == "r16"
    decoder = choose_decoder(model, "now")
    assert isinstance(decoder, decode_cpu.CpuStepDecoder) and len(set(answer)) > 3
    # x's 15-bit rounding: ~1e-4 of the logits' ~10 span
    assert_agree(expected, forced_logits(model, prompt, answer, decoder), 1e-2)


@pytest.mark.parametrize("qtype", NATIVE)
@torch.inference_mode()
def test_prefill_tiles_dequantize_as_gguf_does(ext, qtype):
    """The tiles a prefill multiplies (GGUFLinear past NATIVE_ROWS rows) hold gguf-py's values:
    the same products and sums; a compiler may fuse one product and sum (Q4_1's d q + m, Q4_K's
    d q - m) into one rounding, hence a few fp32 ulps, not bits."""
    rng = np.random.default_rng(11)
    blocks = random_blocks(rng, qtype, (37, 512))
    want = torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype]))
    got = ext.gguf_dequantize_rows(torch.from_numpy(blocks), qtype.lower(), 512)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("bits", [15, 8])
@torch.inference_mode()
def test_gguf_rows_decode_together_each_as_alone(ext, bits):
    """Three sequences in KV-cache rows 0-2 of the Q4_K_M-like model, stepped together: every
    layer (stacked Q4_K/Q6_K q, k, v included) and the Q8_0 head take the three rows on one
    weight read, and each row's logits are bit for bit what it gets stepped alone; with x as
    8-bit integers (a server's steps) as with 15-bit ones."""
    from model.generate import prefill
    from quant import decode_cpu

    model = tiny_gguf_model()
    assert model.output.invariant_rows >= 3  # the head runs the batch in one call
    model.setup_caches(128, batch=3)
    decoder = decode_cpu.build_decoder(model, pull.cache_dir())
    assert decoder is not None
    assert decoder.set_activation_bits(bits) == 15
    prompts = [[5, 17, 99], [3, 250, 7, 41], [200]]

    def run(rows):
        for r in rows:
            prefill(model, prompts[r], cache_row=r)
        tokens = torch.tensor([prompts[r][-1] for r in rows])
        positions = torch.tensor([len(prompts[r]) for r in rows])
        out = []
        for _ in range(8):
            logits = decoder.decode(tokens, positions, torch.tensor(rows))  # (B, V)
            out.append(logits)
            tokens, positions = logits.argmax(-1), positions + 1
        return torch.stack(out, 1)  # (B, steps, V)

    together = run([0, 1, 2])
    for r in range(3):
        assert torch.equal(run([r])[0], together[r])
    assert not torch.equal(together[0], together[1])
    if bits == 8:  # the setting took: 8-bit x moves the logits
        decoder.set_activation_bits(15)
        assert not torch.equal(run([0])[0], together[0])


# ---------------------------------------------------------------- Q4_0 / Q4_1 times int8 x (r16)
def x15_activations(x: np.ndarray, top: int = 16319) -> tuple[np.ndarray, np.ndarray]:
    """x (M, K) fp32 as the r16 kernels take it: per 32 values the integers
    v = round-half-even(x * (16319 / max|x|)) and the step d = max|x| / 16319, both in fp32.
    top=127: x as 8-bit integers (Q8_0-style, in fp32), what `x8` kernels take."""
    blocks = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(blocks).max(axis=2, keepdims=True)
    inv = np.where(amax > 0, np.float32(top) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    return np.rint(blocks * inv), (amax / np.float32(top)).astype(np.float32)


@pytest.mark.parametrize("bits", [15, 8])
@pytest.mark.parametrize("portable", [False, True], ids=["vector", "portable"])
# 15 and 21 rows: a prefill chunk's path (AVX2's wide kernel from 16 rows; AVX-512 VNNI's chunks of
# 8, 4, 2, 1 and 8, 8, 4, 1 rows over x tiled for them), whose rows must equal decode's
@pytest.mark.parametrize("rows", [1, 3, 7, 15, 21])
@pytest.mark.parametrize("n, k", [(16, 64), (40, 256), (576, 1536)])
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "int8_group", "Q4_K"])
@torch.inference_mode()
def test_r16_gemm_equals_the_weights_times_x_as_15_bit_integers(ext, qtype, n, k, rows, portable, bits):
    """The weights are the source's exactly; x is rounded to 15-bit integers per 32 values (8-bit
    ones with x8, as a server's decode steps take it), except that Q4_1's mins meet the exact sum
    of x. Oracle: gguf's dequantization (grouped int8: codes times scales) times that x in
    float64. The kernel's integer sums are exact; only its fp32 scaling rounds."""
    if qtype == "Q4_K" and k % 256:
        pytest.skip("Q4_K rows hold whole 256-value super-blocks")
    rng = np.random.default_rng(n + k + rows)
    if qtype == "int8_group":
        codes = rng.integers(-128, 128, (n, k), dtype=np.int8)
        scales = (rng.random((n, k // 32)) * 1e-3).astype(np.float32)
        w = (codes.reshape(n, -1, 32).astype(np.float64) * scales[..., None]).reshape(n, k)
        src, extra = torch.from_numpy(codes), torch.from_numpy(scales)
    else:
        blocks = random_blocks(rng, qtype, (n, k))
        w = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype]).astype(np.float64)  # (N, K)
        src, extra = torch.from_numpy(blocks), None
    x = rng.normal(size=(rows, k)).astype(np.float32)
    x[0, :32] = 0  # an all-zero block: scale 0, no division by it
    q, d = x15_activations(x, 16319 if bits == 15 else 127)
    xq = (q * d).reshape(rows, k).astype(np.float64)
    if qtype in ("Q4_1", "Q4_K"):  # value = d q + m: the mins times the exact sum of x, the rest times x's 15-bit integers
        if qtype == "Q4_1":
            m = blocks.reshape(n, k // 32, 20)[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float64)  # (N, G)
        else:  # gguf's own values with every code 0 are the mins (-dmin times each 32's 6-bit min)
            zeroed = blocks.reshape(n, k // 256, 144).copy()
            zeroed[:, :, 16:] = 0
            m = gguf.quants.dequantize(zeroed.reshape(n, -1), gguf.GGMLQuantizationType.Q4_K)[:, ::32].astype(np.float64)
        w_dq = w - np.repeat(m, 32, axis=1)
        expected = xq @ w_dq.T + x.reshape(rows, -1, 32).sum(axis=2, dtype=np.float64) @ m.T
    else:
        expected = xq @ w.T
    scheme = qtype.lower()
    packed = ext.r16_repack(src, scheme, k, extra)
    source_bytes = src.numel() + (extra.numel() * 4 if extra is not None else 0)
    if qtype == "Q4_K":  # a super-block's 6-bit scale and min codes as bytes: 148 where the file has 144
        source_bytes = source_bytes * 148 // 144
    assert packed.numel() == -(-n // 16) * 16 * source_bytes // n  # the source's bytes, rows padded to 16
    x8 = bits == 8
    got = ext.r16_linear(torch.from_numpy(x), packed, scheme, n, portable, x8)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    assert relative_error(got, torch.from_numpy(expected)) < 1e-5
    # and within x's rounding (1/16319 of a block's largest value) of the exact fp32 product,
    # what --precise runs; 8-bit x (llama.cpp's) gives ~1e-2 here
    exact = x.astype(np.float64) @ w.T
    assert relative_error(got, torch.from_numpy(exact)) < (2e-4 if bits == 15 else 3e-2)
    for r in range(rows):  # batch invariance
        alone = ext.r16_linear(torch.from_numpy(x[r : r + 1]), packed, scheme, n, portable, x8)
        assert torch.equal(alone, got[r : r + 1])


# 21 rows: a prompt's path (each weight row widened once, q6_k_wide_rows), bit for bit the few rows' one
@pytest.mark.parametrize("rows", [1, 3, 7, 21])
@pytest.mark.parametrize("n, k", [(37, 256), (300, 1024)])
@torch.inference_mode()
def test_q6_k_times_x_as_15_bit_integers(ext, n, k, rows):
    """Q6_K rows in the file's layout times x rounded to 15-bit integers per 32 values (the decode
    step's kernel on vector builds, q6_k_x15.h). Oracle: gguf's dequantization times that x in
    float64; and within x's rounding of the exact product, which the fp32 kernel (x15=False, and
    every portable build) keeps."""
    if ext.isa() == "generic":
        pytest.skip("a build without AVX2 multiplies Q6_K in fp32 alone")
    rng = np.random.default_rng(n + k + rows)
    blocks = random_blocks(rng, "Q6_K", (n, k))
    w = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q6_K).astype(np.float64)  # (N, K)
    x = rng.normal(size=(rows, k)).astype(np.float32)
    x[0, 32:64] = 0  # an all-zero block: scale 0, no division by it
    q, d = x15_activations(x)
    expected = (q * d).reshape(rows, k).astype(np.float64) @ w.T
    b = torch.from_numpy(blocks)
    got = ext.gguf_linear(torch.from_numpy(x), b, "q6_k", x15=True)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    assert relative_error(got, torch.from_numpy(expected)) < 1e-5
    exact = torch.from_numpy(x.astype(np.float64) @ w.T)
    assert relative_error(got, exact) < 2e-4
    fp32 = ext.gguf_linear(torch.from_numpy(x), b, "q6_k", x15=False)
    assert relative_error(fp32, exact) < 1e-5 and not torch.equal(fp32, got)
    assert torch.equal(ext.gguf_linear(torch.from_numpy(x), b, "q6_k", portable=True, x15=True),
                       ext.gguf_linear(torch.from_numpy(x), b, "q6_k", portable=True))
    for r in range(rows):  # batch invariance
        assert torch.equal(ext.gguf_linear(torch.from_numpy(x[r : r + 1]), b, "q6_k", x15=True), got[r : r + 1])


def test_r16_refuses_other_weights_and_shapes(ext):
    blocks = torch.from_numpy(random_blocks(np.random.default_rng(0), "Q6_K", (16, 256)))
    with pytest.raises(RuntimeError, match="q4_0, q4_1, q8_0, q4_k or int8_group"):
        ext.r16_repack(blocks, "q6_k", 256)
    with pytest.raises(RuntimeError, match="scales fp32"):
        ext.r16_repack(torch.zeros(16, 64, dtype=torch.int8), "int8_group", 64)
    packed = ext.r16_repack(torch.from_numpy(random_blocks(np.random.default_rng(0), "Q4_0", (16, 64))), "q4_0", 64)
    with pytest.raises(RuntimeError, match="do not fit"):
        ext.r16_linear(torch.zeros(1, 96), packed, "q4_0", 16)


@torch.inference_mode()
def test_a_short_prefill_through_a_tiled_layer_runs_each_row_as_its_decode_step(ext, monkeypatch):
    """A layer whose fp32 weight outgrows one dequantized tile takes a short prompt's rows through
    the native kernel, NATIVE_ROWS at a time (GGUFLinear.NATIVE_PREFILL_ROWS): every row's output
    is bit for bit the one it gets alone, as a decode step, and follows gguf-py's values times x
    (x rounded to 15 bits on vector builds: q6_k_x15.h). Past NATIVE_PREFILL_ROWS rows the tiles
    and a matmul run (fp32 x, another summation order)."""
    from quant.linear import GGUFLinear

    rng = np.random.default_rng(3)
    blocks = random_blocks(rng, "Q6_K", (256, 512))  # a type the r16 kernel does not take
    layer = GGUFLinear(512, 256, "q6_k")
    layer.blocks = torch.from_numpy(blocks)
    layer.prepare("cpu")
    monkeypatch.setattr(GGUFLinear, "ROW_BLOCK_BYTES", 64 << 10)  # 256 x 512 fp32 = 512 KiB: 8 tiles
    x = torch.from_numpy(rng.normal(size=(35, 512)).astype(np.float32))  # (T, K)
    prefill = layer(x)
    assert torch.equal(prefill, torch.cat([layer(x[i : i + 1]) for i in range(35)]))
    w = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q6_K).astype(np.float64)
    expected = torch.from_numpy(x.double().numpy() @ w.T)
    if ext.isa() != "generic":  # gguf-py's values times x as the kernel rounds it
        q, d = x15_activations(x.numpy())
        assert relative_error(prefill, torch.from_numpy((q * d).reshape(x.shape).astype(np.float64) @ w.T)) < 1e-5
    else:
        assert relative_error(prefill, expected) < 1e-5

    monkeypatch.setattr(GGUFLinear, "NATIVE_PREFILL_ROWS", 34)
    tiles = layer(x)
    assert not torch.equal(tiles, prefill) and relative_error(tiles, expected) < 1e-5


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8])
@torch.inference_mode()
def test_a_step_gives_the_same_logits_on_any_thread_count(ext, kv_dtype):
    """The thread governor (app/threads.py) changes the thread count between steps of one reply. A
    model our kernels run whole (grouped int8: r16 layers and head) gives bit-identical logits on
    1, 2 and 3 threads, two rows at 300 keys (attention split in its key ranges past 256).
    (Layers that torch's kernels run, dense fp32 or an fp16 head, may block their sums by the
    thread count and differ in the last bits: measured on the AVX2 path at 3 threads.)"""
    from model.args import ModelArgs
    from model.generate import prefill
    from quant import decode_cpu
    from quant.linear import prepared_weights

    args = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_dim=256)  # head dim 64
    model = grouped_int8_model(args, ctx=512, batch=2, kv_dtype=kv_dtype)
    assert prepared_weights(model.output).kind == "r16"
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 300, (300,), generator=g).tolist(), torch.randint(0, 300, (290,), generator=g).tolist()]
    for r, p in enumerate(prompts):
        prefill(model, p, cache_row=r)
    decoder = decode_cpu.build_decoder(model, pull.cache_dir())
    args = torch.tensor([7, 8]), torch.tensor([len(p) for p in prompts]), torch.tensor([0, 1])
    before = torch.get_num_threads()
    try:
        out = {}
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out[n] = decoder.decode(*args)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out[1], out[2]) and torch.equal(out[1], out[3])
    assert not torch.equal(out[1][0], out[1][1])
