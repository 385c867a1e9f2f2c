"""Retrieval bench: Python's own documentation topics as a collection, known questions against it.

    python tests/bench/docs_bench.py            recall@3, MRR, off-corpus "no source found" rate
    python tests/bench/docs_bench.py --verbose  and every question's rank

The corpus is built offline from `pydoc_data.topics`, one file per topic (`<topic>.txt`). The
questions (tests/bench/docs_questions.json) were written before any tuning; a hit is any of a
question's topics among the first three distinct files retrieved. tests/test_docs_bench.py holds
the hard bounds.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from app.docs import DocsIndex, search  # noqa: E402
from app.docs.retrieve import RELEVANCE_THRESHOLD, STOP_WORDS  # noqa: E402

QUESTIONS = Path(__file__).with_name("docs_questions.json")


@dataclass
class BenchResult:
    questions: int
    recall_at_3: float
    recall_at_3_kept: float  # the same, counting only passages that pass the relevance threshold
    mrr: float
    avoiding: int            # questions that use none of their topic's name or heading words
    recall_at_3_avoiding: float
    off_corpus: int
    no_source_rate: float
    ranks: list[tuple[str, int | None]]
    off_found: list[str]


def build_corpus(folder: Path) -> list[str]:
    """One `<topic>.txt` per pydoc topic in `folder`; returns the topic names."""
    from pydoc_data.topics import topics

    for name, text in topics.items():
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    return sorted(topics)


def topic_words(topic: str) -> set[str]:
    """The words of a topic's name and of its headings (reST-underlined lines; their stop words
    such as "the" do not count), lower case."""
    from pydoc_data.topics import topics

    lines = topics[topic].splitlines()
    heads = [lines[i - 1] for i in range(1, len(lines))
             if re.fullmatch(r"([=\-*~^])\1{2,}", lines[i].strip()) and lines[i - 1].strip()]
    words = {w for w in re.findall(r"[^\W_]+", " ".join(heads).lower()) if w not in STOP_WORDS}
    return {_stem(w) for w in words | set(re.findall(r"[^\W_]+", topic.lower()))}


def _stem(word: str) -> str:
    return word[:-1] if word.endswith("s") and len(word) > 3 else word


def avoids_topic(question: str, topic: str) -> bool:
    return not ({_stem(w) for w in re.findall(r"[^\W_]+", question.lower())} & topic_words(topic))


def run_bench(home: Path) -> BenchResult:
    spec = json.loads(QUESTIONS.read_text(encoding="utf-8"))
    corpus = home / "pydoc-topics"
    corpus.mkdir()
    build_corpus(corpus)
    with DocsIndex(home / "docs.sqlite3") as index:
        index.add("pydoc", [corpus])
        ranks: list[tuple[str, int | None]] = []
        kept_hits = avoiding_hits = avoiding = 0
        for item in spec["questions"]:
            files, kept = [], []
            for p in search(index, ["pydoc"], item["q"], limit=20, threshold=0.0):
                if p.path not in files:
                    files.append(p.path)
                    kept += [p.path] if p.relevance >= RELEVANCE_THRESHOLD else []
            rank = _rank(files, item["topics"])
            ranks.append((item["q"], rank))
            kept_rank = _rank(kept, item["topics"])
            kept_hits += kept_rank is not None and kept_rank <= 3
            if avoids_topic(item["q"], item["topics"][0]):
                avoiding += 1
                avoiding_hits += rank is not None and rank <= 3
        off_found = [q for q in spec["off_corpus"] if search(index, ["pydoc"], q)]
    n = len(ranks)
    return BenchResult(
        questions=n,
        recall_at_3=sum(1 for _, r in ranks if r is not None and r <= 3) / n,
        recall_at_3_kept=kept_hits / n,
        mrr=sum(1 / r for _, r in ranks if r is not None) / n,
        avoiding=avoiding,
        recall_at_3_avoiding=avoiding_hits / max(1, avoiding),
        off_corpus=len(spec["off_corpus"]),
        no_source_rate=1 - len(off_found) / len(spec["off_corpus"]),
        ranks=ranks,
        off_found=off_found,
    )


def _rank(files: list[str], topics: list[str]) -> int | None:
    """The 1-based place of the first file holding one of `topics`, None if absent."""
    return next((i + 1 for i, f in enumerate(files) if Path(f).stem in topics), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        r = run_bench(Path(tmp))
    if args.verbose:
        for q, rank in r.ranks:
            print(f"{rank if rank else '-':>3}  {q}")
        for q in r.off_found:
            print(f"off-corpus, yet a source: {q}")
    print(f"{r.questions} questions ({r.avoiding} avoid their topic's name and heading words): "
          f"recall@3 {r.recall_at_3:.3f} (avoiding: {r.recall_at_3_avoiding:.3f}; above the relevance "
          f"threshold: {r.recall_at_3_kept:.3f}), MRR {r.mrr:.3f}")
    print(f"{r.off_corpus} off-corpus questions: 'no source found' for {r.no_source_rate:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
