"""`ask` and the chat app as clients of any OpenAI-compatible server: another llamadesk,
llama.cpp's server, Ollama, vLLM.

    remote = Remote.connect(url, key)        # url: http(s)://host:port, with or without /v1
    remote.models() -> ["name", ...]
    remote.context_length(model) -> int | None   # when the server says it
    for piece in remote.stream(messages, model, max_tokens, sampling, cancel): ...
    remote.last                              # usage and finish reason of that reply
    RemoteChat(remote, model)                # the chat screen's ChatModel over a server

Streams differ in small ways that this reader takes as they come: a role-only first chunk (with
content "", null or absent), the role repeated in every chunk (Ollama), usage in every chunk or
only in a last chunk with `choices: []` (include_usage), `timings` (llama.cpp), comments and
blank lines, then `data: [DONE]`. Whatever the server sends is text, never markup or a path.
"""
from __future__ import annotations

import json
import math
import os
import socket
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from .errors import UserError

ENV_URL = "LLAMADESK_REMOTE"
ENV_KEY = "LLAMADESK_REMOTE_KEY"
# Where a server does not say how long its context is, the app assumes this many tokens (a size
# current models and servers commonly hold; a smaller server answers with its own error, shown as
# one line) and counts CHARS_PER_TOKEN characters a token: English text runs about 4 in Llama-family
# vocabularies, code and other scripts fewer, so 3 errs towards trimming a turn too many rather
# than sending one the server cuts or refuses.
ASSUMED_CTX = 4096
CHARS_PER_TOKEN = 3.0
TOKENS_PER_MESSAGE = 4  # a chat format's header and end-of-turn around each message
CANCEL_POLL_S = 0.05  # how often a stream's watcher looks at its cancel event (Esc)


class RemoteError(UserError):
    """The server refused, failed or could not be reached; one line for the user."""


class Unreachable(RemoteError):
    """Nothing answered at the server's address (refused, timed out, no such host)."""


@dataclass
class RemoteReply:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    model: str | None = None


def remote_url(flag: str | None) -> str | None:
    """--remote, else LLAMADESK_REMOTE; None when neither is set (run the model here)."""
    return flag or os.environ.get(ENV_URL) or None


def read_key(key_file: Path | None) -> str | None:
    """The remote's API key: --api-key-file (first line; a file only its owner can read), else
    LLAMADESK_REMOTE_KEY."""
    if key_file is None:
        return os.environ.get(ENV_KEY, "").strip() or None
    try:
        mode = key_file.stat().st_mode
        lines = key_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{key_file}: cannot read the API key ({getattr(e, 'strerror', None) or e})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UserError(f"{key_file}: others can read this key file; run chmod 600 {key_file}")
    if not lines or not lines[0].strip():
        raise UserError(f"{key_file}: the API key file is empty")
    return lines[0].strip()


class Remote:
    def __init__(self, base: str, key: str | None = None, timeout_s: float = 600.0):
        import httpx

        self.base = base
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(base_url=base, headers=headers,
                                   timeout=httpx.Timeout(timeout_s, connect=10.0))
        self.last = RemoteReply()

    @classmethod
    def connect(cls, url: str, key: str | None = None) -> "Remote":
        """A client for `url` (http or https; a trailing /v1 is optional)."""
        return cls(api_base(url), key)

    def where(self) -> str:
        return urlsplit(self.base).netloc

    def models(self) -> list[str]:
        data = self._json(self._request("GET", "/models"))
        items = data.get("data") if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise RemoteError(f"{self.where()}: /v1/models did not answer with a list of models")
        return [m["id"] for m in items if isinstance(m, dict) and isinstance(m.get("id"), str)]

    def ollama_ps(self) -> list[dict]:
        """The models the server holds, from Ollama's /api/ps (llamadesk and Ollama answer it)."""
        r = self._request("GET", self.base[:-3] + "/api/ps")
        data = self._json(r)
        models = data.get("models") if isinstance(data, dict) else None
        if not isinstance(models, list):
            raise RemoteError(f"{self.where()}: /api/ps did not answer with a list of models")
        return [m for m in models if isinstance(m, dict)]

    def pick_model(self, wanted: str | None) -> str:
        """`wanted` if given, else the server's only model; several need --model."""
        if wanted:
            return wanted
        names = self.models()
        if len(names) == 1:
            return names[0]
        if not names:
            raise RemoteError(f"{self.where()} lists no models")
        raise UserError(f"{self.where()} serves {len(names)} models; pick one with --model: "
                        f"{', '.join(names[:10])}{' ...' if len(names) > 10 else ''}")

    def context_length(self, model: str) -> int | None:
        """The server's context for `model` in tokens, where it says: `max_model_len` in its
        /v1/models entry (vLLM, llamadesk), else llama.cpp's /props `n_ctx`. None: not reported
        (Ollama, LM Studio's /v1)."""
        data = self._json(self._request("GET", "/models"))
        listed = data.get("data") if isinstance(data, dict) else None
        for m in listed if isinstance(listed, list) else []:
            if isinstance(m, dict) and m.get("id") == model and _positive_int(m.get("max_model_len")):
                return m["max_model_len"]
        try:
            props = self.client.get(self.base[:-3] + "/props")
            settings = props.json().get("default_generation_settings") if props.status_code == 200 else None
        except Exception:  # any server but llama.cpp: no such route, or not JSON
            return None
        n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
        return n_ctx if _positive_int(n_ctx) else None

    def stream(self, messages: list[dict], model: str, max_tokens: int, sampling: dict | None = None,
               cancel: threading.Event | None = None) -> Iterator[str]:
        """Yield the reply's text as it streams; `self.last` holds usage and finish reason after.
        `sampling` holds OpenAI fields (see openai_sampling). Setting `cancel` (or closing the
        iterator) closes the connection, which stops the generation on servers that watch for it
        (llamadesk, llama.cpp, vLLM, Ollama)."""
        body = {"model": model, "messages": messages, "stream": True, "max_tokens": max_tokens,
                "stream_options": {"include_usage": True}, **(sampling or {})}
        self.last = reply = RemoteReply(model=model)
        import httpx

        ended = threading.Event()
        try:
            with self.client.stream("POST", "/chat/completions", json=body) as r:
                if r.status_code >= 400:
                    r.read()
                    raise RemoteError(self._failure(r))
                if cancel is not None:
                    threading.Thread(target=_hang_up_on, args=(cancel, ended, r), daemon=True).start()
                for data in sse_data(r.iter_lines()):
                    if cancel is not None and cancel.is_set():
                        return
                    if data == "[DONE]":
                        return
                    text = _read_chunk(data, reply, self.where())
                    if text:
                        yield text
        except httpx.HTTPError as e:
            if cancel is not None and cancel.is_set():
                return  # the read we broke off ourselves
            raise RemoteError(f"{self.where()}: {type(e).__name__}: {e}") from None
        finally:
            ended.set()

    def close(self) -> None:
        self.client.close()

    def _request(self, method: str, path: str, **kw):
        import httpx

        try:
            r = self.client.request(method, path, **kw)
        except httpx.HTTPError as e:
            # nothing answering is not the same as a server that answered badly or too slowly
            kind = Unreachable if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout)) else RemoteError
            raise kind(f"{self.where()}: cannot reach the server ({type(e).__name__}: {e})") from None
        if r.status_code >= 400:
            raise RemoteError(self._failure(r))
        return r

    def _json(self, r):
        try:
            return r.json()
        except ValueError:
            raise RemoteError(f"{self.where()}: the answer is not JSON") from None

    def _failure(self, r) -> str:
        """One line from an error response in OpenAI's shape, Ollama's, or plain text."""
        message = r.text
        try:
            err = r.json().get("error", message)
            message = err.get("message", err) if isinstance(err, dict) else err
        except (ValueError, AttributeError):
            pass
        first = " ".join(str(message).split())[:300]
        return f"{self.where()} answered {r.status_code}: {first}"


def api_base(url: str) -> str:
    """`url` as the base of its OpenAI API: scheme://host:port/path/v1. Raises UserError unless
    it is an http(s) URL."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UserError(f"--remote needs an http:// or https:// URL, got {url!r}")
    path = parts.path.rstrip("/")
    path = path[:-3] if path.endswith("/v1") else path
    return f"{parts.scheme}://{parts.netloc}{path}/v1"


def openai_sampling(params) -> dict:
    """The OpenAI fields of `params` (SamplingParams, or the app's ChatSettings: whatever has
    temperature, top_p and seed): those three. OpenAI's API has no top-k or repetition penalty:
    the chat app's settings always hold them, and the server's own apply."""
    fields = {"temperature": params.temperature, "top_p": params.top_p}
    return fields if params.seed is None else {**fields, "seed": params.seed}


def estimate_tokens(messages: list[dict]) -> int:
    """Tokens `messages` take, estimated without the server's tokenizer (see CHARS_PER_TOKEN)."""
    return sum(math.ceil(len(m["content"]) / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE for m in messages)


# ---------------------------------------------------------------- the chat app's model on a server
@dataclass(frozen=True)
class RemoteName:
    """A model as the chat screen names it: the server's name for it, no variant."""

    name: str
    variant: str = ""

    @property
    def ref(self) -> str:
        return self.name


@dataclass
class RemoteNumbers:
    """A remote reply's numbers as the chat screen reads them (app.tui.backend.ReplyNumbers)."""

    prompt_tokens: int = 0
    new_tokens: int = 0  # pieces received until the server reports its count at the end
    stopped: bool = False
    started: float = 0.0
    first_at: float | None = None

    @property
    def tokens_per_s(self) -> float:
        if self.first_at is None or self.new_tokens < 2:
            return 0.0
        return (self.new_tokens - 1) / max(time.monotonic() - self.first_at, 1e-6)


class RemoteChat:
    """A model on a server, as the chat screen's ChatModel: `device` says where it runs, `ctx` is
    the server's context or, when it reports none (`ctx_reported` False), ASSUMED_CTX; token
    counts are estimates (estimate_tokens) until the server reports its own."""

    def __init__(self, remote: Remote, model: str, ctx: int | None):
        self.remote = remote
        self.entry = RemoteName(model)
        self.device = f"on {remote.where()}"
        self.ctx_reported = ctx is not None
        self.ctx = ctx or ASSUMED_CTX
        self.last = RemoteNumbers()
        self._used = 0

    @classmethod
    def open(cls, remote: Remote, wanted: str | None) -> "RemoteChat":
        """`wanted` on `remote` (the server's only, or first, model when None). Network: call it
        from a worker. Raises RemoteError for a server that cannot be reached or lacks `wanted`."""
        names = remote.models()
        if not names:
            raise RemoteError(f"{remote.where()} lists no models")
        if wanted and wanted not in names:
            raise RemoteError(f"{remote.where()} has no model {wanted!r}; it serves "
                              f"{', '.join(names[:10])}{' ...' if len(names) > 10 else ''}")
        model = wanted or names[0]
        return cls(remote, model, remote.context_length(model))

    def count_tokens(self, messages: list[dict]) -> int:
        return estimate_tokens(messages)

    def stream(self, messages: list[dict], params, max_tokens: int, cancel: threading.Event) -> Iterator[str]:
        prompt = estimate_tokens(messages)
        self.last = numbers = RemoteNumbers(prompt_tokens=prompt, started=time.monotonic())
        try:
            for piece in self.remote.stream(messages, self.entry.name, max_tokens, openai_sampling(params), cancel):
                if numbers.first_at is None:
                    numbers.first_at = time.monotonic()
                numbers.new_tokens += 1
                yield piece
        finally:
            numbers.stopped = cancel.is_set()
            reported = self.remote.last
            if reported.prompt_tokens is not None:
                numbers.prompt_tokens = reported.prompt_tokens
            if reported.completion_tokens is not None:
                numbers.new_tokens = reported.completion_tokens
            self._used = numbers.prompt_tokens + numbers.new_tokens

    def context_used(self) -> int:
        return self._used


def sse_data(lines) -> Iterator[str]:
    """The `data:` payloads of a server-sent event stream, one per event (multi-line data joined)."""
    buf: list[str] = []
    for line in lines:
        if not line:
            if buf:
                yield "\n".join(buf)
                buf = []
            continue
        if line.startswith(":"):
            continue  # a comment (keep-alives)
        field, _, value = line.partition(":")
        if field == "data":
            buf.append(value[1:] if value.startswith(" ") else value)
    if buf:
        yield "\n".join(buf)


def _hang_up_on(cancel: threading.Event, ended: threading.Event, response) -> None:
    """Shut the stream's socket as soon as `cancel` is set: the reading thread may wait minutes
    for the next chunk (a long prompt's prefill), and closing the socket from here would not wake
    its recv(); shutdown does, and the server sees the client gone at once."""
    while not ended.wait(CANCEL_POLL_S):
        if cancel.is_set():
            stream = response.extensions.get("network_stream")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:  # already closed by the server
                    pass
            return


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _read_chunk(data: str, reply: RemoteReply, where: str) -> str:
    try:
        chunk = json.loads(data)
    except ValueError:
        raise RemoteError(f"{where}: the stream holds something that is not JSON") from None
    if not isinstance(chunk, dict):
        raise RemoteError(f"{where}: the stream holds something that is not a chunk")
    if "error" in chunk:
        err = chunk["error"]
        message = err.get("message", err) if isinstance(err, dict) else err
        raise RemoteError(f"{where}: {' '.join(str(message).split())[:300]}")
    usage = chunk.get("usage")
    if isinstance(usage, dict):  # the last one wins (some servers send it in every chunk)
        reply.prompt_tokens = usage.get("prompt_tokens", reply.prompt_tokens)
        reply.completion_tokens = usage.get("completion_tokens", reply.completion_tokens)
    if isinstance(chunk.get("model"), str):
        reply.model = chunk["model"]
    text = []
    for choice in chunk.get("choices") or []:
        if not isinstance(choice, dict) or choice.get("index", 0) != 0:
            continue
        if choice.get("finish_reason"):
            reply.finish_reason = choice["finish_reason"]
        delta = choice.get("delta") or {}
        if isinstance(delta.get("content"), str):
            text.append(delta["content"])
    return "".join(text)
