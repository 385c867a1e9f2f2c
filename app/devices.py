"""What the machine has: GPUs with their free memory, or free RAM and the CPU's features.

The one place that probes devices. A "what if" override (`--vram 8GiB`, `--ram 16GiB`,
`--device cpu`) replaces the probe so plans can be made for machines we are not on.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import asdict, dataclass, field

import psutil

from .errors import UserError

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000**2,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30, "t": 1 << 40, "tb": 1000**4, "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """'8GiB', '6 GB', '512M', '1.5g' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text or "")
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"{text!r} is not a size (examples: 8GiB, 6GB, 512MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


@dataclass
class Device:
    kind: str  # "cuda" or "cpu"
    name: str
    total_bytes: int
    free_bytes: int
    capability: tuple[int, int] | None = None  # CUDA compute capability
    features: list[str] = field(default_factory=list)  # CPU flags that matter to the kernels
    threads: int = 1

    @property
    def bf16_ok(self) -> bool:
        return self.kind == "cpu" or (self.capability or (0, 0)) >= (8, 0)

    @property
    def int4_ok(self) -> bool:
        # tinygemm int4 needs Ampere or newer on CUDA; the CPU kernel runs anywhere
        return self.kind == "cpu" or (self.capability or (0, 0)) >= (8, 0)

    def to_dict(self) -> dict:
        return asdict(self)


def cpu_features() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "amx_bf16",
              "amx_int8")
    return [w for w in wanted if w in flags]


def probe_cpu(ram: int | None = None) -> Device:
    mem = psutil.virtual_memory()
    free = ram if ram is not None else mem.available
    total = max(ram or 0, mem.total) if ram is None else ram
    return Device("cpu", _cpu_name(), total, free, None, cpu_features(), threads=len(os.sched_getaffinity(0)))


def _no_nvidia_driver() -> bool:
    """True where Linux shows no NVIDIA driver: then no CUDA device can exist, and plan, list and
    the chat app's first screen need not wait ~2 s for torch to say so."""
    if not sys.platform.startswith("linux"):
        return False
    return not (os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/dxg")
                or any(name.startswith("nvidia") for name in os.listdir("/dev")))


def probe_cuda(vram: int | None = None) -> list[Device]:
    devices = []
    if _no_nvidia_driver():
        return devices
    import torch

    if not torch.cuda.is_available():
        return devices
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        if vram is not None:
            free, total = vram, vram
        devices.append(Device("cuda", props.name, total, free, (props.major, props.minor), threads=1))
    return devices


def probe(device: str | None = None, vram: int | None = None, ram: int | None = None) -> Device:
    """The device to plan for: the first GPU if there is one (or `--vram` says so), else the CPU."""
    if device not in (None, "cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, not {device!r}")
    if device == "cpu":
        return probe_cpu(ram)
    gpus = probe_cuda(vram)
    if gpus:
        return gpus[0]
    if device == "cuda" or vram is not None:
        if vram is None:
            raise UserError("no CUDA GPU found; use --device cpu, or --vram SIZE to plan for a GPU you do not have")
        # planning for a GPU this machine does not have: assume a current one (bf16 and int4 run)
        return Device("cuda", "hypothetical GPU", vram, vram, (8, 0))
    return probe_cpu(ram)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def default_threads() -> int:
    """CPU threads for inference: the cores that other programs leave idle.

    Measured here: with one of two cores busy elsewhere, 2 threads decode at 1.5 tok/s and 1
    thread at 64 (each op's OpenMP barrier waits for the descheduled thread); idle, 2 threads win.
    """
    cores = len(os.sched_getaffinity(0))
    try:
        busy = max(0.0, os.getloadavg()[0] - _own_recent_load())
    except OSError:
        busy = 0.0
    # the load average trails by a minute: a program that has just stopped still counts there, so
    # take what the cores do now (over 0.1 s, this process idle) when that is less
    busy = min(busy, psutil.cpu_percent(interval=0.1) / 100 * psutil.cpu_count())
    return max(1, min(cores, int(cores - busy + 0.5)))


def inference_threads(requested: int | None = None, ui: bool = False) -> int:
    """The one thread rule of chat, ask, bench and serve: the cores other programs leave idle
    (default_threads), one fewer under the chat app (its UI renders on a core of its own), and
    never more than that, whatever `requested` (--threads) says.

    More threads than idle cores is the one setting that collapses decoding: every op ends at an
    OpenMP barrier that waits for the thread the OS has parked behind another program (measured,
    2 cores with one busy: 1.0 tok/s with 2 threads against 61 with 1)."""
    idle = default_threads()
    n = max(1, idle - 1) if ui else idle
    return max(1, min(requested, idle)) if requested else n


def _own_recent_load() -> float:
    """This process's own part of the 1-minute load average, when it is young enough to tell.

    A first `ask` downloads, converts, packs and compiles before it loads (~40 s of CPU here): the
    load average it leaves behind is its own, not other programs', and must not cost it a thread.
    """
    import time

    age = time.time() - psutil.Process().create_time()
    if age > 120:
        return 0.0  # what it did long ago has decayed; what it did lately is not known
    t = os.times()
    return (t.user + t.system + t.children_user + t.children_system) / 60


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def release_freed_memory() -> None:
    """Have glibc hand large freed blocks back to the OS at once (Linux; elsewhere nothing).

    Loading and packing free big temporaries (copies, fused or packed weights); by default glibc
    raises its mmap threshold after such frees and keeps them in the heap: 0.1-1.2 GiB of RSS
    that the memory plan cannot see.
    """
    _glibc("mallopt", M_MMAP_THRESHOLD, 1 << 20)  # 1 MiB, fixed


def reuse_freed_memory() -> None:
    """After loading: let glibc keep freed blocks up to 16 MiB in the heap for the next use.

    With the 1 MiB threshold of loading, every prefill temporary over 1 MiB was a fresh mapping
    whose pages the kernel zeroes on first touch: prefill ran ~30% slower (measured, 512 tokens).
    The heap keeps that workspace between chunks; trim_heap() hands it back after a prompt.
    """
    _glibc("mallopt", M_MMAP_THRESHOLD, 16 << 20)
    _glibc("mallopt", M_TRIM_THRESHOLD, 32 << 20)  # no trimming between two prefill chunks


def trim_heap() -> None:
    """Return the heap's free pages to the OS (after a prompt's prefill: its temporaries)."""
    _glibc("malloc_trim", 0)


def _glibc(function: str, *args: int) -> None:
    """Call one of glibc's malloc tunables; elsewhere (no glibc) there is nothing to tune."""
    try:
        import ctypes

        getattr(ctypes.CDLL("libc.so.6"), function)(*args)
    except (OSError, AttributeError):
        pass
