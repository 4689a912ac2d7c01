"""The gateway's two back ends: who picks the candidate, and what happens when it cannot answer.

    BundleBackend   the in-process Router ranks the candidates: on the event loop's thread when the request
                    is the only one in flight, else in a thread pool (so overlapping requests never wait
                    on each other's routing);
                    the first that answers gets the request: a failure before its first token passes the
                    request to the next in the ranking, invisibly to the client, up to --max-attempts
                    candidates (a request every upstream fails must not go to all of them)
    TritonBackend   the `zooter` model of a Triton repository does both inside Triton

Both hand the gateway an Answer: the candidate, whether it was a fallback, and the answer's start (a
stream's chunks up to the first token) or all of it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from contextlib import asynccontextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import AsyncIterator

from zooter.runtime.conversation import DEFAULT_ROUTE_ON, route_text
from zooter.runtime.errors import UserError
from zooter.servers.gateway.requests import ApiError, Call, invalid, quote
from zooter.servers.gateway.upstreams import (Ending, GrpcClients, OpenAIUpstream, TritonModelUpstream,
                                              TritonZooter, UpstreamError, chunk, completion, is_token, new_id)

log = logging.getLogger("zooter.gateway")
BEFORE, MID = "before_first_token", "mid_stream"
# What the zooter model's input checks say (zooter_tokenize's, and its own): the client's request is wrong.
# The zooter model starts every client error so (triton_models/zooter/model.py): gRPC streams carry
# the message but not the status code.
BAD_INPUT = "zooter: bad input: "


@dataclass
class Answer:
    candidate: str
    fallback: bool
    confidence: float | None           # the router's confidence in its choice; None when not routed or not known
    started: float                     # perf_counter() when the request went to the candidate that answered
    chunks: list = field(default_factory=list)   # streaming: the chunks up to the first token
    rest: AsyncIterator | None = None  # streaming: the chunks after them
    completion: dict | None = None     # not streaming: the whole answer
    router: str | None = None          # the id of the router that chose, when the back end reports one (Triton's
                                       # `zooter` model); the in-process router's id comes from the gateway


if sys.version_info >= (3, 11):
    # A time limit on what awaits inside it, raising TimeoutError: asyncio's own is one timer handle, where
    # anyio.fail_after builds a cancel scope (about ten of them a streamed request, a tenth of its Python).
    within = asyncio.timeout
else:                                   # pragma: no cover - Python 3.10
    @asynccontextmanager
    async def within(seconds: float):
        import anyio

        with anyio.fail_after(seconds):
            yield


def remaining(deadline: float) -> float:
    left = deadline - time.perf_counter()
    if left <= 0:
        raise UpstreamError("timeout", "the request timed out")
    return left


async def first_token(chunks: AsyncIterator, timeout: float) -> list:
    """The chunks up to and including the first that carries part of the answer."""
    got = []
    try:
        async with within(timeout):
            async for data in chunks:
                got.append(data)
                if is_token(data):
                    return got
    except TimeoutError:
        raise UpstreamError("timeout", f"no first token within {timeout:g} s") from None
    raise UpstreamError("broken", "closed the stream without answering")


def unknown_model(model: str, names: list[str]) -> ApiError:
    return ApiError(404, f"unknown model {quote(model)}: use 'zooter' to route, or one of the candidates {names}",
                    code="model_not_found", param="model")


def check_names(call: Call, names: list[str]) -> None:
    """What both back ends refuse before routing: an unknown model, `zooter` options on a named candidate,
    unknown names in zooter.candidates."""
    if call.model != "zooter":
        if call.model not in names:
            raise unknown_model(call.model, names)
        if call.options:
            raise invalid("zooter options apply to model 'zooter' only; this request names a candidate", "zooter")
    unknown = [n for n in call.options.get("candidates", []) if n not in names]
    if unknown:
        raise invalid(f"zooter.candidates: {len(unknown)} unknown candidate(s) {quote(unknown)}", "zooter.candidates")


class BundleBackend:
    kind = "bundle"

    def __init__(self, settings, metrics, http, redact):
        from zooter.runtime.router import Router
        from zooter.serving.candidates import CandidatesError, load_candidates

        self.settings, self.metrics, self.redact = settings, metrics, redact
        # One onnxruntime thread per routing call: the pool below runs one call per core when requests
        # overlap, and a lone call wakes no worker thread (measured: docs/gateway.md, 2026-12-07).
        self.router = Router.load(settings.bundle, lam=settings.lam, tolerance=settings.tolerance, threads=1)
        candidates = load_candidates(settings.candidates)
        self.names = [c.name for c in candidates]
        missing = [label for label in self.router.labels if label not in self.names]
        if missing:
            raise CandidatesError(f"{settings.candidates}: no entry for the router's candidate(s) {missing}")
        self.grpc = GrpcClients()
        self.upstreams, self.unservable = {}, {}
        for c in candidates:
            if c.serve.get("openai_base_url"):
                self.upstreams[c.name] = OpenAIUpstream(c.name, c.serve, http)
            elif c.serve.get("triton_model"):
                self.upstreams[c.name] = TritonModelUpstream(c.name, c.serve, self.grpc, settings.max_tokens)
            else:
                self.unservable[c.name] = "no serve entry (openai_base_url or triton_model)"
        if not any(label in self.upstreams for label in self.router.labels):
            raise UserError(f"{settings.candidates}: none of the router's candidates has a serve entry "
                            "(openai_base_url or triton_model): nothing could answer")
        self.secrets = [u.secret for u in self.upstreams.values() if getattr(u, "secret", None)]
        # Routing is CPU work in onnxruntime: when requests overlap, one thread per core, off the event loop.
        self.pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="zooter-route")

    def describe(self) -> str:
        return (f"bundle {self.settings.bundle} ({len(self.router.labels)} candidates routed, "
                f"{len(self.upstreams)} callable)")

    async def start(self) -> None:
        for name, why in self.unservable.items():
            log.warning("candidate %s cannot be called: %s (the router's choice passes it to the next)", name, why)

    async def close(self) -> None:
        await self.grpc.close()
        self.pool.shutdown(wait=False)

    async def models(self) -> list[str]:
        return self.names

    async def health(self) -> tuple[bool, dict]:
        names = list(self.upstreams)
        states = dict(zip(names, await asyncio.gather(*(self.upstreams[n].probe() for n in names))))
        states.update({name: f"down: {why}" for name, why in self.unservable.items()})
        ready = any(states.get(label) == "up" for label in self.router.labels)
        return ready, {name: states[name] for name in self.names}

    async def _route(self, call: Call, alone: bool) -> tuple[list[str], float | None]:
        """(the candidates to try, best first; the router's confidence, or None when the client named one).
        `alone`: no other request is in flight, so routing on the event loop's thread delays nobody and saves
        the hand-off to a pool thread and back (a wake-up each way)."""
        check_names(call, self.names)
        if call.model != "zooter":
            return [call.model], None
        options, kwargs = call.options, {}
        if "lambda" in options:
            kwargs["lam"] = options["lambda"]
        if "tolerance" in options:
            kwargs["tolerance"] = options["tolerance"]
        allowed = options.get("candidates")
        if allowed:
            if not any(n in self.router.labels for n in allowed):
                raise invalid(f"zooter.candidates: none of {quote(allowed)} is one the router chooses between "
                              f"({self.router.labels})", "zooter.candidates")
            kwargs["candidates"] = [n for n in allowed if n in self.router.labels]
        start = time.perf_counter()
        text = route_text(call.turns, self.settings.route_on or DEFAULT_ROUTE_ON)
        try:
            if alone:
                decision = self.router.route(text, **kwargs)
            else:
                decision = await asyncio.get_running_loop().run_in_executor(
                    self.pool, partial(self.router.route, text, **kwargs))
        except (ValueError, TypeError) as err:   # a setting the bundle cannot take (SettingError), blank text
            raise invalid(f"cannot route this request: {err}", "zooter") from None
        self.metrics.routing.labels(self.router.router_id).observe(time.perf_counter() - start)
        ranking = [n for n in decision.ranking if not allowed or n in allowed]
        return ranking, decision.confidence

    async def answer(self, call: Call, deadline: float, alone: bool = False) -> Answer:
        ranking, confidence = await self._route(call, alone)
        failures, attempts = [], 0
        for i, name in enumerate(ranking):
            upstream = self.upstreams.get(name)
            if upstream is None:
                failures.append(f"{name}: {self.unservable[name]}")
                self.metrics.failure(name, BEFORE, "no_serve")
                continue
            if attempts == self.settings.max_attempts:
                failures.append(f"{len(ranking) - i} more not tried (--max-attempts {attempts})")
                break
            attempts += 1
            started = time.perf_counter()
            try:
                if call.stream:
                    rest = upstream.stream(call)
                    try:
                        chunks = await first_token(rest, min(self.settings.upstream_timeout, remaining(deadline)))
                    except BaseException:
                        await rest.aclose()
                        raise
                    result = {"chunks": chunks, "rest": rest}
                else:
                    result = {"completion": await self._whole(upstream, call, deadline)}
            except UpstreamError as err:
                if err.client_status:
                    raise ApiError(err.client_status, self.redact(f"{name}: {err.message}"),
                                   code="upstream_refused_request") from None
                self.metrics.failure(name, BEFORE, err.reason)
                log.warning("%s failed before its first token (%s): %s", name, err.message, self.redact(err.detail))
                failures.append(f"{name}: {err.message}")
                continue
            fallback = name != ranking[0]
            if fallback:
                self.metrics.fallbacks.labels(name).inc()
            return Answer(name, fallback, confidence, started, **result)
        raise ApiError(503, "no candidate could answer: " + "; ".join(failures), "upstream_error",
                       "upstreams_unavailable")

    async def _whole(self, upstream, call: Call, deadline: float) -> dict:
        """A whole answer, not streamed: its only sign of life is the answer, so the upstream timeout bounds it."""
        timeout = min(self.settings.upstream_timeout, remaining(deadline))
        try:
            async with within(timeout):
                return await upstream.complete(call, timeout)
        except TimeoutError:
            raise UpstreamError("timeout", f"no answer within {timeout:g} s") from None


class TritonBackend:
    """Every request through the `zooter` model over a gRPC stream: routing, fallback and the per-request
    options (`answer_with` for a named candidate, `route_*` for the `zooter` object) happen inside Triton."""

    kind = "triton"

    def __init__(self, settings, metrics):
        self.settings, self.metrics = settings, metrics
        self.grpc = GrpcClients()
        self.zooter = TritonZooter(settings.triton, self.grpc)
        self.labels: list[str] = []
        self.secrets: list[str] = []
        self.unreachable = "not asked yet"             # why Triton's candidates are unknown, while they are

    def describe(self) -> str:
        return f"Triton at grpc://{self.zooter.address} (model zooter)"

    async def start(self) -> None:
        await self.models()

    async def close(self) -> None:
        await self.grpc.close()

    async def models(self) -> list[str]:
        """The router's candidates, read from Triton once it answers (it may start after the gateway)."""
        from tritonclient.utils import InferenceServerException

        if not self.labels:
            try:
                self.labels = await self.zooter.describe()
            except InferenceServerException as err:
                self.unreachable = err.message()
                log.warning("cannot read the candidates from Triton at %s yet: %s", self.zooter.address, err.message())
        return self.labels

    async def health(self) -> tuple[bool, dict]:
        states = await self.zooter.probe()
        return states["triton"] == "up", states

    def _check(self, call: Call) -> None:
        check_names(call, self.labels)
        if (call.options or call.model != "zooter") and not self.zooter.takes_options():
            raise invalid("this Triton repository predates per-request options and named candidates: rebuild it "
                          "with zooter triton build", "zooter" if call.options else "model", "unsupported_option")
        if self.settings.route_on is not None and not self.zooter.takes_messages():
            raise ApiError(503, "the gateway's --route-on needs a Triton repository that routes conversations "
                                "(the `zooter` model's messages and route_on inputs): rebuild it with zooter triton "
                                "build", "upstream_error", "unsupported_repository")

    async def answer(self, call: Call, deadline: float, alone: bool = False) -> Answer:
        if not await self.models():     # the candidates and the model's inputs, once Triton answers
            raise ApiError(503, f"Triton at {self.zooter.address} is not answering: {self.unreachable}",
                           "upstream_error", "upstreams_unavailable")
        self._check(call)
        started = time.perf_counter()
        pieces = self.zooter.pieces(call, call.stream, self.settings.route_on)
        try:
            if not call.stream:
                async with within(remaining(deadline)):
                    got = [piece async for piece in pieces]
                if not got:
                    raise UpstreamError("broken", "Triton closed the stream without answering")
                ending = Ending(call.max_tokens)
                for piece in got:
                    ending.add(piece)
                return self._answer(got[0], started,
                                    completion=completion(call.kind, got[0]["candidate"],
                                                          "".join(p["text_output"] for p in got),
                                                          ending.finish, ending.usage))
            async with within(min(self.settings.upstream_timeout, remaining(deadline))):
                first = await pieces.__anext__()
        except (UpstreamError, TimeoutError, StopAsyncIteration) as err:
            await pieces.aclose()
            raise self._error(err) from None
        id, created = new_id(call.kind), int(time.time())
        candidate, ending = first["candidate"], Ending(call.max_tokens)
        ending.add(first)
        return self._answer(first, started, chunks=[chunk(call.kind, id, created, candidate, first["text_output"],
                                                          first=True)],
                            rest=self._rest(call, pieces, candidate, id, created, ending))

    def _answer(self, first: dict, started: float, **result) -> Answer:
        candidate, fallback = first["candidate"], bool(first.get("note"))
        if fallback:
            self.metrics.fallbacks.labels(candidate).inc()
        confidence = float(first["confidence"]) if first.get("confidence") else None
        return Answer(candidate, fallback, confidence, started, router=first.get("router") or None, **result)

    @staticmethod
    def _error(err) -> ApiError:
        if isinstance(err, TimeoutError):
            return ApiError(503, "Triton sent no first token in time", "upstream_error", "upstreams_unavailable")
        if isinstance(err, StopAsyncIteration):
            return ApiError(503, "Triton closed the stream without answering", "upstream_error", "upstreams_unavailable")
        # The zooter model checks the client's input before any candidate (INVALID_ARG; in a stream only the
        # message says so): those are the client's to fix.
        if err.client_status or BAD_INPUT in err.detail:
            return invalid(f"Triton refused the request: {quote(err.detail, False)}", "messages")
        return ApiError(503, f"Triton could not answer: {err.message}", "upstream_error", "upstreams_unavailable")

    @staticmethod
    async def _rest(call: Call, pieces, candidate: str, id: str, created: int, ending: Ending):
        try:
            async for piece in pieces:
                # A zooter model that moves on to the next candidate after a failure mid-answer would glue two
                # answers together; that is not an answer, so the stream ends in an error instead.
                if piece["candidate"] and piece["candidate"] != candidate:
                    raise UpstreamError("broken", f"{candidate} failed mid-answer (Triton went on to "
                                                  f"{piece['candidate']})")
                ending.add(piece)
                if piece["text_output"]:
                    yield chunk(call.kind, id, created, candidate, piece["text_output"])
            yield chunk(call.kind, id, created, candidate, "", finish=ending.finish)
        finally:
            await pieces.aclose()
