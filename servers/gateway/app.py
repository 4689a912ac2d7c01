"""zooter gateway: an OpenAI-compatible HTTP front door that routes every request to a candidate LLM.

    POST /v1/chat/completions, POST /v1/completions   streaming (SSE, `data: [DONE]`) or not
    GET  /v1/models    `zooter` and every candidate
    GET  /health       readiness from a background check of the upstreams (their map needs a key when keys are
                       set); ?probe=live: liveness alone, ?probe=ready: readiness alone
    GET  /metrics      Prometheus

`model: "zooter"` routes (per-request options in a `zooter` object: lambda, tolerance, candidates); a
candidate's name goes straight to it. Headers x-zooter-candidate, x-zooter-confidence, x-zooter-fallback
show the decision, x-zooter-router the router that made it. SIGHUP reloads the bundle and the candidates
file: requests in flight finish on the router they started with, new ones use the new one, and a bundle
that does not load (or has another encoder) is refused with one line in the log while the old one serves. Back ends and fallback: backends.py; upstreams: upstreams.py;
request checks: requests.py; metrics: metrics.py; the request-read deadline: http.py;
/health's upstream check: health.py. docs/gateway.md has the whole story.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import signal
import socket
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from zooter.runtime.bundle import swap_problem
from zooter.runtime.conversation import check_route_on
from zooter.runtime.errors import UserError
from zooter.servers.gateway.backends import MID, Answer, BundleBackend, TritonBackend, remaining, within
from zooter.servers.gateway.health import HealthMonitor
from zooter.servers.gateway.http import STARTED, server_options, timeout_error
from zooter.servers.gateway.metrics import Metrics
from zooter.servers.gateway.requests import INT32_MAX, ApiError, parse_chat, parse_completion, read_json
from zooter.servers.gateway.upstreams import UpstreamError, UpstreamHttp
from zooter.servers.gateway.wire import EventStream, json_answer, sse

log = logging.getLogger("zooter.gateway")
DONE = b"data: [DONE]\n\n"


@dataclass
class GatewaySettings:
    bundle: str | Path | None = None         # with candidates: route in process
    candidates: str | Path | None = None
    triton: str | None = None                # or: every request through Triton's `zooter` model (gRPC)
    lam: float | None = None                 # cost weight of the in-process rule (None: the bundle's)
    tolerance: float | None = None           # cost knob in reward units (None: the bundle's)
    api_keys: Sequence[str] = ()             # bearer tokens clients must send; empty: no authentication
    max_body_bytes: int = 1 << 20
    request_timeout: float = 300.0           # a whole request from its first byte: headers, body, answer, stream
    upstream_timeout: float = 60.0           # an upstream's first token and each one after it; a whole answer
                                             # when not streaming
    connect_timeout: float = 5.0
    max_tokens: int = 256                    # for Triton models when a request sends no max_tokens
    max_tokens_limit: int = 1 << 20          # a request's max_tokens / max_completion_tokens above it: 400
    max_attempts: int = 3                    # candidates tried at most for one request (fallback included)
    health_interval: float = 5.0             # seconds between upstream checks while all are up (backs off to 30)
    route_on: str | None = None              # which text is routed (runtime/conversation.py); None: last-user
                                             # with --bundle, the repository's own (zooter triton build) with --triton

    def check(self) -> None:
        if bool(self.triton) == bool(self.bundle or self.candidates):
            raise UserError("give either --triton URL or --bundle B --candidates FILE")
        if not self.triton and not (self.bundle and self.candidates):
            raise UserError("--bundle and --candidates go together")
        for name in ("request_timeout", "upstream_timeout", "connect_timeout"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise UserError(f"--{name.replace('_', '-')} must be a number of seconds > 0, got {value!r}")
        for name in ("max_body_bytes", "max_tokens", "max_attempts"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1")
        if not 1 <= self.max_tokens_limit <= INT32_MAX:
            raise UserError(f"--max-tokens-limit must be from 1 to {INT32_MAX}, got {self.max_tokens_limit}")
        if self.max_tokens > self.max_tokens_limit:
            raise UserError(f"--max-tokens ({self.max_tokens}) must not exceed --max-tokens-limit "
                            f"({self.max_tokens_limit})")
        if not (math.isfinite(self.health_interval) and self.health_interval > 0):
            raise UserError(f"the health check interval must be > 0 s, got {self.health_interval!r}")
        if self.route_on is not None:
            try:
                check_route_on(self.route_on)
            except ValueError as err:
                raise UserError(str(err)) from None
        if self.triton and (self.lam is not None or self.tolerance is not None):
            raise UserError("--lambda and --tolerance apply to --bundle; a Triton repository has its rule built in "
                            "(zooter triton build --lambda/--tolerance)")


def load_api_keys(path: str | Path) -> list[str]:
    """One key a line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: no such API keys file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read the API keys file: {err}") from None
    keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise UserError(f"{path}: no API keys in the file (one key a line)")
    return keys


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def _has_text(data: dict) -> bool:
    for choice in data.get("choices") or ():
        if isinstance(choice, dict) and (choice.get("text") or (choice.get("delta") or {}).get("content")):
            return True
    return False


class Gateway:
    """The state behind the app: settings, the back end, metrics, the hashed client keys."""

    def __init__(self, settings: GatewaySettings):
        settings.check()
        self.settings = settings
        self.metrics = Metrics()
        self.keys = [_digest(k) for k in settings.api_keys]
        self.http = None
        if settings.triton:
            self.backend = TritonBackend(settings, self.metrics)
        else:
            self.http = UpstreamHttp(settings.upstream_timeout, settings.connect_timeout)
            self.backend = BundleBackend(settings, self.metrics, self.http, self.redact)
        self.secrets = list(self.backend.secrets)
        self.created = int(time.time())
        self.monitor = HealthMonitor(self.backend.health, settings.health_interval)
        # A reload swaps self.backend; a request keeps the back end it started with (held until it ends),
        # and a replaced one closes when its last request is done.
        self.holds: dict = {}
        self.retired: set = set()
        self.reload_lock = None
        self.tasks: set = set()
        if router_of(self.backend):
            self.metrics.router.labels(router_of(self.backend)).set(1)

    async def close(self) -> None:
        import asyncio

        # A reload or a retired back end's close still running finishes first: a reload that completed after
        # this would leave a back end (threads, gRPC channels) nobody closes.
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)
        await self.monitor.close()
        await self.backend.close()
        for old in list(self.retired):
            self.retired.discard(old)
            await old.close()
        if self.http is not None:
            await self.http.close()

    # --- swapping routers (SIGHUP) -----------------------------------------------------------------
    def hold(self, backend) -> None:
        self.holds[backend] = self.holds.get(backend, 0) + 1

    def release(self, backend) -> None:
        self.holds[backend] -= 1
        if self.holds[backend] == 0:
            del self.holds[backend]
            if backend in self.retired:
                self.retired.discard(backend)
                self._spawn(backend.close())

    def _spawn(self, coroutine) -> None:
        import asyncio

        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def reload_soon(self) -> None:
        """The SIGHUP handler (on the event loop): reload in the background."""
        self._spawn(self.reload())

    async def reload(self) -> bool:
        """Load the bundle and candidates file again and serve new requests with them; False when refused
        (one line in the log; the old router keeps serving)."""
        import asyncio

        from zooter.servers.gateway.backends import BundleBackend

        if self.settings.triton:
            log.error("reload refused: this gateway routes through Triton; swap its router with `zooter triton reload`")
            self.metrics.reloads.labels("refused").inc()
            return False
        if self.reload_lock is None:
            self.reload_lock = asyncio.Lock()
        async with self.reload_lock:
            old = self.backend
            try:
                new = await asyncio.get_running_loop().run_in_executor(
                    None, BundleBackend, self.settings, self.metrics, self.http, self.redact)
            except Exception as err:    # any failure to load: a UserError names the file; others their type
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
                log.error("reload refused, router %s keeps serving: %s", router_of(old), self.redact(reason))
                self.metrics.reloads.labels("refused").inc()
                return False
            problem = swap_problem(old.router.manifest, new.router.manifest)
            if problem:
                log.error("reload refused, router %s keeps serving: %s has %s", router_of(old), self.settings.bundle, problem)
                self.metrics.reloads.labels("refused").inc()
                await new.close()
                return False
            await new.start()
            self.secrets = list(dict.fromkeys(self.secrets + new.secrets))   # old answers may still be streaming
            self.backend = new
            self.monitor.check = new.health
            self.metrics.router.labels(router_of(old)).set(0)
            self.metrics.router.labels(router_of(new)).set(1)
            self.metrics.reloads.labels("done").inc()
            if old in self.holds:
                self.retired.add(old)
            else:
                await old.close()
            print(f"zooter gateway reloaded: router {router_of(old)} -> {router_of(new)} ({new.describe()})", flush=True)
            return True

    def redact(self, text: str) -> str:
        """Upstream keys never leave the gateway: not in errors, not in logs (an upstream may echo one)."""
        for secret in self.secrets:
            text = text.replace(secret, "[redacted]")
        return text

    def authorized(self, request) -> bool:
        if not self.keys:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = _digest(token.strip())
        # Every key is compared, in constant time over equal-length digests: timing says nothing about a key.
        ok = False
        for key in self.keys:
            ok |= hmac.compare_digest(given, key)
        return ok and scheme.lower() == "bearer"

    def authorize(self, request) -> None:
        if not self.authorized(request):
            raise ApiError(401, "missing or invalid API key: send Authorization: Bearer <key>", code="invalid_api_key",
                           headers={"www-authenticate": "Bearer"})

    # --- answering ---------------------------------------------------------------------------------
    async def answer(self, request, kind: str):
        from starlette.requests import ClientDisconnect

        endpoint = request.scope["path"]     # request.url would parse a whole URL object for it: ~25 µs a request
        # From the request's first byte (http.py), so that headers and body share one deadline.
        deadline = request.scope.get(STARTED, time.perf_counter()) + self.settings.request_timeout
        self.metrics.in_flight.inc()
        streaming = False
        backend = self.backend        # the router this request started with answers it, whatever a reload does
        self.hold(backend)
        try:
            self.authorize(request)
            body = await self._read(request, deadline)
            limit = self.settings.max_tokens_limit
            call = parse_chat(body, limit) if kind == "chat" else parse_completion(body, limit)
            # Every request in flight holds its back end (streams until their last byte): alone, this one may
            # route on the event loop's thread (backends.py).
            answer = await backend.answer(call, deadline, alone=sum(self.holds.values()) == 1)
            headers = self._headers(answer, answer.router or router_of(backend))
            if call.model == "zooter" and router_of(backend):
                self.metrics.routed.labels(router_of(backend), answer.candidate).inc()
            if answer.rest is not None:
                streaming = True
                return EventStream(self._relay(endpoint, answer, deadline, backend),
                                   {**headers, "cache-control": "no-cache", "x-accel-buffering": "no"})
            self.metrics.upstream.labels(answer.candidate).observe(time.perf_counter() - answer.started)
            self._count_tokens(answer.candidate, answer.completion.get("usage"), 0)
            self.metrics.requests.labels(endpoint, answer.candidate, "200").inc()
            return json_answer(answer.completion, headers=headers)
        except ApiError as err:
            self.metrics.requests.labels(endpoint, "", str(err.status)).inc()
            return error_response(err)
        except ClientDisconnect:           # gone while sending its body: nobody to answer, nothing went wrong here
            log.info("a client disconnected while sending its request to %s", endpoint)
            self.metrics.requests.labels(endpoint, "", "499").inc()
            return error_response(ApiError(499, "the client disconnected", code="client_disconnected"))
        except Exception:
            log.exception("unexpected error answering %s", endpoint)
            self.metrics.requests.labels(endpoint, "", "500").inc()
            return error_response(ApiError(500, "internal error in the gateway", "server_error", "internal_error"))
        finally:
            if not streaming:
                self.metrics.in_flight.dec()
                self.release(backend)

    async def _read(self, request, deadline: float) -> dict:
        try:
            async with within(max(deadline - time.perf_counter(), 0.0)):
                return await read_json(request, self.settings.max_body_bytes)
        except TimeoutError:
            raise timeout_error(self.settings.request_timeout) from None

    def read_timed_out(self) -> None:
        """A request whose headers did not arrive in time (http.py closed its connection with a 408)."""
        self.metrics.requests.labels("", "", "408").inc()

    @staticmethod
    def _headers(answer: Answer, router: str | None) -> dict:
        headers = {"x-zooter-candidate": answer.candidate, "x-zooter-fallback": "true" if answer.fallback else "false"}
        if router:
            headers["x-zooter-router"] = router
        if answer.confidence is not None:
            headers["x-zooter-confidence"] = f"{answer.confidence:.4f}"
        return headers

    def _count_tokens(self, candidate: str, usage, chunks: int) -> None:
        completion_tokens = chunks
        if isinstance(usage, dict):
            prompt = usage.get("prompt_tokens")
            if isinstance(prompt, int):
                self.metrics.tokens.labels(candidate, "prompt").inc(prompt)
            if isinstance(usage.get("completion_tokens"), int):
                completion_tokens = usage["completion_tokens"]
        if completion_tokens:
            self.metrics.tokens.labels(candidate, "completion").inc(completion_tokens)

    async def _relay(self, endpoint: str, answer: Answer, deadline: float, backend):
        """The stream to the client: the chunks up to the first token, then the rest as they come. A failure
        now ends the stream with an error event (and no [DONE]): the client must not take half an answer
        for a whole one."""
        name, status, chunks, usage = answer.candidate, "499", 0, None   # 499: the client went away
        self.metrics.ttft.labels(name).observe(time.perf_counter() - answer.started)
        try:
            chunks += sum(_has_text(data) for data in answer.chunks)
            yield b"".join(sse(data) for data in answer.chunks)      # one write: the first token sooner
            while True:
                timeout = min(self.settings.upstream_timeout, remaining(deadline))
                try:
                    async with within(timeout):
                        data = await answer.rest.__anext__()
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise UpstreamError("timeout", f"no token for {timeout:g} s") from None
                chunks += _has_text(data)
                usage = data.get("usage") or usage
                yield sse(data)
            status = "200"
            yield DONE
        except UpstreamError as err:
            status = "200"
            self.metrics.failure(name, MID, err.reason)
            log.warning("%s failed mid-stream (%s): %s", name, err.message, self.redact(err.detail))
            yield sse(ApiError(502, f"{name} failed mid-answer: {err.message}; the answer is incomplete",
                                "upstream_error", "stream_interrupted").body())
        finally:
            try:
                await answer.rest.aclose()
                self.metrics.upstream.labels(name).observe(time.perf_counter() - answer.started)
                self._count_tokens(name, usage, chunks)
                self.metrics.requests.labels(endpoint, name, status).inc()
            finally:       # whatever closing the upstream raised, the request ends and lets go of its router
                self.metrics.in_flight.dec()
                self.release(backend)

    # --- the other endpoints -----------------------------------------------------------------------
    async def models(self, request):
        from starlette.responses import JSONResponse

        try:
            self.authorize(request)
        except ApiError as err:
            return error_response(err)
        names = ["zooter", *await self.backend.models()]
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "created": self.created,
                                                         "owned_by": "zooter"} for name in names]})

    async def health(self, request):
        """Open to probes without a key; the upstream map (names, reasons) only with one when keys are set. Never
        asks an upstream itself: the monitor's last check answers."""
        from starlette.responses import JSONResponse

        probe = request.query_params.get("probe")
        if probe == "live":
            return JSONResponse({"live": True})
        ready, upstreams, age = await self.monitor.current()
        code = 200 if ready else 503
        if probe == "ready":
            return JSONResponse({"ready": ready}, status_code=code)
        up = sum(state == "up" for state in upstreams.values())
        status = "ok" if ready and up == len(upstreams) else "degraded" if ready else "unavailable"
        body = {"status": status, "live": True, "ready": ready}
        if self.authorized(request):
            body.update(backend=self.backend.kind, upstreams=upstreams, checked_seconds_ago=round(age, 1))
        return JSONResponse(body, status_code=code)

    async def prometheus(self, request):
        from starlette.responses import Response

        try:
            self.authorize(request)
        except ApiError as err:
            return error_response(err)
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)


def router_of(backend) -> str | None:
    """The id of the router a back end routes with (None through Triton, whose `zooter` model routes)."""
    router = getattr(backend, "router", None)
    return router.router_id if router is not None else None


def error_response(err: ApiError):
    from starlette.responses import JSONResponse

    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def create_app(settings: GatewaySettings, on_ready: Callable[[Gateway], None] | None = None):
    """The ASGI app. Loads the router and candidates now (a UserError for bad input); upstream clients start
    and stop with the app (gRPC's asyncio channels belong to the serving loop)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    gateway = Gateway(settings)

    @asynccontextmanager
    async def lifespan(app):
        await gateway.backend.start()
        await gateway.monitor.start()
        if on_ready is not None:
            on_ready(gateway)
        try:
            yield
        finally:
            await gateway.close()

    async def http_error(request, exc: HTTPException):     # unknown paths and methods, in OpenAI's shape too
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       code=code))

    async def chat_completions(request):
        return await gateway.answer(request, "chat")

    async def completions(request):
        return await gateway.answer(request, "completions")

    app = Starlette(routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                            Route("/v1/completions", completions, methods=["POST"]),
                            Route("/v1/models", gateway.models, methods=["GET"]),
                            Route("/health", gateway.health, methods=["GET"]),
                            Route("/metrics", gateway.prometheus, methods=["GET"])],
                    lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.gateway = gateway
    return app


def gateway_server_options(app) -> dict:
    """uvicorn.Config options the app needs: the HTTP protocol that bounds reading a request."""
    gateway = app.state.gateway
    return server_options(gateway.settings.request_timeout, gateway.read_timed_out)


def listen(host: str, port: int):
    """A listening socket, bound before the server starts so that a busy port is one clear line."""
    try:
        # With the protocol number (IPPROTO_TCP, not 0) asyncio sets TCP_NODELAY on every accepted connection;
        # without it a response's headers and body, written separately, wait out the client's delayed ACK.
        family, kind, proto = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)[0][:3]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def serve(settings: GatewaySettings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> int:
    """Run the gateway until Ctrl-C or SIGTERM (uvicorn drains open requests first)."""
    import uvicorn

    def ready(gateway: Gateway) -> None:
        import asyncio

        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, gateway.reload_soon)
        keys = f"{len(settings.api_keys)} API key(s)" if settings.api_keys else "no API keys (anyone who can connect may call)"
        print(f"zooter gateway ready: http://{host}:{sock.getsockname()[1]}/v1  ({gateway.backend.describe()}; {keys})",
              flush=True)
        if host not in ("127.0.0.1", "localhost", "::1"):
            print(f"  listening on {host}: reachable from other machines; set --api-keys-file and put TLS in front",
                  flush=True)

    app = create_app(settings, on_ready=ready)     # the router and candidates load first: bad input fails fast
    sock = listen(host, port)
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on", timeout_graceful_shutdown=10,
                            **gateway_server_options(app))
    # uvicorn stops gracefully on Ctrl-C or SIGTERM, then raises the signal again for the handler it found:
    # this one, so that a requested stop exits 0, as `zooter serve` does.
    stops = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        for s, handler in stops.items():
            signal.signal(s, handler)
    print("zooter gateway stopped", flush=True)
    return 0
