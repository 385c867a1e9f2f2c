"""A llamadesk server on 127.0.0.1: in a thread of the test process, or as its own process."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time

import httpx

from app.serve import ServeOptions, make_server
from app.serve.app import Served

MODEL = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(served: Served, **opts):
    """A uvicorn server for `served` in a thread; yields its base URL."""
    options = ServeOptions(port=free_port(), **opts)
    server = make_server(served, options)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"{'https' if options.tls_cert else 'http'}://127.0.0.1:{options.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def start_serve(home, *flags, env_extra=None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "LLAMADESK_API_KEY"} | {"LLAMADESK_HOME": str(home)}
    return subprocess.Popen([sys.executable, "-m", "app.cli", "serve", *flags], env=env | (env_extra or {}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@contextlib.contextmanager
def serve_process(home, *flags):
    """A server process on a free port, up (its /health answers); killed if the test left it."""
    port = free_port()
    proc = start_serve(home, "--port", str(port), "--model", MODEL, *flags)
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
