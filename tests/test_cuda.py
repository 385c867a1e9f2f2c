"""The CUDA paths, run where a GPU is (the device machine; CI has none and skips them).

Packed layers against the fp32 matmul of their unpacked weights, and the CUDA-graph decode step
against the eager blocks on the same GPU.
"""
import pytest
import torch

from agreement import assert_agree, forced_logits, greedy_answer
from app.engine import build_model, choose_decoder
from model.static_decode import StaticDecode
from quant.formats import pack_int4, pack_int8, pack_nf4, unpack
from quant.linear import Int4Linear, Int8Linear, NF4Linear

from test_static_decode import ARGS, PROMPT, random_variant

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4"])
@pytest.mark.parametrize("rows", [1, 7])
def test_packed_layer_on_cuda_equals_its_unpacked_weight(scheme, rows):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 256, generator=g) * 0.05
    packed = {"int8": lambda: pack_int8(w), "int4": lambda: pack_int4(w, 32),
              "nf4": lambda: pack_nf4(w.cuda())}[scheme]()[0]
    layer = {"int8": lambda: Int8Linear(256, 200), "int4": lambda: Int4Linear(256, 200, 32),
             "nf4": lambda: NF4Linear(256, 200)}[scheme]()
    layer.load_state_dict({k.partition(".")[2]: v for k, v in packed.state_dict("w").items()}, assign=True)
    layer.prepare("cuda")
    x = torch.randn(rows, 256, generator=g).cuda().to(torch.bfloat16)
    expected = x.float() @ unpack(packed).float().cuda().T
    got = layer(x).float()
    assert (got - expected).abs().max() <= 0.02 * expected.abs().max()
    compiled = torch.compile(layer, dynamic=False)
    torch.testing.assert_close(compiled(x).float(), got, rtol=0.02, atol=0.02 * expected.abs().max().item())


@pytest.mark.parametrize("variant", ["fp32", "int8", "int4"])
def test_cuda_graph_step_follows_the_eager_blocks(variant):
    layout, state = random_variant(variant)
    model = build_model(ARGS, layout, state, 128, device="cuda", dtype=torch.float32)
    decoder = choose_decoder(model)
    assert isinstance(decoder, StaticDecode) and decoder.graph is not None
    answer = greedy_answer(model, PROMPT, 64, decoder)
    eager = forced_logits(model, PROMPT, answer)
    assert_agree(eager, forced_logits(model, PROMPT, answer, decoder), 1e-3)
    assert_agree(eager, forced_logits(model, PROMPT, answer, StaticDecode(model, compile=True)), 1e-3)
