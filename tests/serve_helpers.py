"""A llamadesk server in a thread of the test process, on 127.0.0.1."""
from __future__ import annotations

import contextlib
import socket
import threading
import time

from app.serve import ServeOptions, make_server
from app.serve.app import Served


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
