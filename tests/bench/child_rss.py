"""Run one benchmark step in a fresh child process and say how much memory it took, and where.

    result = run_step(__file__, "quantize", {"ref": "m", "scheme": "int4"}, env={"LLAMADESK_HOME": home})
    result.peak_rss, result.data["peak"]["stack"]

The peak is the child's own VmHWM, read by the child just before it exits. The parent's
`ru_maxrss` from `os.wait4` is kept as a cross-check only: Linux folds the RSS of the process a
child was spawned from into the child's ru_maxrss (exec records the old mm's high-water mark), so
a parent that had imported torch would inflate every figure. The parent therefore imports
nothing heavy, and the step runs behind `--child STEP ARGS_JSON` in the same script.

Inside the child a thread reads /proc/self/status every few milliseconds. At each new high of
VmRSS, and of RssAnon alone, it keeps the split into anonymous and file-backed pages and the main
thread's Python stack: tracemalloc does not see torch's allocations, a stack at the peak does
say which code held the memory. File-backed pages are the parts of memory-mapped files (the
safetensors being read) that have been touched; they count in RSS and in the peak, but the
kernel can drop them under pressure without swapping.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20
_RESULT = "BENCH-RESULT "  # the child's last stdout line: this prefix, then the step's JSON


# ---------------------------------------------------------------- the parent side
@dataclass
class StepResult:
    step: str
    peak_rss: int  # bytes: the child's VmHWM
    ru_maxrss: int  # bytes: os.wait4's figure (includes the parent's RSS at spawn, see above)
    wall_s: float
    load_before: str  # the load average when the step started: other processes share the 2 cores
    data: dict  # what the step returned, plus "peak", "peak_anon", "rss_at_start", "timeline"


def run_step(script: str, step: str, args: dict, env: dict | None = None) -> StepResult:
    """Run `python script --child step json(args)` and collect its result; raise if it fails."""
    cmd = [sys.executable, script, "--child", step, json.dumps(args)]
    child_env = dict(os.environ, **(env or {}), PYTHONUNBUFFERED="1")
    load_before = load()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=child_env, cwd=REPO, text=True)
    out = []
    for line in proc.stdout:  # stderr passes through: progress stays visible
        if not line.startswith(_RESULT):
            sys.stderr.write(line)
        out.append(line)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"step {step} failed with exit code {proc.returncode}: {' '.join(cmd)}")
    last = next(line for line in reversed(out) if line.startswith(_RESULT))
    data = json.loads(last[len(_RESULT):])
    return StepResult(step, data["vm_hwm"], usage.ru_maxrss * 1024, wall, load_before, data)


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """A parent script's parser: its docstring's first paragraph as the description, the rest as
    the epilog, and the hidden `--child STEP ARGS_JSON` that run_step calls it back with."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(doc.split("\n\n")[1:]))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    return parser


# ---------------------------------------------------------------- the child side
def child_main(steps: dict, argv: list[str], preload: tuple[str, ...] = ()) -> None:
    """`--child STEP ARGS_JSON`: run steps[STEP](**args) under a sampler, print the result line.

    The `preload` modules are imported first, so "RSS at start" is what the imports cost and the
    growth from there is the step's own."""
    step, args = argv[0], json.loads(argv[1])
    for module in preload:
        importlib.import_module(module)
    sampler = RssSampler()
    with sampler:
        data = steps[step](**args) or {}
    data.update(sampler.summary())
    print(_RESULT + json.dumps(data), flush=True)


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    wanted = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in wanted:
                out[key] = int(value.split()[0]) * 1024
    return out


class RssSampler:
    """A daemon thread that keeps the highest VmRSS (and RssAnon) seen, with the stack at that moment."""

    def __init__(self, interval_s: float = 0.005, timeline_every_s: float = 0.5):
        self.interval_s, self.timeline_every_s = interval_s, timeline_every_s
        self.peak: dict = {"rss": 0}
        self.peak_anon: dict = {"anon": 0}
        self.timeline: list[dict] = []
        self._main = threading.main_thread().ident
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.perf_counter()
        self.rss_at_start = proc_status()["VmRSS"]

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        next_timeline = 0.0
        while not self._stop.is_set():
            s = proc_status()
            t = time.perf_counter() - self._t0
            rss, anon, file = s["VmRSS"], s.get("RssAnon", 0), s.get("RssFile", 0)
            if rss > self.peak["rss"]:
                self.peak = {"t": t, "rss": rss, "anon": anon, "file": file, "stack": self._main_stack()}
            if anon > self.peak_anon["anon"]:
                self.peak_anon = {"t": t, "rss": rss, "anon": anon, "file": file, "stack": self._main_stack()}
            if t >= next_timeline:
                self.timeline.append({"t": round(t, 2), "rss": rss, "anon": anon, "file": file,
                                      "where": (self._main_stack() or [""])[-1]})
                next_timeline = t + self.timeline_every_s
            time.sleep(self.interval_s)

    def _main_stack(self) -> list[str]:
        """The main thread's frames inside this repository, outermost first, with the tensor name
        a frame is working on (a local `name` or `tname`) and any `*_bytes` count it keeps."""
        frame = sys._current_frames().get(self._main)
        if frame is None:
            return []
        lines = []
        for f, lineno in traceback.walk_stack(frame):
            path = Path(f.f_code.co_filename)
            if REPO not in path.parents:
                continue
            label = f"{path.relative_to(REPO)}:{lineno} {f.f_code.co_name}"
            names = f.f_code.co_varnames + f.f_code.co_cellvars
            if {"name", "tname"} & set(names) or any(n.endswith("_bytes") for n in names):
                local = f.f_locals
                tensor = local.get("name", local.get("tname"))
                if isinstance(tensor, str):
                    label += f" [{tensor}]"
                label += "".join(f" {k}={v / MiB:.0f}MiB" for k, v in local.items()
                                 if k.endswith("_bytes") and isinstance(v, int))
            lines.append(label)
        return lines[::-1]

    def summary(self) -> dict:
        return {"vm_hwm": proc_status()["VmHWM"], "rss_at_start": self.rss_at_start, "peak": self.peak,
                "peak_anon": self.peak_anon, "timeline": self.timeline}


# ---------------------------------------------------------------- what the tables say about the machine
def machine() -> dict:
    """CPU model, cores, RAM, the UTC date and the load average, for the line beside each table."""
    name = platform.processor() or "CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    with open("/proc/meminfo", encoding="ascii") as f:
        total_kib = int(next(line for line in f if line.startswith("MemTotal:")).split()[1])
    return {"cpu": name, "cores": len(os.sched_getaffinity(0)), "ram_gib": round(total_kib / (1 << 20), 1),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "load": load()}


def load() -> str:
    """`uptime`'s 1, 5 and 15 minute load averages."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def code_line() -> str:
    """Which llamadesk the children import: its folder, git commit, and uncommitted app/model/quant files."""
    import app  # light: app/__init__.py imports nothing

    root = Path(app.__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "app", "model", "quant"],
                                 capture_output=True, text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return f"{root} (not a git checkout)"
    dirty = sorted(line[3:] for line in changed if line.strip())
    return f"{root} at {commit}" + (f", uncommitted: {', '.join(dirty)}" if dirty else "")


def machine_line(m: dict) -> str:
    return f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; {m['date']}; load average {m['load']}"


def mib(n: float) -> str:
    return f"{n / MiB:,.0f}"
