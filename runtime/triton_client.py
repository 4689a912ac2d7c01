"""Client side of the Triton deployment: route through `zooter_route`, ask `zooter` for an answer.

URLs: "host:port" or "http://host:port" use HTTP (Triton's port 8000 by default);
"grpc://host:port" uses gRPC (8001). `route_via_triton` uses tritonclient; `ask` over HTTP uses
Triton's generate / generate_stream endpoints with the standard library (server-sent events), over
gRPC a tritonclient bidirectional stream. tritonclient is imported only when called, so
zooter.runtime still imports with numpy, onnxruntime and tokenizers alone.
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

from zooter.errors import UserError

ROUTE_MODEL = "zooter_route"
ANSWER_MODEL = "zooter"
BATCH = 32                 # rows per request: the routing models' default max_batch_size


class TritonRequestError(RuntimeError):
    """Triton answered with an error (bad input, a model not ready, no candidate could answer)."""


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


def route_client(url: str):
    """A tritonclient InferenceServerClient (http or grpc) for `url`, and the module it came from."""
    protocol, address = parse_url(url)
    if protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    return module.InferenceServerClient(address), module


def _route_rows(client, module, texts: Sequence[str]) -> list[dict]:
    from tritonclient.utils import InferenceServerException

    data = np.array([[t.encode("utf-8") if isinstance(t, str) else t] for t in texts], dtype=object)
    text = module.InferInput("text", list(data.shape), "BYTES")
    text.set_data_from_numpy(data)
    outputs = [module.InferRequestedOutput("candidate"), module.InferRequestedOutput("probabilities")]
    try:
        result = client.infer(ROUTE_MODEL, [text], outputs=outputs)
    except InferenceServerException as err:
        raise TritonRequestError(err.message()) from None
    return _decisions(result, client, module)


_LABELS: dict = {}


def _labels(client, module) -> list[str]:
    """Label order (the probabilities' order) from zooter_decide's `labels` parameter, cached per client."""
    key = id(client)
    if key not in _LABELS:
        config = client.get_model_config("zooter_decide")
        if isinstance(config, dict):           # HTTP: JSON
            raw = config["parameters"]["labels"]["string_value"]
        else:                                  # gRPC: ModelConfigResponse
            raw = config.config.parameters["labels"].string_value
        _LABELS[key] = json.loads(raw)
    return _LABELS[key]


def _decisions(result, client, module) -> list[dict]:
    names = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in result.as_numpy("candidate").reshape(-1)]
    probs = result.as_numpy("probabilities")
    labels = _labels(client, module)
    return [{"candidate": name, "probabilities": {label: float(p) for label, p in zip(labels, row)}}
            for name, row in zip(names, probs)]


def route_via_triton(url: str, texts: Sequence[str]) -> list[dict]:
    """Route queries through Triton's zooter_route; [{"candidate": str, "probabilities": {label: p}}]."""
    if isinstance(texts, str):
        raise TypeError("route_via_triton takes a list of queries")
    client, module = route_client(url)
    # Batches of similar lengths, as Router.route_batch forms them: less padding, and a dynamic int8
    # router (activation scales span the batch) then sees the same batches as in-process.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list = [None] * len(texts)
    try:
        for start in range(0, len(order), BATCH):
            idx = order[start:start + BATCH]
            try:
                decisions = _route_rows(client, module, [texts[i] for i in idx])
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
    """Ask `zooter` (route, then the chosen candidate answers). Yields text chunks as they arrive.

    `sampling`: extra TensorRT-LLM inputs (temperature, top_p, top_k, random_seed, ...).
    Raises TritonRequestError when Triton answers with an error.
    """
    protocol, address = parse_url(url)
    if protocol == "grpc":
        return _ask_grpc(address, text, stream, max_tokens, sampling)
    return _ask_http(address, text, stream, max_tokens, sampling)


def _ask_http(address, text, stream, max_tokens, sampling) -> Iterator[Chunk]:
    body = dict(sampling, text_input=text, max_tokens=int(max_tokens), stream=bool(stream))
    endpoint = "generate_stream" if stream else "generate"
    request = urllib.request.Request(f"http://{address}/v2/models/{ANSWER_MODEL}/{endpoint}",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        response = urllib.request.urlopen(request, timeout=600)
    except urllib.error.HTTPError as err:
        raise TritonRequestError(_error_text(err.read())) from None
    except urllib.error.URLError as err:
        raise UserError(f"cannot reach Triton at {address}: {err.reason}") from None
    with response:
        if not stream:
            yield _chunk(json.loads(response.read()))
            return
        for line in response:
            line = line.strip()
            if line.startswith(b"data:"):
                yield _chunk(json.loads(line[5:]))


def _error_text(raw: bytes) -> str:
    try:
        return json.loads(raw)["error"]
    except (ValueError, KeyError, TypeError):
        return raw.decode(errors="replace")


def _chunk(obj: dict) -> Chunk:
    if "error" in obj:
        raise TritonRequestError(obj["error"])
    text = obj.get("text_output", "")
    if isinstance(text, list):
        text = "".join(text)
    return Chunk(text=text, candidate=obj.get("candidate", ""), note=obj.get("note", ""))


_TYPES = {"temperature": ("FP32", np.float32), "top_p": ("FP32", np.float32), "top_k": ("INT32", np.int32),
          "random_seed": ("UINT64", np.uint64), "repetition_penalty": ("FP32", np.float32),
          "length_penalty": ("FP32", np.float32), "min_length": ("INT32", np.int32),
          "presence_penalty": ("FP32", np.float32), "frequency_penalty": ("FP32", np.float32)}


def _ask_grpc(address, text, stream, max_tokens, sampling) -> Iterator[Chunk]:
    import tritonclient.grpc as grpcclient

    def tensor(name, value, dtype, np_dtype):
        t = grpcclient.InferInput(name, [1, 1], dtype)
        t.set_data_from_numpy(np.array([[value]], dtype=np_dtype))
        return t

    inputs = [tensor("text_input", text.encode("utf-8"), "BYTES", object),
              tensor("max_tokens", int(max_tokens), "INT32", np.int32),
              tensor("stream", bool(stream), "BOOL", bool)]
    for name, value in sampling.items():
        if name not in _TYPES:
            raise UserError(f"unknown sampling input {name!r}; known: {sorted(_TYPES)}")
        inputs.append(tensor(name, value, *_TYPES[name]))
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(address)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(ANSWER_MODEL, inputs, enable_empty_final_response=True)
        while True:
            result, error = results.get(timeout=600)
            if error is not None:
                raise TritonRequestError(error.message() if hasattr(error, "message") else str(error))
            response = result.get_response()
            final = response.parameters.get("triton_final_response")
            if result.as_numpy("text_output") is not None:
                def first(name):
                    arr = result.as_numpy(name)
                    return "" if arr is None else "".join(v.decode("utf-8", "replace") for v in arr.reshape(-1))
                yield Chunk(first("text_output"), first("candidate"), first("note"))
            if final is not None and final.bool_param:
                return
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
