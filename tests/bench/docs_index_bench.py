"""Indexing bench: `llamadesk docs add` over a made-up corpus of many text files, then `docs update`.

    python tests/bench/docs_index_bench.py                      10,000 files, 100 MB (the issue's size)
    python tests/bench/docs_index_bench.py --files 1000 --mb 10  a quick look

It writes the corpus (words from Python's documentation topics, in paragraphs under headings, seeded
so every run writes the same files) to a temporary folder, runs `docs add` as a user would (its own
process: wall time and peak RSS), measures the index against the text, touches one file and times
`docs update`'s own work (in this process, Python's start-up left out) and the whole command.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def write_corpus(folder: Path, files: int, total_bytes: int, seed: int = 0) -> int:
    """`files` Markdown files of about total_bytes / files bytes each; returns the bytes written."""
    from pydoc_data.topics import topics

    words = re.findall(r"[A-Za-z]{3,}", " ".join(topics.values()))
    rng = random.Random(seed)
    per_file = total_bytes // files
    written = 0
    for i in range(files):
        parts, size = [], 0
        while size < per_file:
            if not parts or rng.random() < 0.15:
                head = f"## {' '.join(rng.choices(words, k=4)).capitalize()}\n"
                parts.append(head)
                size += len(head) + 1
            lines = [" ".join(rng.choices(words, k=12)) for _ in range(rng.randint(2, 8))]
            para = "\n".join(lines) + "\n"
            parts.append(para)
            size += len(para) + 1
        text = "\n".join(parts)[:per_file]
        sub = folder / f"d{i // 500:02d}"
        sub.mkdir(exist_ok=True)
        (sub / f"note{i:05d}.md").write_text(text, encoding="utf-8")
        written += len(text.encode("utf-8"))
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--mb", type=float, default=100.0, help="total text, in MB (10^6 bytes)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home, corpus = Path(tmp) / "home", Path(tmp) / "corpus"
        corpus.mkdir()
        t0 = time.perf_counter()
        text_bytes = write_corpus(corpus, args.files, int(args.mb * 1e6))
        print(f"corpus: {args.files} files, {text_bytes / 1e6:.1f} MB written in {time.perf_counter() - t0:.1f} s")

        env = dict(os.environ, LLAMADESK_HOME=str(home))
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "app.cli", "docs", "add", "bench", str(corpus)], cwd=ROOT,
                           env=env, capture_output=True, text=True)
        add_s = time.perf_counter() - t0
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB
        if r.returncode:
            print(r.stderr)
            return 1
        print(r.stdout.splitlines()[0])
        db = home / "docs.sqlite3"
        index_bytes = sum(p.stat().st_size for p in home.glob("docs.sqlite3*"))
        print(f"docs add: {add_s:.1f} s wall, peak RSS {peak_kib / 1024:.0f} MiB; index {index_bytes / 1e6:.1f} MB "
              f"= {index_bytes / text_bytes:.2f}x the text ({db.name} and its WAL)")

        one = next(corpus.rglob("note00042.md"))
        with open(one, "a", encoding="utf-8") as f:
            f.write("\nOne more line about llamas.\n")
        os.environ["LLAMADESK_HOME"] = str(home)
        from app.docs import DocsIndex

        t0 = time.perf_counter()
        with DocsIndex() as index:
            s = index.update("bench")
        own_s = time.perf_counter() - t0
        print(f"docs update after touching one file: {own_s:.2f} s of its own work "
              f"({s.changed} changed, {s.unchanged} unchanged)")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "app.cli", "docs", "update", "bench"], cwd=ROOT, env=env,
                       capture_output=True, check=True)
        print(f"llamadesk docs update (nothing changed), whole command: {time.perf_counter() - t0:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
