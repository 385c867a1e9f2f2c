"""The chat app against a running OpenAI-compatible server (llama.cpp's, llama-cpp-python's,
Ollama, vLLM, another llamadesk): a check to run by hand where such a server runs, not in CI.

    python tests/bench/remote_app_check.py URL [MODEL]

Drives the app through Textual's Pilot in a throw-away home: the status line once the model is
picked, a short greedy answer, then a long one stopped with Esc after its first words (how long
the stream took to end, and what was kept). Prints one line per step.
"""
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["LLAMADESK_HOME"] = tempfile.mkdtemp(prefix="llamadesk-remote-check-")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' Pilot helpers
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from app.history import ChatSettings  # noqa: E402
from app.remote import Remote  # noqa: E402
from app.tui import ChatApp  # noqa: E402
from app.tui.widgets.status import StatusLine  # noqa: E402
from test_tui import SIZE, notices, replies, send, until  # noqa: E402


async def check(url: str, model: str | None) -> None:
    app = ChatApp(model, ChatSettings(temperature=0.0, max_tokens=300), remote=Remote.connect(url), memory=None)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.chat.model is not None or notices(app), 60)
        await pilot.pause(0.2)
        print("status:", str(app.chat.query_one(StatusLine).render()).strip())
        for line in notices(app):
            print("notice:", line)
        await send(pilot, "What is the capital of France?")
        await until(pilot, lambda: app.chat.reply is None and replies(app), 300)
        print("answer:", replies(app)[0].content.replace("\n", " ")[:160])
        await send(pilot, "Write a long story about a dragon who learns to bake bread.")
        await until(pilot, lambda: len(replies(app)) == 2 and len(replies(app)[1].content) > 20, 300)
        t0 = time.monotonic()
        await pilot.press("escape")
        await until(pilot, lambda: app.chat.reply is None, 60)
        kept = app.history.messages(app.chat.conversation.id)[-1]
        print(f"esc: the stream ended {time.monotonic() - t0:.2f} s after Esc; kept {len(kept.content.split())} "
              f"words, stopped={kept.stopped}, ran_on={kept.meta.get('ran_on')}")
        print("status:", str(app.chat.query_one(StatusLine).render()).strip())


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    asyncio.run(check(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else None))
