"""Stub upstreams for the gateway tests: a real OpenAI-compatible server on 127.0.0.1 that streams, and fails
on purpose, plus a helper that runs any ASGI app under uvicorn in a thread.

The stub answers "<model> says: " and the prompt's words in reverse, one word a chunk when streaming.
Models whose name contains a keyword misbehave:
    broken   500 every time; the body echoes the Authorization header (the gateway must not pass it on)
    midway   streams two words, then drops the connection mid-answer
    slow     waits 3 s before answering (past the tests' upstream timeout)
    picky    400 "max_tokens is too large for this model" (the client's fault: no fallback)
    private  401 unless the request carries "Authorization: Bearer <UPSTREAM_KEY>"
Every request is recorded: (model, authorization header, body); every GET /models (a health probe) in `probes`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

UPSTREAM_KEY = "sk-upstream-test-0123456789"


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 (a free port) in a daemon thread; `options` go to uvicorn.Config."""

    def __init__(self, app, **options):
        import uvicorn

        # IPPROTO_TCP, so that asyncio sets TCP_NODELAY on accepted connections (as the gateway's own listen does)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        sock.listen(512)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=2,
                                **options)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Abort(Exception):
    """Raised inside a streaming body: uvicorn drops the connection without ending the chunked response."""


def stub_app(records: list, probes: list | None = None):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    def error(status: int, message: str):
        return JSONResponse({"error": {"message": message, "type": "stub", "code": None}}, status_code=status)

    async def answer(request):
        chat = request.url.path.endswith("/chat/completions")
        body = await request.json()
        model, auth = body["model"], request.headers.get("authorization", "")
        records.append((model, auth, body))
        if "broken" in model:
            return error(500, f"internal error; you sent authorization {auth!r}")
        if "private" in model and auth != f"Bearer {UPSTREAM_KEY}":
            return error(401, "invalid api key")
        if "picky" in model:
            return error(400, "max_tokens is too large for this model")
        if "slow" in model:
            await asyncio.sleep(3)
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        words = [f"{model} says:", *reversed(prompt.split())][:body.get("max_tokens") or 64]
        created, id = int(time.time()), "stub-1"
        if not body.get("stream"):
            text = " ".join(words)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"} if chat
                      else {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None})
            return JSONResponse({"id": id, "object": "chat.completion" if chat else "text_completion", "created": created,
                                 "model": model, "choices": [choice],
                                 "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(words),
                                           "total_tokens": len(prompt.split()) + len(words)}})

        def event(text: str | None, finish: str | None = None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            data = {"id": id, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                    "model": model, "choices": [choice]}
            return f"data: {json.dumps(data)}\n\n"

        async def events():
            if chat:
                yield event(None, role=True)      # as vLLM does: the role first, no text yet
            for i, word in enumerate(words):
                if "midway" in model and i == 2:
                    raise Abort("dropping the connection mid-answer, as asked")
                yield event(word if i == 0 else " " + word)
                await asyncio.sleep(0.001)
            yield event(None, finish="stop")
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def models(request):
        if probes is not None:
            probes.append(request.url.path)
        return JSONResponse({"object": "list", "data": []})

    return Starlette(routes=[Route("/v1/chat/completions", answer, methods=["POST"]),
                             Route("/v1/completions", answer, methods=["POST"]),
                             Route("/v1/models", models)])
