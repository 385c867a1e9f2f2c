"""`chat --plain` as a session object over a stand-in engine (words are tokens), then by process
on the real model: Ollama's commands, multi-line prompts, stop strings, the context overflowing,
the history."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from app.history import History
from app.plain_chat import PlainChat
from model.generate import SamplingParams


@dataclass
class Stats:
    prompt_tokens: int = 0
    new_tokens: int = 0


@dataclass
class Entry:
    ref: str = "fake:int4"


@dataclass
class WordEngine:
    """Replies with `reply` one word at a time; a word is a token, a message costs 4 more. Stops at
    the context's end as the real engine does."""

    ctx: int = 64
    reply: str = "one two three"
    entry: Entry = field(default_factory=Entry)
    seen: list = field(default_factory=list)
    last: Stats = field(default_factory=Stats)

    def prompt_ids(self, messages):
        return [0] * sum(len(m["content"].split()) + 4 for m in messages)

    def stream(self, messages, params, max_tokens, cancel):
        self.seen.append((messages, params, max_tokens))
        self.last = Stats(prompt_tokens=len(self.prompt_ids(messages)))
        for word in self.reply.split():
            if cancel.is_set() or self.last.new_tokens >= max_tokens or \
                    self.last.prompt_tokens + self.last.new_tokens >= self.ctx:
                return
            self.last.new_tokens += 1
            yield word + " "


def session(tmp_path, engine=None, **kw):
    engine = engine or WordEngine()
    notices, out = [], io.StringIO()
    chat = PlainChat(lambda n: engine if n is None else WordEngine(ctx=n), SamplingParams(temperature=0),
                     history=History(tmp_path / "h.sqlite3"), say=notices.append, out=out, **kw)
    return chat, engine, notices, out


def test_commands_set_and_show_parameters_like_ollama(tmp_path):
    chat, engine, notices, out = session(tmp_path)
    chat.run(iter(["/set parameter temperature 0.3\n", "/set parameter top_k 40\n", "/set parameter top_p 0.8\n",
                   "/set parameter repeat_penalty 1.1\n", "/set parameter repeat_last_n 64\n",
                   "/set parameter seed 7\n", "/set parameter num_predict 2\n", "/set system Be brief.\n",
                   "/show parameters\n", "/show system\n", "/set parameter temperature nan\n",
                   "/set parameter top_k many\n", "/set parameter bogus 1\n", "/nonsense\n", "hello\n"]))
    p = chat.params
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.repeat_last_n, p.seed) == (0.3, 40, 0.8, 1.1, 64, 7)
    shown = out.getvalue()
    assert "temperature     0.3" in shown and "repeat_last_n   64" in shown and "Be brief." in shown
    assert any("Couldn't set parameter: temperature" in n for n in notices)
    assert "Couldn't set parameter: top_k takes a whole number, not 'many'" in notices
    assert any("Unknown parameter 'bogus'" in n for n in notices)
    assert any("Unknown command '/nonsense'" in n for n in notices)
    messages, params, max_tokens = engine.seen[-1]
    assert messages[0] == {"role": "system", "content": "Be brief."} and max_tokens == 2
    assert out.getvalue().endswith("one two \n")


def test_num_ctx_reloads_the_model_and_bye_quits(tmp_path):
    chat, engine, notices, out = session(tmp_path)
    chat.run(iter(["/set parameter num_ctx 128\n", "/bye\n", "never sent\n"]))
    assert chat.engine.ctx == 128 and engine.seen == []


def test_a_refused_num_ctx_keeps_the_loaded_context_and_the_chat_goes_on(tmp_path):
    from app.errors import UserError

    def load(n):
        if n is not None and n > 100:
            raise UserError(f"fake was trained for at most 100 tokens, not {n}")
        return WordEngine(ctx=n or 64)

    notices, out = [], io.StringIO()
    chat = PlainChat(load, SamplingParams(temperature=0), history=History(tmp_path / "h.sqlite3"),
                     say=notices.append, out=out)
    chat.run(iter(["/set parameter num_ctx 999999\n", "/show parameters\n", "hello\n"]))
    assert any("Couldn't set parameter: num_ctx '999999': fake was trained" in n for n in notices)
    assert chat.engine.ctx == 64 and "num_ctx         64" in out.getvalue()
    assert out.getvalue().endswith("one two three \n")


def test_triple_quotes_make_one_multi_line_prompt(tmp_path):
    chat, engine, notices, out = session(tmp_path)
    chat.run(iter(['"""first line\n', "second line\n", 'third"""\n', '"""one line"""\n']))
    assert [m[0][-1]["content"] for m in engine.seen] == ["first line\nsecond line\nthird", "one line"]


def test_a_stop_string_ends_the_reply_and_is_not_shown(tmp_path):
    chat, engine, notices, out = session(tmp_path, WordEngine(reply="alpha beta gamma delta"))
    chat.run(iter(["/set parameter stop gam\n", "go\n"]))
    assert out.getvalue() == "alpha beta "
    assert chat.messages[-1] == {"role": "assistant", "content": "alpha beta "}


def test_the_oldest_turns_go_with_a_notice_and_a_cut_reply_is_said(tmp_path):
    engine = WordEngine(ctx=64, reply=" ".join(f"w{i}" for i in range(80)))
    chat, _, notices, out = session(tmp_path, engine)
    chat.run(iter([f"question {i} " + "pad " * 10 + "\n" for i in range(4)]))
    assert len(engine.seen) == 4  # every line answered: nothing ended the session
    assert any("the reply was cut: the 64-token context is full" in n for n in notices)
    assert any("the oldest" in n and "left out" in n for n in notices)
    assert engine.seen[-1][0][0]["content"].startswith("question 3")  # only the newest turn fits
    saved = chat.history.messages(chat.conversation_id)
    assert [m.role for m in saved] == ["user", "assistant"] * 4  # the whole chat is in the history
    assert saved[1].model == "fake:int4"


def test_a_prompt_too_long_for_the_context_is_refused_and_the_session_goes_on(tmp_path):
    chat, engine, notices, out = session(tmp_path)
    chat.run(iter(["word " * 100 + "\n", "short\n"]))
    assert any(n.startswith("llamadesk: not sent:") for n in notices)
    assert len(engine.seen) == 1 and engine.seen[0][0][-1]["content"] == "short"


def test_clear_forgets_the_conversation_and_starts_a_new_chat(tmp_path):
    chat, engine, notices, out = session(tmp_path)
    chat.run(iter(["first\n", "/clear\n", "second\n"]))
    assert [m["content"] for m in engine.seen[-1][0]] == ["second"]
    assert [c.title for c in chat.history.conversations()] == ["second", "first"]


def test_a_saved_chat_keeps_the_sampling_it_ran_at(tmp_path):
    """Reopened in the app, a `chat --plain` conversation runs as it did: its settings are the
    session's (the model's suggested temperature, /set parameter), not ChatSettings' generic 0.7."""
    chat, engine, notices, out = session(tmp_path, system="Be brief.")
    chat.params = SamplingParams(temperature=0.2, top_p=0.8, top_k=20, repetition_penalty=1.05, repeat_last_n=32)
    chat.run(iter(["/set parameter top_k 7\n", "hello\n"]))
    settings = chat.history.conversations()[0].settings
    assert (settings.system, settings.temperature, settings.top_p, settings.top_k, settings.repeat_penalty,
            settings.repeat_last_n) == ("Be brief.", 0.2, 0.8, 7, 1.05, 32)
    assert settings.sampling_params() == engine.seen[-1][1]
    # a /set after the chat began is kept with it too
    chat.run(iter(["/set parameter temperature 0.9\n", "/set system Be long.\n"]))
    settings = chat.history.conversations()[0].settings
    assert (settings.system, settings.temperature, settings.top_k) == ("Be long.", 0.9, 7)


@pytest.mark.e2e
def test_chat_plain_at_a_small_context_keeps_going_and_says_so(default_home, tmp_path):
    env = dict(os.environ, LLAMADESK_HOME=str(default_home))
    lines = "".join(f"Tell me a long story about dragon number {i}.\n" for i in range(4)) + "/bye\n"
    r = subprocess.run([sys.executable, "-m", "app.cli", "chat", "--plain", "--ctx", "256", "--temperature", "0"],
                       input=lines, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "the reply was cut: the 256-token context is full" in r.stderr
    assert "left out of this reply" in r.stderr
    assert ">>>" not in r.stdout  # piped: the replies alone
    assert len([line for line in r.stdout.splitlines() if line.strip()]) >= 4
