"""A fast OpenAI-compatible stub upstream and a bare forwarder, each run as a process of its own.

`zooter bench --gateway` puts them behind and beside the gateway (zooter.bench.gateway): the stub answers
at once (after a fixed delay), with no framework, so that what is timed is the path in front of it.
"""

from __future__ import annotations

import asyncio
import json
import time


async def read_body(receive) -> bytes:
    """An ASGI request's whole body."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


def stub_upstream(tokens: int, delay_s: float):
    """A bare ASGI app: POST /v1/chat/completions answers `tokens` words after `delay_s` (streamed: one word an
    event); GET /v1/models answers an empty list. No framework: its own cost should be near nothing."""

    async def respond(send, status: int, body: bytes, content_type: bytes, more: bool = False):
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type)]})
        await send({"type": "http.response.body", "body": body, "more_body": more})

    async def app(scope, receive, send):
        body = await read_body(receive)
        if scope["path"].endswith("/models"):
            await respond(send, 200, b'{"object":"list","data":[]}', b"application/json")
            return
        request = json.loads(body)
        model, created = request.get("model", "stub"), int(time.time())
        await asyncio.sleep(delay_s)
        if not request.get("stream"):
            text = " ".join(f"w{i}" for i in range(tokens))
            answer = {"id": "stub", "object": "chat.completion", "created": created, "model": model,
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                      "usage": {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens}}
            await respond(send, 200, json.dumps(answer).encode(), b"application/json")
            return

        def event(delta: dict, finish: str | None = None) -> bytes:
            data = {"id": "stub", "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return b"data: " + json.dumps(data).encode() + b"\n\n"

        await respond(send, 200, event({"role": "assistant", "content": ""}), b"text/event-stream", more=True)
        for i in range(tokens):
            await send({"type": "http.response.body", "body": event({"content": f" w{i}"}), "more_body": True})
        await send({"type": "http.response.body", "body": event({}, "stop") + b"data: [DONE]\n\n", "more_body": False})

    return app


def bare_proxy(upstream: str):
    """A bare ASGI forwarder with httpx: the request's bytes to `upstream`, the answer's bytes back as they come."""
    import httpx

    client = None

    async def app(scope, receive, send):
        nonlocal client
        if client is None:           # made inside the serving loop, on the first request (a warm-up one)
            client = httpx.AsyncClient(timeout=60)
        body = await read_body(receive)
        request = client.build_request(scope["method"], upstream + scope["path"], content=body,
                                       headers={"content-type": "application/json"})
        response = await client.send(request, stream=True)
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(b"content-type", response.headers["content-type"].encode())]})
            async for part in response.aiter_raw():
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()

    return app


def run_stub(port: int, tokens: int, delay_ms: float) -> None:
    """The stub's process: `python -c "from zooter.bench.openai_stub import run_stub; run_stub(...)"`."""
    _serve(stub_upstream(tokens, delay_ms / 1000), port)


def run_proxy(port: int, upstream: str) -> None:
    """The bare forwarder's process, as run_stub."""
    _serve(bare_proxy(upstream), port)


def _serve(app, port: int) -> None:
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off")
