"""JSON and server-sent events on the gateway's wire: what every request pays for beside routing, kept small.

    dumps / loads   orjson (several times faster than the stdlib's json), falling back to the stdlib for what
                    orjson refuses: integers beyond 64 bits (a request may carry one), NaN from an upstream
    Event           a chunk parsed from an upstream's SSE that keeps the bytes it came as: relayed unchanged
                    when nothing in it is rewritten (no second encode)
    sse_data        the `data:` payloads of an SSE body, however its byte chunks split the lines
    sse             one event to send: `data: <json>` and a blank line
    json_answer     a JSON response, encoded with orjson
    EventStream     a streamed response of SSE bytes that hangs up on the upstream when the client goes
"""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator

import orjson


def dumps(obj) -> bytes:
    try:
        return orjson.dumps(obj)
    except TypeError:       # an integer beyond 64 bits (the request checks allow 32 digits)
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def loads(raw: bytes | str):
    """A JSON value; a ValueError when it is not JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)      # NaN, Infinity, lone surrogates: the stdlib takes them (or raises ValueError)


class Event(dict):
    """A parsed SSE chunk and `raw`, the JSON bytes it came as (None once something in it was changed)."""

    __slots__ = ("raw",)

    def __init__(self, parsed: dict, raw: bytes | None):
        super().__init__(parsed)
        self.raw = raw

    def __setitem__(self, key, value) -> None:
        self.raw = None
        super().__setitem__(key, value)


def sse(data: dict) -> bytes:
    raw = data.raw if type(data) is Event else None
    return b"data: " + (raw if raw is not None else dumps(data)) + b"\n\n"


async def sse_data(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The payload of every `data:` line (one space after the colon dropped, as SSE says), in order; blank lines,
    comments and other fields are skipped. Lines end in \\n, \\r\\n or \\r, split anywhere between chunks."""
    buffer = b""
    async for chunk in chunks:
        buffer = buffer + chunk if buffer else chunk
        if b"\r" in buffer:
            held = buffer.endswith(b"\r")          # maybe the first half of \r\n: decided by the next chunk
            buffer = (buffer[:-1] if held else buffer).replace(b"\r\n", b"\n").replace(b"\r", b"\n") + (b"\r" if held else b"")
        end = buffer.rfind(b"\n")
        if end < 0:
            continue
        for line in buffer[:end].split(b"\n"):
            if line.startswith(b"data:"):
                yield line[6:] if line[5:6] == b" " else line[5:]
        buffer = buffer[end + 1:]
    line = buffer.rstrip(b"\r")
    if line.startswith(b"data:"):       # a last line without its line end
        yield line[6:] if line[5:6] == b" " else line[5:]


def json_answer(obj, status: int = 200, headers: dict | None = None):
    """A starlette Response of `obj` as JSON, encoded with orjson."""
    from starlette.responses import Response

    return Response(dumps(obj), status_code=status, headers=headers, media_type="application/json")


class EventStream:
    """An ASGI response that writes `chunks` (an async generator of bytes) as they come and, if the client goes
    before the end, cancels the request's task where it waits, so that the generator's cleanup (closing the
    upstream's stream) runs at once. Starlette's StreamingResponse does the same under uvicorn (ASGI spec 2.3)
    with an anyio task group and a second task for every stream; one watcher task and a callback cost less
    (measured: docs/gateway.md, 2026-12-08)."""

    def __init__(self, chunks: AsyncIterator[bytes], headers: dict):
        self.chunks = chunks
        self.headers = [(b"content-type", b"text/event-stream; charset=utf-8"),
                        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items())]

    async def __call__(self, scope, receive, send) -> None:
        task, state = asyncio.current_task(), {"done": False, "gone": False}

        def hang_up(watch: asyncio.Future) -> None:
            # receive() answers http.disconnect when the connection drops, and also once the response is complete
            if not state["done"] and not watch.cancelled():
                state["gone"] = True
                task.cancel()

        watch = asyncio.ensure_future(receive())
        watch.add_done_callback(hang_up)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not state["gone"]:
                raise              # the server is stopping this request, not the client
            if hasattr(task, "uncancel"):      # Python 3.11+: the task is not being cancelled any more
                task.uncancel()
        finally:
            state["done"] = True
            watch.cancel()
            await self.chunks.aclose()
