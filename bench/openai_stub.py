"""The one OpenAI-compatible stub: deterministic text, no LLM behind it. The gateway bench times the gateway in
front of it; the tests and the demos ask it, and make it fail on purpose.

    zooter stub-llm [--port 0] [--delay SECONDS] [--tokens N]   (the command: zooter/cli/gateway.py)
    -> prints "listening on http://127.0.0.1:PORT/v1", then serves until stopped

POST /v1/chat/completions and /v1/completions answer, streamed (one word a chunk) or not. The answer to a prompt
is a fixed function of (model, prompt), `answer_text`: "<model> answers: " and the prompt's words in reverse,
cut at max_tokens words (a "token" here is a whitespace-separated word) with finish_reason "length"; with
`tokens` set, every answer is `tokens` words instead. Unless `keywords` is off (the bench turns it off), models
whose name contains a keyword misbehave, so that clients meet real HTTP failures:
    verbose  answers with 40 copies of the prompt (always hits max_tokens)
    empty    answers with an empty string
    flaky    answers 503 to the first request for each prompt, then normally
    limited  answers 429 with "Retry-After: 1" to the first request for each prompt, then normally
    broken   answers 500 every time; the message echoes the Authorization header (a proxy must not pass it on)
    missing  answers 404 "model not found"
    picky    answers 400 "max_tokens is too large for this model" (the client's fault)
    private  answers 401 unless the request carries "Authorization: Bearer <api_key>"
    slow     waits 3 s before answering
    midway   streams two words, then drops the connection mid-answer
    endless  streams a word every 10 ms until its client hangs up (counted in stats.hung_up), at most 60 s
    paired   holds each request until another request of the model is (or was) in flight, at most 10 s: a
             client's concurrency then shows in max_in_flight however loaded the machine is
GET /v1/models answers an empty list (a health probe; each is recorded in `probes`). GET /stats answers
{"requests": {model: n}, "max_in_flight": {model: n}}. Every answered POST is recorded in `records` as (model,
authorization header, body). A bare ASGI app, no framework: its own cost should be near nothing.

`bare_proxy` is the bench's other helper: a forwarder on the gateway's own stack (uvicorn, aiohttp), the price of
one more HTTP hop with no routing.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

DEFAULT_KEY = "test-key"
DEFAULT_MAX_TOKENS = 256


class Abort(Exception):
    """Raised after part of a streamed body: uvicorn drops the connection without ending the chunked response."""


def answer_text(model: str, prompt: str, keywords: bool = True) -> str:
    """What the stub answers `prompt` with as `model`, before max_tokens cuts it."""
    if keywords and "empty" in model:
        return ""
    if keywords and "verbose" in model:
        return " ".join([prompt] * 40)
    return f"{model} answers: " + " ".join(reversed(prompt.split()))


async def read_body(receive) -> bytes:
    """An ASGI request's whole body."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


class Stats:
    """Requests per model and the most in flight at once (one event loop: no lock needed)."""

    def __init__(self):
        self.requests: dict[str, int] = {}
        self.in_flight: dict[str, int] = {}
        self.max_in_flight: dict[str, int] = {}
        self.seen: set[tuple[str, str]] = set()
        self.hung_up: dict[str, int] = {}

    def enter(self, model: str) -> None:
        self.requests[model] = self.requests.get(model, 0) + 1
        self.in_flight[model] = self.in_flight.get(model, 0) + 1
        self.max_in_flight[model] = max(self.max_in_flight.get(model, 0), self.in_flight[model])

    def leave(self, model: str) -> None:
        self.in_flight[model] -= 1

    async def wait_for_company(self, model: str, timeout: float = 10.0) -> None:
        """Hold a request until another one of the same model is in flight (or one has been): a client that
        sends concurrently shows it whatever the machine's load; one that does not waits here."""
        deadline = time.monotonic() + timeout
        while self.max_in_flight.get(model, 0) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    def first_time(self, model: str, prompt: str) -> bool:
        if (model, prompt) in self.seen:
            return False
        self.seen.add((model, prompt))
        return True


def stub_app(records: list | None = None, probes: list | None = None, delay_s: float = 0.0, tokens: int | None = None,
             keywords: bool = True, api_key: str = DEFAULT_KEY, gap_s: float = 0.0):
    """The stub as an ASGI app (see the module docstring). `delay_s` before every answer, `gap_s` between streamed
    words; `stats` (a Stats) is on the app."""
    stats = Stats()

    async def respond(send, status: int, obj, headers: dict | None = None) -> None:
        body = json.dumps(obj).encode()
        head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        head += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": body})

    def error(message: str) -> dict:
        return {"error": {"message": message, "type": "stub", "code": None}}

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":       # nothing to set up or tear down
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            return await send({"type": "lifespan.shutdown.complete"})
        path = scope["path"].rstrip("/")
        body = await read_body(receive)
        if scope["method"] == "GET" and path == "/v1/models":
            if probes is not None:
                probes.append(scope["path"])
            return await respond(send, 200, {"object": "list", "data": []})
        if scope["method"] == "GET" and path == "/stats":
            return await respond(send, 200, {"requests": stats.requests, "max_in_flight": stats.max_in_flight})
        if scope["method"] != "POST" or path not in ("/v1/chat/completions", "/v1/completions"):
            return await respond(send, 404, error(f"no route {scope['path']}"))
        chat = path.endswith("/chat/completions")
        try:
            request = json.loads(body)
            model = str(request["model"])
            prompt = str(request["messages"][-1]["content"] if chat else request["prompt"])
            max_tokens = int(request.get("max_tokens") or DEFAULT_MAX_TOKENS)
        except (ValueError, KeyError, IndexError, TypeError) as err:
            return await respond(send, 400, error(f"bad request: {err}"))
        auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        if records is not None:
            records.append((model, auth, request))
        stats.enter(model)
        try:
            if delay_s:
                await asyncio.sleep(delay_s)
            failure = await misbehaviour(model, prompt, auth) if keywords else None
            if failure is not None:
                return await respond(send, *failure)
            words = ([f"w{i}" for i in range(tokens)] if tokens is not None
                     else answer_text(model, prompt, keywords).split())
            finish = "length" if len(words) > max_tokens else "stop"
            words = words[:max_tokens]
            if request.get("stream") and keywords and "endless" in model:
                return await endless(receive, send, model)
            if request.get("stream"):
                return await stream(send, chat, model, words, finish, abort_at=2 if keywords and "midway" in model else None)
            text = " ".join(words)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish} if chat
                      else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
            prompt_tokens = len(prompt.split())
            return await respond(send, 200, {
                "id": "stub-1", "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model, "choices": [choice],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
                          "total_tokens": prompt_tokens + len(words)}})
        finally:
            stats.leave(model)

    async def misbehaviour(model: str, prompt: str, auth: str):
        """(status, body[, headers]) for a model that fails on purpose, None for one that answers."""
        if "paired" in model:
            await stats.wait_for_company(model)
        if "private" in model and auth != f"Bearer {api_key}":
            return 401, error("invalid api key")
        if "missing" in model:
            return 404, error(f"model {model!r} not found")
        if "broken" in model:
            return 500, error(f"internal error (this model always fails); you sent authorization {auth!r}")
        if "picky" in model:
            return 400, error("max_tokens is too large for this model")
        if "flaky" in model and stats.first_time(model, prompt):
            return 503, error("overloaded, try again")
        if "limited" in model and stats.first_time(model, prompt):
            return 429, error("rate limited"), {"Retry-After": "1"}
        if "slow" in model:
            await asyncio.sleep(3)
        return None

    async def stream(send, chat: bool, model: str, words: list[str], finish: str, abort_at: int | None) -> None:
        created = int(time.time())

        def event(text: str | None, end: str | None = None, role: bool = False) -> bytes:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
                choice = {"index": 0, "delta": delta, "finish_reason": end}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": end, "logprobs": None}
            data = {"id": "stub-1", "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": created, "model": model, "choices": [choice]}
            return b"data: " + json.dumps(data).encode() + b"\n\n"

        async def part(body: bytes, more: bool = True) -> None:
            await send({"type": "http.response.body", "body": body, "more_body": more})

        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        if chat:
            await part(event(None, role=True))      # as vLLM does: the role first, no text yet
        for i, word in enumerate(words):
            if i == abort_at:
                raise Abort("dropping the connection mid-answer, as asked")
            await part(event(word if i == 0 else " " + word))
            if gap_s:
                await asyncio.sleep(gap_s)
        await part(event(None, finish) + b"data: [DONE]\n\n", more=False)

    async def endless(receive, send, model: str) -> None:
        """Words until the client hangs up (a real LLM server stops generating then), for 60 s at most."""
        gone = asyncio.ensure_future(receive())         # http.disconnect once the client's connection is closed
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        deadline = time.monotonic() + 60
        try:
            while not gone.done() and time.monotonic() < deadline:
                data = {"id": "stub-1", "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                        "choices": [{"index": 0, "delta": {"content": " word"}, "finish_reason": None}]}
                await send({"type": "http.response.body", "body": b"data: " + json.dumps(data).encode() + b"\n\n",
                            "more_body": True})
                await asyncio.sleep(0.01)
            if gone.done():
                stats.hung_up[model] = stats.hung_up.get(model, 0) + 1
            else:
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        finally:
            gone.cancel()

    app.stats = stats
    return app


def bare_proxy(upstream: str):
    """A bare ASGI forwarder with the gateway's HTTP client (aiohttp): the request's bytes to `upstream`, the
    answer's bytes back as they come."""
    import aiohttp

    session = None

    async def app(scope, receive, send):
        nonlocal session
        if session is None:           # made inside the serving loop, on the first request (a warm-up one)
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                            timeout=aiohttp.ClientTimeout(total=None, sock_read=60))
        body = await read_body(receive)
        async with session.request(scope["method"], upstream + scope["path"], data=body,
                                   headers={"content-type": "application/json"}) as response:
            await send({"type": "http.response.start", "status": response.status,
                        "headers": [(b"content-type", response.headers["content-type"].encode())]})
            async for part in response.content.iter_any():
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def listen(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening socket (port 0: a free one). IPPROTO_TCP, so that asyncio sets TCP_NODELAY on what it accepts
    (as the gateway's own listen does); a deep backlog, so a burst of connections on a busy machine waits."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(512)
    return sock


def serve(app, sock: socket.socket) -> None:
    """Serve `app` on `sock` in this process until it is stopped (SIGTERM, SIGINT)."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])


def run_stub(port: int, tokens: int, delay_ms: float) -> None:
    """The bench's stub process: `tokens` words after `delay_ms`, no keywords, on 127.0.0.1:`port`."""
    serve(stub_app(delay_s=delay_ms / 1000, tokens=tokens, keywords=False), listen(port=port))


def run_proxy(port: int, upstream: str) -> None:
    """The bench's bare forwarder process, as run_stub."""
    serve(bare_proxy(upstream), listen(port=port))


if __name__ == "__main__":     # the command line lives in the CLI (argparse only there)
    raise SystemExit("run the stub with `zooter stub-llm [--port 0] [--delay S] [--tokens N]`")
