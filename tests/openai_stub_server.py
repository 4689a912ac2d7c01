"""A small, honest OpenAI-compatible server for tests and the demo: deterministic text, no LLM behind it.

    python tests/openai_stub_server.py [--port 0] [--delay SECONDS]
    -> prints "listening on http://127.0.0.1:PORT/v1", then serves POST /v1/chat/completions

The answer to a prompt is a fixed function of (model, prompt): "<model> answers: " and the prompt's words
in reverse order, cut at max_tokens words (a "token" here is a whitespace-separated word) with
finish_reason "length". Models whose name contains a keyword misbehave on purpose, so that clients can
be tested against real HTTP failures:
    verbose  answers with 40 copies of the prompt (always hits max_tokens)
    empty    answers with an empty string
    flaky    answers 503 to the first request for each prompt, then normally
    limited  answers 429 with "Retry-After: 1" to the first request for each prompt, then normally
    broken   answers 500 every time
    missing  answers 404 "model not found"
    private  answers 401 unless the request carries "Authorization: Bearer test-key"
    paired   holds each request until another request of the model is (or was) in flight, at most
             10 s: a client's concurrency then shows in max_in_flight however loaded the machine is
GET /stats returns {"requests": {model: n}, "max_in_flight": {model: n}}: how many requests each model got,
and the most that were in flight at once (tests read it to check per-candidate concurrency limits).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def answer_text(model: str, prompt: str) -> str:
    if "empty" in model:
        return ""
    if "verbose" in model:
        return " ".join([prompt] * 40)
    return f"{model} answers: " + " ".join(reversed(prompt.split()))


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.in_flight: dict[str, int] = {}
        self.max_in_flight: dict[str, int] = {}
        self.seen: set[tuple[str, str]] = set()

    def enter(self, model: str) -> None:
        with self.lock:
            self.requests[model] = self.requests.get(model, 0) + 1
            self.in_flight[model] = self.in_flight.get(model, 0) + 1
            self.max_in_flight[model] = max(self.max_in_flight.get(model, 0), self.in_flight[model])

    def wait_for_company(self, model: str, timeout: float = 10.0) -> None:
        """Hold a request until another one of the same model is in flight (or one has been): a client
        that sends concurrently shows it whatever the machine's load; one that does not waits here."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.max_in_flight.get(model, 0) >= 2:
                    return
            time.sleep(0.005)

    def leave(self, model: str) -> None:
        with self.lock:
            self.in_flight[model] -= 1

    def first_time(self, model: str, prompt: str) -> bool:
        with self.lock:
            key = (model, prompt)
            if key in self.seen:
                return False
            self.seen.add(key)
            return True


def make_handler(stats: Stats, delay: float):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output clean
            pass

        def _send(self, code: int, obj, headers: dict | None = None) -> None:
            body = json.dumps(obj).encode()
            self.send_response(code)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path.rstrip("/") == "/stats":
                with stats.lock:
                    self._send(200, {"requests": stats.requests, "max_in_flight": stats.max_in_flight})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                model = str(body["model"])
                prompt = str(body["messages"][-1]["content"])
                max_tokens = int(body.get("max_tokens") or 256)
            except (ValueError, KeyError, IndexError, TypeError) as err:
                self._send(400, {"error": {"message": f"bad request: {err}"}})
                return
            stats.enter(model)
            try:
                if delay:
                    time.sleep(delay)
                if "paired" in model:
                    stats.wait_for_company(model)
                if "private" in model and self.headers.get("Authorization") != "Bearer test-key":
                    self._send(401, {"error": {"message": "invalid api key"}})
                    return
                if "missing" in model:
                    self._send(404, {"error": {"message": f"model {model!r} not found"}})
                    return
                if "broken" in model:
                    self._send(500, {"error": {"message": "internal error (this model always fails)"}})
                    return
                if "flaky" in model and stats.first_time(model, prompt):
                    self._send(503, {"error": {"message": "overloaded, try again"}})
                    return
                if "limited" in model and stats.first_time(model, prompt):
                    self._send(429, {"error": {"message": "rate limited"}}, {"Retry-After": "1"})
                    return
                words = answer_text(model, prompt).split()
                finish = "length" if len(words) > max_tokens else "stop"
                text = " ".join(words[:max_tokens])
                self._send(200, {
                    "id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()), "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                    "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": min(len(words), max_tokens)},
                })
            finally:
                stats.leave(model)

    return Handler


class StubServer(ThreadingHTTPServer):
    # socketserver's default listen backlog is 5. The tests open up to 18 connections at once, and on a
    # loaded machine the accept thread falls behind: connections past the backlog were reset, which
    # failed test_answers_failures_retries_and_limits at random (docs/collect.md, "Testing").
    request_queue_size = 128


def serve(port: int = 0, delay: float = 0.0, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    server = StubServer((host, port), make_handler(Stats(), delay))
    server.daemon_threads = True
    return server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds each request takes (default 0)")
    args = parser.parse_args()
    server = serve(args.port, args.delay, args.host)
    print(f"listening on http://{args.host}:{server.server_address[1]}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
