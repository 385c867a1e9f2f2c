"""The plain C++ kernels of quant/csrc without torch, here and on ARM.

tests/csrc/kernel_check.cpp includes the kernel headers with shims for the three things they take
from torch and checks every block type's plain C++ GEMV, dequantization and r16 GEMM against its
own reference from gguf's formulas (it lists its checks). It is built with this machine's g++
and run; where Debian's aarch64 toolchain is installed it is also cross-compiled with NEON (the
compiler vectorizes the plain loops with it) and run under qemu-user, and the whole
decode_cpu.cpp is compiled for aarch64 against torch's headers. On Debian:
`apt-get install g++-aarch64-linux-gnu qemu-user`.
"""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from quant.extension import BASE_FLAGS, SOURCE

HARNESS = Path(__file__).parent / "csrc" / "kernel_check.cpp"
# the extension's own flags and standard (torch's cpp_extension builds C++20); no -march, so the
# headers' x86 paths are compiled out on the host as on ARM
FLAGS = ["-std=c++20", *BASE_FLAGS, f"-I{SOURCE.parent}"]
ARM_GXX = "aarch64-linux-gnu-g++"
NEON = ["-march=armv8-a+simd"]
ARM_SYSROOT = Path("/usr/aarch64-linux-gnu")  # where Debian's cross toolchain keeps ARM's libc
EM_AARCH64 = 183  # the ELF header's e_machine for AArch64


def _compile(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stderr[-4000:]}"


def _assert_all_checks_pass(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:] or done.stdout[-4000:]
    tally = re.search(r"(\d+) of (\d+) checks passed", done.stdout)
    assert tally and tally[1] == tally[2], done.stdout[-4000:]
    for kernel in ("dequantize q6_k", "gemv q4_k", "gemv int8_group", "r16 q4_1", "r16 q4_k rows=7",
                   "batch r16 int8_group rows=7", "r16 x8 q4_0", "r16 x8 q8_0 rows=7", "batch r16 x8 q4_1 rows=7",
                   "x as 8-bit integers"):
        assert f"ok   {kernel}" in done.stdout, f"{kernel}: not checked"


@pytest.fixture(scope="module")
def arm_binary(tmp_path_factory) -> Path:
    if shutil.which(ARM_GXX) is None:
        pytest.skip(f"no {ARM_GXX} (apt-get install g++-aarch64-linux-gnu)")
    out = tmp_path_factory.mktemp("arm") / "kernel_check"
    _compile([ARM_GXX, *FLAGS, *NEON, str(HARNESS), "-o", str(out)])
    return out


def test_portable_kernels_match_gguf_reference_on_this_machine(tmp_path):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler (g++ or c++) on PATH")
    out = tmp_path / "kernel_check"
    _compile([compiler, *FLAGS, str(HARNESS), "-o", str(out)])
    _assert_all_checks_pass([str(out)])


def test_kernels_cross_compile_for_arm_with_neon(arm_binary):
    header = arm_binary.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == EM_AARCH64


def test_portable_kernels_match_gguf_reference_on_arm_under_qemu(arm_binary):
    if shutil.which("qemu-aarch64") is None:
        pytest.skip("no qemu-aarch64 (apt-get install qemu-user)")
    if not (ARM_SYSROOT / "lib").is_dir():
        pytest.skip(f"no ARM libc under {ARM_SYSROOT}")
    _assert_all_checks_pass(["qemu-aarch64", "-L", str(ARM_SYSROOT), str(arm_binary)])


def test_whole_decode_step_compiles_for_arm_against_torch_headers():
    """The extension's source with its torch and Python headers (this machine's: they hold no
    x86-only code, and an x86-64 pyconfig.h has AArch64's type sizes), syntax and every template
    instantiated; it cannot be linked without an ARM libtorch."""
    if shutil.which(ARM_GXX) is None:
        pytest.skip(f"no {ARM_GXX} (apt-get install g++-aarch64-linux-gnu)")
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"]]]
    _compile([ARM_GXX, *FLAGS, *NEON, "-fsyntax-only", *includes, "-DTORCH_EXTENSION_NAME=llamadesk_decode_arm",
              "-DTORCH_API_INCLUDE_EXTENSION_H", str(SOURCE)])
