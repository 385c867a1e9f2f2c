"""The device probe under the limits a machine sets: cgroup v1 and v2 trees built by each test
(a fake /proc/self and cgroup folders), nested limits, "max", CPU quotas."""
from __future__ import annotations

from pathlib import Path

import pytest

from app import devices
from app.devices import CgroupMemory, Device, cgroup_cpus, cgroup_memory, probe_cpu, usable_cpus
from app.plan import catalog_candidate, fits, plan_memory
from model.args import ModelArgs

MiB, GiB = 1 << 20, 1 << 30
V1_UNLIMITED = "9223372036854771712"


class Tree:
    """A fake /proc/self (cgroup, mountinfo) and the cgroup folders it points at, under tmp_path."""

    def __init__(self, root: Path):
        self.root = root
        self.proc = root / "proc"
        self.proc.mkdir()
        self.groups: list[str] = []
        self.mounts: list[str] = []

    def mount(self, name: str, fstype: str, options: str = "rw", hierarchy_root: str = "/") -> Path:
        point = self.root / name
        point.mkdir()
        self.mounts.append(f"{30 + len(self.mounts)} 23 0:{26 + len(self.mounts)} {hierarchy_root} {point} "
                           f"rw,nosuid - {fstype} {fstype} {options}")
        return point

    def files(self, folder: Path, **files: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (folder / name.replace("_", ".", 1)).write_text(text + "\n")

    def write(self) -> Path:
        (self.proc / "cgroup").write_text("\n".join(self.groups) + "\n")
        (self.proc / "mountinfo").write_text("\n".join(self.mounts) + "\n")
        return self.proc


def v2_memory(tree: Tree, folder: Path, limit: str, current: int, inactive: int) -> None:
    tree.files(folder, memory_max=limit, memory_current=str(current),
               memory_stat=f"anon 1\nfile 2\ninactive_file {inactive}\nactive_file 3")


@pytest.fixture
def tree(tmp_path):
    return Tree(tmp_path)


def test_v2_limit_minus_usage_plus_inactive_file_cache(tree):
    top = tree.mount("unified", "cgroup2")
    tree.groups = ["0::/system.slice/llamadesk.service"]
    v2_memory(tree, top / "system.slice", "max", 5 * GiB, 0)
    v2_memory(tree, top / "system.slice" / "llamadesk.service", str(GiB), 600 * MiB, 200 * MiB)
    got = cgroup_memory(tree.write())
    # 1 GiB - (600 MiB used - 200 MiB of reclaimable file cache)
    assert got == CgroupMemory(GiB - 400 * MiB, GiB, str(top / "system.slice" / "llamadesk.service"), 2)
    assert "cgroup v2 limit of 1.00 GiB (memory.max in" in got.describe()


def test_v2_nested_the_tightest_ancestor_wins(tree):
    top = tree.mount("unified", "cgroup2")
    tree.groups = ["0::/user.slice/app"]
    v2_memory(tree, top / "user.slice", str(800 * MiB), 700 * MiB, 0)  # 100 MiB left for all of it
    v2_memory(tree, top / "user.slice" / "app", str(GiB), 300 * MiB, 0)
    got = cgroup_memory(tree.write())
    assert (got.available, got.limit, got.path) == (100 * MiB, 800 * MiB, str(top / "user.slice"))


def test_v2_max_everywhere_is_no_limit(tree):
    top = tree.mount("unified", "cgroup2")
    tree.groups = ["0::/a/b"]
    v2_memory(tree, top / "a", "max", GiB, 0)
    v2_memory(tree, top / "a" / "b", "max", GiB, 0)
    assert cgroup_memory(tree.write()) is None


def test_usage_below_the_inactive_cache_never_counts_negative(tree):
    top = tree.mount("unified", "cgroup2")
    tree.groups = ["0::/x"]
    v2_memory(tree, top / "x", str(GiB), 100 * MiB, 300 * MiB)
    assert cgroup_memory(tree.write()).available == GiB


def test_v1_memory_limit_with_hierarchical_inactive_file(tree):
    tree.mount("systemd", "cgroup", "rw,name=systemd")
    memory = tree.mount("memory", "cgroup", "rw,memory")
    tree.groups = ["9:name=systemd:/", "4:memory:/docker/abc", "0::/"]
    tree.files(memory / "docker", memory_limit_in_bytes=V1_UNLIMITED, memory_usage_in_bytes=str(3 * GiB),
               memory_stat="total_inactive_file 0")
    tree.files(memory / "docker" / "abc", memory_limit_in_bytes=str(2 * GiB),
               memory_usage_in_bytes=str(GiB), memory_stat=f"inactive_file 1\ntotal_inactive_file {512 * MiB}")
    got = cgroup_memory(tree.write())
    assert (got.available, got.limit, got.version) == (GiB + 512 * MiB, 2 * GiB, 1)
    assert "memory.limit_in_bytes" in got.describe()


def test_v1_in_a_container_whose_mount_starts_at_its_own_cgroup(tree):
    # without a cgroup namespace, /proc/self/cgroup names the host's path and the container's
    # mount shows that cgroup as its top
    memory = tree.mount("memory", "cgroup", "rw,memory", hierarchy_root="/docker/abc")
    tree.groups = ["4:memory:/docker/abc"]
    tree.files(memory, memory_limit_in_bytes=str(GiB), memory_usage_in_bytes=str(100 * MiB), memory_stat="")
    assert cgroup_memory(tree.write()).available == GiB - 100 * MiB


def test_v1_unlimited_and_no_cgroup_files_at_all(tree):
    memory = tree.mount("memory", "cgroup", "rw,memory")
    tree.groups = ["4:memory:/"]
    tree.files(memory, memory_limit_in_bytes=V1_UNLIMITED, memory_usage_in_bytes="1")
    assert cgroup_memory(tree.write()) is None
    assert cgroup_memory(tree.root / "no-such-proc") is None


def test_v1_and_v2_together_take_the_tighter(tree):
    memory = tree.mount("memory", "cgroup", "rw,memory")
    unified = tree.mount("unified", "cgroup2")
    tree.groups = ["4:memory:/a", "0::/b"]
    tree.files(memory / "a", memory_limit_in_bytes=str(2 * GiB), memory_usage_in_bytes="0")
    v2_memory(tree, unified / "b", str(GiB), 0, 0)
    got = cgroup_memory(tree.write())
    assert (got.available, got.version) == (GiB, 2)


def test_cpu_quota_v2_nested_and_max(tree, monkeypatch):
    top = tree.mount("unified", "cgroup2")
    tree.groups = ["0::/a/b"]
    tree.files(top / "a", cpu_max="300000 100000")
    tree.files(top / "a" / "b", cpu_max="max 100000")
    proc = tree.write()
    assert cgroup_cpus(proc) == 3.0
    (top / "a" / "b" / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpus(proc) == 1.5
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert usable_cpus(proc) == 1  # 1.5 CPUs: a second thread would be throttled half the time
    (top / "a" / "b" / "cpu.max").write_text("max 100000\n")
    (top / "a" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpus(proc) is None
    assert usable_cpus(proc) == 4  # affinity alone


def test_cpu_quota_v1_and_affinity(tree, monkeypatch):
    cpu = tree.mount("cpu,cpuacct", "cgroup", "rw,cpu,cpuacct")
    tree.groups = ["3:cpu,cpuacct:/job"]
    tree.files(cpu, cpu_cfs_quota_us="-1", cpu_cfs_period_us="100000")
    tree.files(cpu / "job", cpu_cfs_quota_us="250000", cpu_cfs_period_us="100000")
    proc = tree.write()
    assert cgroup_cpus(proc) == 2.5
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    assert usable_cpus(proc) == 2
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: {5})
    assert usable_cpus(proc) == 1  # affinity is tighter than the quota


def test_the_plan_uses_the_cgroup_limit_says_so_and_fits(monkeypatch):
    """Under a 1 GiB cgroup on a host with 22 GiB free, the plan fits the cgroup, not the host."""
    limited = CgroupMemory(900 * MiB, GiB, "/sys/fs/cgroup/llamadesk.service", 2)
    monkeypatch.setattr(devices, "cgroup_memory", lambda proc=None: limited)
    device = probe_cpu()
    assert device.free_bytes == 900 * MiB and device.total_bytes <= GiB
    assert device.limit == "the cgroup v2 limit of 1.00 GiB (memory.max in /sys/fs/cgroup/llamadesk.service)"
    smollm2 = ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, ffn_dim=1536,
                        tie_embeddings=True, max_seq_len=8192)
    big = ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim=8192,
                    tie_embeddings=True, max_seq_len=8192)  # a 1.2B model
    candidates = [catalog_candidate("llama-1b", big, "int4", device),
                  catalog_candidate("smollm2-135m", smollm2, "int4", device)]
    result = plan_memory(candidates, device)
    assert result.chosen is not None and result.chosen.model == "smollm2-135m"
    assert fits(candidates[1], result.chosen.ctx, device)
    assert result.chosen.total_bytes <= device.free_bytes
    assert not fits(candidates[0], 2048, device)  # the 1.2B model the host's free RAM would have taken
    assert "bounded by the cgroup v2 limit of 1.00 GiB" in result.chosen.why
    assert probe_cpu(ram=GiB).limit == "--ram"


def test_this_machine_probes_without_failing():
    device = probe_cpu()
    assert isinstance(device, Device) and device.free_bytes > 0 and device.threads == usable_cpus() >= 1
    assert device.limit


@pytest.mark.parametrize("cores, load, own, now_busy, want", [
    (2, 0.1, 0.0, 0.0, 2),   # idle: every core
    (2, 1.0, 0.0, 1.0, 1),   # one core busy elsewhere: one thread, never two that wait at barriers
    (2, 1.0, 0.0, 0.05, 2),  # a program that has just stopped still weighs in the load average
    (2, 1.4, 0.9, 1.0, 2),   # this process's own first minute (download, pack) is not another's
    (8, 3.2, 0.0, 3.0, 5),   # three of eight busy
    (2, 6.0, 0.0, 2.0, 1),   # everything busy: still one
    (4, 1.0, 0.0, 1.0, 3),
])
def test_the_thread_rule_takes_the_cores_other_programs_leave_idle(monkeypatch, cores, load, own, now_busy, want):
    """default_threads: the idle cores by the 1-minute load average less this process's own part,
    or by what the cores do now when that is less; inference_threads: never more than those,
    whatever --threads asks, and one fewer under the chat app (its screen's core)."""
    monkeypatch.setattr(devices, "usable_cpus", lambda: cores)
    monkeypatch.setattr(devices.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(devices, "_own_recent_load", lambda: own)
    monkeypatch.setattr(devices.psutil, "cpu_count", lambda *a, **k: cores)
    monkeypatch.setattr(devices.psutil, "cpu_percent", lambda interval=None: 100 * now_busy / cores)
    assert devices.default_threads() == want
    assert devices.inference_threads() == want
    assert devices.inference_threads(requested=64) == want
    assert devices.inference_threads(requested=1) == 1
    assert devices.inference_threads(ui=True) == max(1, want - 1)
