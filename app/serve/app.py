"""The ASGI app: routes of both APIs over one `Served` model, and the guards in front of them.

Guards, outermost first: CORS (only when origins are listed), the request log (method, path,
status, time and token counts: never prompt or reply text), the Host and Origin checks (403: no
DNS rebinding, no web page's requests but those of listed or loopback origins), the API key
(Bearer, compared in constant time), the body limit (4 MiB, 413). Errors keep each API's own
shape: OpenAI's `{"error": {"message", "type", "param", "code"}}` under /v1, Ollama's
`{"error": "..."}` elsewhere.
"""
from __future__ import annotations

import asyncio
import gc
import hmac
import json
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from model.chat_format import ChatTemplateError
from model.tokenizer import TokenizerError

from .. import store
from . import is_loopback
from .params import BadRequest, Sampling
from .scheduler import Job, QueueFull, Scheduler, ShuttingDown

MAX_BODY = 4 * 2**20


@dataclass
class Served:
    """What the server holds: the loaded engine (None while unloaded), its scheduler, and how it
    was started. `loader(name) -> Engine` loads another installed model on request (None: only
    this one is served); `keep_alive_s` unloads the model after that long idle (None: never)."""
    engine: object
    scheduler: Scheduler
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    log: object = None  # a callable taking one line; default: stderr
    loader: object = None
    keep_alive_s: float | None = None
    docs: list[str] = field(default_factory=list)  # collections chat requests answer from (serve --docs)
    last_used: float = field(default_factory=time.monotonic)
    _switching: asyncio.Event | None = None
    _watcher: asyncio.Task | None = None
    _jobs: list[Job] = field(default_factory=list)  # submitted here and maybe not finished (cancel_after)
    _past_grace: bool = False  # shutdown's grace is over: what is submitted now is cancelled at once

    @property
    def ref(self) -> str | None:
        return self.engine.entry.ref if self.engine is not None else None

    async def acquire(self, name, listing: str = "GET /v1/models") -> str:
        """Make the requested model (`name`, `name:variant`, `name:latest`) the loaded one; its ref.

        Names are looked up among the installed models, never opened as paths (unknown: 404, its
        message pointing to `listing`, the caller's API's list of models). A
        model that is not loaded replaces the loaded one once the requests in flight are done;
        requests arriving meanwhile wait for it. Returns with no await between the check and the
        caller's next synchronous steps, so the caller tokenizes and submits on this engine."""
        want = installed_name(name, listing)
        self._watch_idle()
        while True:
            if self._switching is not None:
                await self._switching.wait()
                continue
            if self.engine is not None and same_model(want, self.engine.entry):
                self.last_used = time.monotonic()
                return self.ref
            if self.loader is None:
                raise BadRequest(f"model {name!r} is installed but this server runs {self.ref}; "
                                 f"start `llamadesk serve --model {name}` for it", "model")
            await self.switch(want)

    async def switch(self, want: str | None) -> None:
        """Unload the model once idle, then load `want` (None: leave nothing loaded)."""
        self._switching = asyncio.Event()
        try:
            await asyncio.to_thread(self._switch_now, want)
        finally:
            done, self._switching = self._switching, None
            done.set()

    def _switch_now(self, want: str | None) -> None:
        from ..devices import release_freed_memory
        from ..errors import UserError
        from .scheduler import EngineRows

        while not self.scheduler.idle():
            time.sleep(0.02)
        self.scheduler.replace(None)
        self.engine = None
        gc.collect()
        release_freed_memory()  # the plan for the next model counts on what this one held
        if want is None:
            self.log("unloaded the model")
            return
        try:  # on the thread that decodes (Scheduler.call)
            rows = self.scheduler.call(lambda: EngineRows(self.loader(want), self.scheduler.parallel))
        except (UserError, MemoryError) as e:
            raise BadRequest(f"cannot load {want}: {e}", "model", status=500, code="load_failed") from None
        self.engine = rows.engine
        self.scheduler.replace(rows)
        self.log(f"loaded {self.ref}")

    def _watch_idle(self) -> None:
        if self._watcher is None and self.loader is not None:
            self._watcher = asyncio.get_running_loop().create_task(self._unload_when_idle())

    async def _unload_when_idle(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.keep_alive_s or 1.0))
            if self.engine is None or self._switching is not None or self.keep_alive_s is None:
                continue
            idle_s = time.monotonic() - max(self.last_used, self.scheduler.last_finished)
            if self.scheduler.idle() and idle_s >= self.keep_alive_s:
                await self.switch(None)

    def ground(self, messages: list[dict], max_tokens: int | None) -> tuple[list[dict], list[dict] | None]:
        """`messages` with the last user message quoting passages of the served collections, as
        the chat app quotes them, and their sources ({"n", "path", "line", "page"} each). Without
        `serve --docs`: unchanged, None. A client's `#NAME` picks among the served collections only.
        Runs on the event loop between `acquire` and `submit`: an FTS5 query takes milliseconds."""
        if not self.docs:
            return messages, None
        from ..context import reply_room
        from ..docs.attach import ground_chat

        tokenizer, ctx = self.engine.tokenizer, self.engine.ctx
        grounded, passages = ground_chat(messages, self.docs, "", ctx, reply_room(max_tokens or ctx, ctx),
                                         lambda text: len(tokenizer.encode(text, allowed_special=set())),
                                         taggable=self.docs)
        return grounded, None if passages is None else [p.to_dict() for p in passages]

    def prompt_budget(self, prompt: list[int], sampling: Sampling) -> int:
        """The max_tokens this prompt may use: what was asked, at most the context left."""
        room = self.engine.ctx - len(prompt)
        if room < 1:
            raise BadRequest(f"the prompt is {len(prompt)} tokens; the model's context holds {self.engine.ctx}",
                             "messages", code="context_length_exceeded")
        return min(sampling.max_tokens or room, room)

    async def submit(self, prompt: list[int], sampling: Sampling) -> Job:
        if not prompt:
            raise BadRequest("the prompt is empty", "prompt")
        job = Job(prompt, sampling.params, self.prompt_budget(prompt, sampling), sampling.stop)
        try:
            self.scheduler.submit(job)
        except QueueFull as e:
            raise Busy(e.retry_after) from None
        except ShuttingDown:
            raise BadRequest("the server is shutting down", status=503, code="shutting_down") from None
        self._jobs = [j for j in self._jobs if not j.finished] + [job]
        if self._past_grace:  # submitted after the grace ran out (it waited for a model, say): no time left
            job.cancel.set()
        return job

    async def cancel_after(self, grace_s: float) -> None:
        """Let this server's jobs run for up to `grace_s`, then cancel the rest: the worker ends
        each as it ends a disconnected client's, and its handler, still connected, closes the reply
        (finish "cancelled"). The server's shutdown runs this (make_server): uvicorn's own cancel
        would cut the replies mid-await instead, each logging a CancelledError traceback."""
        deadline = time.monotonic() + grace_s
        while any(not j.finished for j in self._jobs) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._past_grace = True
        for job in self._jobs:
            job.cancel.set()


def installed_name(name, listing: str) -> str:
    """`name` or `name:variant` of an installed model (`:latest` means the name alone)."""
    if not isinstance(name, str) or not name.strip():
        raise BadRequest(f"'model' must name a model ({listing} lists them)", "model")
    base, _, variant = name.strip().lower().partition(":")
    variant = "" if variant == "latest" else variant
    if not any(e.name == base and variant in ("", e.variant) for e in store.list_entries()):
        raise BadRequest(f"model {name!r} is not installed here ({listing} lists what is)", "model",
                         status=404, code="model_not_found")
    return f"{base}:{variant}" if variant else base


def same_model(want: str, entry) -> bool:
    base, _, variant = want.partition(":")
    return base == entry.name and variant in ("", entry.variant)


class Busy(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"every slot and queue place is taken; retry in {retry_after} s")
        self.retry_after = retry_after


async def job_events(job: Job, request: Request):
    """The job's events as they come; a client that goes away cancels the job (the worker stops
    it before its next step)."""
    try:
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                event = None
            if await request.is_disconnected():  # checked every token: a step's wait at most
                return
            if event is None:
                continue
            yield event
            if event[0] in ("done", "error"):
                return
    finally:
        if not job.finished:
            job.cancel.set()


def tokens_note(job: Job, finish: str) -> str:
    """The request log's counts for a generation: its tokens and how it ended, never its text."""
    return f" prompt={len(job.prompt)} completion={job.completion_tokens} finish={finish}"


def usage(job: Job) -> dict:
    return {"prompt_tokens": len(job.prompt), "completion_tokens": job.completion_tokens,
            "total_tokens": len(job.prompt) + job.completion_tokens}


async def json_body(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested thousands deep
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def error_response(request_path: str, status: int, message: str, param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    if request_path.startswith("/v1"):
        kind = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error",
                501: "not_implemented"}.get(status, "invalid_request_error" if status < 500 else "server_error")
        content = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    else:
        content = {"error": message}
    return JSONResponse(content, status_code=status, headers=headers)


# ---------------------------------------------------------------- guards (plain ASGI middleware)
class Guards:
    """Request log, API key and body limit in one pass over the ASGI call."""

    def __init__(self, app, served: Served):
        self.app, self.served = app, served
        self.key = served.api_key.encode() if served.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.monotonic()
        path = scope["path"]
        scope.setdefault("state", {})
        status = {}

        async def send_logged(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_logged, path)
        finally:
            tokens = scope["state"].get("tokens", "")
            self.served.log(f"{scope['method']} {path} {status.get('code', '-')} "
                            f"{(time.monotonic() - t0) * 1000:.0f}ms{tokens}")

    async def _guarded(self, scope, receive, send, path):
        headers = dict(scope["headers"])
        refused = self._refused(headers)
        if refused:
            return await error_response(path, 403, refused[0], code=refused[1])(scope, receive, send)
        if self.key is not None and path not in ("/health", "/"):  # probes: they say no more than "up"
            auth = headers.get(b"authorization", b"")
            scheme, _, given = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                return await error_response(path, 401, "a valid API key is needed (Authorization: Bearer KEY)",
                                            code="invalid_api_key",
                                            headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return await _too_large(path)(scope, receive, send)
        body = bytearray()
        more = scope["method"] in ("POST", "PUT", "PATCH")
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > MAX_BODY:
                return await _too_large(path)(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _refused(self, headers: dict) -> tuple[str, str] | None:
        """Why a request must not reach the model (message, code), or None.

        A page in a browser may send requests anywhere: one from an origin not listed by
        --cors-origin (nor on this machine) is refused before it costs a token. Without a key, a
        Host that is not a loopback name is refused too: a rebound DNS name of the attacker's
        would otherwise make our replies readable to their page. With a key the key guards,
        and a reverse proxy may pass its own Host."""
        host = headers.get(b"host", b"").decode("latin-1")
        if self.key is None and host and not is_loopback(_host_name(host)):
            return (f"Host {host!r} is refused: without an API key this server answers only localhost, "
                    f"127.0.0.1 and [::1] (serve with a key to answer other names)"), "host_not_allowed"
        origin = headers.get(b"origin", b"").decode("latin-1")
        if origin and not self._origin_allowed(origin, host):
            return (f"requests from {origin} are refused (allow a web page's origin with serve --cors-origin)",
                    "origin_not_allowed")
        return None

    def _origin_allowed(self, origin: str, host: str) -> bool:
        listed = self.served.cors_origins
        if "*" in listed or origin in listed:  # as CORSMiddleware matches them
            return True
        try:
            parts = urlsplit(origin)
        except ValueError:
            return False
        # a page on this machine, or one served from this very host (a proxy's same-origin page;
        # without a key the Host check above has already kept that to this machine)
        return parts.scheme in ("http", "https") and (is_loopback(parts.hostname or "")
                                                      or (bool(host) and parts.netloc.lower() == host.lower()))


def _host_name(host: str) -> str:
    """The name in a Host header: `[::1]:8462` -> `::1`, `localhost:8462` -> `localhost`."""
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _too_large(path: str) -> JSONResponse:
    return error_response(path, 413, f"the request body is over the {MAX_BODY // 2**20} MiB limit")


def _log_stderr(line: str) -> None:
    sys.stderr.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
    sys.stderr.flush()


def build_app(served: Served) -> Starlette:
    from . import ollama_api, openai_api

    served.log = served.log or _log_stderr

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": served.ref, **served.scheduler.counts()})

    async def root(request: Request) -> PlainTextResponse:
        # Ollama's "is it up" answer, which its clients probe before anything else
        return PlainTextResponse("llamadesk is running")

    async def on_bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return error_response(request.url.path, exc.status, str(exc), exc.param, exc.code)

    async def on_busy(request: Request, exc: Busy) -> JSONResponse:
        return error_response(request.url.path, 429, str(exc), code="server_busy",
                              headers={"Retry-After": str(exc.retry_after)})

    async def on_http(request: Request, exc) -> JSONResponse:
        return error_response(request.url.path, exc.status_code, exc.detail)

    async def on_prompt(request: Request, exc: Exception) -> JSONResponse:
        # the model's chat template refused the conversation (e.g. roles out of order)
        return error_response(request.url.path, 400, str(exc), "messages")

    async def on_failure(request: Request, exc: Exception) -> JSONResponse:
        served.log(f"error: {type(exc).__name__} in {request.url.path}")  # no request text
        return error_response(request.url.path, 500, f"internal error ({type(exc).__name__})")

    from starlette.exceptions import HTTPException

    routes = ([Route("/health", health), Route("/", root, methods=["GET", "HEAD"])]
              + openai_api.routes(served) + ollama_api.routes(served))
    middleware = []
    if served.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=served.cors_origins,
                                     allow_methods=["GET", "POST", "OPTIONS"],
                                     allow_headers=["Authorization", "Content-Type"]))
    middleware.append(Middleware(Guards, served=served))
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={BadRequest: on_bad_request, Busy: on_busy, HTTPException: on_http,
                                         ChatTemplateError: on_prompt, TokenizerError: on_prompt,
                                         Exception: on_failure})
