"""`ask --remote`: the CLI as a client of OpenAI-compatible servers.

The streams in tests/remote_streams/ are written in the exact shapes that llama.cpp's server,
Ollama's /v1 and vLLM send (a role-only first chunk with content null or "", the role in every
chunk, `timings`, a usage-only last chunk, an SSE comment, `[DONE]`), transcribed from their
public issue threads: those servers do not run on this machine. llama_cpp_python.sse is a real
recording from llama-cpp-python's server. A small HTTP server on
127.0.0.1 replays each one byte for byte; the last test runs against a real `llamadesk serve`.
"""
from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest

from app import cli
from app.errors import UserError
from app.remote import Remote, openai_sampling, read_key, sse_data
from model.generate import SamplingParams

STREAMS = Path(__file__).parent / "remote_streams"


class _Replay(http.server.BaseHTTPRequestHandler):
    stream: bytes = b""
    models: list[str] = []
    context: int | None = None  # the max_model_len /v1/models reports (vLLM's field), or none
    status = 200
    seen: list[dict] = []

    def do_GET(self):
        if self.path != "/v1/models":  # llama.cpp's /props, asked for its context: not this server
            self._send(404, "text/plain", b"Not Found")
            return
        extra = {"max_model_len": self.context} if self.context else {}
        body = json.dumps({"object": "list", "data": [{"id": m, "object": "model", **extra}
                                                      for m in self.models]}).encode()
        self._send(200, "application/json", body)

    def do_POST(self):
        length = int(self.headers.get("content-length", 0))
        type(self).seen.append({"path": self.path, "auth": self.headers.get("authorization"),
                                "body": json.loads(self.rfile.read(length))})
        if self.status != 200:
            self._send(self.status, "application/json",
                       json.dumps({"error": {"message": "model 'x' not found\nsecond line", "type": "x"}}).encode())
        else:
            self._send(200, "text/event-stream", self.stream)

    def _send(self, status, kind, body):
        self.send_response(status)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def replay():
    handler = type("Replay", (_Replay,), {"seen": [], "models": ["only-model"], "status": 200, "context": None})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("name, finish, model", [
    ("llamacpp", "stop", "SmolLM2-135M-Instruct-Q4_1.gguf"),
    ("ollama", "stop", "smollm2:135m"),
    ("vllm", "length", "HuggingFaceTB/SmolLM2-135M-Instruct"),
])
def test_recorded_streams_give_the_same_reply(replay, name, finish, model):
    handler, url = replay
    handler.stream = (STREAMS / f"{name}.sse").read_bytes()
    remote = Remote.connect(url + "/v1/", key="k3y")
    pieces = list(remote.stream([{"role": "user", "content": "colours?"}], "m", 32,
                                openai_sampling(SamplingParams(temperature=0.2, top_p=0.9, seed=3))))
    assert "".join(pieces) == "Red, green and blue é ✓"
    assert "" not in pieces  # role-only and finish chunks carry no text
    assert (remote.last.prompt_tokens, remote.last.completion_tokens) == (31, 7)
    assert remote.last.finish_reason == finish and remote.last.model == model
    sent = handler.seen[-1]
    assert sent["path"] == "/v1/chat/completions" and sent["auth"] == "Bearer k3y"
    assert sent["body"] == {"model": "m", "messages": [{"role": "user", "content": "colours?"}], "stream": True,
                            "max_tokens": 32, "stream_options": {"include_usage": True},
                            "temperature": 0.2, "top_p": 0.9, "seed": 3}


def test_a_stream_recorded_from_llama_cpp_pythons_server(replay):
    """Recorded from llama-cpp-python 0.3.36's server (`python -m llama_cpp.server`, the default
    model's Q4_1 GGUF, 2026-11-30): a role-only first chunk without content, `logprobs: null`
    in every chunk, and no usage chunk although include_usage was asked: the reply's token counts
    are unknown, never guessed."""
    handler, url = replay
    handler.stream = (STREAMS / "llama_cpp_python.sse").read_bytes()
    remote = Remote.connect(url + "/v1")
    text = "".join(remote.stream([{"role": "user", "content": "What is the capital of France?"}], "smollm2", 16))
    assert text == "L'Étoile, la Marseillaise. Paris is the capital"
    assert remote.last.finish_reason == "length" and remote.last.model == "smollm2"
    assert (remote.last.prompt_tokens, remote.last.completion_tokens) == (None, None)


def test_sse_reader_joins_multiline_data_and_skips_comments():
    lines = [": keep-alive", "", "event: message", "data: a", "data: b", "", "data:c", ""]
    assert list(sse_data(lines)) == ["a\nb", "c"]


def test_an_error_answer_is_one_line(replay):
    handler, url = replay
    handler.status = 404
    with pytest.raises(UserError) as e:
        list(Remote.connect(url).stream([{"role": "user", "content": "x"}], "x", 4))
    assert str(e.value) == f"{url[7:]} answered 404: model 'x' not found second line"


def test_the_only_model_is_picked_and_several_need_a_name(replay):
    handler, url = replay
    remote = Remote.connect(url)
    assert remote.pick_model(None) == "only-model"
    handler.models = ["a", "b"]
    with pytest.raises(UserError, match="pick one with --model: a, b"):
        remote.pick_model(None)


def test_bad_urls_and_keys_are_refused(tmp_path):
    with pytest.raises(UserError, match="http:// or https://"):
        Remote.connect("file:///etc/passwd")
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    key.chmod(0o644)
    with pytest.raises(UserError, match="chmod 600"):
        read_key(key)
    key.chmod(0o600)
    assert read_key(key) == "s3cret"


def test_ask_remote_from_the_environment(replay, monkeypatch, capsys):
    handler, url = replay
    handler.stream = (STREAMS / "llamacpp.sse").read_bytes()
    monkeypatch.setenv("LLAMADESK_REMOTE", url)
    assert cli.main(["ask", "colours?", "--temperature", "0", "-v"]) == 0
    out, err = capsys.readouterr()
    assert out == "Red, green and blue é ✓\n"
    assert "SmolLM2-135M-Instruct-Q4_1.gguf on 127.0.0.1" in err and "prompt 31 tokens, 7 tokens" in err
    assert handler.seen[-1]["body"]["model"] == "only-model"


def test_ask_remote_refuses_options_openai_lacks(replay, capsys):
    _, url = replay
    assert cli.main(["ask", "hi", "--remote", url, "--top-k", "40"]) == 1
    assert "--top-k, --repeat-penalty and --repeat-last-n are not part of the OpenAI API" in capsys.readouterr().err
    assert cli.main(["ask", "hi", "--remote", url, "--repeat-penalty", "1.1"]) == 1


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_ask_remote_against_llamadesk_serve(default_home, monkeypatch, capsys):
    from app.engine import Engine
    from app.serve.app import Served
    from app.serve.scheduler import EngineRows, Scheduler
    from serve_helpers import running

    monkeypatch.setenv("LLAMADESK_HOME", str(default_home))
    engine = Engine.load("smollm2-135m-instruct", ctx=1024, compile_kernel="never")
    scheduler = Scheduler(EngineRows(engine))
    try:
        with running(Served(engine, scheduler, log=lambda line: None)) as url:
            expected = "".join(engine.stream([{"role": "user", "content": "Name three colours."}],
                                             SamplingParams(temperature=0), 12))
            code = cli.main(["ask", "Name three colours.", "--remote", url, "--model", "smollm2-135m-instruct",
                             "--temperature", "0", "--max-tokens", "12", "-v"])
            out, err = capsys.readouterr()
            assert code == 0 and out == expected + "\n"
            assert "12 tokens, finish length" in err
    finally:
        scheduler.close(grace_s=0)
