"""Loading maps the store's files: a model that runs its stored tensors as they are (GGUF blocks)
reads them in place from the page cache, as llama.cpp reads a GGUF; one whose weights were
repacked owns the few tensors left and lets the files go (their read pages would count twice).

Where a tensor lives is read from /proc/self/maps (Linux): the address ranges of each file the
process has mapped."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from app import store
from app.engine import load_model
from app.importer import import_checkpoint
from app.variants import quantize_variant
from quant.quantize import QuantOptions
from tiny_checkpoints import tiny_checkpoint, write_random_blocks_gguf

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMADESK_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def mapped_ranges(files: list[Path]) -> list[tuple[int, int]]:
    """[start, end) of every mapping of `files` in this process."""
    wanted = {str(f.resolve()) for f in files}
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
        if len(fields) == 6 and fields[5] in wanted:
            start, end = (int(a, 16) for a in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's stored tensors as it holds them (not the KV cache, made at load)."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    return {k: t for k, t in tensors.items() if ".kv_cache." not in k}


def store_files(entry: store.ModelEntry) -> list[Path]:
    return [entry.path / f for f in entry.manifest["weights"]]


def test_gguf_blocks_run_in_place_from_the_stores_mapped_files(tmp_path, home):
    entry = import_checkpoint(write_random_blocks_gguf(tmp_path / "rand.gguf", "Q4_0"), "rand")
    model = load_model(entry, 64)  # fused, as ask and chat load it
    ranges = mapped_ranges(store_files(entry))
    assert ranges, "the store's files are not mapped"
    held = weights(model)
    assert {"layers.0.attention.wqkv.parts.0.blocks", "layers.0.feed_forward.w13.parts.1.blocks",
            "tok_embeddings.blocks", "output.blocks", "norm.weight"} <= held.keys()
    for name, t in held.items():
        start = t.data_ptr()
        assert any(lo <= start and start + t.nbytes <= hi for lo, hi in ranges), f"{name} is a copy"

    with torch.inference_mode():  # and the model runs on them
        assert torch.isfinite(model(torch.tensor([[1, 17, 250, 3]]), 0)).all()


def test_repacked_weights_let_the_files_go(tmp_path, home):
    path, _ = tiny_checkpoint(tmp_path, "hf", tied=False)
    import_checkpoint(path, name="tiny")
    entry = quantize_variant("tiny", QuantOptions("int4"), report_tokens=0)
    model = load_model(entry, 64)
    # int4 runs in the kernel's own layout, a copy: the norms left on the mapping are copied too
    assert mapped_ranges(store_files(entry)) == []
    assert weights(model)["norm.weight"].abs().sum() > 0


def _resident_kb(t: torch.Tensor) -> int:
    """Resident KiB of the pages under `t`, from /proc/self/smaps' entry for its mapping."""
    start = t.data_ptr()
    current = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(a, 16) for a in head.split("-"))
            current = lo <= start < hi
        elif current and line.startswith("Rss:"):
            return int(line.split()[1])
    raise AssertionError("no mapping holds the tensor")


def test_a_repacked_layer_lets_the_file_pages_it_read_go(tmp_path):
    """What the r16 repack does with the GGUF blocks it read: their file pages leave the
    process's resident memory, their values stay (read again from the page cache); a tensor in
    anonymous memory is left alone (dropping its pages would zero it)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from quant.linear import release_file_pages

    values = torch.arange(4 << 20, dtype=torch.int32)  # 16 MiB
    save_file({"t": values}, str(tmp_path / "w.safetensors"))
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        mapped = f.get_tensor("t")
    assert torch.equal(mapped, values)  # every page read: resident
    before = _resident_kb(mapped)
    assert release_file_pages(mapped)
    assert _resident_kb(mapped) < before - (8 << 10)  # the 16 MiB went (all but the partial end pages)
    assert torch.equal(mapped, values)
    anonymous = values.clone()
    assert not release_file_pages(anonymous) and torch.equal(anonymous, values)
