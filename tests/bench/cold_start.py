"""Cold start: `llamadesk ask` (load + 16 tokens) against llama-cpp-python on the same GGUF.

Each command runs in a fresh process, one after another, `--rounds` times; the median wall time
and the peak RSS (the child's ru_maxrss) are printed side by side with the same-run time of
`python -c "import torch"`, the floor any PyTorch program pays. The issue's goal: llamadesk's wall
<= 2 x llama.cpp's + import torch, peak RSS <= 1.1 x llama.cpp's at the same context.

    python tests/bench/cold_start.py --model llama-1b:int4 --gguf ~/llama-1b.Q4_0.gguf --ctx 512

The page cache is left as it is (warm after the first round): what a second start costs.
llama.cpp completes the bare prompt (6 tokens); `ask` wraps it in the model's chat format (35
tokens with SmolLM2's template and default system prompt). `--raw` makes `ask` send the bare
prompt too, for the same work on both sides.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

LLAMACPP = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=int(sys.argv[2]), n_threads=int(sys.argv[3]), verbose=False)
out = llm.create_completion("The capital of France is", max_tokens=16, temperature=0)
print(out["choices"][0]["text"])
"""


def run(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one child process, from its own rusage."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # reaped here, so Popen never sees it
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd[:4])}... failed: {err.read().decode()[-500:]}")
    return wall, usage.ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="installed llamadesk model, NAME:VARIANT")
    ap.add_argument("--gguf", required=True, help="the same weights as a GGUF file, for llama-cpp-python")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--raw", action="store_true", help="ask without the chat format, as llama.cpp completes")
    a = ap.parse_args()
    py = sys.executable
    cmds = {
        "import torch": [py, "-c", "import torch"],
        "llama.cpp": [py, "-c", LLAMACPP, a.gguf, str(a.ctx), str(a.threads)],
        "llamadesk": [py, "-m", "app.cli", "ask", "--model", a.model, "--ctx", str(a.ctx), "--threads",
                      str(a.threads), "--max-tokens", "16", "--temperature", "0", *(["--raw"] if a.raw else []),
                      "The capital of France is"],
    }
    walls: dict[str, list[float]] = {k: [] for k in cmds}
    peaks: dict[str, int] = {}
    for _ in range(a.rounds):
        for name, cmd in cmds.items():
            wall, peak = run(cmd)
            walls[name].append(wall)
            peaks[name] = peak
    result = {k: {"wall_s": round(statistics.median(v), 2), "peak_rss_mb": round(peaks[k] / 1e6)}
              for k, v in walls.items()}
    lc, ld, torch_s = result["llama.cpp"], result["llamadesk"], result["import torch"]["wall_s"]
    result["goal_wall_s"] = round(2 * lc["wall_s"] + torch_s, 2)
    result["wall_ok"] = ld["wall_s"] <= result["goal_wall_s"]
    result["rss_ratio"] = round(ld["peak_rss_mb"] / lc["peak_rss_mb"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
