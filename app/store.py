"""Models on disk: one folder per model and variant, written atomically.

    $LLAMADESK_HOME (default: platformdirs' user data folder)/
      models/<name>/<variant>/llamadesk.json   what the folder holds (args, source, variant)
                               model*.safetensors, tokenizer files
      models/.staging-<pid>-<name>-<variant>/   a write in progress; renamed when complete

A reference is written like an Ollama tag: `name` or `name:variant`. The imported full-precision
weights are the variant `source`; the quantizer adds `int8`, `int4`, `nf4`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import platformdirs

from .errors import UserError

MANIFEST = "llamadesk.json"
FORMAT_VERSION = 2  # 2: GGUF sources keep their blocks (quant.ggml); version 1 entries still load
SOURCE = "source"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def home() -> Path:
    return Path(os.environ.get("LLAMADESK_HOME") or platformdirs.user_data_path("llamadesk"))


def config_dir() -> Path:
    """Settings and secrets (a server's API key): $LLAMADESK_HOME when set, else platformdirs'
    user config folder, kept apart from the data folder that holds models and the history."""
    override = os.environ.get("LLAMADESK_HOME")
    return Path(override) if override else platformdirs.user_config_path("llamadesk")


def usable_home() -> Path:
    """The home folder, created if missing. Raises UserError, naming the folder and what to do,
    when it is a file or cannot be created (a read-only disk, a parent that is a file)."""
    path = home()
    hint = "set LLAMADESK_HOME to a folder you can write, or unset it for the default"
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: the llamadesk home is a file, not a folder; {hint}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{path}: cannot create the llamadesk home ({e.strerror}); {hint}") from None
    return path


def models_root() -> Path:
    return home() / "models"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    variant: str
    path: Path
    manifest: dict

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.variant}"

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())


def parse_ref(ref: str) -> tuple[str, str | None]:
    """(name, variant or None) of `name[:variant]`; a Hub alias (`hf.co/OWNER/REPO[:QUANT]`, as
    `llamadesk pull` took it) is the installed model pulled from there, with no variant."""
    if ref.strip().lower().startswith(HUB_PREFIXES):
        return _pulled_from(ref), None
    name, colon, variant = ref.strip().partition(":")
    name = name.lower()
    if not _NAME.match(name) or (variant and not _NAME.match(variant)) or (colon and not variant):
        raise UserError(f"{ref!r} is not a model name (letters, digits, '.', '-', '_', optionally ':variant')")
    return name, variant or None


# ---------------------------------------------------------------- Hub aliases
HUB_PREFIXES = ("hf.co/", "huggingface.co/")
HUB_DEFAULT_QUANT = "q4_k_m"  # Ollama's: `hf.co/OWNER/REPO` alone means this GGUF


def hub_alias(repo: str, quant: str | None) -> str:
    """The canonical, lower-case alias of a pull: `hf.co/owner/repo:q4_k_m`, or `hf.co/owner/repo`
    for a safetensors repo. Kept in the source's manifest as source.hub.alias."""
    return f"hf.co/{repo.lower()}" + (f":{quant.lower()}" if quant else "")


def _pulled_from(ref: str) -> str:
    """The store name of the model pulled as `ref` (any case, either host, quant or not)."""
    rest = ref.strip().split("/", 1)[1]
    repo, _, quant = rest.partition(":")
    wanted = {hub_alias(repo, quant or None)} if quant else {hub_alias(repo, None), hub_alias(repo, HUB_DEFAULT_QUANT)}
    for e in list_entries():
        if e.manifest.get("source", {}).get("hub", {}).get("alias") in wanted:
            return e.name
    raise UserError(f"{ref.strip()} is not installed; `llamadesk pull {ref.strip()}` fetches it")


def name_from_path(path: Path) -> str:
    """A store name from a file or folder name: 'Llama-3.2-1B.Q4_0.gguf' -> 'llama-3.2-1b.q4_0'."""
    stem = path.name[: -len(".gguf")] if path.name.lower().endswith(".gguf") else path.name
    # accents off, not the letters: 'Ünïcode' -> 'unicode' (it was 'n-code')
    stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode("ascii")
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._")
    return (name or "model")[:64]


def list_entries() -> list[ModelEntry]:
    entries = []
    root = models_root()
    if not root.is_dir():
        return entries
    for model_dir in sorted(root.iterdir()):
        if model_dir.name.startswith(".") or not model_dir.is_dir():
            continue
        for variant_dir in sorted(model_dir.iterdir()):
            manifest = _read_manifest(variant_dir)
            if manifest is not None:
                entries.append(ModelEntry(model_dir.name, variant_dir.name, variant_dir, manifest))
    return entries


def _read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def find(ref: str) -> ModelEntry:
    """The installed entry for `name[:variant]`; without a variant, the source."""
    name, variant = parse_ref(ref)
    variants = [e for e in list_entries() if e.name == name]
    if not variants:
        installed = ", ".join(sorted({e.name for e in list_entries()})) or "none"
        raise UserError(f"model {name!r} is not installed (installed: {installed}); "
                        f"see `llamadesk pull` and `llamadesk import`")
    if variant is None:
        by_variant = {e.variant: e for e in variants}
        return by_variant.get(SOURCE) or variants[0]
    for e in variants:
        if e.variant == variant:
            return e
    have = ", ".join(e.ref for e in variants)
    raise UserError(f"{name}:{variant} is not installed (have: {have}); see `llamadesk quantize`")


def remove(ref: str) -> list[ModelEntry]:
    """Remove one variant, or with a bare name every variant of the model."""
    name, variant = parse_ref(ref)
    doomed = [e for e in list_entries() if e.name == name and (variant is None or e.variant == variant)]
    model_dir = models_root() / name
    damaged_only = variant is None and model_dir.is_dir() and any(p.is_dir() for p in model_dir.iterdir())
    if not doomed and not damaged_only:
        find(ref)  # raises the helpful "not installed" message
    for e in doomed:
        _remove_tree(e.path)
    if variant is None and model_dir.is_dir():  # the whole model: a variant too damaged to list too
        for p in model_dir.iterdir():
            if p.is_dir():
                _remove_tree(p)
    if model_dir.is_dir() and not any(p.is_dir() for p in model_dir.iterdir()):
        (model_dir / SETTINGS).unlink(missing_ok=True)
        if not any(model_dir.iterdir()):
            model_dir.rmdir()
    return doomed


def remove_packed_from_other_sources(source: ModelEntry) -> list[ModelEntry]:
    """Remove the variants of `source`'s model that were packed from another source (their
    manifest's quant.source_fingerprint is not `source`'s): after `import --force` replaced the
    source, they would still answer for the model with the old weights."""
    fingerprint = source.manifest.get("source", {}).get("fingerprint")

    def made_from(e: ModelEntry) -> str | None:  # a packed variant's record, else a float copy's own source
        return (e.manifest.get("quant") or {}).get("source_fingerprint") or (e.manifest.get("source") or {}).get("fingerprint")

    doomed = [e for e in list_entries() if e.name == source.name and e.variant != source.variant
              and made_from(e) not in (None, fingerprint)]
    for e in doomed:
        _remove_tree(e.path)
    return doomed


# ---------------------------------------------------------------- per-model settings
SETTINGS = "settings.json"  # models/<name>/settings.json: what `llamadesk set` chose, for every variant
SETTING_NAMES = ("chat-format",)


def settings(name: str) -> dict:
    path = models_root() / parse_ref(name)[0] / SETTINGS
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read the model's settings ({e}); remove the file") from None
    return data if isinstance(data, dict) else {}


def save_setting(name: str, key: str, value: str | None) -> None:
    """Set (or with None, clear) one of SETTING_NAMES for an installed model; written atomically."""
    entry = find(name)
    if key not in SETTING_NAMES:
        raise UserError(f"unknown setting {key!r}; settings are {', '.join(SETTING_NAMES)}")
    data = settings(entry.name)
    if value is None:
        data.pop(key, None)
    else:
        data[key] = value
    path = models_root() / entry.name / SETTINGS
    tmp = path.with_name(f".{SETTINGS}.{os.getpid()}")
    write_json(tmp, data)
    os.replace(tmp, path)


@contextmanager
def staging(name: str, variant: str, replace: bool = False) -> Iterator[Path]:
    """A temporary folder that becomes models/<name>/<variant> only if the block completes.

    Anything that goes wrong inside, Ctrl-C included, removes the temporary folder and leaves the
    store as it was.
    """
    parse_ref(f"{name}:{variant}")
    root = models_root()
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale_staging(root)
    final = root / name / variant
    if final.exists() and not replace:
        raise UserError(f"{name}:{variant} is already installed at {final}; remove it first (`llamadesk rm {name}:{variant}`)")
    tmp = root / f".staging-{os.getpid()}-{name}-{variant}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        yield tmp
        (root / name).mkdir(exist_ok=True)
        if final.exists():
            old = root / f".old-{os.getpid()}-{name}-{variant}"
            os.rename(final, old)
            os.rename(tmp, final)
            _remove_tree(old)
        else:
            os.rename(tmp, final)
    except OSError as e:
        _remove_tree(tmp)
        if getattr(e, "errno", None) == 28:
            raise UserError(f"the disk is full while writing {name}:{variant} under {root}; nothing was installed") from None
        raise
    except BaseException:
        _remove_tree(tmp)
        raise


def _clean_stale_staging(root: Path) -> None:
    """Remove temporary folders left by a process that died mid-write."""
    for p in root.glob(".*-*"):
        parts = p.name.split("-")
        if p.name.startswith((".staging-", ".old-")) and len(parts) > 1 and parts[1].isdigit():
            if not _pid_alive(int(parts[1])):
                _remove_tree(p)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
