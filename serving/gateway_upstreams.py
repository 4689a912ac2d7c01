"""Where the gateway sends a request: OpenAI-compatible servers, Triton models with TensorRT-LLM I/O, and the
`zooter` model of a Triton repository. Each streams OpenAI-shaped chunks and raises UpstreamError on failure.

    OpenAIUpstream       serve.openai_base_url (vLLM, trtllm-serve, ...): the client's body, model renamed,
                         over httpx; chunks pass through with `model` set to the candidate's name
    TritonModelUpstream  serve.triton_model: text_input, max_tokens, stream, temperature, top_p -> text_output
                         over a gRPC stream (tritonclient.grpc.aio); chunks are built here
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

from zooter.runtime.conversation import finish_reason, turns_to_json
from zooter.runtime.errors import UserError

# Upstream statuses that mean "this request is wrong": asking another candidate cannot help.
CLIENT_ERRORS = (400, 413, 422)
ERROR_BODY_BYTES = 4096


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


# What a Triton model may say about its answer's end, besides text_output: TensorRT-LLM's LLM-API model
# gives `finish_reason`; Zooter's stand-ins and `zooter` model also give the token counts.
END_OUTPUTS = ("finish_reason", "prompt_tokens", "completion_tokens")


class Ending:
    """How a Triton answer ended, from the END_OUTPUTS its responses carried (each named output: the last
    value sent). `finish` is the model's finish_reason, else inferred from completion_tokens and max_tokens,
    else "stop" (nothing tells: docs/gateway.md); `usage` is given only when the model counted both."""

    def __init__(self, max_tokens: int | None):
        self.max_tokens = max_tokens
        self.values: dict[str, str] = {}

    def add(self, piece: dict) -> None:
        self.values.update({name: piece[name] for name in END_OUTPUTS if piece.get(name)})

    def _count(self, name: str) -> int | None:
        try:
            return int(self.values[name])
        except (KeyError, ValueError):
            return None

    @property
    def finish(self) -> str:
        return finish_reason(self.values.get("finish_reason"), self._count("completion_tokens"), self.max_tokens) or "stop"

    @property
    def usage(self) -> dict | None:
        prompt, answer = self._count("prompt_tokens"), self._count("completion_tokens")
        if prompt is None or answer is None:
            return None
        return {"prompt_tokens": prompt, "completion_tokens": answer, "total_tokens": prompt + answer}


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
def _transport_error(err) -> UpstreamError:
    import httpx

    if isinstance(err, httpx.TimeoutException):
        return UpstreamError("timeout", "timed out", f"{type(err).__name__}")
    if isinstance(err, httpx.ConnectError):
        return UpstreamError("refused", "cannot connect", f"{type(err).__name__}: {err}")
    return UpstreamError("broken", "the connection broke", f"{type(err).__name__}: {err}")


def _error_message(raw: bytes) -> str:
    text = raw[:ERROR_BODY_BYTES].decode("utf-8", "replace")
    try:
        error = json.loads(text).get("error")
        message = error.get("message") if isinstance(error, dict) else error
        if isinstance(message, str) and message:
            return message[:500]
    except (ValueError, AttributeError):
        pass
    return text.strip()[:500]


def _status_error(status: int, raw: bytes) -> UpstreamError:
    message = _error_message(raw)
    if status in CLIENT_ERRORS:
        return UpstreamError("http_4xx", f"the candidate refused the request: {message}", message, client_status=status)
    # 401/403/404 (this candidate's key or model name is wrong), 408, 429, 5xx: the next candidate may answer.
    return UpstreamError("http_5xx" if status >= 500 else "http_4xx", f"HTTP {status}", f"HTTP {status}: {message}")


class OpenAIUpstream:
    def __init__(self, name: str, serve: dict, http):
        from zooter.serving.candidates import openai_endpoint

        endpoint = openai_endpoint(name, serve)
        self.name, self.base, self.http = name, endpoint.base_url, http
        self.model = endpoint.model
        self.headers = endpoint.headers()
        self.secret = endpoint.api_key

    def _request(self, call, timeout=None):
        path = "/chat/completions" if call.kind == "chat" else "/completions"
        body = json.dumps(dict(call.body, model=self.model), separators=(",", ":")).encode()
        options = {} if timeout is None else {"timeout": timeout}
        return self.http.build_request("POST", self.base + path, content=body, headers=self.headers, **options)

    async def complete(self, call, timeout) -> dict:
        import httpx

        try:
            response = await self.http.send(self._request(call, timeout))
        except httpx.HTTPError as err:
            raise _transport_error(err) from None
        if response.status_code != 200:
            raise _status_error(response.status_code, response.content)
        try:
            payload = response.json()
        except ValueError:
            raise UpstreamError("bad_response", "answered something that is not JSON") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("choices"), list):
            raise UpstreamError("bad_response", "answered without choices", str(payload)[:300])
        payload["model"] = self.name
        return payload

    async def stream(self, call) -> AsyncIterator[dict]:
        import httpx

        try:
            response = await self.http.send(self._request(call), stream=True)
        except httpx.HTTPError as err:
            raise _transport_error(err) from None
        try:
            if response.status_code != 200:
                raw = b""
                async for part in response.aiter_bytes():
                    raw += part
                    if len(raw) >= ERROR_BODY_BYTES:
                        break
                raise _status_error(response.status_code, raw)
            finished = False
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue          # blank separators, comments, event names
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                try:
                    parsed = json.loads(data)
                except ValueError:
                    raise UpstreamError("bad_response", "sent an event that is not JSON", data[:300]) from None
                if not isinstance(parsed, dict):
                    raise UpstreamError("bad_response", "sent an event that is not an object", data[:300])
                if parsed.get("error"):
                    raise UpstreamError("stream_error", "reported an error", _error_message(data.encode()))
                parsed["model"] = self.name
                finished = finished or any(isinstance(c, dict) and c.get("finish_reason")
                                           for c in parsed.get("choices") or ())
                yield parsed
            if not finished:
                raise UpstreamError("broken", "the stream ended before the answer did")
        except httpx.HTTPError as err:
            raise _transport_error(err) from None
        finally:
            await response.aclose()

    async def probe(self) -> str:
        import httpx

        try:
            response = await self.http.get(self.base + "/models", headers=self.headers, timeout=2.0)
        except httpx.HTTPError as err:
            return f"down: {_transport_error(err).message}"
        return "up" if response.status_code == 200 else f"down: HTTP {response.status_code}"


# --- Triton ---------------------------------------------------------------------------------------------
def grpc_address(url: str, where: str) -> str:
    """host:port of a Triton gRPC endpoint, from "grpc://host:port" or "host:port"."""
    url = url.strip().rstrip("/")
    if url.startswith("grpc://"):
        return url[len("grpc://"):]
    if "://" in url:
        raise UserError(f"{where}: {url}: the gateway talks to Triton over gRPC: give grpc://host:port "
                        "(Triton's gRPC port, 8001 by default)")
    return url


class GrpcClients:
    """One tritonclient.grpc.aio client per Triton address, made on first use inside the event loop
    (gRPC's asyncio channels belong to the loop that creates them) and shared by every request."""

    def __init__(self):
        self.clients: dict = {}

    def get(self, address: str):
        if address not in self.clients:
            import tritonclient.grpc.aio as grpcclient

            self.clients[address] = grpcclient.InferenceServerClient(address)
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
    if "INVALID_ARG" in status:
        return UpstreamError("bad_request", f"Triton refused the request: {message[:300]}", message, client_status=400)
    if "UNAVAILABLE" in status:
        return UpstreamError("refused", "cannot connect to Triton", message)
    if "DEADLINE_EXCEEDED" in status:
        return UpstreamError("timeout", "timed out", message)
    if any(s in message for s in ("unknown model", "not found", "not ready", "unavailable")):
        return UpstreamError("unloaded", "the model is not loaded", message)
    return UpstreamError("model_error", f"the model failed: {message[:300]}", message)


async def _one(request: dict):
    yield request


def _text(values) -> str:
    if values is None:
        return ""
    return "".join(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values.reshape(-1))


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
            yield tuple(_text(result.as_numpy(name)) for name in outputs)
    except (InferenceServerException, grpc.RpcError) as err:
        raise _triton_error(err) from None
    finally:
        responses.cancel()


def _tensor(name: str, datatype: str, shape: list[int], value):
    """A gRPC input of `shape`: filled with `value`, or holding it in order when it is a list."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    dtype = {"BYTES": object, "BOOL": bool, "INT32": np.int32, "INT64": np.int64, "UINT64": np.uint64,
             "FP32": np.float32, "FP64": np.float64}[datatype]
    tensor = grpcclient.InferInput(name, shape, datatype)
    data = np.array(value, dtype=dtype).reshape(shape) if isinstance(value, list) else np.full(shape, value, dtype=dtype)
    tensor.set_data_from_numpy(data)
    return tensor


class TritonModelUpstream:
    """A candidate's Triton model with TensorRT-LLM ensemble I/O (serve.triton_model, serve.triton_url)."""

    def __init__(self, name: str, serve: dict, clients: GrpcClients, max_tokens: int):
        protocol = str(serve.get("protocol") or "grpc").lower()
        if protocol != "grpc":
            raise UserError(f"candidate {name!r}: the gateway calls Triton models over gRPC: set protocol: grpc "
                            "and triton_url to the gRPC address")
        self.name, self.model, self.clients, self.max_tokens = name, str(serve["triton_model"]), clients, max_tokens
        self.address = grpc_address(str(serve.get("triton_url") or "localhost:8001"), f"candidate {name!r}")
        self._inputs: dict | None = None      # name -> (datatype, shape), read once from the model's metadata
        self._outputs: list[str] = ["text_output"]   # text_output and the END_OUTPUTS the model has

    async def _describe(self, client) -> dict:
        from tritonclient.utils import InferenceServerException

        try:
            meta = await client.get_model_metadata(self.model, as_json=True)
        except InferenceServerException as err:
            raise _triton_error(err) from None
        # Metadata shapes include the batch dimension (-1) when the model batches; every -1 is 1 here.
        inputs = {i["name"]: (i["datatype"], [1 if int(d) < 0 else int(d) for d in i["shape"]]) for i in meta["inputs"]}
        if "text_input" not in inputs or "max_tokens" not in inputs or \
                "text_output" not in {o["name"] for o in meta["outputs"]}:
            raise UpstreamError("bad_response", "the model lacks TensorRT-LLM I/O (text_input, max_tokens -> text_output)")
        outputs = {o["name"] for o in meta["outputs"]}
        self._outputs = ["text_output", *(name for name in END_OUTPUTS if name in outputs)]
        return inputs

    async def texts(self, call, stream: bool, ending: Ending) -> AsyncIterator[str]:
        """The answer's pieces of text; what the model says about its end goes to `ending`."""
        client = self.clients.get(self.address)
        if self._inputs is None:
            self._inputs = await self._describe(client)
        wanted = {"text_input": call.prompt.encode("utf-8"), "max_tokens": ending.max_tokens,
                  "stream": stream, **call.sampling,
                  # Without it a TensorRT-LLM ensemble answers with the prompt followed by the answer.
                  "exclude_input_in_output": True}
        inputs = [_tensor(name, *self._inputs[name], value) for name, value in wanted.items() if name in self._inputs]
        import tritonclient.grpc as grpcclient

        outputs = tuple(self._outputs)
        request = {"model_name": self.model, "inputs": inputs,
                   "outputs": [grpcclient.InferRequestedOutput(name) for name in outputs]}
        try:
            async for values in _responses(client, request, outputs):
                piece = dict(zip(outputs, values))
                ending.add(piece)
                if piece["text_output"]:
                    yield piece["text_output"]
        except UpstreamError:
            self._inputs = None           # a model loaded again may have another config
            raise

    async def stream(self, call) -> AsyncIterator[dict]:
        id, created = new_id(call.kind), int(time.time())
        first, ending = True, Ending(call.max_tokens or self.max_tokens)
        async for text in self.texts(call, True, ending):
            yield chunk(call.kind, id, created, self.name, text, first=first)
            first = False
        yield chunk(call.kind, id, created, self.name, "", finish=ending.finish, first=first)

    async def complete(self, call, timeout) -> dict:
        ending = Ending(call.max_tokens or self.max_tokens)
        text = "".join([t async for t in self.texts(call, False, ending)])
        return completion(call.kind, self.name, text, ending.finish, ending.usage)

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
                             if o.name in ("text_output", "candidate", "note", "confidence", *END_OUTPUTS))
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
