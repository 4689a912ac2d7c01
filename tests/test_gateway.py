"""zooter gateway: the official openai client (sync and async, streaming and not) against the gateway, backed by
stub upstreams on 127.0.0.1 (one answers 500, one is down, one is slow, one breaks mid-stream) and by a real
tritonserver with stand-in candidates. No timing assertions: the figures are bench/gateway.py's."""

from __future__ import annotations

import asyncio
import json
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from gateway_stubs import UPSTREAM_KEY, ServerThread, closed_port, stub_app
from tiny import LABELS, TEXTS

CLIENT_KEYS = ("gw-client-key-1", "gw-client-key-2")
KEY_ENV = "ZOOTER_TEST_UPSTREAM_KEY"
QUERY = "Prove that there are infinitely many primes."


# --- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stub():
    records: list = []
    app = stub_app(records)
    server = ServerThread(app)
    server.records, server.stats = records, app.stats
    yield server
    server.stop()


@pytest.fixture(scope="module")
def router(bundles):
    from zooter.runtime.router import Router

    return Router.load(bundles["int8"])


@pytest.fixture(scope="module")
def upstream_key():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(KEY_ENV, UPSTREAM_KEY)
        yield UPSTREAM_KEY


def write_candidates(path: Path, serve: dict[str, dict]) -> Path:
    path.write_text(json.dumps([{"name": name, "serve": entry} for name, entry in serve.items()]))   # JSON is YAML
    return path


def start_gateway(**settings) -> ServerThread:
    """The gateway as `zooter gateway` serves it (its guarded HTTP protocol included), in a thread."""
    from zooter.servers.gateway import GatewaySettings, create_app, gateway_server_options

    app = create_app(GatewaySettings(**settings))
    return ServerThread(app, **gateway_server_options(app))


@pytest.fixture(scope="module")
def healthy(bundles, stub, upstream_key, tmp_path_factory):
    """Every router candidate served by the stub under another model name, with an upstream key; client keys on."""
    v1 = stub.url + "/v1"
    serve = {label: {"openai_base_url": v1, "model": f"private-{label}", "api_key_env": KEY_ENV} for label in LABELS}
    serve["midway-demo"] = {"openai_base_url": v1, "model": "midway"}
    serve["picky-demo"] = {"openai_base_url": v1, "model": "picky"}
    serve["endless-demo"] = {"openai_base_url": v1, "model": "endless"}
    path = write_candidates(tmp_path_factory.mktemp("healthy") / "candidates.yaml", serve)
    server = start_gateway(bundle=bundles["int8"], candidates=path, api_keys=CLIENT_KEYS, max_body_bytes=65536)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ranking(router) -> list[str]:
    return router.route(QUERY).ranking


@pytest.fixture(scope="module")
def faulty(bundles, stub, upstream_key, ranking, tmp_path_factory):
    """For QUERY the router's first choice answers 500, the second is down, the third is slow, the fourth answers."""
    v1 = stub.url + "/v1"
    serve = {ranking[0]: {"openai_base_url": v1, "model": "broken", "api_key_env": KEY_ENV},
             ranking[1]: {"openai_base_url": f"http://127.0.0.1:{closed_port()}/v1"},
             ranking[2]: {"openai_base_url": v1, "model": "slow"},
             ranking[3]: {"openai_base_url": v1, "model": "good"}}
    path = write_candidates(tmp_path_factory.mktemp("faulty") / "candidates.yaml", serve)
    server = start_gateway(bundle=bundles["int8"], candidates=path, upstream_timeout=1.0, max_attempts=4)
    yield server
    server.stop()


def client(server: ServerThread, key: str | None = CLIENT_KEYS[0]):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=key or "none", max_retries=0)


def async_client(server: ServerThread, key: str | None = CLIENT_KEYS[0]):
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=server.url + "/v1", api_key=key or "none", max_retries=0)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def metric(server: ServerThread, name: str, key: str | None = CLIENT_KEYS[0], **labels) -> float:
    """The gateway's /metrics samples `name` with `labels`, summed (0 when absent)."""
    from zooter.bench.report import metric_value

    headers = {"authorization": f"Bearer {key}"} if key else {}
    return metric_value(httpx.get(server.url + "/metrics", headers=headers).raise_for_status().text, name, **labels)


# --- routing and answering --------------------------------------------------------------------------------
def test_the_decision_is_the_in_process_routers_and_visible(healthy, router, stub):
    openai = client(healthy)
    for text in TEXTS[:6]:
        decision = router.route(text)
        raw = openai.chat.completions.with_raw_response.create(model="zooter", messages=ask(text), max_tokens=4)
        answer = raw.parse()
        assert raw.headers["x-zooter-candidate"] == decision.candidate == answer.model
        assert raw.headers["x-zooter-fallback"] == "false"
        assert float(raw.headers["x-zooter-confidence"]) == pytest.approx(decision.confidence, abs=1e-3)
        assert answer.choices[0].message.content.startswith(f"private-{decision.candidate} answers:")
    model, auth, body = stub.records[-1]
    assert model == f"private-{decision.candidate}" and auth == f"Bearer {UPSTREAM_KEY}"
    assert body["max_tokens"] == 4 and "zooter" not in body

    # Per-request options, as the openai client sends them: extra_body={"zooter": {...}}.
    costly = router.route(QUERY, lam=1.0)
    raw = openai.chat.completions.with_raw_response.create(model="zooter", messages=ask(QUERY),
                                                           extra_body={"zooter": {"lambda": 1.0}})
    assert raw.headers["x-zooter-candidate"] == costly.candidate
    subset = router.route(QUERY).ranking[2:]
    raw = openai.chat.completions.with_raw_response.create(model="zooter", messages=ask(QUERY),
                                                           extra_body={"zooter": {"candidates": subset}})
    assert raw.headers["x-zooter-candidate"] == router.route(QUERY, candidates=subset).candidate
    assert raw.headers["x-zooter-fallback"] == "false"
    ranking = router.route(QUERY).ranking
    # A candidate's name goes straight to it: no routing, so no confidence.
    raw = openai.chat.completions.with_raw_response.create(model=ranking[3], messages=ask(QUERY))
    assert raw.headers["x-zooter-candidate"] == ranking[3] and "x-zooter-confidence" not in raw.headers


def test_tolerance_and_allowed_candidates_go_to_the_router(healthy, router):
    openai = client(healthy)
    raw = openai.chat.completions.with_raw_response.create(model="zooter", messages=ask(QUERY),
                                                           extra_body={"zooter": {"tolerance": 0.1}})
    assert raw.headers["x-zooter-candidate"] == router.route(QUERY, tolerance=0.1).candidate
    subset = [n for n in LABELS if n != router.route(QUERY).candidate][:2]
    raw = openai.chat.completions.with_raw_response.create(model="zooter", messages=ask(QUERY),
                                                           extra_body={"zooter": {"candidates": subset}})
    assert raw.headers["x-zooter-candidate"] == router.route(QUERY, candidates=subset).candidate


def test_streaming_and_completions_sync_and_async(healthy, router):
    chosen = router.route(QUERY).candidate
    with client(healthy).chat.completions.with_streaming_response.create(
            model="zooter", messages=ask(QUERY), stream=True) as response:
        assert response.headers["x-zooter-candidate"] == chosen
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = list(response.parse())
    assert {c.model for c in chunks} == {chosen}
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
        f"private-{chosen} answers: " + " ".join(reversed(QUERY.split()))
    assert chunks[-1].choices[0].finish_reason == "stop"

    async def run():
        openai = async_client(healthy)
        stream = await openai.chat.completions.create(model="zooter", messages=ask(QUERY), stream=True, max_tokens=3)
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
        whole = await openai.completions.create(model="zooter", prompt=QUERY, max_tokens=3)
        pieces = await openai.completions.create(model="zooter", prompt=QUERY, max_tokens=3, stream=True)
        streamed = "".join([c.choices[0].text async for c in pieces])
        models = await openai.models.list()
        await openai.close()
        return text, whole, streamed, [m.id for m in models.data]

    text, whole, streamed, models = asyncio.run(run())
    assert text == f"private-{chosen} answers: primes." == whole.choices[0].text == streamed
    assert whole.model == chosen and whole.usage.completion_tokens == 3
    assert models == ["zooter", *LABELS, "midway-demo", "picky-demo", "endless-demo"]


# --- fallback ---------------------------------------------------------------------------------------------
def test_a_failure_before_the_first_token_falls_back_invisibly(faulty, ranking, router, caplog):
    before = {reason: metric(faulty, "zooter_gateway_upstream_failures_total", None, candidate=name,
                             stage="before_first_token", reason=reason)
              for name, reason in zip(ranking, ("http_5xx", "refused", "timeout"))}
    fallbacks = metric(faulty, "zooter_gateway_fallbacks_total", None, candidate=ranking[3])
    openai = client(faulty, None)
    raw = openai.chat.completions.with_raw_response.create(model="zooter", messages=ask(QUERY))
    assert raw.headers["x-zooter-candidate"] == ranking[3] == raw.parse().model
    assert raw.headers["x-zooter-fallback"] == "true"
    # The confidence is the router's, in its own choice: the fallback header says the answer is another's.
    assert float(raw.headers["x-zooter-confidence"]) == pytest.approx(router.route(QUERY).confidence, abs=1e-3)
    with openai.chat.completions.with_streaming_response.create(model="zooter", messages=ask(QUERY),
                                                                stream=True) as response:
        assert response.headers["x-zooter-candidate"] == ranking[3]
        text = "".join(c.choices[0].delta.content or "" for c in response.parse())
    assert text.startswith("good answers:")
    for (name, reason), old in zip(zip(ranking, ("http_5xx", "refused", "timeout")), before.values()):
        assert metric(faulty, "zooter_gateway_upstream_failures_total", None, candidate=name,
                      stage="before_first_token", reason=reason) == old + 2, (name, reason)
    assert metric(faulty, "zooter_gateway_fallbacks_total", None, candidate=ranking[3]) == fallbacks + 2
    # The broken upstream echoed the gateway's upstream key in its error body: the log has it redacted.
    assert "[redacted]" in caplog.text and UPSTREAM_KEY not in caplog.text


def test_every_upstream_down_is_a_503_without_secrets(faulty, ranking):
    from openai import InternalServerError

    with pytest.raises(InternalServerError) as info:
        client(faulty, None).chat.completions.create(model="zooter", messages=ask(QUERY),
                                                     extra_body={"zooter": {"candidates": ranking[:2]}})
    assert info.value.status_code == 503
    error = info.value.body
    assert error["code"] == "upstreams_unavailable" and error["type"] == "upstream_error"
    assert f"{ranking[0]}: HTTP 500" in error["message"] and f"{ranking[1]}: cannot connect" in error["message"]
    assert UPSTREAM_KEY not in json.dumps(error) and "127.0.0.1" not in error["message"]


def test_a_failure_mid_stream_ends_with_an_error_event(healthy):
    from openai import APIError

    failures = metric(healthy, "zooter_gateway_upstream_failures_total", candidate="midway-demo", stage="mid_stream")
    received = []
    with pytest.raises(APIError, match="midway-demo failed mid-answer"):
        for c in client(healthy).chat.completions.create(model="midway-demo", messages=ask(QUERY), stream=True):
            received.append(c.choices[0].delta.content or "")
    assert "".join(received) == "midway answers:"       # what came before the break, then the error
    # On the wire: the error event is the last one, and no [DONE] follows it.
    with httpx.stream("POST", healthy.url + "/v1/completions", headers={"authorization": f"Bearer {CLIENT_KEYS[0]}"},
                      json={"model": "midway-demo", "prompt": QUERY, "stream": True}) as response:
        events = [line for line in response.iter_lines() if line.startswith("data:")]
    assert json.loads(events[-1][5:])["error"]["code"] == "stream_interrupted" and "[DONE]" not in events[-1]
    assert metric(healthy, "zooter_gateway_upstream_failures_total", candidate="midway-demo",
                  stage="mid_stream") == failures + 2


def test_an_upstream_that_refuses_the_request_is_not_retried(healthy, stub):
    from openai import BadRequestError

    asked = len(stub.records)
    with pytest.raises(BadRequestError, match="picky-demo: the candidate refused the request: max_tokens is too large"):
        client(healthy).chat.completions.create(model="picky-demo", messages=ask(QUERY))
    assert len(stub.records) == asked + 1



# Events as some servers write them: CRLF and lone CR line ends, a comment, other fields, `data:` without its space,
# spacing and escapes of their own, a field the gateway does not know. Each payload is (model, its bytes).
ODD_EVENTS = [b'{"id": "x1", "object": "chat.completion.chunk", "model": "odd-demo",  "choices": [{"index": 0, '
              b'"delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}',
              b'{"id":"x1","object":"chat.completion.chunk","model":"odd-demo","choices":[{"index":0,'
              b'"delta":{"content":"caf\\u00e9 \\ud83d\\ude00"},"finish_reason":null}],"x_extra":[1.50,2e3]}',
              b'{"id":"x1","object":"chat.completion.chunk","model":"odd-demo","choices":[{"index":0,'
              b'"delta":{"content":" tail"},"finish_reason":null}]}',
              b'{"id":"x1","object":"chat.completion.chunk","model":"someone-else","choices":[{"index":0,'
              b'"delta":{},"finish_reason":"stop"}]}']


def odd_sse_app(connections: list):
    """An upstream that streams ODD_EVENTS in unusual SSE, split across writes in the middle of lines; it records
    the client address of every request (the same one again: a connection kept alive)."""
    e = ODD_EVENTS
    wire = (b": keep-alive\r\nevent: message\r\ndata: " + e[0] + b"\r\n\r\nid: 7\ndata:" + e[1] + b"\r\rdata: " + e[2]
            + b"\n\n" + b"data: " + e[3] + b"\n\ndata: [DONE]\n\n")
    parts = [wire[:40], wire[40:41], wire[41:200], wire[200:len(wire) - 30], wire[len(wire) - 30:]]

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            return await send({"type": "lifespan.shutdown.complete"})
        while (await receive()).get("more_body"):
            pass
        if scope["method"] == "GET":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
            return await send({"type": "http.response.body", "body": b'{"data": []}'})
        connections.append(tuple(scope["client"]))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for i, part in enumerate(parts):
            await send({"type": "http.response.body", "body": part, "more_body": i < len(parts) - 1})
            await asyncio.sleep(0.01)

    return app


def test_streamed_chunks_pass_through_byte_for_byte_from_unusual_sse(bundles, tmp_path):
    """What an upstream streams reaches the client as the same JSON bytes (no decode and encode on the way) unless
    the gateway rewrites something (the `model` of a chunk that names another model); and a stream read to its
    end leaves its upstream connection open for the next request."""
    connections: list = []
    upstream = ServerThread(odd_sse_app(connections))
    serve = {label: {"openai_base_url": f"http://127.0.0.1:{closed_port()}/v1"} for label in LABELS}
    serve["odd-demo"] = {"openai_base_url": upstream.url + "/v1"}      # the only one on this upstream
    gateway = start_gateway(bundle=bundles["int8"], candidates=write_candidates(tmp_path / "c.yaml", serve))
    try:
        for _ in range(4):
            with httpx.stream("POST", gateway.url + "/v1/chat/completions", timeout=60,
                              json={"model": "odd-demo", "messages": ask(QUERY), "stream": True}) as response:
                assert response.status_code == 200
                events = [line[len("data: "):].encode() for line in response.iter_lines() if line.startswith("data: ")]
            assert events[:3] == ODD_EVENTS[:3] and events[-1] == b"[DONE]" and len(events) == 5
            last = json.loads(events[3])
            assert last["model"] == "odd-demo" and last == {**json.loads(ODD_EVENTS[3]), "model": "odd-demo"}
        # Each stream on a connection of its own would be 4; a health check may hold one while a stream starts.
        assert len(connections) == 4 and len(set(connections)) <= 2, connections
    finally:
        gateway.stop()
        upstream.stop()

# --- the rest of the API ------------------------------------------------------------------------------------
def test_api_keys(healthy):
    from openai import AuthenticationError

    with pytest.raises(AuthenticationError):
        client(healthy, "wrong-key").chat.completions.create(model="zooter", messages=ask(QUERY))
    for headers in ({}, {"authorization": "Basic " + CLIENT_KEYS[0]}, {"authorization": "Bearer"}):
        response = httpx.post(healthy.url + "/v1/chat/completions", headers=headers,
                              json={"model": "zooter", "messages": ask(QUERY)})
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["code"] == "invalid_api_key"
    for path in ("/v1/models", "/metrics"):
        assert httpx.get(healthy.url + path).status_code == 401
    assert client(healthy, CLIENT_KEYS[1]).models.list().data[0].id == "zooter"
    assert httpx.get(healthy.url + "/health?probe=live").json() == {"live": True}   # probes need no key


BAD = [  # (body, status, param or code, words in the message)
    (b"{not json", 400, "invalid_json", "not valid JSON"),
    (b"", 400, "invalid_json", "empty"),
    (b"[1, 2]", 400, "invalid_json", "JSON object"),
    ({"model": "zooter"}, 400, "messages", "messages is required"),
    ({"model": "zooter", "messages": []}, 400, "messages", "must not be empty"),
    ({"model": "zooter", "messages": "hi"}, 400, "messages", "must be an array"),
    ({"model": "zooter", "messages": [{"role": "user", "content": 42}]}, 400, "messages[0].content", "string or a list"),
    ({"model": "zooter", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "one of"),
    ({"model": "zooter", "messages": [{"role": "user", "content": "  "}]}, 400, "messages", "no text"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model", "model is required"),
    ({"model": 7, "messages": [{"role": "user", "content": "hi"}]}, 400, "model", "non-empty string"),
    ({"model": "zooter", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream", "boolean"),
    ({"model": "zooter", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "9"}, 400, "max_tokens", "integer"),
    ({"model": "zooter", "messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 400, "temperature", "between"),
    ({"model": "zooter", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n", "n must be 1"),
    ({"model": "zooter", "messages": [{"role": "user", "content": "hi"}], "zooter": {"lambda": -1}}, 400,
     "zooter.lambda", ">= 0"),
    ({"model": "zooter", "messages": [{"role": "user", "content": "hi"}], "zooter": {"lamda": 1}}, 400, "zooter",
     "unknown option"),
    ({"model": "zooter", "messages": [{"role": "user", "content": "hi"}], "zooter": {"candidates": ["nobody"]}}, 400,
     "zooter.candidates", "unknown candidate"),
    ({"model": "zooter", "messages": [{"role": "user", "content": "hi"}], "zooter": {"candidates": ["picky-demo"]}},
     400, "zooter.candidates", "none of"),
    ({"model": "alpha-7b", "messages": [{"role": "user", "content": "hi"}], "zooter": {"lambda": 1}}, 400, "zooter",
     "model 'zooter' only"),
    ({"model": "gpt-17", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "unknown model 'gpt-17'"),
    (b"null", 400, "invalid_json", "must be a JSON object, not null"),
    (b'"hi"', 400, "invalid_json", "must be a JSON object, not string"),
    # Integers within their ranges (Triton's INT32 inputs wrapped or overflowed; upstreams got them unchecked).
    *[({"model": "zooter", "messages": [{"role": "user", "content": "hi"}], name: value}, 400, name, "must be an integer")
      for name, value in [("max_tokens", 4294967299), ("max_tokens", 3000000000), ("max_tokens", 10**30),
                          ("max_tokens", 10**9), ("max_tokens", 0), ("max_completion_tokens", 2**31),
                          ("seed", 2**64), ("top_k", -5), ("top_logprobs", 21), ("min_tokens", -1)]],
    # Bodies Python's json takes but nothing downstream can: deep nesting, 5,000 digits, NaN and infinities.
    (b'{"model": "zooter", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "invalid_json", "nests deeper than"),
    (b'{"model": "zooter", "messages": [{"role": "user", "content": "hi"}], "tools": ' + b"[" * 100 + b"]" * 100 + b"}",
     400, "tools" + "[0]" * 63, "nests deeper than 64"),
    (b'{"model": "zooter", "messages": [{"role": "user", "content": "hi"}], "seed": 1' + b"0" * 5000 + b"}", 400,
     "seed", "an integer of 5001 digits"),
    *[(b'{"model": "zooter", "messages": [{"role": "user", "content": "hi"}], ' + field + b"}", 400, param, words)
      for field, param, words in [(b'"frequency_penalty": NaN', "frequency_penalty", "NaN"),
                                  (b'"seed": Infinity', "seed", "Infinity"),
                                  (b'"logit_bias": {"50256": -Infinity}', "logit_bias.50256", "-Infinity"),
                                  (b'"temperature": 1e999', "temperature", "1e999"),
                                  (b'"metadata": {"tags": [1, NaN]}', "metadata.tags[1]", "NaN")]],
    ({"model": "zooter", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"50256": 101}}, 400,
     "logit_bias", "from -100 to 100"),
    ({"model": "zooter", "messages": [{"role": "user", "content": "hi"}], "presence_penalty": -3}, 400,
     "presence_penalty", "between"),
]


@pytest.mark.parametrize("body,status,param,words", BAD, ids=[f"{i}-{b[2][:30]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_an_openai_shaped_error(healthy, stub, body, status, param, words, caplog):
    headers = {"authorization": f"Bearer {CLIENT_KEYS[0]}", "content-type": "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    asked = len(stub.records)
    response = httpx.post(healthy.url + "/v1/chat/completions", headers=headers, content=content)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"} and words in error["message"]
    assert param in (error["param"], error["code"])
    assert len(stub.records) == asked and "Traceback" not in caplog.text        # nothing went upstream


def test_integer_ranges_hold_on_the_triton_back_end_too():
    """Checked before any back end: with --triton, 4294967299 no longer wraps to 3 in Triton's INT32 input, nor
    does 10**30 overflow into a 500 (Triton is not even running here: the 400 comes first)."""
    gateway = start_gateway(triton=f"grpc://127.0.0.1:{closed_port()}")
    try:
        for value in (4294967299, 3000000000, 10**30, 2**20 + 1):
            response = httpx.post(gateway.url + "/v1/chat/completions",
                                  json={"model": "zooter", "messages": ask(QUERY), "max_tokens": value})
            assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens", response.text
    finally:
        gateway.stop()


def test_errors_quote_a_bounded_part_of_the_input(faulty):
    many = [f"n{i}" for i in range(80000)]
    response = httpx.post(faulty.url + "/v1/chat/completions",
                          json={"model": "zooter", "messages": ask(QUERY), "zooter": {"candidates": many}})
    assert response.status_code == 400 and len(response.content) < 1000, len(response.content)
    assert "80000 unknown candidate(s)" in response.json()["error"]["message"]
    response = httpx.post(faulty.url + "/v1/chat/completions", json={"model": "m" * 100000, "messages": ask(QUERY)})
    assert response.status_code == 404 and len(response.content) < 1000, len(response.content)
    response = httpx.post(faulty.url + "/v1/chat/completions",
                          json={"model": "zooter", "messages": [{"role": "r" * 100000, "content": "hi"}]})
    assert response.status_code == 400 and len(response.content) < 1000, len(response.content)


def test_oversize_bodies_unknown_paths_and_the_openai_client(healthy):
    from openai import BadRequestError, NotFoundError

    headers = {"authorization": f"Bearer {CLIENT_KEYS[0]}"}
    big = json.dumps({"model": "zooter", "messages": ask("x" * 70000)}).encode()
    response = httpx.post(healthy.url + "/v1/chat/completions", headers=headers, content=big)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    def chunked():            # no Content-Length: the limit holds on what actually arrives
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    response = httpx.post(healthy.url + "/v1/chat/completions", headers=headers, content=chunked())
    assert response.status_code == 413
    response = httpx.get(healthy.url + "/v1/nothing-here", headers=headers)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert httpx.get(healthy.url + "/v1/chat/completions", headers=headers).json()["error"]["code"] == "method_not_allowed"
    with pytest.raises(NotFoundError, match="unknown model"):
        client(healthy).chat.completions.create(model="gpt-17", messages=ask(QUERY))
    with pytest.raises(BadRequestError, match="prompt must not be empty"):
        client(healthy).completions.create(model="zooter", prompt=" ")


def test_metrics_count_requests_routing_latency_and_tokens(healthy, router):
    chosen = router.route(QUERY).candidate
    names = [("zooter_gateway_requests_total", {"endpoint": "/v1/chat/completions", "candidate": chosen, "status": "200"}),
             ("zooter_gateway_requests_total", {"endpoint": "/v1/chat/completions", "candidate": "", "status": "400"}),
             ("zooter_gateway_routing_seconds_count", {"router": router.router_id}),
             ("zooter_gateway_upstream_ttft_seconds_count", {"candidate": chosen}),
             ("zooter_gateway_upstream_seconds_count", {"candidate": chosen}),
             ("zooter_gateway_tokens_total", {"candidate": chosen, "kind": "completion"}),
             ("zooter_gateway_tokens_total", {"candidate": chosen, "kind": "prompt"})]
    before = [metric(healthy, name, **labels) for name, labels in names]
    openai = client(healthy)
    openai.chat.completions.create(model="zooter", messages=ask(QUERY), max_tokens=5)       # usage: 8 + 5 tokens
    list(openai.chat.completions.create(model="zooter", messages=ask(QUERY), max_tokens=5, stream=True))  # 5 chunks
    httpx.post(healthy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {CLIENT_KEYS[0]}"},
               json={"model": "zooter"})
    after = [metric(healthy, name, **labels) for name, labels in names]
    assert [a - b for a, b in zip(after, before)] == [2, 1, 2, 1, 2, 10, len(QUERY.split())]
    assert metric(healthy, "zooter_gateway_in_flight_requests") == 0
    assert metric(healthy, "zooter_gateway_routed_total", router=router.router_id, candidate=chosen) >= 2


# --- reading a request: deadline, disconnects ---------------------------------------------------------------
def read_until_closed(sock: socket.socket) -> bytes:
    """What the server sends until it closes (a socket timeout, generous, fails the test instead of hanging)."""
    data = b""
    while True:
        try:
            part = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not part:
            return data
        data += part


def trickle(sock: socket.socket, data: bytes, every: float = 0.25) -> bytes:
    """Send `data` a byte at a time, `every` seconds apart, until the server answers or closes: what it sent."""
    for byte in data:
        readable, _, _ = select.select([sock], [], [], every)
        if readable:
            return read_until_closed(sock)
        try:
            sock.sendall(bytes([byte]))
        except OSError:              # closed under us
            return read_until_closed(sock)
    pytest.fail("the server took the whole trickle: it set no deadline on reading the request")


def connect(server: ServerThread, head: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    sock.sendall(head)
    return sock


def wait_for(condition, what: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"


def installed(*modules: str) -> bool:
    from importlib.util import find_spec

    return all(find_spec(m) is not None for m in modules)


def serving_stack(server: ServerThread) -> set[tuple[str, str]]:
    """(uvicorn's HTTP protocol under the guard, the event loop's module) of each connection open now."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    def protocol(conn) -> str:
        return "h11" if isinstance(conn, H11Protocol) else "httptools"

    return {(protocol(c), type(c.loop).__module__.split(".")[0]) for c in server.server.server_state.connections}


# Both of uvicorn's HTTP stacks: h11 on asyncio (always there), httptools on uvloop (the `gateway` extra's, when
# installed; AutoHTTPProtocol and the auto loop pick them).
STACKS = [pytest.param(("h11", "asyncio"), id="h11-asyncio"),
          pytest.param(("httptools", "uvloop"), id="httptools-uvloop",
                       marks=pytest.mark.skipif(not installed("httptools", "uvloop"), reason="httptools, uvloop not installed"))]


@pytest.fixture(scope="module", params=STACKS)
def impatient(request, bundles, stub, tmp_path_factory):
    """A gateway with a 2-second request timeout (not used for anything that should be answered), on one HTTP stack."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from zooter.servers.gateway import GatewaySettings, create_app
    from zooter.servers.gateway.http import guarded

    path = write_candidates(tmp_path_factory.mktemp("impatient") / "candidates.yaml",
                            {label: {"openai_base_url": stub.url + "/v1", "model": "good"} for label in LABELS})
    app = create_app(GatewaySettings(bundle=bundles["int8"], candidates=path, request_timeout=2.0))
    http, loop = request.param
    if http == "h11":
        base = H11Protocol
    else:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    server = ServerThread(app, http=guarded(base, 2.0, app.state.gateway.read_timed_out), loop=loop)
    server.stack = request.param
    yield server
    server.stop()


def test_a_request_must_arrive_within_the_request_timeout(impatient, caplog):
    """Slow-loris, with headers or body: stalled or a byte at a time, each is cut at --request-timeout (a 408, or a
    closed connection when its headers never came), counted, and the in-flight gauge comes back to 0."""
    endpoint = "/v1/chat/completions"
    early, late = (metric(impatient, "zooter_gateway_requests_total", None, endpoint=e, status="408") for e in ("", endpoint))
    # Headers that never end: stalled, then a byte every 0.25 s.
    stalled = read_until_closed(connect(impatient, b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127"))
    assert stalled == b"" or stalled.startswith(b"HTTP/1.1 408"), stalled
    dripped = trickle(connect(impatient, b"POST /v1/chat"), b"/completions HTTP/1.1\r\nx-slow: " + b"a" * 400)
    assert dripped.startswith(b"HTTP/1.1 408") and b"request_timeout" in dripped, dripped
    # Bodies that never end: 5 stalled at once (each held a request in flight), and one a byte every 0.25 s.
    body = json.dumps({"model": "zooter", "messages": ask(QUERY)}).encode()
    socks = [connect(impatient, HEAD + b"content-length: %d\r\n\r\n" % len(body) + body[:20]) for _ in range(5)]
    wait_for(lambda: serving_stack(impatient) == {impatient.stack}, "not served on the stack under test")
    dripped = trickle(connect(impatient, HEAD + b"content-length: %d\r\n\r\n" % len(body)), body)
    for answer in [read_until_closed(sock) for sock in socks] + [dripped]:
        assert answer.startswith(b"HTTP/1.1 408") and b'"code":"request_timeout"' in answer, answer
    assert metric(impatient, "zooter_gateway_requests_total", None, endpoint=endpoint, status="408") == late + 6
    assert metric(impatient, "zooter_gateway_requests_total", None, endpoint="", status="408") >= early + 1
    assert metric(impatient, "zooter_gateway_in_flight_requests", None) == 0
    assert "Traceback" not in caplog.text


def test_a_client_that_leaves_while_sending_is_a_499_not_an_error(healthy, caplog):
    endpoint = "/v1/chat/completions"
    before = metric(healthy, "zooter_gateway_requests_total", endpoint=endpoint, status="499")
    errors = metric(healthy, "zooter_gateway_requests_total", endpoint=endpoint, status="500")
    sock = connect(healthy, HEAD + f"authorization: Bearer {CLIENT_KEYS[0]}\r\n".encode() +
                   b"content-length: 5000\r\n\r\n" + b'{"model": "zooter", "messages": [')
    sock.close()
    wait_for(lambda: metric(healthy, "zooter_gateway_requests_total", endpoint=endpoint, status="499") == before + 1,
             "the disconnect was not counted as 499")
    assert metric(healthy, "zooter_gateway_requests_total", endpoint=endpoint, status="500") == errors
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.levelname == "ERROR"]
    assert metric(healthy, "zooter_gateway_in_flight_requests") == 0


def test_a_client_that_leaves_mid_stream_hangs_up_on_the_upstream(healthy, stub, caplog):
    """A client gone mid-answer: the gateway closes the upstream's stream too (a real LLM server then stops
    generating), counts a 499, and lets go of the request."""
    endpoint = "/v1/chat/completions"
    before = metric(healthy, "zooter_gateway_requests_total", endpoint=endpoint, candidate="endless-demo", status="499")
    hung_up = stub.stats.hung_up.get("endless", 0)
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", healthy.url + endpoint, headers={"authorization": f"Bearer {CLIENT_KEYS[0]}"},
                         json={"model": "endless-demo", "messages": ask(QUERY), "stream": True}) as response:
            assert response.status_code == 200
            words = 0
            for line in response.iter_lines():
                words += line.startswith("data:")
                if words == 3:
                    break          # leaving the block unread closes the connection
    wait_for(lambda: stub.stats.hung_up.get("endless", 0) == hung_up + 1,
             "the upstream's stream stayed open after the client left")
    wait_for(lambda: metric(healthy, "zooter_gateway_requests_total", endpoint=endpoint, candidate="endless-demo",
                            status="499") == before + 1, "the client's leaving was not counted as 499")
    assert metric(healthy, "zooter_gateway_in_flight_requests") == 0
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.levelname == "ERROR"]


# --- health and the retry budget ------------------------------------------------------------------------------
def test_health_answers_from_one_background_check(bundles, upstream_key, tmp_path):
    """Ten /health calls ask each upstream once (the monitor's first check), not ten times; probes need no key
    and get the status alone; the upstream map needs a key."""
    records, probes = [], []
    stub = ServerThread(stub_app(records, probes))
    path = write_candidates(tmp_path / "c.yaml", {label: {"openai_base_url": stub.url + "/v1"} for label in LABELS})
    gateway = start_gateway(bundle=bundles["int8"], candidates=path, api_keys=CLIENT_KEYS, health_interval=3600)
    try:
        key = {"authorization": f"Bearer {CLIENT_KEYS[0]}"}
        for _ in range(10):
            detailed = httpx.get(gateway.url + "/health", headers=key)
            assert detailed.status_code == 200 and detailed.json()["upstreams"] == {label: "up" for label in LABELS}
        assert len(probes) == len(LABELS), probes
        bare = httpx.get(gateway.url + "/health")
        assert bare.status_code == 200 and bare.json() == {"status": "ok", "live": True, "ready": True}
        wrong = httpx.get(gateway.url + "/health", headers={"authorization": "Bearer nope"}).json()
        assert "upstreams" not in wrong and "backend" not in wrong
        ready = httpx.get(gateway.url + "/health?probe=ready")
        assert ready.status_code == 200 and ready.json() == {"ready": True}
        assert httpx.get(gateway.url + "/health?probe=live").json() == {"live": True}
        assert len(probes) == len(LABELS)
    finally:
        gateway.stop()
        stub.stop()


def test_health_sees_an_upstream_go_down_without_being_asked(bundles, tmp_path):
    stub = ServerThread(stub_app([]))
    path = write_candidates(tmp_path / "c.yaml", {label: {"openai_base_url": stub.url + "/v1"} for label in LABELS})
    gateway = start_gateway(bundle=bundles["int8"], candidates=path, health_interval=0.2)
    try:
        assert httpx.get(gateway.url + "/health").json()["status"] == "ok"
        stub.stop()
        wait_for(lambda: httpx.get(gateway.url + "/health").status_code == 503, "/health never saw the upstream go")
        health = httpx.get(gateway.url + "/health").json()
        assert health["status"] == "unavailable" and all(s.startswith("down") for s in health["upstreams"].values())
        assert httpx.get(gateway.url + "/health?probe=ready").status_code == 503
        assert httpx.get(gateway.url + "/health?probe=live").status_code == 200
    finally:
        gateway.stop()


def test_a_request_every_upstream_fails_tries_max_attempts_candidates(bundles, stub, tmp_path):
    from openai import InternalServerError

    path = write_candidates(tmp_path / "c.yaml",
                            {label: {"openai_base_url": stub.url + "/v1", "model": f"broken-{label}"} for label in LABELS})
    gateway = start_gateway(bundle=bundles["int8"], candidates=path)
    try:
        asked = len(stub.records)
        with pytest.raises(InternalServerError, match=r"1 more not tried \(--max-attempts 3\)") as info:
            client(gateway, None).chat.completions.create(model="zooter", messages=ask(QUERY))
        assert info.value.status_code == 503 and len(stub.records) == asked + 3
    finally:
        gateway.stop()


def test_health_and_models_show_the_upstreams(faulty, ranking):
    response = httpx.get(faulty.url + "/health")
    assert response.status_code == 200
    health = response.json()
    assert health["ready"] and health["live"] and health["status"] == "degraded" and health["backend"] == "bundle"
    assert health["upstreams"][ranking[1]] == "down: cannot connect" and health["upstreams"][ranking[3]] == "up"
    assert [m.id for m in client(faulty, None).models.list().data] == ["zooter", *ranking]


# --- the command ------------------------------------------------------------------------------------------------
def test_the_command_refuses_a_bad_setup_in_one_line(bundles, tmp_path, capsys):
    from zooter.cli import main

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("- name: a\n  serve: {openai_base_url: http://127.0.0.1:1/v1\n- name: b\n")

    cases = [([], "give either --triton URL or --bundle B --candidates FILE"),
             (["--bundle", str(bundles["int8"])], "--bundle and --candidates go together"),
             (["--triton", "http://127.0.0.1:8000"], "the gateway talks to Triton over gRPC"),
             (["--bundle", str(bundles["int8"]), "--candidates", str(bundles["candidates"])],
              "none of the router's candidates has a serve entry"),
             (["--bundle", str(bundles["int8"]), "--candidates", str(bundles["candidates"]),
               "--api-keys-file", str(tmp_path / "none")], "no such API keys file"),
             (["--bundle", str(bundles["int8"]), "--candidates", str(bundles["candidates"]),
               "--upstream-timeout", "0"], "--upstream-timeout must be"),
             (["--bundle", str(bundles["int8"]), "--candidates", str(bundles["candidates"]),
               "--max-attempts", "0"], "--max-attempts must be >= 1"),
             (["--bundle", str(bundles["int8"]), "--candidates", str(bundles["candidates"]),
               "--max-tokens-limit", str(2**31)], "--max-tokens-limit must be from 1 to 2147483647"),
             (["--bundle", str(bundles["int8"]), "--candidates", str(bad_yaml)],
              f"{bad_yaml}: invalid YAML at line 3, column 7: expected ',' or '}}'")]
    for argv, message in cases:
        assert main(["gateway", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_zooter_gateway_serves_on_loopback_and_stops_on_sigterm(bundles, stub, tmp_path, listeners):
    from zooter.servers.tritonserver import free_port

    candidates = write_candidates(tmp_path / "c.yaml", {label: {"openai_base_url": stub.url + "/v1"} for label in LABELS})
    busy = ServerThread(stub_app([]))
    try:
        argv = [sys.executable, "-m", "zooter.cli", "gateway", "--bundle", str(bundles["int8"]), "--candidates",
                str(candidates)]
        taken = subprocess.run([*argv, "--port", str(busy.port)], capture_output=True, text=True, timeout=60)
        assert taken.returncode == 2 and f"cannot listen on 127.0.0.1:{busy.port}" in taken.stderr
    finally:
        busy.stop()
    port = free_port()
    proc = subprocess.Popen([*argv, "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:          # uvicorn's own lines come first
            lines.append(line)
            if line.startswith("zooter gateway ready"):
                break
        assert lines[-1].startswith(f"zooter gateway ready: http://127.0.0.1:{port}/v1"), "".join(lines)
        assert listeners(port) == {"127.0.0.1"}
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                            json={"model": "zooter", "messages": ask(QUERY)}, timeout=30)
        assert answer.status_code == 200 and answer.headers["x-zooter-candidate"] in LABELS
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


# --- through Triton --------------------------------------------------------------------------------------------
def test_triton_down_is_a_503_that_says_so():
    from openai import InternalServerError

    gateway = start_gateway(triton=f"grpc://127.0.0.1:{closed_port()}")
    try:
        openai = client(gateway, None)
        for model, extra in [("zooter", {}), ("zooter", {"zooter": {"tolerance": 0.1}}), (LABELS[0], {})]:
            with pytest.raises(InternalServerError, match="Triton at 127.0.0.1:[0-9]+ is not answering") as caught:
                openai.chat.completions.create(model=model, messages=ask(QUERY), extra_body=extra)
            assert caught.value.status_code == 503
        assert httpx.get(gateway.url + "/health").status_code == 503
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def triton(bundles, ranking, tmp_path_factory):
    """A real tritonserver with the tiny router and stand-ins, except for QUERY's first choice, whose model is
    not in the server: the `zooter` model falls back past it."""
    from zooter.export.triton_repo import build_repository
    from zooter.serving.candidates import parse_candidates
    from triton_helpers import tritonserver

    missing = {"serve": {"triton_model": "not_loaded_here"}}
    candidates = parse_candidates([{"name": n, **(missing if n == ranking[0] else {})} for n in LABELS])
    folder = tmp_path_factory.mktemp("gateway_triton")
    built = build_repository(bundles["int8"], folder / "repo", candidates, stand_ins=True, default_max_tokens=4)
    with tritonserver(built.path, log_file=folder / "server.log") as server:
        yield server


def banner(candidate: str) -> str:
    return f"[stand-in SmolLM2-135M-Instruct for {candidate}] "


@pytest.mark.slow
@pytest.mark.triton
def test_gateway_in_front_of_triton(triton, router, ranking):
    from openai import BadRequestError

    gateway = start_gateway(triton=f"grpc://{triton.grpc_url}")
    try:
        openai = client(gateway, None)
        text = next(t for t in TEXTS if router.route(t).candidate != ranking[0])
        chosen = router.route(text).candidate
        with openai.chat.completions.with_streaming_response.create(model="zooter", messages=ask(text), stream=True,
                                                                    max_tokens=4) as response:
            assert response.headers["x-zooter-candidate"] == chosen and response.headers["x-zooter-fallback"] == "false"
            confidence = response.headers["x-zooter-confidence"]
            chunks = list(response.parse())
        assert float(confidence) == pytest.approx(router.route(text).confidence, abs=1e-3)
        assert len(chunks) >= 3 and {c.model for c in chunks} == {chosen}
        assert "".join(c.choices[0].delta.content or "" for c in chunks).startswith(banner(chosen))
        assert chunks[-1].choices[0].finish_reason == "length"        # 4 tokens cut the stand-in's answer

        async def fallback():       # QUERY's first choice has no Triton model: Triton answers with the second
            async_openai = async_client(gateway, None)
            raw = await async_openai.chat.completions.with_raw_response.create(model="zooter", messages=ask(QUERY),
                                                                               max_tokens=3)
            await async_openai.close()
            return raw.headers, raw.parse()

        headers, answer = asyncio.run(fallback())
        assert headers["x-zooter-candidate"] == ranking[1] == answer.model and headers["x-zooter-fallback"] == "true"
        assert answer.choices[0].message.content.startswith(banner(ranking[1]))
        # The stand-in counts its tokens: 3 generated (max_tokens), so the answer was cut.
        assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 3
        assert answer.usage.total_tokens == answer.usage.prompt_tokens + 3 and answer.usage.prompt_tokens > 0
        assert metric(gateway, "zooter_gateway_fallbacks_total", None, candidate=ranking[1]) == 1

        # A named candidate answers without routing; the `zooter` object's knobs reach the router inside Triton.
        raw = openai.chat.completions.with_raw_response.create(model=ranking[2], messages=ask(QUERY), max_tokens=3)
        assert raw.headers["x-zooter-candidate"] == ranking[2] == raw.parse().model
        assert raw.headers["x-zooter-fallback"] == "false" and "x-zooter-confidence" not in raw.headers
        assert raw.parse().choices[0].message.content.startswith(banner(ranking[2]))
        subset = [ranking[2], ranking[1]]
        raw = openai.chat.completions.with_raw_response.create(model="zooter", messages=ask(QUERY), max_tokens=3,
                                                               extra_body={"zooter": {"candidates": subset}})
        assert raw.headers["x-zooter-candidate"] == router.route(QUERY, candidates=subset).candidate
        for text in TEXTS:
            decision = router.route(text, tolerance=0.1)
            expected = next(c for c in decision.ranking if c != ranking[0])     # ranking[0] has no model here
            raw = openai.chat.completions.with_raw_response.create(model="zooter", messages=ask(text), max_tokens=2,
                                                                   extra_body={"zooter": {"tolerance": 0.1}})
            assert raw.headers["x-zooter-candidate"] == expected, text
        with pytest.raises(BadRequestError, match="zooter options apply to model 'zooter' only"):
            openai.chat.completions.create(model=ranking[1], messages=ask(QUERY), extra_body={"zooter": {"lambda": 1}})
        with pytest.raises(BadRequestError, match="unknown candidate"):
            openai.chat.completions.create(model="zooter", messages=ask(QUERY),
                                           extra_body={"zooter": {"candidates": ["nobody"]}})
        health = httpx.get(gateway.url + "/health")
        assert health.status_code == 200 and health.json()["upstreams"] == {"triton": "up"}
        assert [m.id for m in openai.models.list().data] == ["zooter", *LABELS]
    finally:
        gateway.stop()


@pytest.mark.slow
@pytest.mark.triton
def test_in_process_routing_to_triton_models(triton, bundles, ranking, tmp_path):
    from zooter.export.triton_repo import model_name_for

    url = f"grpc://{triton.grpc_url}"
    serve = {label: {"triton_model": model_name_for(label), "triton_url": url} for label in LABELS}
    serve[ranking[0]] = {"triton_model": "not_loaded_here", "triton_url": url}
    gateway = start_gateway(bundle=bundles["int8"], candidates=write_candidates(tmp_path / "c.yaml", serve), max_tokens=4)
    try:
        openai = client(gateway, None)
        with openai.chat.completions.with_streaming_response.create(model="zooter", messages=ask(QUERY),
                                                                    stream=True) as response:
            assert response.headers["x-zooter-candidate"] == ranking[1] and response.headers["x-zooter-fallback"] == "true"
            text = "".join(c.choices[0].delta.content or "" for c in response.parse())
        assert text.startswith(banner(ranking[1]))
        assert metric(gateway, "zooter_gateway_upstream_failures_total", None, candidate=ranking[0],
                      stage="before_first_token", reason="unloaded") == 1
        answer = openai.completions.create(model=ranking[2], prompt=QUERY, max_tokens=2)
        assert answer.model == ranking[2] and answer.choices[0].text.startswith(banner(ranking[2]))
        assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 2
        health = httpx.get(gateway.url + "/health").json()
        assert health["upstreams"][ranking[0]].startswith("down") and health["upstreams"][ranking[1]] == "up"
    finally:
        gateway.stop()


# --- where routing runs ---------------------------------------------------------------------------------------
def recording_routes(app, delay: float = 0.0) -> list[str]:
    """The names of the threads the gateway's router is called on, in order; each call after `delay` seconds."""
    router = app.state.gateway.backend.router
    route, threads = router.route, []

    def recorded(*args, **kwargs):
        threads.append(threading.current_thread().name)
        time.sleep(delay)
        return route(*args, **kwargs)

    router.route = recorded
    return threads


def test_a_lone_request_routes_on_the_event_loop_and_overlapping_ones_in_the_pool(bundles, stub, router, tmp_path):
    # "paired" holds each request upstream until another is in flight: the second request is routed while the
    # first is in flight, however the two are scheduled.
    path = write_candidates(tmp_path / "c.yaml",
                            {label: {"openai_base_url": stub.url + "/v1", "model": f"paired-{label}"} for label in LABELS})
    gateway = start_gateway(bundle=bundles["int8"], candidates=path)
    app = gateway.server.config.app
    try:
        # One onnxruntime thread a call: the pool is the parallelism when requests overlap.
        assert app.state.gateway.backend.router.session.get_session_options().intra_op_num_threads == 1
        threads = recording_routes(app)
        with httpx.Client(timeout=60) as http:
            body = {"model": "zooter", "messages": ask(QUERY)}
            with ThreadPoolExecutor(2) as pool:
                answers = list(pool.map(lambda _: http.post(gateway.url + "/v1/chat/completions", json=body), range(2)))
            assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
            assert {a.headers["x-zooter-candidate"] for a in answers} == {router.route(QUERY).candidate}
            assert len(threads) == 2 and any(name.startswith("zooter-route") for name in threads), threads
            # Alone (nothing else in flight), a request routes on the event loop's thread: no hand-off to the pool.
            # The paired upstream holds it at most 10 s waiting for a partner, then answers.
            del threads[:]
            alone = http.post(gateway.url + "/v1/chat/completions", json=body)
            assert alone.status_code == 200 and alone.headers["x-zooter-candidate"] == router.route(QUERY).candidate
            assert threads == [gateway.thread.name], threads
    finally:
        gateway.stop()


def test_a_request_routed_inline_still_keeps_its_deadline(bundles, stub, tmp_path):
    path = write_candidates(tmp_path / "c.yaml",
                            {label: {"openai_base_url": stub.url + "/v1", "model": label} for label in LABELS})
    gateway = start_gateway(bundle=bundles["int8"], candidates=path, request_timeout=1.0)
    app = gateway.server.config.app
    try:
        threads = recording_routes(app, delay=1.5)     # routing alone outlasts the request's deadline
        asked = len(stub.records)
        answer = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "zooter", "messages": ask(QUERY)},
                            timeout=60)
        assert threads == [gateway.thread.name]
        assert answer.status_code >= 500 and "timed out" in answer.json()["error"]["message"], answer.text
        assert len(stub.records) == asked            # no candidate was asked after the deadline
    finally:
        gateway.stop()


def test_a_request_to_an_openai_upstream_hands_nothing_to_a_worker_thread(bundles, stub, router, tmp_path):
    """aiohttp's trust_env looked up the proxy variables and ~/.netrc in the loop's default executor on every request
    and health probe (two thread hand-offs, each a wake-up); they are read once, when the candidates load."""
    from zooter.servers.gateway import GatewaySettings, create_app, gateway_server_options

    submitted: list = []

    class Recording(ThreadPoolExecutor):
        def submit(self, fn, *args, **kwargs):
            submitted.append(getattr(fn, "__qualname__", repr(fn)))
            return super().submit(fn, *args, **kwargs)

    def ready(_gateway) -> None:
        asyncio.get_running_loop().set_default_executor(Recording(2))

    path = write_candidates(tmp_path / "c.yaml",
                            {label: {"openai_base_url": stub.url + "/v1", "model": label} for label in LABELS})
    app = create_app(GatewaySettings(bundle=bundles["int8"], candidates=path), on_ready=ready)
    gateway = ServerThread(app, **gateway_server_options(app))
    try:
        with httpx.Client(timeout=60) as http:
            for stream in (False, True, False):
                answer = http.post(gateway.url + "/v1/chat/completions",
                                   json={"model": "zooter", "messages": ask(QUERY), "stream": stream})
                assert answer.status_code == 200 and answer.headers["x-zooter-candidate"] == router.route(QUERY).candidate
                assert (b"data: [DONE]" in answer.content) == stream
            assert http.get(gateway.url + "/health").json()["status"] == "ok"     # the probes ran too
        assert submitted == []
    finally:
        gateway.stop()


def test_upstreams_take_the_proxy_and_netrc_from_the_environment(tmp_path, monkeypatch):
    """What trust_env gave, read once per upstream: HTTP_PROXY unless NO_PROXY names the host; .netrc credentials
    only for an upstream without a key or credentials in its URL of its own (aiohttp refuses two at once)."""
    from zooter.servers.gateway.upstreams import UpstreamHttp

    netrc = tmp_path / "netrc"
    netrc.write_text("machine llm.internal login alice password s3cret\n")
    netrc.chmod(0o600)
    for name in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(netrc))
    assert UpstreamHttp.via("http://elsewhere:8000/v1", {}) == {}
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.internal:3128")
    via = UpstreamHttp.via("http://llm.internal:8000/v1", {})
    assert str(via["proxy"]) == "http://proxy.internal:3128" and via["proxy_auth"] is None
    assert (via["auth"].login, via["auth"].password) == ("alice", "s3cret")
    assert "auth" not in UpstreamHttp.via("http://llm.internal:8000/v1", {"Authorization": "Bearer k"})
    assert "auth" not in UpstreamHttp.via("http://bob:pw@llm.internal:8000/v1", {})   # the URL's own credentials
    monkeypatch.setenv("NO_PROXY", "llm.internal")
    assert "proxy" not in UpstreamHttp.via("http://llm.internal:8000/v1", {})


def test_the_writes_of_one_loop_turn_leave_the_gateway_as_one_send():
    """Headers and body written in one turn of the event loop go to the socket as one write (one packet, one wake-up
    of the client); a later turn's writes are a send of their own; flush() (the app's first body part) sends at
    once; close sends what was written first; abort drops it; the rest is the transport's."""
    from zooter.servers.gateway.http import Coalescing

    class Transport:
        def __init__(self):
            self.sent, self.closed = [], False

        def write(self, data):
            self.sent.append(bytes(data))

        def is_closing(self):
            return self.closed

        def close(self):
            self.closed = True

        def abort(self):
            self.closed = True

        def get_extra_info(self, name):
            return ("127.0.0.1", 1) if name == "peername" else None

    async def turns():
        loop = asyncio.get_running_loop()
        raw = Transport()
        joined = Coalescing(raw, loop)
        joined.write(b"HTTP/1.1 200 OK\r\n\r\n")
        joined.writelines([b"a", b"b"])
        assert raw.sent == []                       # nothing yet: the turn is not over
        await asyncio.sleep(0)
        assert raw.sent == [b"HTTP/1.1 200 OK\r\n\r\nab"]
        joined.write(b"c")
        joined.write(b"d")
        joined.flush()                              # at once: a response's first part does not wait for the turn
        assert raw.sent == [b"HTTP/1.1 200 OK\r\n\r\nab", b"cd"]
        await asyncio.sleep(0)                      # the flush the turn scheduled finds nothing left
        joined.write(b"e")
        joined.close()
        assert raw.sent == [b"HTTP/1.1 200 OK\r\n\r\nab", b"cd", b"e"] and raw.closed
        await asyncio.sleep(0)
        assert len(raw.sent) == 3
        dropped = Transport()
        gone = Coalescing(dropped, loop)
        gone.write(b"lost")
        gone.abort()
        await asyncio.sleep(0)
        assert dropped.sent == [] and dropped.closed
        assert joined.get_extra_info("peername") == ("127.0.0.1", 1)

    asyncio.run(turns())


def test_the_gateway_serves_on_httptools_and_uvloop_when_installed_else_h11_and_asyncio(healthy):
    """What `zooter gateway` picks (uvicorn's auto choices, behind the guard of http.py): the `gateway` extra's
    httptools and uvloop when they are installed (less CPU a request, docs/gateway.md), else h11 and asyncio;
    the other stack's request-read deadline: test_a_request_must_arrive_within_the_request_timeout."""
    expected = ("httptools", "uvloop") if installed("httptools", "uvloop") else ("h11", "asyncio")
    sock = connect(healthy, b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
    try:
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        assert serving_stack(healthy) == {expected}
    finally:
        sock.close()


class KeepAliveUpstream:
    """An OpenAI upstream on raw HTTP/1.1 keep-alive that resets a connection whose next request comes after more
    than `idle` seconds: what a client meets when it reuses a connection as a server (uvicorn: 5 s) closes it."""

    ANSWER = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"},
                                      "finish_reason": "stop"}]}).encode()

    def __init__(self, idle: float):
        self.idle, self.connections, self.resets = idle, 0, 0
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d/v1" % self.server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def _serve(self, reader, writer) -> None:
        self.connections += 1
        last = time.monotonic()
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if time.monotonic() - last > self.idle:
                    self.resets += 1
                    writer.transport.abort()
                    return
                length = next((int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                               if line.startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                body = self.ANSWER if head.startswith(b"POST") else b'{"object": "list", "data": []}'
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
                             % len(body) + body)
                await writer.drain()
                last = time.monotonic()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def stop(self) -> None:
        async def close():
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(15)
        self.loop.close()


def test_an_upstream_connection_idle_as_long_as_uvicorns_keep_alive_is_not_reused(bundles, router, tmp_path):
    """The gateway kept idle upstream connections for 60 s; uvicorn-based upstreams close theirs after 5 s, and a
    request sent down one as it closed failed over to another candidate (seen in soaks after a lull). Now a
    connection idle for 4 s is closed, not reused: after 5 s of quiet the request goes out on a new one."""
    upstream = KeepAliveUpstream(idle=4.5)
    path = write_candidates(tmp_path / "c.yaml", {label: {"openai_base_url": upstream.url} for label in LABELS})
    gateway = start_gateway(bundle=bundles["int8"], candidates=path, health_interval=3600)
    try:
        with httpx.Client(timeout=60) as http:
            body = {"model": "zooter", "messages": ask(QUERY)}
            first = http.post(gateway.url + "/v1/chat/completions", json=body)
            assert first.status_code == 200, first.text
            time.sleep(5.0)        # the quiet itself is the condition: longer under load changes nothing
            second = http.post(gateway.url + "/v1/chat/completions", json=body)
        assert second.status_code == 200, second.text
        assert second.headers["x-zooter-fallback"] == "false"
        assert second.headers["x-zooter-candidate"] == router.route(QUERY).candidate
        assert upstream.resets == 0
    finally:
        gateway.stop()
        upstream.stop()


def test_an_idle_client_connection_outlives_the_clients_own_keep_alive(healthy):
    """uvicorn closed an idle client connection after 5 s: exactly when httpx and the openai package reuse theirs
    (aiohttp clients up to 15 s, load balancers 60 s), so a request could meet the close and fail. The gateway keeps
    one for 75 s: a second request after 6 s of quiet is answered on the same connection."""
    get = b"GET /health?probe=live HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"
    sock = connect(healthy, get)
    try:
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        time.sleep(6.0)            # the quiet itself is the condition: longer under load changes nothing
        sock.sendall(get)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        sock.close()
