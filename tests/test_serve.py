"""`llamadesk serve` driven by the official openai and ollama clients, on the real default model.

One engine is loaded per module; each server below is a uvicorn in a thread on 127.0.0.1 over it.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import socket
import threading
import time

import httpx
import ollama
import openai
import pytest

from app.engine import Engine
from app.serve import ServeOptions, is_loopback, make_server
from app.serve.app import MAX_BODY, Served
from app.serve.scheduler import EngineRows, Scheduler
from model.generate import SamplingParams

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
MODEL = "smollm2-135m-instruct"
HELLO = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def engine(default_home):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMADESK_HOME", str(default_home))
        yield Engine.load(MODEL, ctx=1024, compile_kernel="never")


@pytest.fixture(scope="module")
def rows(engine):
    return EngineRows(engine)


@pytest.fixture(scope="module")
def scheduler(rows):
    s = Scheduler(rows, parallel=4, queue=16)
    yield s
    s.close(grace_s=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(served: Served, **opts):
    """A uvicorn server for `served` in a thread; yields its base URL."""
    options = ServeOptions(port=_free_port(), **opts)
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


@pytest.fixture(scope="module")
def logs():
    return []


@pytest.fixture(scope="module")
def url(engine, scheduler, logs):
    with running(Served(engine, scheduler, log=logs.append)) as base:
        yield base


@pytest.fixture()
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def engine_reply(engine, messages, max_tokens, params) -> str:
    """What the engine's own chat path (Engine.stream) says: the oracle for the server's rows."""
    return "".join(engine.stream(messages, params, max_tokens))


# ---------------------------------------------------------------- OpenAI
def test_models_lists_every_installed_variant(client, engine):
    ids = [m.id for m in client.models.list().data]
    assert engine.entry.ref in ids and f"{MODEL}:source" in ids


def test_chat_greedy_matches_the_engine_with_usage(client, engine):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
    expected = engine_reply(engine, HELLO, 8, SamplingParams(temperature=0))
    assert r.choices[0].message.content == expected and expected
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8
    assert r.usage.prompt_tokens == len(engine.prompt_ids(HELLO))
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    assert r.model == engine.entry.ref


def test_seeded_sampling_matches_the_engine(client, engine):
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, temperature=1.0,
                                       top_p=0.95, seed=1234)
    assert r.choices[0].message.content == engine_reply(engine, HELLO, 10, params)


def test_stream_with_include_usage(client, engine):
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-2].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == engine_reply(engine, HELLO, 6, SamplingParams(temperature=0))


def test_stop_sequence_ends_the_reply_before_it(client, engine):
    full = engine_reply(engine, HELLO, 16, SamplingParams(temperature=0))
    words = full.split()
    stop = words[len(words) // 2]
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == full[:full.index(stop)]
    streamed = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=0,
                                              stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[:full.index(stop)]


def test_text_parts_are_the_same_as_a_string(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name three "}, {"type": "text", "text": "colours."}]}]
    a = client.chat.completions.create(model=MODEL, messages=parts, max_completion_tokens=5, temperature=0)
    b = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_completions_parse_special_tokens(client, engine):
    raw = "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n"
    r = client.completions.create(model=MODEL, prompt=raw, max_tokens=5, temperature=0)
    ids = engine.tokenizer.encode(raw, allowed_special="all")
    assert r.usage.prompt_tokens == len(ids) < len(engine.tokenizer.encode(raw, allowed_special=set()))
    assert r.choices[0].finish_reason == "length" and r.choices[0].text
    streamed = client.completions.create(model=MODEL, prompt=raw, max_tokens=5, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


@pytest.mark.parametrize("extra, named", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logprobs": True}, "logprobs"),
    ({"n": 2}, "n"),
])
def test_unsupported_fields_are_a_400_naming_them(client, extra, named):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, **extra)
    assert named in e.value.message and e.value.body["param"] == named


def test_images_are_a_400(client):
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]
    with pytest.raises(openai.BadRequestError, match="image_url"):
        client.chat.completions.create(model=MODEL, messages=image, max_tokens=2)


def test_unknown_model_is_a_404_and_never_a_path(client):
    for name in ("no-such-model", "../../etc/passwd", "/tmp"):
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model=name, messages=HELLO, max_tokens=2)
        assert e.value.body["code"] == "model_not_found"


def test_embeddings_are_a_501(client):
    with pytest.raises(openai.APIStatusError) as e:
        client.embeddings.create(model=MODEL, input="hello")
    assert e.value.status_code == 501


def test_health(url, engine):
    r = httpx.get(f"{url}/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["model"] == engine.entry.ref


def test_prompt_longer_than_the_context_is_a_400(client, engine):
    long = [{"role": "user", "content": "word " * (engine.ctx + 10)}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=long, max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded"


# ---------------------------------------------------------------- Ollama
@pytest.fixture()
def ollama_client(url):
    return ollama.Client(host=url)


def test_ollama_chat_streamed_and_plain(ollama_client, engine):
    options = {"temperature": 0, "num_predict": 6}
    expected = engine_reply(engine, HELLO, 6, SamplingParams(temperature=0))
    parts = list(ollama_client.chat(model=MODEL, messages=HELLO, options=options, stream=True))
    assert "".join(p.message.content for p in parts) == expected
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    last = parts[-1]
    assert last.done_reason == "length" and last.eval_count == 6
    assert last.prompt_eval_count == len(engine.prompt_ids(HELLO))
    plain = ollama_client.chat(model=MODEL, messages=HELLO, options=options, stream=False)
    assert plain.message.content == expected and plain.message.role == "assistant" and plain.done


def test_ollama_generate_is_ndjson(url, engine):
    body = {"model": MODEL, "prompt": "Name three colours.", "options": {"temperature": 0, "num_predict": 5}}
    with httpx.stream("POST", f"{url}/api/generate", json=body) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] == 5
    text = "".join(x["response"] for x in lines)
    assert text == engine_reply(engine, HELLO, 5, SamplingParams(temperature=0))


def test_ollama_generate_raw_parses_specials(ollama_client, engine):
    raw = "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n"
    r = ollama_client.generate(model=MODEL, prompt=raw, raw=True, options={"temperature": 0, "num_predict": 3})
    assert r.prompt_eval_count == len(engine.tokenizer.encode(raw, allowed_special="all"))
    assert r.response and r.done_reason == "length"


def test_ollama_stop_and_seed(ollama_client):
    options = {"temperature": 0.9, "seed": 7, "num_predict": 8}
    a = ollama_client.generate(model=MODEL, prompt="Tell me a story.", options=options)
    b = ollama_client.generate(model=MODEL, prompt="Tell me a story.", options=options)
    assert a.response == b.response
    stop = a.response.split()[2]
    c = ollama_client.generate(model=MODEL, prompt="Tell me a story.", options=options | {"stop": [stop]})
    assert c.response == a.response[:a.response.index(stop)] and c.done_reason == "stop"


def test_ollama_tags_show_ps_version(ollama_client, engine):
    names = [m.model for m in ollama_client.list().models]
    assert engine.entry.ref in names and f"{MODEL}:source" in names
    tag = next(m for m in ollama_client.list().models if m.model == engine.entry.ref)
    assert tag.details.family == "llama" and tag.details.parameter_size == "135M" and tag.size > 0
    shown = ollama_client.show(engine.entry.ref)
    assert shown.modelinfo["llama.block_count"] == 30 and "im_start" in shown.template
    running_now = ollama_client.ps().models
    assert [m.model for m in running_now] == [engine.entry.ref] and running_now[0].context_length == engine.ctx
    assert ollama_client._client.get("/api/version").json()["version"]


@pytest.mark.parametrize("call", [lambda c: c.pull(MODEL), lambda c: c.delete(MODEL),
                                  lambda c: c.embed(model=MODEL, input="hello")])
def test_ollama_model_management_is_a_501(ollama_client, call):
    with pytest.raises(ollama.ResponseError) as e:
        call(ollama_client)
    assert e.value.status_code == 501


def test_ollama_unknown_model_and_unsupported_option(ollama_client):
    with pytest.raises(ollama.ResponseError) as e:
        ollama_client.chat(model="no-such-model", messages=HELLO)
    assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as e:
        ollama_client.chat(model=MODEL, messages=HELLO, options={"mirostat": 2})
    assert e.value.status_code == 400 and "options.mirostat" in str(e.value)
    with pytest.raises(ollama.ResponseError) as e:
        ollama_client.chat(model=MODEL, messages=HELLO, format="json")
    assert e.value.status_code == 400 and "format" in str(e.value)
