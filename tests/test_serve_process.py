"""`llamadesk serve` as its own process: refusing a public bind without a key, and SIGTERM."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from serve_helpers import free_port

MODEL = "smollm2-135m-instruct"


def _serve(home, *flags, env_extra=None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "LLAMADESK_API_KEY"} | {"LLAMADESK_HOME": str(home)}
    return subprocess.Popen([sys.executable, "-m", "app.cli", "serve", *flags], env=env | (env_extra or {}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10"])
def test_public_bind_without_a_key_refuses_to_start(tmp_path, host):
    proc = _serve(tmp_path, "--host", host, "--port", str(free_port()))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert err.strip().count("\n") == 0 and err.startswith("llamadesk: error: refusing to listen on")
    assert "LLAMADESK_API_KEY" in err


def test_the_key_never_comes_from_argv(tmp_path):
    proc = _serve(tmp_path, "--api-key", "s3cret")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "unrecognized arguments" in err


def test_an_empty_key_file_is_refused(tmp_path):
    empty = tmp_path / "key"
    empty.write_text("\n")
    proc = _serve(tmp_path, "--host", "0.0.0.0", "--api-key-file", str(empty))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "empty" in err


@contextlib.contextmanager
def _running(home, *flags):
    """A server process on a free port, up (its /health answers); killed if the test left it."""
    port = free_port()
    proc = _serve(home, "--port", str(port), "--model", MODEL, *flags)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_sigterm_finishes_the_stream_in_flight_then_exits_0(default_home):
    with _running(default_home, "--ctx", "1024") as (proc, port):
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
    with _running(default_home, "--ctx", "4096") as (proc, port):
        # greedy counting goes on for thousands of tokens (~100 s here): longer than the grace
        body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 4000, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            with pytest.raises(httpx.TransportError):  # cut off, without [DONE]
                for line in lines:
                    assert line != "data: [DONE]"
        assert proc.wait(timeout=30) == 0
        assert 9 < time.monotonic() - t0 < 25
