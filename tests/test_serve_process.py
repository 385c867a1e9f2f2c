"""`llamadesk serve` as its own process: refusing a public bind without a key, and SIGTERM."""
from __future__ import annotations

import json
import signal
import socket
import time

import httpx
import pytest
from serve_helpers import MODEL, free_port, serve_process, start_serve


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10"])
def test_public_bind_without_a_key_refuses_to_start(tmp_path, host):
    proc = start_serve(tmp_path, "--host", host, "--port", str(free_port()))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert err.strip().count("\n") == 0 and err.startswith("llamadesk: error: refusing to listen on")
    assert "LLAMADESK_API_KEY" in err


def test_the_key_never_comes_from_argv(tmp_path):
    proc = start_serve(tmp_path, "--api-key", "s3cret")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "unrecognized arguments" in err


def test_serve_docs_refuses_a_collection_that_is_not_there(tmp_path):
    proc = start_serve(tmp_path, "--docs", "nope", "--port", str(free_port()))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and err.count("\n") == 1 and err.startswith("llamadesk: error: ")
    assert "nope" in err


def test_an_empty_key_file_is_refused(tmp_path):
    empty = tmp_path / "key"
    empty.write_text("\n")
    proc = start_serve(tmp_path, "--host", "0.0.0.0", "--api-key-file", str(empty))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "empty" in err


@pytest.mark.e2e
def test_a_port_in_use_is_one_line_before_the_model_loads(default_home):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = start_serve(default_home, "--port", str(port), "--model", MODEL)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Serving" not in out
    assert err == f"llamadesk: error: could not listen on 127.0.0.1:{port} (Address already in use)\n"


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_sigterm_finishes_the_stream_in_flight_then_exits_0(default_home):
    with serve_process(default_home, "--ctx", "1024") as (proc, port):
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}],
                "max_tokens": 40, "temperature": 0, "stream": True}
        events = []
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if len(events) == 3:
                    proc.send_signal(signal.SIGTERM)
                    time.sleep(0.5)
                    with pytest.raises(httpx.TransportError):  # no longer accepting
                        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=30) == 0
        assert "Server stopped." in proc.stderr.read()


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_sigterm_cancels_what_is_still_running_after_10_s(default_home):
    with serve_process(default_home, "--ctx", "4096") as (proc, port):
        # greedy counting goes on for thousands of tokens (~100 s here): longer than the grace
        body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 4000, "temperature": 0, "stream": True}
        events = []
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            events = [line[6:] for line in lines if line.startswith("data: ")]
        assert 9 < time.monotonic() - t0 < 15
        # the stream is ended, not cut: a finish chunk, then [DONE]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"  # cut short, in OpenAI's words
        assert proc.wait(timeout=30) == 0
        err = proc.stderr.read()
        assert "Traceback" not in err and "ERROR" not in err and "Server stopped." in err
        assert "POST /v1/completions 200" in err and "finish=cancelled" in err
