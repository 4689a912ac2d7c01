"""Client side of the Triton deployment: one home for talking to a tritonserver.

    parse_url / connect     a tritonclient client for "host:port" / "http://host:port" (HTTP) or
                            "grpc://host:port" (gRPC)
    stream                  the gRPC bidirectional-stream loop (decoupled models: `zooter`, stand-ins,
                            TensorRT-LLM ensembles), with a deadline per response
    load_model / unload_model  model control, with the control key when the server restricts it
    route_via_triton        routing through the `zooter_route` ensemble
    ask                     route and answer through the `zooter` model, streamed

HTTP answers (`ask` over HTTP) use Triton's generate endpoints with the standard library; the rest
uses tritonclient, imported when called.
"""

from __future__ import annotations

import json
import queue
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from zooter.runtime.candidate_io import error_message, filled
from zooter.runtime.candidate_io import text as text_of
from zooter.runtime.errors import UserError

ROUTE_MODEL = "zooter_route"
ANSWER_MODEL = "zooter"
DECISION_OUTPUTS = ("candidate", "probabilities", "expected_rewards", "confidence", "ranking")
BATCH = 32                   # rows per request: the routing models' default max_batch_size
MAX_TEXT_BYTES = 65536       # the repository's default limit; longer text is refused before sending
CONTROL_HEADER = "zooter-control-key"   # the header Triton's restricted model-repository/logging APIs require
# Control APIs, restricted to requests carrying CONTROL_HEADER (the launcher's flags, the manifests of
# `zooter deploy`): loading models runs their code; logging and trace settings choose files to write;
# registering a shared-memory region (system or CUDA) lets a client read and write any /dev/shm key
# the server can open, the python backend's own regions included.
RESTRICTED_APIS = "model-repository,logging,trace,shared-memory"


class TritonRequestError(RuntimeError):
    """Triton answered with an error (bad input, a model not ready, no candidate could answer);
    `status` is Triton's status code when it sent one (e.g. "StatusCode.INVALID_ARGUMENT", "400")."""

    def __init__(self, message: str, status: str = ""):
        super().__init__(message)
        self.status = status

    @property
    def client_error(self) -> bool:
        """The request itself is wrong (or names a missing model): asking again cannot help."""
        return any(s in self.status for s in ("NOT_FOUND", "INVALID_ARG", "400", "404"))


def parse_url(url: str) -> tuple[str, str]:
    """("http" | "grpc", "host:port")."""
    url = url.strip().rstrip("/")
    if url.startswith("grpc://"):
        return "grpc", url[len("grpc://"):]
    if url.startswith("https://"):
        raise UserError(f"{url}: https is not supported here; use http://host:port or grpc://host:port")
    if url.startswith("http://"):
        return "http", url[len("http://"):]
    if "://" in url:
        raise UserError(f"{url}: expected host:port, http://host:port or grpc://host:port")
    return "http", url


def grpc_address(url: str, where: str) -> str:
    """host:port of a Triton gRPC endpoint, from "grpc://host:port" or "host:port" (parse_url's forms, less
    http): the gateway's Triton upstreams and the manifests of `zooter deploy`."""
    if "://" in url and not url.strip().startswith("grpc://"):
        raise UserError(f"{where}: {url}: the gateway talks to Triton over gRPC: give grpc://host:port "
                        "(Triton's gRPC port, 8001 by default)")
    return parse_url(url)[1]


def client_module(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as module
    elif protocol == "http":
        import tritonclient.http as module
    else:
        raise UserError(f"protocol must be grpc or http, not {protocol!r}")
    return module


def connect(url: str, protocol: str | None = None, **options):
    """(tritonclient InferenceServerClient, its module) for `url`; `protocol` overrides the URL's."""
    parsed, address = parse_url(url)
    protocol = protocol or parsed
    module = client_module(protocol)
    client = module.InferenceServerClient(address, **options)
    client.zooter_address = f"{protocol}://{address}"
    return client, module


def unreachable(url: str, err: Exception) -> UserError:
    return UserError(f"cannot reach Triton at {url}: {err}; is `zooter serve` running there?")


def stream(client, model: str, inputs, outputs=None, timeout: float = 600.0, idle=None) -> Iterator:
    """Results of one request to a decoupled model over a gRPC stream, until its final response.

    `idle()` is called every second without a response and may raise to give up (say, when the
    model was unloaded); `timeout` bounds the wait for any one response. Errors raise
    TritonRequestError with Triton's message.
    """
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(model, inputs, outputs=outputs, enable_empty_final_response=True)
        waited = 0.0
        while True:
            try:
                result, error = results.get(timeout=1.0)
            except queue.Empty:
                waited += 1.0
                if waited >= timeout:
                    raise TritonRequestError(f"{model}: no response within {timeout:g} s") from None
                if idle is not None:
                    idle()
                continue
            waited = 0.0
            if error is not None:
                raise TritonRequestError(error.message() if hasattr(error, "message") else str(error),
                                         str(error.status() or "") if hasattr(error, "status") else "")
            yield result
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                return
    finally:
        client.stop_stream(cancel_requests=True)


def control(url: str, model: str, action: str, key: str | None = None, timeout: float = 300.0) -> None:
    """Load or unload `model` through the repository API (HTTP); `key` is the server's control key."""
    if action not in ("load", "unload"):
        raise ValueError(f"action must be load or unload, not {action!r}")
    protocol, address = parse_url(url)
    if protocol != "http":
        raise UserError("model control goes through the HTTP address (host:port)")
    headers = {"Content-Type": "application/json"}
    if key:
        headers[CONTROL_HEADER] = key
    request = urllib.request.Request(f"http://{address}/v2/repository/models/{model}/{action}", data=b"{}",
                                     headers=headers, method="POST")
    try:
        urllib.request.urlopen(request, timeout=timeout).read()
    except urllib.error.HTTPError as err:
        with err:               # closed now: an open connection holds Triton's stop until its exit timeout
            detail = f"{action} {model}: HTTP {err.code}: {error_message(err.read(), 4000)}"
        raise TritonRequestError(detail) from None
    except urllib.error.URLError as err:
        raise unreachable(url, err.reason) from None


def load_model(url: str, model: str, key: str | None = None) -> None:
    control(url, model, "load", key)


def unload_model(url: str, model: str, key: str | None = None) -> None:
    control(url, model, "unload", key)


# --- routing -------------------------------------------------------------------------------------
def check_text(text, i: int = 0) -> bytes:
    """A query as UTF-8 bytes, refused here (not after a round trip) when it is empty or too long."""
    if isinstance(text, str):
        from zooter.runtime.tokenize import clean_query

        data = clean_query(text).encode("utf-8") if text.strip() else b""
    elif isinstance(text, (bytes, bytearray)):
        data = bytes(text)
    else:
        raise TypeError(f"query {i}: expected a str, got {type(text).__name__}")
    if not data.strip():
        raise UserError(f"query {i}: empty text: give the query to route")
    if len(data) > MAX_TEXT_BYTES:
        raise UserError(f"query {i}: {len(data)} bytes is over Triton's {MAX_TEXT_BYTES}-byte limit "
                        f"(the router reads only its first tokens; send less)")
    return data


def route_rows(client, module, texts: Sequence) -> list[dict]:
    """One request to zooter_route with these queries as rows; the decisions as
    [{"candidate", "expected_reward", "confidence", "expected_rewards", "probabilities", "ranking"}]."""
    from tritonclient.utils import InferenceServerException

    data = np.array([[check_text(t, i)] for i, t in enumerate(texts)], dtype=object)
    text = module.InferInput("text", list(data.shape), "BYTES")
    text.set_data_from_numpy(data)
    outputs = [module.InferRequestedOutput(name) for name in DECISION_OUTPUTS]
    try:
        result = client.infer(ROUTE_MODEL, [text], outputs=outputs)
    except InferenceServerException as err:
        raise TritonRequestError(err.message(), str(err.status() or "")) from None

    def names(values):
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]

    probs, expected = result.as_numpy("probabilities"), result.as_numpy("expected_rewards")
    labels = route_labels(client, probs.shape[-1])
    out = []
    for k, candidate in enumerate(names(result.as_numpy("candidate").reshape(-1))):
        out.append({"candidate": candidate, "expected_reward": float(expected[k][labels.index(candidate)]),
                    "confidence": float(result.as_numpy("confidence").reshape(-1)[k]),
                    "expected_rewards": {label: float(v) for label, v in zip(labels, expected[k])},
                    "probabilities": {label: float(p) for label, p in zip(labels, probs[k])},
                    "ranking": [x for x in names(result.as_numpy("ranking")[k]) if x]})
    return out


_LABELS: dict[str, list[str]] = {}


def route_labels(client, width: int | None = None) -> list[str]:
    """Label order of `probabilities`, from zooter_route's `labels` parameter; cached per server
    address (never per client object: ids are reused), read again when the width no longer fits."""
    key = getattr(client, "zooter_address", None) or repr(client)
    if key not in _LABELS or (width is not None and len(_LABELS[key]) != width):
        config = client.get_model_config(ROUTE_MODEL)
        if isinstance(config, dict):           # HTTP: JSON
            raw = config["parameters"]["labels"]["string_value"]
        else:                                  # gRPC: ModelConfigResponse
            raw = config.config.parameters["labels"].string_value
        _LABELS[key] = json.loads(raw)
    return _LABELS[key]


def route_via_triton(url: str, texts: Sequence[str]) -> list[dict]:
    """Route queries through Triton's zooter_route; one decision dict a query (see route_rows)."""
    if isinstance(texts, str):
        raise TypeError("route_via_triton takes a list of queries")
    for i, t in enumerate(texts):
        check_text(t, i)
    client, module = connect(url)
    try:
        client.is_server_live()
    except Exception as err:   # refused, unknown host: tritonclient raises its own types
        client.close()
        raise unreachable(url, err) from None
    # Batches of similar lengths, as Router.route_batch forms them: less padding, and a dynamic int8
    # router (activation scales span the batch) then sees the same batches as in-process.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list = [None] * len(texts)
    try:
        for start in range(0, len(order), BATCH):
            idx = order[start:start + BATCH]
            try:
                decisions = route_rows(client, module, [texts[i] for i in idx])
            except TritonRequestError as err:   # "row N" counts in the sorted batch: name the caller's query
                raise TritonRequestError(re.sub(r"\brow (\d+)", lambda m: f"query {idx[int(m.group(1))]}", str(err))) from None
            for i, decision in zip(idx, decisions):
                out[i] = decision
        return out
    finally:
        client.close()


# --- answers -------------------------------------------------------------------------------------
@dataclass
class Chunk:
    text: str
    candidate: str
    note: str = ""


def ask(url: str, text: str, stream: bool = True, max_tokens: int = 128, **sampling) -> Iterator[Chunk]:
    """Ask `zooter` (route, then the chosen candidate answers). Yields text chunks as they arrive (a stream's
    last response, which only says how the answer ended, is not one).

    `sampling`: extra TensorRT-LLM inputs (temperature, top_p, top_k, random_seed, ...).
    Raises TritonRequestError when Triton answers with an error.
    """
    protocol, address = parse_url(url)
    check_text(text)
    if protocol == "grpc":
        return _ask_grpc(url, text, stream, max_tokens, sampling)
    return _ask_http(address, text, stream, max_tokens, sampling)


def _ask_http(address, text, stream, max_tokens, sampling) -> Iterator[Chunk]:
    body = dict(sampling, text_input=text, max_tokens=int(max_tokens), stream=bool(stream))
    endpoint = "generate_stream" if stream else "generate"
    request = urllib.request.Request(f"http://{address}/v2/models/{ANSWER_MODEL}/{endpoint}",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        response = urllib.request.urlopen(request, timeout=600)
    except urllib.error.HTTPError as err:
        with err:               # closed now: an open connection holds Triton's stop until its exit timeout
            detail = error_message(err.read(), 4000)
        raise TritonRequestError(detail) from None
    except urllib.error.URLError as err:
        raise unreachable(address, err.reason) from None
    with response:
        if not stream:
            yield _chunk(json.loads(response.read()))
            return
        for line in response:
            line = line.strip()
            if line.startswith(b"data:"):
                chunk = _chunk(json.loads(line[5:]))
                if chunk.text:
                    yield chunk


def _chunk(obj: dict) -> Chunk:
    if "error" in obj:
        raise TritonRequestError(obj["error"])
    text = obj.get("text_output", "")
    if isinstance(text, list):
        text = "".join(text)
    return Chunk(text=text, candidate=obj.get("candidate", ""), note=obj.get("note", ""))


_TYPES = {"temperature": "FP32", "top_p": "FP32", "top_k": "INT32", "random_seed": "UINT64",
          "repetition_penalty": "FP32", "length_penalty": "FP32", "min_length": "INT32", "presence_penalty": "FP32",
          "frequency_penalty": "FP32"}


def _ask_grpc(url, text, stream_answer, max_tokens, sampling) -> Iterator[Chunk]:
    client, module = connect(url)

    def tensor(name, value, datatype):
        t = module.InferInput(name, [1, 1], datatype)
        t.set_data_from_numpy(filled(datatype, [1, 1], value)[1])
        return t

    inputs = [tensor("text_input", text.encode("utf-8"), "BYTES"), tensor("max_tokens", int(max_tokens), "INT32"),
              tensor("stream", bool(stream_answer), "BOOL")]
    for name, value in sampling.items():
        if name not in _TYPES:
            raise UserError(f"unknown sampling input {name!r}; known: {sorted(_TYPES)}")
        inputs.append(tensor(name, value, _TYPES[name]))

    def first(result, name):
        return text_of(result.as_numpy(name))

    try:
        for result in stream(client, ANSWER_MODEL, inputs):
            text = first(result, "text_output")
            if text or (result.as_numpy("text_output") is not None and not stream_answer):
                yield Chunk(text, first(result, "candidate"), first(result, "note"))
    except TritonRequestError:
        raise
    except Exception as err:   # the gRPC channel could not be opened
        raise unreachable(url, err) from None
    finally:
        client.close()
