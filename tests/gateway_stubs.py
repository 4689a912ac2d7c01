"""Upstreams for the gateway tests: the one OpenAI stub (zooter.bench.openai_stub: "<model> answers: " and the
prompt's words in reverse, one word a chunk when streaming; models named broken, midway, slow, picky, private...
misbehave) on 127.0.0.1, and a helper that runs any ASGI app under uvicorn in a thread.
"""

from __future__ import annotations

import socket
import threading
import time

UPSTREAM_KEY = "sk-upstream-test-0123456789"


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 (a free port) in a daemon thread; `options` go to uvicorn.Config."""

    def __init__(self, app, **options):
        import uvicorn

        from zooter.bench.openai_stub import listen

        sock = listen()
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


def stub_app(records: list, probes: list | None = None):
    """The one OpenAI stub (zooter.bench.openai_stub: its keywords, its answers) for the gateway tests: every request
    recorded, "private" models wanting UPSTREAM_KEY, and a millisecond between streamed words, so that a stream
    reaches the gateway in pieces."""
    from zooter.bench.openai_stub import stub_app as openai_stub

    return openai_stub(records, probes, api_key=UPSTREAM_KEY, gap_s=0.001)
