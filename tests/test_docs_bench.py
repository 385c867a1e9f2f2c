"""The retrieval bench's hard bounds (tests/bench/docs_bench.py prints the figures)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "bench"))

from docs_bench import QUESTIONS, avoids_topic, run_bench  # noqa: E402


def test_the_question_set_is_what_the_issue_asks_for():
    spec = json.loads(QUESTIONS.read_text(encoding="utf-8"))
    questions = spec["questions"]
    assert len(questions) >= 50 and len(spec["off_corpus"]) >= 20
    assert sum(avoids_topic(q["q"], q["topics"][0]) for q in questions) * 2 >= len(questions)
    from pydoc_data.topics import topics

    for q in questions:  # every answer's fact is in its main topic: the ground truth is true
        assert q["fact"].lower() in topics[q["topics"][0]].lower(), q


def test_recall_at_3_and_no_source_found_off_corpus(tmp_path):
    r = run_bench(tmp_path)
    print(f"recall@3 {r.recall_at_3:.3f}, MRR {r.mrr:.3f}, no source off-corpus {r.no_source_rate:.1%}")
    assert r.recall_at_3 >= 0.8
    assert r.no_source_rate >= 0.8
