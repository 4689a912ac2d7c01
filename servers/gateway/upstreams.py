"""Where the gateway sends a request: OpenAI-compatible servers, Triton models with TensorRT-LLM I/O, and the
`zooter` model of a Triton repository. Each streams OpenAI-shaped chunks and raises UpstreamError on failure.

    OpenAIUpstream       serve.openai_base_url (vLLM, trtllm-serve, ...): the client's body, model renamed,
                         over aiohttp (UpstreamHttp); chunks pass through with `model` set to the candidate's
                         name, as the bytes they came as when that is their name already
    TritonModelUpstream  serve.triton_model: TensorRT-LLM's LLM-API model or the ensemble/BLS I/O, mapped by
                         runtime.candidate_io, over a gRPC stream (tritonclient.grpc.aio); chunks are built here
    TritonZooter         the `zooter` BLS model (routing and fallback inside Triton): the same I/O plus the
                         `candidate` and `note` outputs

Messages of UpstreamError are shown to clients: they name what went wrong, never a URL, a key or an
upstream's error body (that goes to `detail`, for the log), except when the upstream says the request
itself is wrong, which the client needs to know to fix it.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import AsyncIterator

from zooter.runtime.candidate_io import (END_OUTPUTS, ENSEMBLE, Ask, IOMismatch, Reading, TritonModel, error_message, status_kind,
                                         text, triton_kind)
from zooter.runtime.conversation import turns_to_json
from zooter.runtime.errors import UserError
from zooter.servers.gateway.wire import Event, dumps, loads, sse_data
from zooter.serving.triton_client import grpc_address

ERROR_BODY_BYTES = 4096
# A pooled upstream connection idle this long is closed, not reused: below uvicorn's 5 s keep-alive (vLLM's and
# trtllm-serve's server), so the gateway never sends a request down a connection the upstream is closing that
# moment (it failed, and the request went to another candidate).
POOL_IDLE_SECONDS = 4.0


class UpstreamError(Exception):
    """A candidate could not answer. `reason` is the metrics label; `client_status` is set when the upstream
    refused the request itself (no fallback: the client gets that status)."""

    def __init__(self, reason: str, message: str, detail: str = "", client_status: int | None = None):
        super().__init__(message)
        self.reason, self.message, self.detail, self.client_status = reason, message, detail, client_status


# --- OpenAI-shaped answers ---------------------------------------------------------------------------
def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def chunk(kind: str, id: str, created: int, model: str, text: str, finish: str | None = None,
          first: bool = False) -> dict:
    if kind == "chat":
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return {"id": id, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def completion(kind: str, model: str, text: str, finish: str = "stop", usage: dict | None = None) -> dict:
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice, obj = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}, "text_completion"
    answer = {"id": new_id(kind), "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}
    if usage:
        answer["usage"] = usage
    return answer


class Ending(Reading):
    """How an answer in ensemble-shaped pieces ended (the `zooter` model's: deltas, finish_reason, counts)."""

    def __init__(self, max_tokens: int | None):
        super().__init__(ENSEMBLE, max_tokens)


def is_token(data: dict) -> bool:
    """Whether a chunk carries something of the answer (text, a tool call, the finish, usage), as opposed
    to the role-only chunk servers send first: a failure before this is still invisible to the client."""
    if data.get("usage"):
        return True
    for choice in data.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        if choice.get("finish_reason") or choice.get("text"):
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict) and any(delta.get(k) for k in ("content", "tool_calls", "function_call",
                                                                  "reasoning_content", "refusal")):
            return True
    return False


# --- OpenAI-compatible servers -------------------------------------------------------------------------
class UpstreamHttp:
    """The one aiohttp session every OpenAI-compatible upstream shares (pooled keep-alive connections), made on
    first use inside the serving loop: aiohttp sessions belong to the loop that makes them. aiohttp, not httpx:
    its connection pool and C parser cost a fraction of httpx's CPU per request (docs/gateway.md)."""

    def __init__(self, read_timeout: float, connect_timeout: float):
        self.read_timeout, self.connect_timeout = read_timeout, connect_timeout
        self._session = None

    def session(self):
        if self._session is None:
            import aiohttp

            # No trust_env: with it aiohttp looks up the proxy variables and ~/.netrc on every request, each in a
            # worker thread (two thread hand-offs a request); `via` reads them once per upstream instead.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=POOL_IDLE_SECONDS),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout, sock_read=self.read_timeout))
        return self._session

    @staticmethod
    def via(base_url: str, headers: dict) -> dict:
        """What the environment says about reaching `base_url`, as aiohttp's trust_env would (request options):
        the proxy of HTTP_PROXY / HTTPS_PROXY unless NO_PROXY exempts the host, and ~/.netrc (or $NETRC)
        credentials for the host when the upstream has no key of its own, nor credentials in its URL (aiohttp refuses
        two at once, as trust_env never gave them). Read when the candidates load (again on SIGHUP)."""
        from aiohttp.helpers import basicauth_from_netrc, get_env_proxy_for_url, netrc_from_env
        from yarl import URL

        url, options = URL(base_url), {}
        try:
            options["proxy"], options["proxy_auth"] = get_env_proxy_for_url(url)
        except LookupError:
            pass
        if url.host and url.user is None and not any(k.lower() == "authorization" for k in headers):
            try:
                options["auth"] = basicauth_from_netrc(netrc_from_env(), url.host)
            except LookupError:
                pass
        return options

    def timeout(self, seconds: float):
        """A whole call's limit: connecting and every read within `seconds` too."""
        import aiohttp

        return aiohttp.ClientTimeout(total=seconds, sock_connect=min(self.connect_timeout, seconds), sock_read=seconds)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _transport_errors() -> tuple:
    import asyncio

    import aiohttp

    return aiohttp.ClientError, asyncio.TimeoutError


def _transport_error(err) -> UpstreamError:
    import asyncio

    import aiohttp

    # aiohttp's connect and read timeouts are asyncio.TimeoutErrors (the builtin TimeoutError from Python 3.11)
    if isinstance(err, asyncio.TimeoutError):
        return UpstreamError("timeout", "timed out", f"{type(err).__name__}")
    if isinstance(err, aiohttp.ClientConnectorError):
        return UpstreamError("refused", "cannot connect", f"{type(err).__name__}: {err}")
    return UpstreamError("broken", "the connection broke", f"{type(err).__name__}: {err}")


def _status_error(status: int, raw: bytes) -> UpstreamError:
    message = error_message(raw)
    if status_kind(status) == "client":
        return UpstreamError("http_4xx", f"the candidate refused the request: {message}", message, client_status=status)
    # 401/403/404 (this candidate's key or model name is wrong), 408, 429, 5xx: the next candidate may answer.
    return UpstreamError("http_5xx" if status >= 500 else "http_4xx", f"HTTP {status}", f"HTTP {status}: {message}")


async def _head(response, limit: int = ERROR_BODY_BYTES) -> bytes:
    """At most about `limit` bytes of a body (an error's: its message is all that is needed)."""
    raw = b""
    while len(raw) < limit:
        part = await response.content.readany()
        if not part:
            break
        raw += part
    return raw


async def _drain(response, limit: int = 65536, seconds: float = 1.0) -> None:
    """What follows [DONE] (the end of the chunked body), so that the connection goes back to the pool instead of
    being closed; an upstream that sends more, or nothing for a second, loses its connection instead."""
    import anyio

    with anyio.move_on_after(seconds):
        left = limit
        while left > 0 and not response.content.at_eof():
            part = await response.content.readany()
            if not part:
                return
            left -= len(part)


class OpenAIUpstream:
    def __init__(self, name: str, serve: dict, http: UpstreamHttp):
        from zooter.serving.candidates import openai_endpoint

        endpoint = openai_endpoint(name, serve)
        self.name, self.base, self.http = name, endpoint.base_url, http
        self.model = endpoint.model
        self.headers = endpoint.headers()
        self.secret = endpoint.api_key
        self.via = http.via(self.base, self.headers)

    def _post(self, call, timeout=None):
        path = "/chat/completions" if call.kind == "chat" else "/completions"
        body = dumps(dict(call.body, model=self.model))
        options = {} if timeout is None else {"timeout": self.http.timeout(timeout)}
        return self.http.session().post(self.base + path, data=body, headers=self.headers, **self.via, **options)

    async def complete(self, call, timeout) -> dict:
        try:
            async with self._post(call, timeout) as response:
                raw = await response.read()
                status = response.status
        except _transport_errors() as err:
            raise _transport_error(err) from None
        if status != 200:
            raise _status_error(status, raw[:ERROR_BODY_BYTES])
        try:
            payload = loads(raw)
        except ValueError:
            raise UpstreamError("bad_response", "answered something that is not JSON") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("choices"), list):
            raise UpstreamError("bad_response", "answered without choices", str(payload)[:300])
        payload["model"] = self.name
        return payload

    async def stream(self, call) -> AsyncIterator[dict]:
        """The answer's chunks as Events: each keeps the bytes it came as, relayed unchanged when the upstream
        already calls itself by the candidate's name (the one thing rewritten)."""
        try:
            response = await self._post(call)
        except _transport_errors() as err:
            raise _transport_error(err) from None
        try:
            if response.status != 200:
                raise _status_error(response.status, await _head(response))
            finished = False
            async for data in sse_data(response.content.iter_any()):
                if data.strip() == b"[DONE]":
                    await _drain(response)
                    return
                try:
                    parsed = loads(data)
                except ValueError:
                    raise UpstreamError("bad_response", "sent an event that is not JSON", _text(data)) from None
                if not isinstance(parsed, dict):
                    raise UpstreamError("bad_response", "sent an event that is not an object", _text(data))
                if parsed.get("error"):
                    raise UpstreamError("stream_error", "reported an error", error_message(data))
                event = Event(parsed, data)
                if parsed.get("model") != self.name:
                    event["model"] = self.name
                finished = finished or any(isinstance(c, dict) and c.get("finish_reason")
                                           for c in parsed.get("choices") or ())
                yield event
            if not finished:
                raise UpstreamError("broken", "the stream ended before the answer did")
        except _transport_errors() as err:
            raise _transport_error(err) from None
        finally:
            response.release()        # back to the pool when the body was read to its end, else closed

    async def probe(self) -> str:
        try:
            async with self.http.session().get(self.base + "/models", headers=self.headers,
                                               timeout=self.http.timeout(2.0), **self.via) as response:
                status = response.status
                await _head(response, 65536)   # read to its end: the connection stays open for the next call
        except _transport_errors() as err:
            return f"down: {_transport_error(err).message}"
        return "up" if status == 200 else f"down: HTTP {status}"


def _text(data: bytes) -> str:
    return data[:300].decode("utf-8", "replace")


# --- Triton ---------------------------------------------------------------------------------------------
RECONNECT = [("grpc.initial_reconnect_backoff_ms", 250), ("grpc.min_reconnect_backoff_ms", 250),
             ("grpc.max_reconnect_backoff_ms", 2000)]


class GrpcClients:
    """One tritonclient.grpc.aio client per Triton address, made on first use inside the event loop
    (gRPC's asyncio channels belong to the loop that creates them) and shared by every request."""

    def __init__(self):
        self.clients: dict = {}

    def get(self, address: str):
        if address not in self.clients:
            import tritonclient.grpc.aio as grpcclient

            # gRPC backs off reconnecting to a server that went away (up to 120 s by default), failing every
            # call meanwhile: capped at 2 s, traffic returns to a restarted candidate server within seconds.
            self.clients[address] = grpcclient.InferenceServerClient(address, channel_args=RECONNECT)
        return self.clients[address]

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()
        self.clients.clear()


def _triton_error(err) -> UpstreamError:
    """An InferenceServerException, a gRPC error or an error response, as an UpstreamError."""
    import grpc

    if isinstance(err, grpc.RpcError):
        status, message = str(err.code()), err.details() or ""
    else:
        status, message = str(err.status() or ""), err.message() or str(err)
    kind = triton_kind(status, message)
    if kind == "bad_request":
        return UpstreamError("bad_request", f"Triton refused the request: {message[:300]}", message, client_status=400)
    if kind == "refused":
        return UpstreamError("refused", "cannot connect to Triton", message)
    if kind == "timeout":
        return UpstreamError("timeout", "timed out", message)
    if kind in ("missing", "unloaded"):
        return UpstreamError("unloaded", "the model is not loaded", message)
    return UpstreamError("model_error", f"the model failed: {message[:300]}", message)


async def _one(request: dict):
    yield request


async def _responses(client, request: dict, outputs: tuple[str, ...]) -> AsyncIterator[tuple]:
    """Decoded outputs of one request over a gRPC stream, until Triton closes it (after the final response:
    the request side is closed once the request is sent)."""
    import grpc
    from tritonclient.utils import InferenceServerException

    try:
        responses = client.stream_infer(_one(request))
    except InferenceServerException as err:
        raise _triton_error(err) from None
    try:
        async for result, error in responses:
            if error is not None:
                raise _triton_error(error)
            yield tuple(text(result.as_numpy(name)) for name in outputs)
    except (InferenceServerException, grpc.RpcError) as err:
        raise _triton_error(err) from None
    finally:
        responses.cancel()


def _tensor(name: str, datatype: str, shape: list[int], value):
    """A gRPC input: `value` as runtime.candidate_io's specs give it (numpy), or a scalar filling `shape`, or a
    list of values in order."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    from zooter.runtime.candidate_io import filled

    if not isinstance(value, np.ndarray):
        shape, value = filled(datatype, shape, value)
    tensor = grpcclient.InferInput(name, list(value.shape), datatype)
    tensor.set_data_from_numpy(value)
    return tensor


class TritonModelUpstream:
    """A candidate's Triton model (serve.triton_model, serve.triton_url): TensorRT-LLM's LLM-API model or the
    ensemble/BLS I/O, detected from its metadata (serve.io names it when both fit); runtime.candidate_io
    maps the request onto it and reads the answer."""

    def __init__(self, name: str, serve: dict, clients: GrpcClients, max_tokens: int):
        protocol = str(serve.get("protocol") or "grpc").lower()
        if protocol != "grpc":
            raise UserError(f"candidate {name!r}: the gateway calls Triton models over gRPC: set protocol: grpc "
                            "and triton_url to the gRPC address")
        self.name, self.model, self.clients, self.max_tokens = name, str(serve["triton_model"]), clients, max_tokens
        self.address = grpc_address(str(serve.get("triton_url") or "localhost:8001"), f"candidate {name!r}")
        self.io = serve.get("io")
        self.described: TritonModel | None = None      # read once from the model's metadata and config
        self.check_io()

    def check_io(self, timeout: float = 5.0) -> str | None:
        """At start, before serving: a model with none of the known I/Os is a UserError naming it and its
        inputs; a server that cannot be reached now is not (None: /health names it, requests go elsewhere)."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        client = grpcclient.InferenceServerClient(self.address)
        try:
            meta = client.get_model_metadata(self.model, as_json=True, client_timeout=timeout)
            config = client.get_model_config(self.model, as_json=True, client_timeout=timeout)["config"]
        except InferenceServerException:
            return None
        finally:
            client.close()
        try:
            return TritonModel.from_metadata(self.model, meta, config, self.io).io
        except IOMismatch as err:
            raise UserError(f"candidate {self.name!r} at {self.address}: {err}") from None

    async def _describe(self, client) -> TritonModel:
        from tritonclient.utils import InferenceServerException

        try:
            meta = await client.get_model_metadata(self.model, as_json=True)
            config = (await client.get_model_config(self.model, as_json=True))["config"]
        except InferenceServerException as err:
            raise _triton_error(err) from None
        try:
            return TritonModel.from_metadata(self.model, meta, config, self.io)
        except IOMismatch as err:
            raise UpstreamError("bad_response", "the model has none of the known I/Os", str(err)) from None

    async def texts(self, call, stream: bool, ended: list) -> AsyncIterator[str]:
        """The answer's pieces of text; the Reading that learns how it ended is appended to `ended`."""
        import tritonclient.grpc as grpcclient

        client = self.clients.get(self.address)
        if self.described is None:
            self.described = await self._describe(client)
        model = self.described
        # OpenAI's stop (a string or a list of them) and seed map onto the model's inputs; a seed Triton's
        # UINT64 cannot hold is left to the model's default.
        stop, seed = call.body.get("stop"), call.body.get("seed")
        stop = [stop] if isinstance(stop, str) else [s for s in stop if isinstance(s, str)] if isinstance(stop, list) else []
        seed = seed if isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0 else None
        ask = Ask(call.prompt, call.max_tokens or self.max_tokens, stream, **call.sampling, seed=seed, stop=stop)
        reading = model.reading(ask)
        ended.append(reading)
        inputs = [_tensor(name, datatype, shape, value) for name, datatype, shape, value in model.specs(ask)]
        outputs = tuple(model.outputs)
        request = {"model_name": self.model, "inputs": inputs,
                   "outputs": [grpcclient.InferRequestedOutput(name) for name in outputs]}
        try:
            async for values in _responses(client, request, outputs):
                delta = reading.add(dict(zip(outputs, values)))
                if delta:
                    yield delta
        except UpstreamError:
            self.described = None           # a model loaded again may have another config
            raise

    async def stream(self, call) -> AsyncIterator[dict]:
        id, created = new_id(call.kind), int(time.time())
        first, ended = True, []
        async for piece in self.texts(call, True, ended):
            yield chunk(call.kind, id, created, self.name, piece, first=first)
            first = False
        yield chunk(call.kind, id, created, self.name, "", finish=ended[0].finish, first=first)

    async def complete(self, call, timeout) -> dict:
        ended = []
        answer = "".join([t async for t in self.texts(call, False, ended)])
        return completion(call.kind, self.name, answer, ended[0].finish, ended[0].usage)

    async def probe(self) -> str:
        from tritonclient.utils import InferenceServerException

        try:
            ready = await self.clients.get(self.address).is_model_ready(self.model, client_timeout=2.0)
        except InferenceServerException as err:
            return f"down: {_triton_error(err).message}"
        return "up" if ready else "down: the model is not loaded"


class TritonZooter:
    """The `zooter` model of a repository from `zooter triton build`: routes inside Triton, falls back inside
    Triton, and says who answered (`candidate`), why when it fell back (`note`) and, in repositories that
    have the output, how sure the router was (`confidence`, on the first response)."""

    MODEL = "zooter"
    ROUTE = "zooter_route"

    def __init__(self, url: str, clients: GrpcClients):
        self.address = grpc_address(url, "--triton")
        self.clients = clients
        self.outputs: tuple[str, ...] | None = None     # the model's outputs, read once from its config
        self.inputs: frozenset[str] = frozenset()

    async def describe(self) -> list[str]:
        """The router's candidates (zooter_route's `labels` parameter); learns the `zooter` model's outputs."""
        client = self.clients.get(self.address)
        config = await client.get_model_config(self.MODEL, client_timeout=5.0)
        self.outputs = tuple(o.name for o in config.config.output
                             if o.name in ("text_output", "candidate", "note", "confidence", "router", *END_OUTPUTS))
        self.inputs = frozenset(i.name for i in config.config.input)
        route = await client.get_model_config(self.ROUTE, client_timeout=5.0)
        return json.loads(route.config.parameters["labels"].string_value)

    def takes_options(self) -> bool:
        """Whether the repository's `zooter` model takes a named candidate and per-request routing knobs."""
        return {"answer_with", "route_lambda", "route_tolerance", "route_candidates"} <= self.inputs

    def takes_messages(self) -> bool:
        """Whether the repository's `zooter` model routes a conversation itself (the `messages` and `route_on`
        inputs); an older one routes on text_input, the whole prompt."""
        return {"messages", "route_on"} <= self.inputs

    async def pieces(self, call, stream: bool, route_on: str | None = None) -> AsyncIterator[dict[str, str]]:
        """{output: decoded value} per response ("" for an output a response does not carry). The candidate
        gets the whole prompt (text_input); the model routes on the part of `messages` its route_on picks
        (`route_on`: this request's, else the repository's)."""
        import tritonclient.grpc as grpcclient

        if self.outputs is None:
            await self.describe()
        values = {"text_input": ("BYTES", call.prompt.encode("utf-8")), "stream": ("BOOL", stream)}
        if call.kind == "chat" and self.takes_messages():
            values["messages"] = ("BYTES", turns_to_json(call.turns).encode("utf-8"))
        if route_on is not None:
            values["route_on"] = ("BYTES", route_on.encode("utf-8"))
        if call.max_tokens:
            values["max_tokens"] = ("INT32", call.max_tokens)
        values.update({name: ("FP32", value) for name, value in call.sampling.items()})
        if call.model != self.MODEL:
            values["answer_with"] = ("BYTES", call.model.encode("utf-8"))
        for name in ("lambda", "tolerance"):
            if name in call.options:
                values[f"route_{name}"] = ("FP32", call.options[name])
        inputs = [_tensor(name, datatype, [1, 1], value) for name, (datatype, value) in values.items()]
        if call.options.get("candidates"):
            names = call.options["candidates"]
            inputs.append(_tensor("route_candidates", "BYTES", [1, len(names)], [n.encode("utf-8") for n in names]))
        request = {"model_name": self.MODEL, "inputs": inputs,
                   "outputs": [grpcclient.InferRequestedOutput(name) for name in self.outputs]}
        async for piece in _responses(self.clients.get(self.address), request, self.outputs):
            yield dict(zip(self.outputs, piece))

    async def probe(self) -> dict[str, str]:
        from tritonclient.utils import InferenceServerException

        client = self.clients.get(self.address)
        try:
            if not await client.is_server_ready(client_timeout=2.0):
                return {"triton": "down: the server is not ready"}
            ready = await client.is_model_ready(self.MODEL, client_timeout=2.0)
        except InferenceServerException as err:
            return {"triton": f"down: {_triton_error(err).message}"}
        return {"triton": "up" if ready else f"down: model {self.MODEL} is not loaded"}
