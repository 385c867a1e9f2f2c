"""`llamadesk serve`: the OpenAI- and Ollama-compatible HTTP server over one loaded model.

    serve(ServeOptions(...))   check the options, bind, load the planned model, run uvicorn until SIGTERM

Rooms: scheduler.py (the only code that touches the model: slots, queue, the batched-decoder
seam), params.py (each API's fields onto sampling), app.py (routes, guards, errors),
openai_api.py and ollama_api.py (the two APIs' shapes).
"""
from __future__ import annotations

import ipaddress
import os
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

__all__ = ["DEFAULT_PORT", "ServeOptions", "serve", "check_options", "is_loopback", "read_api_key", "listen_socket",
           "load_served", "make_server"]

DEFAULT_PORT = 8462
GRACE_S = 10.0
# uvicorn's own cancel of what still runs, this long after ours (Served.cancel_after): only a
# backstop, for a handler that our cancel does not end
BACKSTOP_S = 5.0


# A server's default: llama.cpp's 8-bit rounding of activations (ServeOptions.activation_bits)
DEFAULT_ACTIVATION_BITS = 8


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    model: str | None = None
    parallel: int = 4
    queue: int = 16
    ctx: int | None = None
    kv_dtype: str = "auto"
    threads: int | None = None
    api_key_file: Path | None = None
    cors_origins: list[str] = field(default_factory=list)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    keep_alive_s: float | None = 300.0  # idle time before the model is unloaded; None: never
    docs: list[str] = field(default_factory=list)  # collections chat requests answer from; none unless named
    # what prompts and the CPU step round activations to (Engine.set_activation_bits): 8, llama.cpp's rounding
    # (a batched step of 4 requests ~10-25% shorter: with it 4 clients got 2.6-2.85x one client's
    # tokens/s, with 15 bits 1.85-2.8x; docs/BENCHMARKS.md), or 15, the chat's accuracy; None: not
    # asked for, so DEFAULT_ACTIVATION_BITS, and nothing said where no compiled step takes it
    activation_bits: int | None = None


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and the name localhost; any other address or name reaches the network."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_api_key(key_file: Path | None) -> str | None:
    """The key from --api-key-file (first line) or LLAMADESK_API_KEY; never from argv."""
    if key_file is not None:
        try:
            key = key_file.read_text(encoding="utf-8").strip().splitlines()[0:1]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{key_file}: cannot read the API key ({e.strerror or e})") from None
        if not key or not key[0].strip():
            raise UserError(f"{key_file}: the API key file is empty")
        return key[0].strip()
    key = os.environ.get("LLAMADESK_API_KEY", "").strip()
    return key or None


def check_options(opts: ServeOptions) -> str | None:
    """Refuse what must not start (a public bind without a key, half a TLS pair); the key."""
    key = read_api_key(opts.api_key_file)
    if not is_loopback(opts.host) and key is None:
        raise UserError(f"refusing to listen on {opts.host} without an API key: set LLAMADESK_API_KEY or "
                        f"pass --api-key-file (or bind 127.0.0.1 and use an SSH tunnel)")
    if bool(opts.tls_cert) != bool(opts.tls_key):
        raise UserError("--tls-cert and --tls-key go together")
    for path in (opts.tls_cert, opts.tls_key):
        if path is not None and not path.is_file():
            raise UserError(f"{path}: no such file")
    if not 0 < opts.port < 65536:
        raise UserError(f"--port must be between 1 and 65535, got {opts.port}")
    if opts.parallel < 1 or opts.queue < 0:
        raise UserError("--parallel must be at least 1 and --queue at least 0")
    if opts.activation_bits not in (None, 8, 15):
        raise UserError(f"--activation-bits must be 8 or 15, got {opts.activation_bits}")
    if opts.docs:
        from ..docs.index import DocsIndex, check_name

        opts.docs = list(dict.fromkeys(check_name(n) for n in opts.docs))
        with DocsIndex() as index:
            for name in opts.docs:
                index.require(name)
    return key


def load_served(opts: ServeOptions, key: str | None, say=None, engine=None):
    """Load the model (unless an `engine` is given) and start its scheduler."""
    from ..engine import Engine
    from .app import Served
    from .scheduler import EngineRows, Scheduler

    def with_bits(engine):
        bits = opts.activation_bits or DEFAULT_ACTIVATION_BITS
        if engine.set_activation_bits(bits) is None and opts.activation_bits is not None and say:
            say(Engine.activation_bits_unused(opts.activation_bits))
        return engine

    def load(name: str | None):
        return with_bits(Engine.load(name, ctx=opts.ctx, say=say, threads=opts.threads, kv_dtype=opts.kv_dtype,
                                     slots=opts.parallel))

    scheduler = Scheduler(None, opts.parallel, opts.queue)
    try:  # on the scheduler's thread, which decodes (Scheduler.call says why)
        rows = scheduler.call(lambda: EngineRows(with_bits(engine) if engine else load(opts.model), opts.parallel))
    except BaseException:
        # a model that could not load, or Ctrl-C while it loads: then the load, which cannot be
        # stopped, ends first (a process that exits under it aborts in C++: "terminate called")
        scheduler.close(grace_s=0, join_s=None)
        raise
    scheduler.replace(rows)
    return Served(rows.engine, scheduler, api_key=key, cors_origins=list(opts.cors_origins), loader=load,
                  keep_alive_s=opts.keep_alive_s, docs=list(opts.docs))


def make_server(served, opts: ServeOptions):
    """A uvicorn server for `served`: graceful shutdown waits GRACE_S for in-flight requests, then
    cancels their generations, whose replies end as a finished one does."""
    import asyncio

    import uvicorn

    from .app import build_app

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            cancel = asyncio.get_running_loop().create_task(served.cancel_after(GRACE_S))
            try:
                await super().shutdown(sockets)
            finally:
                cancel.cancel()

    config = uvicorn.Config(build_app(served), host=opts.host, port=opts.port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=GRACE_S + BACKSTOP_S, lifespan="off",
                            ssl_certfile=str(opts.tls_cert) if opts.tls_cert else None,
                            ssl_keyfile=str(opts.tls_key) if opts.tls_key else None)
    return Server(config)


def listen_socket(opts: ServeOptions) -> socket.socket:
    """The bound socket uvicorn will listen on. Bound before the model loads, and before "Serving"
    is said: a port in use is one line at once, not uvicorn's log after a load."""
    ipv6 = ":" in opts.host
    sock = socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart binds over TIME_WAIT
    if ipv6:  # as uvicorn binds "::": IPv6 only
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    try:
        sock.bind((opts.host.strip("[]"), opts.port))
        # listening now, not when uvicorn starts: two sockets with SO_REUSEADDR may both bind a
        # port nobody listens on yet; early clients wait in the backlog while the model loads
        sock.listen(2048)
    except OSError as e:
        sock.close()
        host = f"[{opts.host.strip('[]')}]" if ipv6 else opts.host
        raise UserError(f"could not listen on {host}:{opts.port} ({e.strerror or e})") from None
    return sock


def serve(opts: ServeOptions, say=print) -> int:
    """Run until SIGTERM or Ctrl-C: then stop accepting, let in-flight requests finish for up to
    GRACE_S, cancel the rest and return 0."""
    from ..threads import settle_after_load

    key = check_options(opts)
    sock = listen_socket(opts)
    try:
        served = load_served(opts, key, say)
    except BaseException:
        sock.close()
        raise
    server = make_server(served, opts)
    settle_after_load()  # as the chat app does
    scheme = "https" if opts.tls_cert else "http"
    host = f"[{opts.host}]" if ":" in opts.host else opts.host
    bits = served.engine.step_activation_bits
    say(f"Serving {served.ref} ({served.engine.ctx}-token context, {opts.parallel} slots, queue {opts.queue}"
        f"{f', {bits}-bit activations' if bits else ''}) "
        f"on {scheme}://{host}:{opts.port} (OpenAI: /v1, Ollama: /api){'; API key required' if key else ''}")
    if opts.docs:
        say(f"Chats are answered from the collection(s) {', '.join(opts.docs)}: their passages go to every client")
    # uvicorn re-raises the signal it caught once it has shut down; a SIGTERM that ends a graceful
    # shutdown is a clean exit, not a death by signal
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    except SystemExit:  # uvicorn's answer to a server it cannot start
        pass
    finally:
        served.scheduler.close(grace_s=0)
    if not server.started:
        raise UserError(f"could not serve on {host}:{opts.port} (the log above says why)")
    say("Server stopped.")
    return 0
