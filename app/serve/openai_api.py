"""OpenAI's API: /v1/chat/completions, /v1/completions, /v1/models(/ID); /v1/embeddings is a 501.

Two fields beyond OpenAI's: /v1/models gives the loaded model's context as `max_model_len` (vLLM's
name for it, which clients read), and a chat answered from documents (`serve --docs`) carries its
`sources` ([{"n", "path", "line", "page"}]) in the response, or in a stream's finish chunk.

Streams are server-sent events as OpenAI sends them: a role-only first chunk, content chunks, a
last chunk with `finish_reason`, a usage-only chunk (`choices: []`) when
`stream_options.include_usage` is set, then `data: [DONE]`.
"""
from __future__ import annotations

import json
import time
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .. import store
from .app import Served, error_response, installed_name, job_events, json_body, same_model, tokens_note, usage
from .params import (OPENAI_DEFAULTS, OPENAI_FIELDS, OPENAI_IGNORED, OPENAI_NEUTRAL, BadRequest,
                     refuse_unsupported, sampling_from, stream_flag, unsupported)

ROLES = {"system", "user", "assistant", "developer"}


def routes(served: Served) -> list[Route]:
    async def chat(request: Request):
        body = await json_body(request)
        refuse_unsupported(unsupported(body, set(OPENAI_FIELDS) | OPENAI_IGNORED, OPENAI_NEUTRAL))
        messages = chat_messages(body.get("messages"))
        model = await served.acquire(body.get("model"))
        messages, sources = (served.ground(messages, sampling_from(body, OPENAI_FIELDS, OPENAI_DEFAULTS).max_tokens)
                             if served.docs else (messages, None))
        prompt = served.engine.prompt_ids(messages)
        return await _answer(served, request, body, model, prompt, chat=True, sources=sources)

    async def completions(request: Request):
        body = await json_body(request)
        refuse_unsupported(unsupported(body, set(OPENAI_FIELDS) | OPENAI_IGNORED, OPENAI_NEUTRAL))
        text = body.get("prompt")
        if isinstance(text, list) and len(text) == 1:
            text = text[0]
        if not isinstance(text, str):
            raise BadRequest("'prompt' must be a string (one prompt per request)", "prompt")
        model = await served.acquire(body.get("model"))
        # raw text: special-token text in it becomes those tokens, as llama.cpp's server does
        prompt = served.engine.tokenizer.encode(text, bos=_wants_bos(served, text), allowed_special="all")
        return await _answer(served, request, body, model, prompt, chat=False)

    def model_object(entry: store.ModelEntry) -> dict:
        return ({"id": entry.ref, "object": "model", "created": int(served.started), "owned_by": "llamadesk"}
                | ({"max_model_len": served.engine.ctx} if entry.ref == served.ref else {}))

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [model_object(e) for e in store.list_entries()]})

    async def model(request: Request):
        """One entry of /v1/models by its id (the client's models.retrieve)."""
        want = installed_name(request.path_params["model"], "GET /v1/models")  # as a chat request names it
        found = [e for e in store.list_entries() if same_model(want, e)]
        # a bare name: the loaded variant, else the source, as a chat request would get
        found.sort(key=lambda e: (e.ref != served.ref, e.variant != store.SOURCE))
        return JSONResponse(model_object(found[0]))

    async def embeddings(request: Request):
        return error_response(request.url.path, 501, "embeddings are not implemented by llamadesk",
                              code="not_implemented")

    return [Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{model:path}", model, methods=["GET"]),
            Route("/v1/embeddings", embeddings, methods=["POST"])]


def _wants_bos(served: Served, text: str) -> bool:
    tok = served.engine.tokenizer
    return bool(tok.add_bos and tok.bos_id is not None and not text.startswith(tok.id_to_piece(tok.bos_id)))


def chat_messages(messages) -> list[dict]:
    """OpenAI messages as the chat format takes them: text content only, known roles."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}] needs a role among {', '.join(sorted(ROLES))}", f"messages[{i}].role")
        for key in ("tool_calls", "function_call", "audio"):
            if m.get(key):
                raise BadRequest(f"unsupported field: messages[{i}].{key}", f"messages[{i}].{key}")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _text(m.get("content"), f"messages[{i}].content")})
    return out


def _text(content, param: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"{param} must be a string or a list of text parts", param)
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind in ("image_url", "input_image", "input_audio", "file"):
            raise BadRequest(f"unsupported field: {param} with {kind} parts (images, audio and files "
                             f"are not implemented)", param)
        else:
            raise BadRequest(f"{param}: each part must be {{'type': 'text', 'text': ...}}", param)
    return "".join(parts)


async def _answer(served: Served, request: Request, body: dict, model: str, prompt: list[int], chat: bool,
                  sources: list[dict] | None = None):
    sampling = sampling_from(body, OPENAI_FIELDS, OPENAI_DEFAULTS)
    stream = stream_flag(body, False)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    job = await served.submit(prompt, sampling)
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    kind = "chat.completion" if chat else "text_completion"
    if not stream:
        text, finish = [], "cancelled"  # no "done" event: the client left, and its leaving cancelled the job
        async for event in job_events(job, request):
            if event[0] == "text":
                text.append(event[1])
            elif event[0] == "error":
                raise BadRequest(f"generation failed: {event[1]}", status=500, code="server_error")
            else:
                finish = event[1]
        request.scope["state"]["tokens"] = tokens_note(job, finish)
        reply = "".join(text)
        choice = ({"index": 0, "message": {"role": "assistant", "content": reply}, "logprobs": None}
                  if chat else {"index": 0, "text": reply, "logprobs": None})
        choice["finish_reason"] = _reason(finish)
        return JSONResponse({"id": ident, "object": kind, "created": created, "model": model,
                             "choices": [choice], "usage": usage(job), "system_fingerprint": None}
                            | ({} if sources is None else {"sources": sources}))

    include_usage = bool(options.get("include_usage"))
    kind += ".chunk" if chat else ""

    def chunk(delta_or_text, finish=None) -> str:
        choice = ({"index": 0, "delta": delta_or_text} if chat else {"index": 0, "text": delta_or_text})
        choice.update(logprobs=None, finish_reason=finish)
        out = {"id": ident, "object": kind, "created": created, "model": model, "system_fingerprint": None,
               "choices": [choice]}
        if include_usage:
            out["usage"] = None
        if finish is not None and sources is not None:
            out["sources"] = sources
        return _sse(out)

    async def events():
        finish = None
        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            async for event in job_events(job, request):
                if event[0] == "text":
                    yield chunk({"content": event[1]} if chat else event[1])
                elif event[0] == "error":
                    yield _sse({"error": {"message": f"generation failed: {event[1]}", "type": "server_error",
                                          "param": None, "code": "server_error"}})
                    return
                else:
                    finish = event[1]
        finally:
            request.scope["state"]["tokens"] = tokens_note(job, finish or "cancelled")
        if finish is None:  # the client left: nobody to finish the stream for
            return
        # a "cancelled" finish with the client still here is the server's shutdown: the client is
        # told the reply ends there (as cut short), as the non-streamed reply tells it
        yield chunk({} if chat else "", _reason(finish))
        if include_usage:
            yield _sse({"id": ident, "object": kind, "created": created, "model": model,
                        "system_fingerprint": None, "choices": [], "usage": usage(job)})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _reason(finish: str) -> str:
    """OpenAI's finish_reason for ours: a reply the server's shutdown cancelled is cut short,
    "length" (OpenAI has no "cancelled", and strictly typed clients refuse values it lacks)."""
    return "length" if finish == "cancelled" else finish


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

