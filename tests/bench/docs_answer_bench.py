"""Answers with and without the collection: how often the default model's answer holds the fact.

    python tests/bench/docs_answer_bench.py [--model REF] [--ctx 2048] [--max-tokens 64] [--limit N]

The retrieval bench's questions (tests/bench/docs_questions.json) over the same pydoc-topics
collection, each asked twice, greedy: plainly, and grounded in the collection as `ask --docs` does.
An answer counts when it contains the question's `fact` (case-insensitive). Needs an installed
model (LLAMADESK_HOME); the collection is built in a temporary home of its own.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from docs_bench import QUESTIONS, build_corpus  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--limit", type=int, default=0, help="only the first N questions")
    args = parser.parse_args()

    from model.generate import SamplingParams

    from app.docs import DocsIndex
    from app.docs.attach import Grounds
    from app.docs.retrieve import passage_budget
    from app.engine import Engine

    engine = Engine.load(args.model, ctx=args.ctx)
    count = lambda text: len(engine.tokenizer.encode(text, allowed_special=set()))  # noqa: E731
    questions = json.loads(QUESTIONS.read_text(encoding="utf-8"))["questions"]
    questions = questions[: args.limit] if args.limit else questions
    greedy = SamplingParams(temperature=0.0)

    def answer(prompt: str) -> str:
        return "".join(engine.stream([{"role": "user", "content": prompt}], greedy, args.max_tokens,
                                     threading.Event()))

    with tempfile.TemporaryDirectory() as tmp:
        models_home = os.environ.get("LLAMADESK_HOME")
        home = Path(tmp) / "home"
        home.mkdir()
        if models_home:
            os.symlink(Path(models_home) / "models", home / "models")
        os.environ["LLAMADESK_HOME"] = str(home)
        corpus = Path(tmp) / "pydoc-topics"
        corpus.mkdir()
        build_corpus(corpus)
        with DocsIndex() as index:
            index.add("pydoc", [corpus])
        grounds = Grounds(["pydoc"])
        plain = grounded = 0
        t0 = time.perf_counter()
        for q in questions:
            fact = q["fact"].lower()
            a = answer(q["q"])
            prompt, _ = grounds.apply(q["q"], passage_budget(engine.ctx, args.max_tokens), count)
            b = answer(prompt)
            plain += fact in a.lower()
            grounded += fact in b.lower()
    n = len(questions)
    print(f"{engine.entry.ref}, ctx {engine.ctx}, {args.max_tokens} tokens greedy, {n} questions, "
          f"{time.perf_counter() - t0:.0f} s: fact in the answer without the collection {plain}/{n} "
          f"({plain / n:.0%}), with it {grounded}/{n} ({grounded / n:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
