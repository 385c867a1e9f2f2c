"""Ollama's API: /api/chat and /api/generate (NDJSON streams), /api/tags, /api/show, /api/ps,
/api/version; /api/pull, /api/delete and /api/embed(dings) are 501 (`llamadesk pull` and
`llamadesk rm` manage models; embeddings are not implemented). A chat answered from documents
(`serve --docs`) carries its `sources` in the final object, a field Ollama does not have."""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from model.args import ModelArgs

from .. import store
from .app import Served, error_response, job_events, json_body, tokens_note
from .params import (OLLAMA_DEFAULTS, OLLAMA_IGNORED_OPTIONS, OLLAMA_OPTIONS, BadRequest, parse_duration,
                     refuse_unsupported, sampling_from, stream_flag, unsupported)

# top-level fields each endpoint reads, and those that change nothing at their neutral value
CHAT_FIELDS = {"model", "messages", "stream", "options", "keep_alive"}
GENERATE_FIELDS = {"model", "prompt", "system", "raw", "stream", "options", "keep_alive"}
NEUTRAL = {"format": ("",), "tools": ([],), "images": ([],), "template": ("",), "context": ([],), "suffix": ("",),
           "think": (False,)}
ROLES = {"system", "user", "assistant"}
TAGS = "GET /api/tags"  # where an Ollama client finds the installed models


def routes(served: Served) -> list[Route]:
    async def chat(request: Request):
        body = await json_body(request)
        refuse_unsupported(unsupported(body, CHAT_FIELDS, NEUTRAL))
        messages = body.get("messages") or []
        if not isinstance(messages, list):
            raise BadRequest("'messages' must be a list")
        for i, m in enumerate(messages):
            if isinstance(m, dict) and (m.get("images") or m.get("tool_calls")):
                raise BadRequest(f"unsupported field: messages[{i}].{'images' if m.get('images') else 'tool_calls'}")
            # content left out is "" (Ollama's own reading; its client leaves empty fields out)
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content", ""), str):
                raise BadRequest(f"messages[{i}] needs a role ({', '.join(sorted(ROLES))}) and string content")
        keep_alive = _keep_alive(body)
        model = await served.acquire(body.get("model"), TAGS)
        if not messages:  # Ollama's way to load (or, with keep_alive 0, unload) a model
            return JSONResponse(await _load_only(served, model, keep_alive)
                                | {"message": {"role": "assistant", "content": ""}})
        _apply_keep_alive(served, keep_alive)
        messages = [{"role": m["role"], "content": m.get("content", "")} for m in messages]
        messages, sources = served.ground(messages, _max_tokens(body)) if served.docs else (messages, None)
        prompt = served.engine.prompt_ids(messages)
        return await _answer(served, request, body, model, prompt, "chat", sources)

    async def generate(request: Request):
        body = await json_body(request)
        refuse_unsupported(unsupported(body, GENERATE_FIELDS, NEUTRAL))
        text, system = body.get("prompt") or "", body.get("system") or ""
        if not isinstance(text, str) or not isinstance(system, str):
            raise BadRequest("'prompt' and 'system' must be strings")
        keep_alive = _keep_alive(body)
        model = await served.acquire(body.get("model"), TAGS)
        if not text:
            return JSONResponse(await _load_only(served, model, keep_alive) | {"response": ""})
        _apply_keep_alive(served, keep_alive)
        if body.get("raw"):
            prompt = served.engine.tokenizer.encode(text, allowed_special="all")
        else:
            prompt = served.engine.prompt_ids(([{"role": "system", "content": system}] if system else [])
                                              + [{"role": "user", "content": text}])
        return await _answer(served, request, body, model, prompt, "generate")

    async def tags(request: Request):
        return JSONResponse({"models": [_describe(e) for e in store.list_entries()]})

    async def show(request: Request):
        body = await json_body(request)
        name = body.get("model") or body.get("name")
        entry = _installed(name)
        args = ModelArgs.from_dict(entry.manifest["args"])
        info = {"general.architecture": "llama", "general.parameter_count": args.n_params,
                "llama.context_length": args.max_seq_len, "llama.embedding_length": args.dim,
                "llama.block_count": args.n_layers, "llama.attention.head_count": args.n_heads,
                "llama.attention.head_count_kv": args.n_kv_heads, "llama.vocab_size": args.vocab_size}
        template = served.engine.chat_format.template if served.engine is not None and entry.ref == served.ref else ""
        return JSONResponse({"modelfile": "", "parameters": "", "template": template, "license": "",
                             "details": _describe(entry)["details"], "model_info": info,
                             "capabilities": ["completion"], "modified_at": _modified(entry)})

    async def ps(request: Request):
        if served.engine is None:
            return JSONResponse({"models": []})
        entry = served.engine.entry
        plan = served.engine.plan
        size = sum(plan.bytes.values()) if plan is not None else entry.size_bytes
        on_gpu = str(served.engine.device).startswith("cuda")
        return JSONResponse({"models": [_describe(entry) | {
            "size": size, "size_vram": size if on_gpu else 0, "context_length": served.engine.ctx,
            "expires_at": _expires(served)}]})

    async def version(request: Request):
        from importlib.metadata import version as installed_version

        return JSONResponse({"version": installed_version("llamadesk")})

    async def not_here(request: Request):
        what = request.url.path.rsplit("/", 1)[-1]
        hint = {"pull": "use `llamadesk pull` on the server", "delete": "use `llamadesk rm` on the server"}
        return error_response(request.url.path, 501, f"/api/{what} is not implemented by llamadesk"
                              + (f"; {hint[what]}" if what in hint else ""))

    return [Route("/api/chat", chat, methods=["POST"]),
            Route("/api/generate", generate, methods=["POST"]),
            Route("/api/tags", tags, methods=["GET"]),
            Route("/api/show", show, methods=["POST"]),
            Route("/api/ps", ps, methods=["GET"]),
            Route("/api/version", version, methods=["GET"])] + [
            Route(f"/api/{what}", not_here, methods=["POST", "DELETE"])
            for what in ("pull", "push", "delete", "copy", "create", "embed", "embeddings")]


def _max_tokens(body: dict) -> int | None:
    options = body.get("options")
    if not isinstance(options, dict):
        return None
    return sampling_from({k: v for k, v in options.items() if k == "num_predict"}, OLLAMA_OPTIONS, OLLAMA_DEFAULTS,
                         "options.").max_tokens


def _keep_alive(body: dict) -> float | None | bool:
    """The request's keep_alive in seconds (None: forever); False when it does not set one."""
    value = body.get("keep_alive")
    if value is None:
        return False
    try:
        return parse_duration(value)
    except ValueError as e:
        raise BadRequest(f"keep_alive: {e}") from None


def _apply_keep_alive(served: Served, keep_alive) -> None:
    if keep_alive is not False and served.loader is not None:
        served.keep_alive_s = keep_alive


async def _load_only(served: Served, model: str, keep_alive) -> dict:
    if keep_alive is not False and keep_alive == 0 and served.loader is not None:  # False == 0 in Python
        await served.switch(None)
        return _final(model, "unload")
    _apply_keep_alive(served, keep_alive)
    return _final(model, "load")


def _expires(served: Served) -> str:
    if served.keep_alive_s is None or served.loader is None:
        return "2318-01-01T00:00:00Z"  # held until the server stops
    idle_from = max(served.last_used, served.scheduler.last_finished)
    left = max(0.0, served.keep_alive_s - (time.monotonic() - idle_from))
    return datetime.fromtimestamp(time.time() + left, timezone.utc).isoformat()


def _installed(name) -> store.ModelEntry:
    """An installed model by name (`name` picks its first variant), looked up, never a path."""
    if not isinstance(name, str) or not name:
        raise BadRequest("'model' must name a model")
    base, _, variant = name.strip().lower().partition(":")
    for e in store.list_entries():
        if e.name == base and variant in ("", "latest", e.variant):
            return e
    raise BadRequest(f"model {name!r} not found", status=404)


def _modified(entry: store.ModelEntry) -> str:
    return entry.manifest.get("created") or datetime.fromtimestamp(
        (entry.path / store.MANIFEST).stat().st_mtime, timezone.utc).isoformat()


def _describe(entry: store.ModelEntry) -> dict:
    args = ModelArgs.from_dict(entry.manifest["args"])
    n = args.n_params
    return {"name": entry.ref, "model": entry.ref, "modified_at": _modified(entry), "size": entry.size_bytes,
            "digest": "", "details": {
                "parent_model": "", "format": entry.manifest.get("source", {}).get("format", "safetensors"),
                "family": "llama", "families": ["llama"],
                "parameter_size": f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M",
                "quantization_level": _quantization_level(entry.manifest)}}


def _quantization_level(manifest: dict) -> str:
    """As Ollama names it: a packed variant's scheme (INT4, INT8, NF4), else the type most of the
    source's tensors are stored in (Q4_1 for the default model's GGUF, BF16 for a bf16 folder)."""
    quant = manifest.get("quant") or {}
    if quant.get("scheme") and not quant.get("exact"):
        return quant["scheme"].upper()
    types = [t for t in (manifest.get("source", {}).get("types") or {}).values() if t != "F32"] or ["F32"]
    return max(set(types), key=types.count).upper()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _final(model: str, reason: str) -> dict:
    return {"model": model, "created_at": _now(), "done": True, "done_reason": reason}


async def _answer(served: Served, request: Request, body: dict, model: str, prompt: list[int], kind: str,
                  sources: list[dict] | None = None):
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise BadRequest("'options' must be an object")
    refuse_unsupported([f"options.{k}" for k in unsupported(options, set(OLLAMA_OPTIONS) | OLLAMA_IGNORED_OPTIONS, {})])
    sampling = sampling_from(options, OLLAMA_OPTIONS, OLLAMA_DEFAULTS, "options.")
    stream = stream_flag(body, True)
    t0 = time.monotonic_ns()
    job = await served.submit(prompt, sampling)

    def piece(text: str) -> dict:
        part = {"message": {"role": "assistant", "content": text}} if kind == "chat" else {"response": text}
        return {"model": model, "created_at": _now(), **part, "done": False}

    def final(finish: str) -> dict:
        first = job.first_token or job.finished
        out = piece("") | _final(model, finish) | {
            "total_duration": time.monotonic_ns() - t0, "load_duration": 0,
            "prompt_eval_count": len(prompt), "prompt_eval_duration": int((first - job.started) * 1e9),
            "eval_count": job.completion_tokens, "eval_duration": int((job.finished - first) * 1e9)}
        request.scope["state"]["tokens"] = tokens_note(job, finish)
        return out | ({} if sources is None else {"sources": sources})

    if not stream:
        text, finish = [], "cancelled"  # no "done" event: the client left, and its leaving cancelled the job
        async for event in job_events(job, request):
            if event[0] == "text":
                text.append(event[1])
            elif event[0] == "error":
                raise BadRequest(f"generation failed: {event[1]}", status=500)
            else:
                finish = event[1]
        out = final(finish)
        if kind == "chat":
            out["message"]["content"] = "".join(text)
        else:
            out["response"] = "".join(text)
        return JSONResponse(out)

    async def lines():
        try:
            async for event in job_events(job, request):
                if event[0] == "text":
                    yield json.dumps(piece(event[1]), ensure_ascii=False) + "\n"
                elif event[0] == "error":
                    yield json.dumps({"error": f"generation failed: {event[1]}"}) + "\n"
                else:  # "cancelled" here, with the client still connected, is the server's shutdown
                    yield json.dumps(final(event[1]), ensure_ascii=False) + "\n"
        finally:
            if "tokens" not in request.scope["state"]:  # final() did not note them: the client left
                request.scope["state"]["tokens"] = tokens_note(job, "cancelled")

    return StreamingResponse(lines(), media_type="application/x-ndjson")
