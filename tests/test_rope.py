"""RoPE scaling read from config.json and GGUF: linear, YaRN and Llama 3.1's "llama3" give
transformers' logits at positions past the original context; other kinds are refused by name."""
from __future__ import annotations

import json

import gguf
import pytest
import torch
from tiny_checkpoints import tiny_checkpoint, tiny_hf_model, write_gguf

from model.args import ConfigError
from model.checkpoints import CheckpointError, load_state_dict_into, open_checkpoint
from model.model import Transformer

ORIGINAL = 48  # the "original context" the scaled models stretch
SCALINGS = {
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": ORIGINAL},
}
LENGTH = 3 * ORIGINAL  # the last positions are well past the original context


@pytest.mark.parametrize("layout", ["hf", "gguf"])
@pytest.mark.parametrize("kind", SCALINGS)
@torch.no_grad()
def test_scaled_rope_matches_transformers_past_the_original_context(tmp_path, kind, layout):
    path, oracle = tiny_checkpoint(tmp_path, layout, rope=SCALINGS[kind])
    ckpt = open_checkpoint(path)
    assert (ckpt.args.rope_scaling or {}).get("rope_type", "llama3") == kind
    with torch.device("meta"):
        model = Transformer(ckpt.args)
    load_state_dict_into(model, ckpt, dtype=torch.float32)
    model.setup_caches(LENGTH)
    tokens = torch.randint(0, 320, (1, LENGTH), generator=torch.Generator().manual_seed(0))
    ours = model.eval()(tokens, 0)[0]  # (T, vocab)
    theirs = oracle(tokens).logits[0]
    err = ((ours - theirs).abs().max(-1).values / theirs.abs().max()).tolist()
    assert max(err[ORIGINAL:]) < 1e-4, f"{kind}: logits past position {ORIGINAL} differ by {max(err):.2e}"
    # and the scaling matters: plain RoPE would give other logits there
    plain = tiny_hf_model(rope={"rope_type": "default", "rope_theta": SCALINGS[kind]["rope_theta"]})
    plain.load_state_dict(oracle.state_dict())
    assert (plain(tokens).logits[0, -1] - theirs[-1]).abs().max() > 1e-3


def test_other_scalings_are_refused_in_one_line(tmp_path):
    path, _ = tiny_checkpoint(tmp_path, "hf")
    config = json.loads((path / "config.json").read_text())
    config.pop("rope_parameters", None)
    (path / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}))
    with pytest.raises((ConfigError, CheckpointError), match="rope scaling 'dynamic' is not supported "
                       r"\(linear, yarn and llama3 are\)"):
        open_checkpoint(path)


def test_a_longrope_gguf_is_refused(tmp_path):
    model = tiny_hf_model()
    path = tmp_path / "longrope.gguf"
    write_gguf(model, path)
    reader_meta = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}
    from model.args import from_gguf_metadata

    with pytest.raises(ConfigError, match="rope scaling 'longrope' is not supported"):
        from_gguf_metadata({**reader_meta, "llama.rope.scaling.type": "longrope", "llama.rope.scaling.factor": 2.0})
