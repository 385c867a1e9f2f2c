"""What the machine has: GPUs with their free memory, or free RAM and the CPU's features.

The one place that probes devices. A "what if" override (`--vram 8GiB`, `--ram 16GiB`,
`--device cpu`) replaces the probe so plans can be made for machines we are not on.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
    limit: str = ""  # which limit `free_bytes` comes from (a cgroup's, the host's), in words
    cgroup_limit: int | None = None  # bytes, when a cgroup's limit is what bounds `free_bytes`

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
    """The CPU and the memory this process may use: the host's available RAM, or less where a
    cgroup (a container, a systemd service) limits it; `limit` says which one counted."""
    mem = psutil.virtual_memory()
    if ram is not None:
        return Device("cpu", _cpu_name(), ram, ram, None, cpu_features(), threads=usable_cpus(),
                      limit="--ram")
    free, total, limit = mem.available, mem.total, "the host's available RAM"
    group = cgroup_memory()
    if group is not None and group.available < free:
        return Device("cpu", _cpu_name(), min(total, group.limit), group.available, None, cpu_features(),
                      threads=usable_cpus(), limit=group.describe(), cgroup_limit=group.limit)
    return Device("cpu", _cpu_name(), total, free, None, cpu_features(), threads=usable_cpus(), limit=limit)


# ---------------------------------------------------------------- cgroups: what a container allows
# A process in a cgroup (Docker, Kubernetes, systemd services) is killed at the cgroup's memory
# limit, whatever the host has free: the plan must see the smallest room left along the path from
# the process's cgroup up to the root. Page cache that is not in active use (inactive_file) counts
# against the limit but is reclaimed before the OOM killer runs, so it counts as available.
_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as the largest page-aligned int64


@dataclass(frozen=True)
class CgroupMemory:
    available: int  # bytes this process can still take before the tightest limit
    limit: int  # that cgroup's limit in bytes
    path: str  # that cgroup's folder
    version: int  # 1 or 2

    def describe(self) -> str:
        name = "memory.max" if self.version == 2 else "memory.limit_in_bytes"
        return f"the cgroup v{self.version} limit of {format_bytes(self.limit)} ({name} in {self.path})"


def _cgroup_dirs(controller: str, proc: Path) -> list[tuple[int, Path, Path]]:
    """(version, the process's cgroup folder, the mount point above it) for each hierarchy that
    has `controller` ("memory" or "cpu"): the v2 one and/or the v1 one."""
    try:
        groups = (proc / "cgroup").read_text().splitlines()
        mounts = (proc / "mountinfo").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in mounts:
        fields = line.split()
        if "-" not in fields:
            continue
        dash = fields.index("-")
        root, mount_point, fstype, options = fields[3], fields[4], fields[dash + 1], fields[dash + 3:]
        if fstype == "cgroup2":
            version, wanted = 2, [g.split(":", 2)[2] for g in groups if g.startswith("0::")]
        elif fstype == "cgroup" and controller in ",".join(options).split(","):
            version = 1
            wanted = [g.split(":", 2)[2] for g in groups
                      if len(g.split(":", 2)) == 3 and controller in g.split(":", 2)[1].split(",")]
        else:
            continue
        for path in wanted:
            # a container's mount may show the hierarchy from the container's own cgroup (`root`)
            if root == "/":
                relative = path
            elif path == root or path.startswith(root + "/"):
                relative = path[len(root):]
            else:
                relative = "/"  # the process's cgroup is above the mount: its top is the nearest
            found.append((version, Path(mount_point) / relative.lstrip("/"), Path(mount_point)))
    return found


def _ancestors(folder: Path, mount_point: Path) -> list[Path]:
    """`folder`, its parent, ... up to and including `mount_point`."""
    out = [folder]
    while folder != mount_point and mount_point in folder.parents:
        folder = folder.parent
        out.append(folder)
    return out


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text == "max" else int(text) if text.lstrip("-").isdigit() else None


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def cgroup_memory(proc: Path = Path("/proc/self")) -> CgroupMemory | None:
    """The tightest cgroup memory limit over this process's cgroup and its ancestors, v1 and v2:
    min over them of limit - (usage - inactive file cache). None when no cgroup sets a limit."""
    tightest = None
    for version, folder, mount_point in _cgroup_dirs("memory", proc):
        for d in _ancestors(folder, mount_point):
            if version == 2:
                limit, usage = _read_int(d / "memory.max"), _read_int(d / "memory.current")
                inactive = _stat(d / "memory.stat", "inactive_file")
            else:
                limit, usage = _read_int(d / "memory.limit_in_bytes"), _read_int(d / "memory.usage_in_bytes")
                inactive = _stat(d / "memory.stat", "total_inactive_file") or _stat(d / "memory.stat", "inactive_file")
            if limit is None or limit >= _UNLIMITED:
                continue
            used = max(0, (usage or 0) - inactive)
            available = max(0, limit - used)
            if tightest is None or available < tightest.available:
                tightest = CgroupMemory(available, limit, str(d), version)
    return tightest


def cgroup_cpus(proc: Path = Path("/proc/self")) -> float | None:
    """The tightest CPU quota over this process's cgroup and its ancestors, in CPUs (quota /
    period: 150000/100000 is 1.5); None when none is set."""
    tightest = None
    for version, folder, mount_point in _cgroup_dirs("cpu", proc):
        for d in _ancestors(folder, mount_point):
            if version == 2:
                try:
                    quota, period = (d / "cpu.max").read_text().split()
                except (OSError, ValueError):
                    continue
                if quota == "max":
                    continue
                cpus = int(quota) / int(period)
            else:
                quota, period = _read_int(d / "cpu.cfs_quota_us"), _read_int(d / "cpu.cfs_period_us")
                if quota is None or quota <= 0 or not period:
                    continue
                cpus = quota / period
            tightest = cpus if tightest is None else min(tightest, cpus)
    return tightest


def usable_cpus(proc: Path = Path("/proc/self")) -> int:
    """How many CPUs this process can keep busy: the cores it may run on (affinity), fewer when
    a cgroup's quota allows less (whole CPUs, at least 1: a thread over the quota is throttled,
    and the others wait for it at every barrier)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpus(proc)
    return max(1, min(cores, int(quota))) if quota is not None else cores


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
    cores = usable_cpus()
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


def thread_ceiling(requested: int | None = None) -> int:
    """The most threads decoding may move up to later (app/threads.py), whatever the load now:
    the usable cores, or `requested` (--threads) if fewer. The chat app starts one below the
    cores (inference_threads(ui=True)) and the governor tries the last one while it renders."""
    cores = usable_cpus()
    return max(1, min(requested, cores)) if requested else cores


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
