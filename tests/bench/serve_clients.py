"""`llamadesk serve` under 1, 2, 4 and 8 streaming clients: aggregate tokens/s and TTFT p50/p95.

    python tests/bench/serve_clients.py --url http://127.0.0.1:8462 --tokens 64
    python tests/bench/serve_clients.py --start --clients 1 2 4 8 --json   # starts its own server

Each round starts N clients at once; each streams one completion of `--tokens` tokens (temperature
0, a counting prompt that does not end early; the tokens counted are those its usage reports). Aggregate tok/s = all completion tokens / the round's wall time; TTFT
is each client's time from sending to its first content chunk. The issue's goal: the aggregate at
4 clients >= 2.5x the same run's single-client figure (needs the batched decoder; with one row
at a time the figure stays near 1x).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import httpx

PROMPT = "Count from 1 to 500, separated by commas: 1, 2, 3,"


def one_client(url: str, model: str, tokens: int, out: list, i: int) -> None:
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    completion = 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                completion = chunk["usage"]["completion_tokens"]
    out[i] = {"ttft_s": first, "tokens": completion, "total_s": time.perf_counter() - t0}


def round_of(url: str, model: str, n: int, tokens: int) -> dict:
    results: list = [None] * n
    threads = [threading.Thread(target=one_client, args=(url, model, tokens, results, i)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttfts = sorted(r["ttft_s"] for r in results)
    total = sum(r["tokens"] for r in results)
    return {"clients": n, "completion_tokens": total, "wall_s": round(wall, 3),
            "aggregate_tok_s": round(total / wall, 2),
            "ttft_p50_s": round(statistics.median(ttfts), 3),
            "ttft_p95_s": round(ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 3)}


def start_server(port: int, parallel: int, threads: int | None, activation_bits: int | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--parallel", str(parallel),
           "--ctx", "2048"] + (["--threads", str(threads)] if threads else [])
    cmd += ["--activation-bits", str(activation_bits)] if activation_bits else []
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8462")
    ap.add_argument("--start", action="store_true", help="start `llamadesk serve` on --port for the run")
    ap.add_argument("--port", type=int, default=8463)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--activation-bits", type=int, choices=(8, 15),
                    help="with --start: the server's --activation-bits (default: serve's own)")
    args = ap.parse_args()
    proc = start_server(args.port, max(args.clients), args.threads, args.activation_bits) if args.start else None
    url = f"http://127.0.0.1:{args.port}" if proc else args.url
    try:
        model = httpx.get(f"{url}/health").json()["model"]
        round_of(url, model, 1, 8)  # warm-up
        rows = [round_of(url, model, n, args.tokens) for n in args.clients]
    finally:
        if proc:
            proc.terminate()
            proc.wait(timeout=30)
    single = next((r["aggregate_tok_s"] for r in rows if r["clients"] == 1), None)
    for r in rows:
        r["vs_single"] = round(r["aggregate_tok_s"] / single, 2) if single else None
    if args.json:
        print(json.dumps({"model": model, "tokens_per_client": args.tokens, "rounds": rows}, indent=2))
    else:
        print(f"{model}, {args.tokens} tokens per client")
        print(f"{'clients':>7} {'agg tok/s':>10} {'x single':>9} {'TTFT p50':>9} {'TTFT p95':>9}")
        for r in rows:
            print(f"{r['clients']:>7} {r['aggregate_tok_s']:>10.1f} {r['vs_single']:>9.2f} "
                  f"{r['ttft_p50_s']:>8.2f}s {r['ttft_p95_s']:>8.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
