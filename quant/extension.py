"""The compiled CPU kernels (csrc/decode_cpu.cpp): built once per machine, for one vector path.

The extension holds the decode step quant/decode_cpu.py drives and the kernels packed layers
call directly (the int8 group-of-32 head). It is compiled with torch's cpp_extension into the
cache folder, once per machine and path (~30 s on 2 cores); without a C++ compiler everything
keeps its Python path. The path is the best this CPU runs (AVX-512, AVX2, plain C++), or the one
LLAMADESK_ISA forces.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("csrc") / "decode_cpu.cpp"  # includes the other files of csrc/
_lock = threading.Lock()
_extension = None
_failed: str | None = None


# -ffp-contract=off: plain C++ arithmetic is done as written on every path, never fused into an FMA
# in one inlined copy of a kernel and not in another, so a row's values do not depend on how many
# rows share its weight pass (batch invariance); the vector kernels choose their FMAs explicitly.
# -fno-trapping-math: nothing here reads floating-point exception flags, and without it g++ 12
# leaves SiLU's and softmax's exp (fast_exp: a clamp and a floor) as scalar code, in case either
# raised a flag: its std::floor stays a call on every path, and without AVX-512's masks its clamp's
# compares are not turned into blends. The same values either way (no reassociation, no contraction).
BASE_FLAGS = ["-O3", "-fopenmp-simd", "-fno-trapping-math", "-ffp-contract=off"]
# The vector paths in csrc/decode_cpu.cpp, best first, with the compiler flags that turn each on.
# x86-64-v3 is AVX2 + FMA + F16C (Haswell, Zen 1-3); "generic" is the plain C++ every CPU runs
# (on x86 the SSE2 baseline, on ARM the compiler's NEON auto-vectorization).
ISA_FLAGS = {
    "avx512": ["-march=x86-64-v4"],
    "avx2": ["-march=x86-64-v3"],
    "generic": [],
}
# torch's own CPU dispatch (ATEN_CPU_CAPABILITY) that goes with each path: it also decides how
# torch packs int4 weights, which the step reads in place
TORCH_CAPABILITY = {"avx512": "AVX512", "avx2": "AVX2", "generic": "DEFAULT"}


def supported_isas() -> list[str]:
    """The step's paths this CPU runs, best first, as far as torch dispatches (so that
    ATEN_CPU_CAPABILITY=avx2 on an AVX-512 machine leaves avx2 and generic)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["generic"]
    capability = torch.backends.cpu.get_cpu_capability()
    order = list(ISA_FLAGS)
    best = {"AVX512": 0, "AVX2": 1}.get(capability, len(order) - 1)
    return order[best:]


def chosen_isa() -> str:
    """LLAMADESK_ISA (avx512, avx2 or generic) if set, else the best path this CPU runs.

    Raises ValueError (one line) for an unknown name or a path this CPU cannot run."""
    supported = supported_isas()
    wanted = os.environ.get("LLAMADESK_ISA", "").strip().lower()
    if not wanted:
        return supported[0]
    if wanted not in ISA_FLAGS:
        raise ValueError(f"LLAMADESK_ISA={wanted!r} is not a path (choose from {', '.join(ISA_FLAGS)})")
    if wanted not in supported:
        raise ValueError(f"LLAMADESK_ISA={wanted}: this CPU runs only {', '.join(supported)}")
    return wanted


def _flag_sets() -> list[tuple[list[str], list[str]]]:
    """(compile flags, link flags) to try in turn. The first adds OpenMP where torch runs on it:
    without -fopenmp, at::parallel_for in the extension compiles to a plain loop on one thread.
    The extension then shares torch's own OpenMP runtime and threads (torch ships libgomp.so.1,
    the soname the linker records, so the loader reuses the copy torch loaded). A compiler
    without OpenMP support (clang without libomp) falls back to the second, single-threaded."""
    isa = chosen_isa()
    # the top path is built for exactly this CPU (its tuning, its extra extensions); a lower one
    # for its level alone, or -march=native would bring this CPU's AVX-512 back in
    base = BASE_FLAGS + (["-march=native"] if isa == "avx512" else ISA_FLAGS[isa])
    sets = []
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        sets.append((base + ["-fopenmp"], ["-fopenmp"]))
    sets.append((base, []))
    return sets


def _extension_name(flags: list[str]) -> str:
    # every file of csrc/ (the headers decode_cpu.cpp includes): a change to any one rebuilds
    sources = b"".join(p.name.encode() + p.read_bytes() for p in sorted(SOURCE.parent.iterdir()) if p.is_file())
    key = sources + torch.__version__.encode() + " ".join(flags).encode()
    return f"llamadesk_decode_{hashlib.sha256(key).hexdigest()[:12]}"


def is_built(cache: Path) -> bool:
    """Whether this source has been compiled for this torch and path under `cache`/kernels."""
    try:
        return _built_library(cache) is not None
    except ValueError:  # LLAMADESK_ISA names no path this CPU runs: nothing to find
        return False


def _built_library(cache: Path) -> Path | None:
    for flags, _ in _flag_sets():
        name = _extension_name(flags)
        found = sorted((cache / "kernels" / name).glob(f"{name}*.so"))
        if found:
            return found[-1]
    return None


def _import_library(path: Path):
    import importlib.machinery
    import importlib.util

    module_name = path.name.split(".")[0]  # torch may have built it as NAME_v1
    loader = importlib.machinery.ExtensionFileLoader(module_name, str(path))
    spec = importlib.util.spec_from_file_location(module_name, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def load_extension(cache: Path, build: bool = True):
    """The compiled module (kept under `cache`/kernels), building it first if `build` (~30 s once
    per machine on 2 cores); None without a C++ compiler or if the build failed (logged once)."""
    global _extension, _failed
    with _lock:
        if _extension is not None or _failed is not None:
            return _extension
        try:
            chosen_isa()
        except ValueError as e:
            _failed = str(e)
            log.warning("fused decode step unavailable: %s", _failed)
            return None
        if not build and not is_built(cache):
            return None
        built = _built_library(cache)
        if built is not None:
            # import the library directly: torch.utils.cpp_extension pulls in setuptools and
            # ~30 MiB of modules that only building needs
            try:
                _extension = _import_library(built)
                return _extension
            except ImportError as e:
                log.info("rebuilding the fused decode step (%s)", e)
        if shutil.which("c++") is None and shutil.which("g++") is None:
            _failed = "no C++ compiler (c++ or g++) on PATH"
            log.info("fused decode step unavailable: %s", _failed)
            return None
        from torch.utils import cpp_extension

        # torch looks for ninja on PATH; the one pip installed sits beside this interpreter
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        sets = _flag_sets()
        for i, (cflags, ldflags) in enumerate(sets):
            name = _extension_name(cflags)
            build_dir = cache / "kernels" / name
            build_dir.mkdir(parents=True, exist_ok=True)
            try:
                with _build_lock(build_dir):
                    _extension = cpp_extension.load(
                        name=name, sources=[str(SOURCE)], build_directory=str(build_dir),
                        extra_cflags=cflags, extra_ldflags=ldflags, verbose=False)
                return _extension
            except (RuntimeError, OSError, ImportError, SystemExit) as e:
                if "interrupted by user" in str(e):  # Ctrl-C reached ninja first: it is the user's stop
                    raise KeyboardInterrupt from None
                reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                if i + 1 < len(sets):
                    log.info("building the fused decode step with %s failed (%s); trying without",
                             " ".join(ldflags), reason)
                    continue
                _failed = reason
                log.warning("fused decode step unavailable (build failed: %s); using the Python path", _failed)
        return _extension


@contextmanager
def _build_lock(build_dir: Path):
    """One builder per machine at a time, and no stale lock left by a killed one.

    torch's own lock is a file that waits forever once its process was killed mid-build; an
    flock dies with its process, so whoever holds it knows torch's file is stale."""
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on torch's own lock
        yield
        return
    with open(build_dir.parent / f"{build_dir.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        (build_dir / "lock").unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def loaded_extension():
    """The compiled module if this process has loaded it, else None (never builds)."""
    return _extension
