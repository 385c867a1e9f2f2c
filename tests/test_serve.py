"""`llamadesk serve` driven by the official openai and ollama clients, on the real default model.

One engine is loaded per module; each server below is a uvicorn in a thread on 127.0.0.1 over it.
"""
from __future__ import annotations

import asyncio
import datetime
import json
import threading
import time

import httpx
import ollama
import openai
import pytest

from app.engine import Engine
from app.serve import is_loopback
from app.serve.app import MAX_BODY, Served
from app.serve.scheduler import EngineRows, Job, Scheduler
from model.generate import SamplingParams
from serve_helpers import running

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


def test_models_retrieve_gives_the_listed_entry(client, engine):
    listed = {m.id: m for m in client.models.list().data}
    for ref in (engine.entry.ref, f"{MODEL}:source"):
        assert client.models.retrieve(ref) == listed[ref]
    assert client.models.retrieve(engine.entry.ref).max_model_len == engine.ctx
    # the names a chat request takes: bare (the loaded variant), :latest, any case
    for name in (MODEL, f"{MODEL}:latest", MODEL.upper()):
        assert client.models.retrieve(name) == listed[engine.entry.ref]
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.body["code"] == "model_not_found"


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


@pytest.mark.parametrize("message", [{"role": "user"}, {"role": "user", "content": None}, {"role": "assistant"}])
def test_a_message_without_content_is_a_400(client, url, message):
    messages = [message] if message["role"] == "user" else HELLO + [message]
    with pytest.raises(openai.BadRequestError, match="must be a string or a list of text parts"):
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    r = httpx.post(f"{url}/api/chat", json={"model": MODEL, "messages": messages, "options": {"num_predict": 2}})
    if "content" in message:  # null: refused; left out, Ollama's API reads it as "" (its client drops "")
        assert r.status_code == 400 and "string content" in r.json()["error"]
    else:
        assert r.status_code == 200, r.text


def test_the_ollama_client_with_an_empty_system_message_is_answered(url):
    # ollama's client leaves empty fields out of what it sends: {"role": "system"}
    r = ollama.Client(host=url).chat(model=MODEL, messages=[{"role": "system", "content": ""}] + HELLO,
                                     options={"num_predict": 2, "temperature": 0})
    assert r.message.content


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 2}),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
    ("/api/chat", {"messages": HELLO, "options": {"num_predict": 2}}),
    ("/api/generate", {"prompt": "Hi", "options": {"num_predict": 2}})])
@pytest.mark.parametrize("stream", ["no", "false", "yes", 1])
def test_a_stream_that_is_not_true_or_false_is_a_400(url, path, body, stream):
    r = httpx.post(f"{url}{path}", json={"model": MODEL, "stream": stream} | body)
    assert r.status_code == 400
    error = r.json()["error"]
    if path.startswith("/v1"):
        assert error["message"] == "stream must be true or false" and error["param"] == "stream"
    else:
        assert error == "stream must be true or false"


def test_images_are_a_400(client):
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]
    with pytest.raises(openai.BadRequestError, match="image_url"):
        client.chat.completions.create(model=MODEL, messages=image, max_tokens=2)


def test_unknown_model_is_a_404_and_never_a_path(client):
    for name in ("no-such-model", "../../etc/passwd", "/tmp"):
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model=name, messages=HELLO, max_tokens=2)
        assert e.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("field, value", [("temperature", -1), ("top_p", 2), ("seed", -1)])
def test_a_value_out_of_range_is_a_400_naming_its_param(client, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, **{field: value})
    assert e.value.body["param"] == field and e.value.body["message"].startswith(f"{field} must be")


def test_a_wrong_method_under_v1_is_an_invalid_request(url):
    r = httpx.get(f"{url}/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


def test_root_says_it_is_running_as_ollama_does(url):
    r = httpx.get(f"{url}/")
    assert r.status_code == 200 and r.text == "llamadesk is running"
    assert r.headers["content-type"].startswith("text/plain")
    assert httpx.head(f"{url}/").status_code == 200


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
    source = next(m for m in ollama_client.list().models if m.model == f"{MODEL}:source")
    assert (source.details.format, source.details.quantization_level) == ("gguf", "Q4_1")  # the file's blocks
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


@pytest.mark.parametrize("path, body", [("/api/chat", {"messages": HELLO}), ("/api/generate", {"prompt": "Hi"})])
def test_ollama_unknown_model_points_to_its_own_list(url, path, body):
    r = httpx.post(f"{url}{path}", json={"model": "no-such-model"} | body)
    assert r.status_code == 404 and "GET /api/tags" in r.json()["error"] and "/v1" not in r.json()["error"]


def test_ollama_option_out_of_range_is_named_as_sent(ollama_client):
    with pytest.raises(ollama.ResponseError) as e:
        ollama_client.chat(model=MODEL, messages=HELLO, options={"repeat_penalty": -3.0})
    assert e.value.status_code == 400 and e.value.error == "options.repeat_penalty must be > 0, got -3.0"


# ---------------------------------------------------------------- safety
def test_loopback_is_127_slash_8_and_ipv6_one():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.4.5.6", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.10", "10.0.0.1", "example.com"))


def test_wrong_or_missing_key_is_a_401(engine, scheduler):
    with running(Served(engine, scheduler, api_key="correct horse", log=lambda line: None)) as base:
        wrong = openai.OpenAI(base_url=f"{base}/v1", api_key="battery staple", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        r = httpx.post(f"{base}/api/chat", json={"model": MODEL, "messages": HELLO})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        right = openai.OpenAI(base_url=f"{base}/v1", api_key="correct horse", max_retries=0)
        assert right.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).usage.completion_tokens
        keyed = ollama.Client(host=base, headers={"Authorization": "Bearer correct horse"})
        assert keyed.list().models
        assert httpx.get(f"{base}/health").status_code == 200  # a liveness probe needs no key


def test_body_over_4_mib_is_a_413(url):
    big = b'{"model": "x", "prompt": "' + b"a" * MAX_BODY + b'"}'
    assert httpx.post(f"{url}/v1/completions", content=big).status_code == 413

    def chunks():  # no Content-Length: the limit holds on what arrives
        for _ in range(5):
            yield b"a" * 2**20

    r = httpx.post(f"{url}/api/generate", content=chunks())
    assert r.status_code == 413 and "4 MiB" in r.json()["error"]


def test_malformed_json_is_a_400_in_each_apis_shape(url):
    r = httpx.post(f"{url}/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{url}/api/chat", content=b"[1, 2")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    assert httpx.post(f"{url}/api/chat", content=b"[1, 2]").status_code == 400
    for path in ("/v1/chat/completions", "/api/chat"):  # nested deeper than Python's recursion: not a 500
        r = httpx.post(f"{url}{path}", content=b"[" * 5000)
        assert r.status_code == 400 and "not valid JSON" in json.dumps(r.json())


def test_a_page_elsewhere_or_a_rebound_host_is_a_403(url, engine, scheduler):
    chat = {"model": MODEL, "messages": HELLO, "max_tokens": 2}
    # a page's form posts text/plain (no preflight); a rebound DNS name brings its own Host
    r = httpx.post(f"{url}/v1/chat/completions", content=json.dumps(chat),
                   headers={"Host": "attacker.example:8462", "Origin": "http://attacker.example:8462",
                            "Content-Type": "text/plain"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
    r = httpx.post(f"{url}/api/chat", json=chat, headers={"Origin": "https://attacker.example"})
    assert r.status_code == 403 and "--cors-origin" in r.json()["error"] and "\n" not in r.json()["error"]
    r = httpx.get(f"{url}/v1/models", headers={"Origin": "null"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    port = url.rsplit(":", 1)[1]
    for host in ("attacker.example", f"attacker.example:{port}", f"127.0.0.1.attacker.example:{port}"):
        assert httpx.get(f"{url}/api/tags", headers={"Host": host}).status_code == 403
    for host in ("localhost", f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert httpx.get(f"{url}/api/tags", headers={"Host": host}).status_code == 200
    for origin in ("http://localhost:3000", "https://127.0.0.1", "http://[::1]:8080"):
        assert httpx.get(f"{url}/api/tags", headers={"Origin": origin}).status_code == 200
    with running(Served(engine, scheduler, cors_origins=["http://app.example"], log=lambda line: None)) as base:
        r = httpx.post(f"{base}/v1/chat/completions", json=chat, headers={"Origin": "http://app.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        assert httpx.get(f"{base}/v1/models", headers={"Origin": "http://evil.example"}).status_code == 403
    # with a key the key guards: a reverse proxy in front may pass on the Host its clients asked for
    with running(Served(engine, scheduler, api_key="k", log=lambda line: None)) as base:
        proxied = {"Host": "llm.example.org", "Authorization": "Bearer k"}
        assert httpx.get(f"{base}/v1/models", headers=proxied).status_code == 200
        assert httpx.get(f"{base}/v1/models", headers={"Host": "llm.example.org"}).status_code == 401
        assert httpx.get(f"{base}/v1/models", headers=proxied | {"Origin": "http://evil.example"}).status_code == 403
        # the proxy's own page (same origin as the Host it passes on)
        same = proxied | {"Origin": "https://llm.example.org"}
        assert httpx.get(f"{base}/v1/models", headers=same).status_code == 200


def test_cors_is_off_unless_origins_are_listed(url, engine, scheduler):
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    r = httpx.options(f"{url}/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    with running(Served(engine, scheduler, cors_origins=["http://app.example"], log=lambda line: None)) as base:
        r = httpx.options(f"{base}/v1/chat/completions", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        r = httpx.options(f"{base}/v1/chat/completions", headers=preflight | {"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers


def test_request_log_has_no_prompt_or_reply_text(client, logs):
    marker = "Zanzibar-7731"
    before = len(logs)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Say {marker}"}],
                                       max_tokens=4, temperature=0)
    # the server logs a request once its response is sent: the client may have it a moment earlier
    deadline = time.monotonic() + 5
    while len(logs) == before and time.monotonic() < deadline:
        time.sleep(0.01)
    line = logs[-1]
    assert line.split()[:3] == ["POST", "/v1/chat/completions", "200"] and "completion=4" in line
    assert not any(marker in x or (r.choices[0].message.content.strip() and
                                   r.choices[0].message.content.strip() in x) for x in logs)


def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llamadesk test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_https_with_a_certificate_the_client_trusts(engine, scheduler, tmp_path):
    import ssl

    cert, key = _self_signed(tmp_path)
    with running(Served(engine, scheduler, log=lambda line: None), tls_cert=cert, tls_key=key) as base:
        assert base.startswith("https://")
        trusting = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0,
                                 http_client=httpx.Client(verify=ssl.create_default_context(cafile=str(cert))))
        r = trusting.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
        assert r.usage.completion_tokens == 3
        with pytest.raises(openai.APIConnectionError):  # a client that does not trust it refuses
            openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0).models.list()
        with pytest.raises(httpx.RemoteProtocolError):  # and plain HTTP gets nothing
            httpx.get(base.replace("https", "http") + "/health")


# ---------------------------------------------------------------- many clients, disconnects
def _leave_after_4_chunks(base: str) -> None:
    """A streamed chat of up to 500 tokens whose client closes the connection after 4 chunks."""
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 500, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: ")
            if got == 4:
                break


def test_disconnect_mid_stream_stops_the_generation(url, engine, scheduler, logs):
    _leave_after_4_chunks(url)
    deadline = time.monotonic() + 10
    while scheduler.counts()["active"]:
        assert time.monotonic() < deadline, "the generation went on after the client left"
        time.sleep(0.05)
    line = next(x for x in reversed(logs) if x.startswith("POST /v1/chat/completions"))
    assert "finish=cancelled" in line
    assert int(line.split("completion=")[1].split()[0]) < 100


def test_disconnect_while_waiting_for_a_plain_reply_stops_it(url, scheduler, logs):
    body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 800, "temperature": 0}
    before = len(logs)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{url}/v1/completions", json=body, timeout=httpx.Timeout(10, read=1.5))
    deadline = time.monotonic() + 10
    while scheduler.counts()["active"]:
        assert time.monotonic() < deadline, "the generation went on after the client left"
        time.sleep(0.05)
    line = _logged(logs, before, "POST /v1/completions")
    assert "finish=cancelled" in line and "prompt=" in line
    assert int(line.split("completion=")[1].split()[0]) < 800


def test_an_ollama_stream_left_early_logs_its_counts(url, scheduler, logs):
    body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6,", "options": {"num_predict": 500, "temperature": 0}}
    before = len(logs)
    with httpx.stream("POST", f"{url}/api/generate", json=body) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 3:
                break
    line = _logged(logs, before, "POST /api/generate")
    assert "finish=cancelled" in line and "prompt=" in line
    assert 3 <= int(line.split("completion=")[1].split()[0]) < 500


def _logged(logs: list, before: int, start: str) -> str:
    """The request's log line, once the server has written it (after its response ends)."""
    deadline = time.monotonic() + 10
    while not any(x.startswith(start) for x in logs[before:]):
        assert time.monotonic() < deadline, f"no {start} logged"
        time.sleep(0.05)
    return next(x for x in logs[before:] if x.startswith(start))


def test_a_client_leaving_during_its_prompt_stops_the_prefill(engine, rows, monkeypatch):
    """The client goes as the first layer over its 900-token prompt ends (a hook sets the job's
    cancel there, as job_events does when it sees the disconnect): no other layer runs, the job
    ends cancelled and its slot takes the next request."""
    from prompt_layers import after_each_prompt_layer

    tight = Scheduler(rows, parallel=1, queue=1)
    job = Job(list(range(1000, 1900)), SamplingParams(temperature=0), 4)
    ran = []

    def leave(module, args):
        ran.append(module)
        job.cancel.set()

    # after the first layer the prompt runs, the model's forward or the CPU step
    hooks = after_each_prompt_layer(monkeypatch, engine.model, lambda: leave(None, None))

    async def events(j):
        tight.submit(j)
        seen = []
        while not seen or seen[-1][0] not in ("done", "error"):
            seen.append(await j.events.get())
        return seen

    try:
        seen = asyncio.run(events(job))
    finally:
        for hook in hooks:
            hook.remove()
    try:
        assert seen == [("done", "cancelled")] and len(ran) == 1
        after = asyncio.run(events(Job(engine.tokenizer.encode("1, 2, 3,"), SamplingParams(temperature=0), 3)))
        assert after[-1] == ("done", "length") and after[0][0] == "text"
    finally:
        tight.close(grace_s=0)


def test_full_queue_is_a_429_with_retry_after(engine, rows):
    tight = Scheduler(rows, parallel=1, queue=0)
    said = []
    try:
        with running(Served(engine, tight, log=said.append)) as base:
            # a count that goes on for 900 tokens: the first request holds the one slot throughout
            body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 900, "stream": True,
                    "temperature": 0}
            with httpx.stream("POST", f"{base}/v1/completions", json=body) as first:
                lines = first.iter_lines()
                head = [next(lines), next(lines), next(lines)]
                assert tight.counts()["active"] == 1, (head, said)
                c = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
                with pytest.raises(openai.RateLimitError) as e:
                    c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
                assert int(e.value.response.headers["retry-after"]) >= 1
                r = httpx.post(f"{base}/api/generate", json={"model": MODEL, "prompt": "hi"})
                assert r.status_code == 429 and "retry-after" in r.headers
    finally:
        tight.close(grace_s=0)


# ---------------------------------------------------------------- a batching server (what `serve` runs)
class SeenRows(EngineRows):
    """EngineRows that remember how many rows each decode step fed together."""

    def __init__(self, engine, slots):
        super().__init__(engine, slots)
        self.sizes: list[int] = []

    def step(self, tokens, positions, slots):
        self.sizes.append(len(tokens))
        return super().step(tokens, positions, slots)


@pytest.fixture(scope="module")
def batching(default_home):
    """A server of 8 slots over its own engine (its cache holds 8 rows), as `serve --parallel 8`:
    requests that overlap decode in one step."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMADESK_HOME", str(default_home))
        engine = Engine.load(MODEL, ctx=1024, compile_kernel="never")
    rows = SeenRows(engine, slots=8)
    scheduler = Scheduler(rows, parallel=8, queue=8)
    lines: list[str] = []
    try:
        with running(Served(engine, scheduler, log=lines.append)) as base:
            yield engine, rows, scheduler, base, lines
    finally:
        scheduler.close(grace_s=0)


def _counting(i: int, n: int = 6) -> str:
    """A prompt the model goes on counting from at temperature 0: it does not end early."""
    return ", ".join(str(k) for k in range(100 * i, 100 * i + n)) + ","


def _crowd(base: str, n: int, max_tokens: int, results: dict) -> list[threading.Thread]:
    """n completions that count, started in threads; each one's choice lands in results[i]."""
    def one(i):
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        r = c.completions.create(model=MODEL, prompt=_counting(i + 1), max_tokens=max_tokens, temperature=0)
        results[i] = r.choices[0]

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return threads


def _wait_active(scheduler, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while scheduler.counts()["active"] < n:
        assert time.monotonic() < deadline, f"{n} requests never decoded at once"
        time.sleep(0.01)


@pytest.mark.parametrize("bits", [15, 8])
@pytest.mark.parametrize("others", [1, 3, 7])
def test_a_request_says_the_same_alone_and_beside_others(batching, others, bits):
    """Batch invariance: at temperature 0 and at a fixed seed, a request's text alone is its text
    decoded in the same steps as `others` other requests (the steps are counted: it really shared
    them), with 15-bit activations (`ask`'s) and 8-bit ones (the server's default); alone, it is
    what the engine itself says with that setting."""
    engine, rows, scheduler, base, _ = batching
    if engine.set_activation_bits(bits) != bits:
        engine.set_activation_bits(15)
        pytest.skip(f"{bits}-bit activations need the compiled CPU step, not built here")
    mine = [{"role": "user", "content": "Write a haiku about rain."}]
    c = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)

    def ask(**kw):
        return c.chat.completions.create(model=MODEL, messages=mine, max_tokens=8, **kw).choices[0].message.content

    try:
        assert ask(temperature=0) == engine_reply(engine, mine, 8, SamplingParams(temperature=0))
        for kw in [dict(temperature=0), dict(temperature=1.0, seed=99)]:
            alone = ask(**kw)
            results: dict = {}
            crowd = _crowd(base, others, 200, results)
            _wait_active(scheduler, others)
            rows.sizes.clear()
            beside = ask(**kw)
            widest = max(rows.sizes)
            for t in crowd:
                t.join(timeout=120)
            assert beside == alone
            assert widest == others + 1, f"the request never decoded beside all {others} others"
            assert len(results) == others and all(r.finish_reason == "length" for r in results.values())
    finally:
        engine.set_activation_bits(15)


def test_a_client_leaving_a_full_batch_stops_only_its_row(batching):
    """A streamed client goes while 3 others decode beside it: its row leaves within a few steps,
    the others go on to their full length and say what each says alone."""
    engine, rows, scheduler, base, lines = batching
    c = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    alone = [c.completions.create(model=MODEL, prompt=_counting(i + 1), max_tokens=150, temperature=0).choices[0].text
             for i in range(3)]
    results: dict = {}
    crowd = _crowd(base, 3, 150, results)
    _wait_active(scheduler, 3)
    before = len(lines)
    _leave_after_4_chunks(base)
    deadline = time.monotonic() + 10
    while not (mine := [x for x in lines[before:] if x.startswith("POST /v1/chat/completions")]):
        assert time.monotonic() < deadline, "the generation went on after the client left"
        time.sleep(0.01)
    line = mine[0]
    assert "finish=cancelled" in line and int(line.split("completion=")[1].split()[0]) < 100
    assert any(t.is_alive() for t in crowd), "the others ended before the client left: nothing was tested"
    for t in crowd:
        t.join(timeout=120)
    assert [results[i].text for i in range(3)] == alone
    assert all(results[i].finish_reason == "length" for i in range(3))


def test_max_tokens_stops_at_the_end_of_the_context(batching):
    """max_tokens past the context's end is cut to the room left: the reply fills the context
    exactly and ends with finish_reason "length"."""
    engine, _, _, base, _ = batching
    n = 6
    while len(engine.tokenizer.encode(_counting(0, n))) < engine.ctx - 20:
        n += 5
    c = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    r = c.completions.create(model=MODEL, prompt=_counting(0, n), max_tokens=500, temperature=0)
    room = engine.ctx - r.usage.prompt_tokens
    assert 0 < room < 40
    assert r.usage.completion_tokens == room and r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("asked, runs", [(None, 8), (8, 8), (15, 15)])
def test_serve_options_reach_the_compiled_step(engine, asked, runs):
    """ServeOptions.activation_bits (`serve --activation-bits`) as load_served applies it; not
    asked for, the server rounds to 8 bits (llama.cpp's rounding, the server's default)."""
    from app.serve import ServeOptions, load_served

    engine.set_activation_bits(8 if runs == 15 else 15)  # the engine holds the other setting before
    served = load_served(ServeOptions(activation_bits=asked, parallel=1), None, engine=engine)
    try:
        if engine.step_activation_bits is None:
            pytest.skip("the compiled CPU step is not built here (it alone has 8-bit activations)")
        assert engine.step_activation_bits == runs and engine.decoder.inner.set_activation_bits(runs) == runs
    finally:
        served.scheduler.close(grace_s=0)
        engine.set_activation_bits(15)


def test_serve_takes_8_bit_activations_unless_asked_for_15():
    from app.cli import build_parser

    assert build_parser().parse_args(["serve"]).activation_bits is None  # ServeOptions' default: 8
    assert build_parser().parse_args(["serve", "--activation-bits", "15"]).activation_bits == 15


def test_activation_bits_are_8_or_15(engine):
    from app.errors import UserError
    from app.serve import ServeOptions, check_options

    with pytest.raises(UserError, match="8 or 15"):
        engine.set_activation_bits(4)
    with pytest.raises(UserError, match="--activation-bits must be 8 or 15"):
        check_options(ServeOptions(activation_bits=16))


def test_queued_requests_all_answer(url, engine):
    """Twice the slots plus some, at once: each request gets its own, correct reply."""
    prompts = [f"Count to {n}." for n in range(3, 9)]
    results: dict[int, str] = {}

    def ask(i):
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        results[i] = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompts[i]}],
                                               max_tokens=5, temperature=0).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i, p in enumerate(prompts):
        assert results[i] == engine_reply(engine, [{"role": "user", "content": p}], 5, SamplingParams(temperature=0))


# ---------------------------------------------------------------- other models, keep_alive
@pytest.fixture()
def swapping(engine, default_home):
    """A server that loads other installed models on request and unloads after 1 s idle."""
    def load(name):
        return Engine.load(name, ctx=1024, compile_kernel="never")

    lines = []
    own = Scheduler(EngineRows(engine), parallel=2, queue=4)
    served = Served(engine, own, loader=load, keep_alive_s=None, log=lines.append)
    try:
        with running(served) as base:
            yield served, base, lines
    finally:
        own.close(grace_s=0)


def test_another_installed_model_is_swapped_in(swapping):
    served, base, lines = swapping
    c = ollama.Client(host=base)
    options = {"temperature": 0, "num_predict": 4}
    first = served.ref
    other = f"{MODEL}:int4" if first != f"{MODEL}:int4" else f"{MODEL}:source"
    r = c.chat(model=other, messages=HELLO, options=options)
    assert r.model == other and r.message.content
    assert [m.model for m in c.ps().models] == [other] and f"loaded {other}" in lines
    back = c.chat(model=first, messages=HELLO, options=options)
    assert back.model == first and [m.model for m in c.ps().models] == [first]


def test_a_swap_waits_for_the_request_in_flight(swapping):
    """A request for another model while one streams on the loaded model: the stream ends at its
    full length on the model it began on, then the other model is loaded and answers."""
    served, base, lines = swapping
    c = ollama.Client(host=base)
    first = served.ref
    other = f"{MODEL}:int4" if first != f"{MODEL}:int4" else f"{MODEL}:source"
    before = len(lines)
    stream = c.generate(model=first, prompt=_counting(1), raw=True, stream=True,
                        options={"temperature": 0, "num_predict": 120})
    assert next(stream).response  # it decodes
    r = c.generate(model=other, prompt="Hi", options={"num_predict": 2})
    last = list(stream)[-1]
    assert last.done_reason == "length" and last.eval_count == 120 and last.model == first
    assert r.model == other and r.response
    new = lines[before:]
    ended = next(i for i, x in enumerate(new) if x.startswith("POST /api/generate") and "completion=120" in x)
    assert ended < new.index(f"loaded {other}")


def test_keep_alive_unloads_when_idle_and_the_next_request_reloads(swapping):
    served, base, lines = swapping
    c = ollama.Client(host=base)
    c.generate(model=MODEL, prompt="Hi", options={"num_predict": 2}, keep_alive="1s")
    deadline = time.monotonic() + 15
    while c.ps().models or "unloaded the model" not in lines:
        assert time.monotonic() < deadline, "the model stayed loaded past its keep_alive"
        time.sleep(0.2)
    assert served.engine is None
    r = c.generate(model=MODEL, prompt="Hi", options={"num_predict": 2}, keep_alive=-1)
    assert r.response and r.done_reason == "length" and c.ps().models


def test_keep_alive_0_with_no_prompt_unloads_now(swapping):
    served, base, _ = swapping
    c = ollama.Client(host=base)
    r = c.generate(model=MODEL, prompt="", keep_alive=0)
    assert r.done_reason == "unload" and c.ps().models == []
    assert c.generate(model=MODEL, prompt="").done_reason == "load" and len(c.ps().models) == 1


def test_llamadesk_ps_shows_what_the_server_holds(url, engine, capsys, monkeypatch):
    from app import cli, serve
    from serve_helpers import free_port

    assert cli.main(["ps", "--remote", url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NAME", "CONTEXT", "SIZE", "UNTIL"]
    assert out[1].split()[:2] == [engine.entry.ref, str(engine.ctx)]
    assert cli.main(["ps", "--remote", f"http://127.0.0.1:{free_port()}"]) == 1
    assert "cannot reach the server" in capsys.readouterr().err
    # no server on this machine: said as such, not as a connection error
    monkeypatch.setattr(serve, "DEFAULT_PORT", free_port())
    assert cli.main(["ps"]) == 1
    assert capsys.readouterr().err.startswith("llamadesk: error: no `llamadesk serve` is running on this machine")


def test_ps_does_not_call_a_server_that_answers_badly_missing(monkeypatch, capsys):
    """Only a refused or timed-out connection means no server: one that answers with no HTTP (a
    TLS server, another program on the port) is named with its error."""
    import socket
    import threading

    from app import cli, serve

    listener = socket.create_server(("127.0.0.1", 0))

    def answer_garbage() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(b"not http at all\r\n\r\n")

    threading.Thread(target=answer_garbage, daemon=True).start()
    monkeypatch.setattr(serve, "DEFAULT_PORT", listener.getsockname()[1])
    try:
        assert cli.main(["ps"]) == 1
    finally:
        listener.close()
    err = capsys.readouterr().err
    assert "cannot reach the server" in err and "no `llamadesk serve`" not in err, err


def test_a_template_that_refuses_the_conversation_is_a_400(client, engine, monkeypatch):
    from model.chat_format import ChatFormat

    strict = ChatFormat("{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message "
                        "must come first') }}{% endif %}{{ messages[0]['content'] }}")
    monkeypatch.setattr(engine, "chat_format", strict)
    with pytest.raises(openai.BadRequestError, match="a system message must come first"):
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)


# ---------------------------------------------------------------- documents: serve --docs
FESTIVAL = "# The Zorbl festival\n\nThe Zorbl festival is held every year in the town of Quillhaven.\n"
ZORBL = [{"role": "user", "content": "Where is the Zorbl festival held?"}]


@pytest.fixture()
def docs_home(default_home, tmp_path, monkeypatch):
    """A home with the installed models (linked) and two collections: `town`, and `private`."""
    from app.docs import DocsIndex

    (tmp_path / "models").symlink_to(default_home / "models")
    monkeypatch.setenv("LLAMADESK_HOME", str(tmp_path))
    for folder, name, text in (("notes", "festival.md", FESTIVAL),
                               ("private", "diary.md", "# Diary\n\nMy PIN for the Zorbl festival gate is 4321.\n")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_text(text, encoding="utf-8")
    with DocsIndex() as index:
        index.add("town", [tmp_path / "notes"])
        index.add("private", [tmp_path / "private"])
    return tmp_path


def test_serve_docs_quotes_only_its_collections_and_returns_the_sources(engine, scheduler, docs_home):
    from app.docs.attach import ground_chat

    festival = {"n": 1, "path": str(docs_home / "notes" / "festival.md"), "line": 1, "page": None}
    diary = str(docs_home / "private" / "diary.md")
    body = {"model": MODEL, "messages": ZORBL, "max_tokens": 12, "temperature": 0}
    with running(Served(engine, scheduler, log=lambda line: None, docs=["town"])) as base:
        plain = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120).json()
        # the oracle: the engine answering the prompt the chat app would write with these passages
        grounded, _ = ground_chat(ZORBL, ["town"], "", engine.ctx, 12,
                                  lambda text: len(engine.tokenizer.encode(text, allowed_special=set())))
        assert "> The Zorbl festival is held every year" in grounded[-1]["content"]
        assert plain["choices"][0]["message"]["content"] == engine_reply(engine, grounded, 12,
                                                                         SamplingParams(temperature=0))
        assert plain["sources"] == [festival]

        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body | {"stream": True}, timeout=120) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert [c.get("sources") for c in chunks] == [None] * (len(chunks) - 1) + [[festival]]

        # `#private` names a collection this server was not started with: it stays text
        secret = [{"role": "user", "content": "#private What is my PIN for the Zorbl festival gate?"}]
        r = httpx.post(f"{base}/v1/chat/completions", json=body | {"messages": secret}, timeout=120).json()
        assert diary not in [s["path"] for s in r["sources"]]

        ollama_reply = httpx.post(f"{base}/api/chat", json={"model": MODEL, "messages": ZORBL, "stream": False,
                                                           "options": {"temperature": 0, "num_predict": 4}},
                                  timeout=120).json()
        assert ollama_reply["sources"] == [festival]
    with running(Served(engine, scheduler, log=lambda line: None, docs=["town", "private"])) as base:
        r = httpx.post(f"{base}/v1/chat/completions", json=body | {"messages": secret}, timeout=120).json()
        assert r["sources"][0]["path"] == diary  # the same question, where the server serves it


def test_a_server_started_without_docs_quotes_nothing(url):
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": ZORBL, "max_tokens": 4},
                   timeout=120).json()
    assert "sources" not in r
