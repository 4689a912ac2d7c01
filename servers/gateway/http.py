"""The gateway's HTTP connections: a request must arrive, headers and body, within --request-timeout.

uvicorn bounds a request's size (h11: 16 KiB of headers) but not its time: headers sent one byte at a time, or
never finished, hold a connection open for ever, and nothing in the app sees it (the app starts only once the
headers are in). `guarded(base, timeout, on_timeout)` is uvicorn's own HTTP protocol (h11 or httptools, as
uvicorn picks) with one timer per connection: armed when a connection opens and at a request's first byte, it
closes a connection whose request has not reached the app `timeout` seconds after that (with a 408 when some
of it came; silently when nothing did). The time the first byte came travels in the request's scope, so the
app reads the body against the same deadline (app.py). Between requests a connection stays open
KEEP_ALIVE_SECONDS, longer than clients keep theirs. Writes are joined (`Coalescing`): a response's headers
leave with its first body part, at once, in one send; a stream's later writes of one event-loop turn, in one.
"""

from __future__ import annotations

import json
import time

from zooter.servers.gateway.requests import ApiError

STARTED = "zooter.request_started"      # scope key: perf_counter() when the request's first byte arrived
# An idle client connection stays open this long (uvicorn's default: 5 s). Clients keep theirs for 5 s (httpx,
# the openai package) or 15 s (aiohttp), and load balancers 60 s (AWS ALB): a server that closes first races the
# client's next request on that connection, which then fails. 75 s, as nginx, outlasts them all.
KEEP_ALIVE_SECONDS = 75


def timeout_error(timeout: float) -> ApiError:
    return ApiError(408, f"the request did not arrive within the gateway's --request-timeout ({timeout:g} s)",
                    code="request_timeout", headers={"connection": "close"})


def _raw_408(timeout: float) -> bytes:
    body = json.dumps(timeout_error(timeout).body()).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n" % len(body)) + body


class Coalescing:
    """A connection's transport whose writes within one turn of the event loop leave in one send. uvicorn writes
    a response's headers as soon as the app starts it and its body when it comes, two sends that reach the client
    as two packets, each a wake-up of the client and a system call here; joined, the answer (or a stream's first
    token) arrives in one (measured: docs/gateway.md, 2026-12-08). `flush()` sends at once: the app's first body
    part does not wait for the rest of the turn (a stream's other buffered events). Everything else is the
    transport's own."""

    __slots__ = ("_transport", "_loop", "_pending")

    def __init__(self, transport, loop):
        self._transport, self._loop, self._pending = transport, loop, None

    def write(self, data) -> None:
        if self._pending is None:
            self._pending = [data]
            self._loop.call_soon(self.flush)
        else:
            self._pending.append(data)

    def writelines(self, lines) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()                # what was written before close goes out first, as with the transport alone
        self._transport.close()

    def abort(self) -> None:
        self._pending = None
        self._transport.abort()

    def __getattr__(self, name):
        return getattr(self._transport, name)


def guarded(base: type, timeout: float, on_timeout) -> type:
    """`base` (a uvicorn HTTP protocol class) with the request-read deadline; `on_timeout()` counts each 408."""
    refusal = _raw_408(timeout)

    class Guarded(base):
        def connection_made(self, transport) -> None:
            self._in_request, self._first_byte, self._timer = False, None, None
            inner = self.app

            async def app(scope, receive, send):      # headers complete: the app takes over the deadline
                self._in_request = True
                self._disarm()
                scope[STARTED] = self._first_byte if self._first_byte is not None else time.perf_counter()
                joined, first = self.transport, [True]

                async def send_first_part_now(message):
                    await send(message)
                    if first[0] and message["type"] == "http.response.body":
                        first[0] = False
                        joined.flush()    # the headers and the first part leave now, not after the turn's other work

                await inner(scope, receive, send_first_part_now)

            self.app = app
            super().connection_made(Coalescing(transport, self.loop))
            self._arm(timeout)

        def data_received(self, data: bytes) -> None:
            if not self._in_request and self._first_byte is None:
                self._first_byte = time.perf_counter()
                if self._timer is None:
                    self._arm(timeout)
            super().data_received(data)

        def on_response_complete(self) -> None:
            # Between requests uvicorn's keep-alive timeout closes an idle connection; the next request's first
            # byte arms the timer again.
            self._in_request, self._first_byte = False, None
            self._disarm()
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self, delay: float) -> None:
            self._disarm()
            self._timer = self.loop.call_later(delay, self._expired)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expired(self) -> None:
            self._timer = None
            if self._in_request or self.transport.is_closing():
                return
            if self._first_byte is not None:
                left = self._first_byte + timeout - time.perf_counter()
                if left > 0:            # the timer ran from an idle start; this request began later
                    self._arm(left)
                    return
                on_timeout()
                self.transport.write(refusal)
            self.transport.close()

    Guarded.__name__ = f"Guarded{base.__name__}"
    return Guarded


def server_options(timeout: float, on_timeout) -> dict:
    """uvicorn.Config options for the gateway: its HTTP protocol, guarded, and how long idle connections stay."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return {"http": guarded(AutoHTTPProtocol, timeout, on_timeout), "timeout_keep_alive": KEEP_ALIVE_SECONDS}
