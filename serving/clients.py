"""How to ask one candidate LLM for an answer, from its candidates-file `serve` entry.

Two ways to reach a candidate:

    serve: {openai_base_url: http://host:8000/v1, model: NAME, api_key_env: VAR}
        POST {base}/chat/completions over plain HTTP (urllib); the key, if any, is read from $VAR.
    serve: {triton_model: NAME, triton_url: host:8001, protocol: grpc|http}
        the TensorRT-LLM ensemble I/O through tritonclient: text_input (BYTES), max_tokens (INT32),
        stream (BOOL), optional temperature/top_p (FP32) -> text_output (BYTES).

Every client answers `complete(prompt) -> Answer` and raises CallError on failure; CallError.retryable
says whether trying again can help (timeouts, refused connections, 429 and 5xx do; a 400 or an unknown
model does not), so the retry policy in generate.py stays in one place.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass

from zooter.runtime.errors import UserError


@dataclass
class Answer:
    text: str
    finish_reason: str | None = None  # "length" means the answer hit max_tokens and was cut
    output_tokens: int | None = None


class CallError(Exception):
    """A failed call; `retryable` is False when the same request can only fail again."""

    def __init__(self, message: str, retryable: bool, retry_after_s: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after_s = retry_after_s  # the server's own Retry-After, when it sent one


@dataclass
class Sampling:
    max_tokens: int = 512
    temperature: float | None = None  # None: leave it to the server's default
    top_p: float | None = None
    timeout_s: float = 120.0


def client_for(name: str, serve: dict, sampling: Sampling):
    """The client for a candidate's `serve` entry; a UserError when the entry says nothing usable."""
    if serve.get("openai_base_url"):
        return OpenAIClient(serve, sampling, name)
    if serve.get("triton_model"):
        return TritonClient(serve, sampling)
    raise UserError(f"candidate {name!r} has no usable 'serve' entry (need openai_base_url or triton_model), got {serve!r}")


def _seconds(value) -> float | None:
    """Retry-After as seconds (the HTTP-date form is rare from LLM servers and is ignored)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class OpenAIClient:
    """An OpenAI-compatible chat-completions endpoint (vLLM, TGI, llama.cpp server, OpenAI itself)."""

    def __init__(self, serve: dict, sampling: Sampling, name: str):
        from zooter.serving.candidates import openai_endpoint

        endpoint = openai_endpoint(name, serve)
        self.url = endpoint.base_url + "/chat/completions"
        self.model = endpoint.model
        self.sampling = sampling
        self.headers = endpoint.headers()

    def complete(self, prompt: str) -> Answer:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": self.sampling.max_tokens, "stream": False}
        if self.sampling.temperature is not None:
            body["temperature"] = self.sampling.temperature
        if self.sampling.top_p is not None:
            body["top_p"] = self.sampling.top_p
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.sampling.timeout_s) as response:
                payload = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace")[:300].strip()
            # 408/409/425/429 and 5xx are the server's momentary trouble; other 4xx are our request's fault.
            retryable = err.code in (408, 409, 425, 429) or err.code >= 500
            raise CallError(f"HTTP {err.code} from {self.url}: {detail}", retryable,
                            _seconds(err.headers.get("Retry-After") if err.headers else None)) from None
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", err)
            raise CallError(f"cannot reach {self.url}: {reason}", True) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CallError(f"{self.url} answered something that is not JSON: {err}", True) from None
        try:
            choice = payload["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise CallError(f"{self.url} answered without choices[0].message.content: {str(payload)[:300]}", False) from None
        usage = payload.get("usage") or {}
        return Answer(text, choice.get("finish_reason"), usage.get("completion_tokens"))


class TritonClient:
    """A Triton model with the TensorRT-LLM ensemble I/O.

    The model's metadata and config are read once: only the optional inputs the model declares are
    sent, shapes follow its dims and batching, and a decoupled model is called over a gRPC stream.
    """

    def __init__(self, serve: dict, sampling: Sampling):
        self.model = str(serve["triton_model"])
        self.protocol = str(serve.get("protocol") or "grpc").lower()
        if self.protocol not in ("grpc", "http"):
            raise UserError(f"triton model {self.model!r}: protocol must be grpc or http, got {self.protocol!r}")
        self.url = str(serve.get("triton_url") or ("localhost:8001" if self.protocol == "grpc" else "localhost:8000"))
        self.sampling = sampling
        self._inputs: dict[str, dict] | None = None  # name -> {"datatype", "shape"}
        self._decoupled = False
        self._local = threading.local()
        self._lock = threading.Lock()

    def _module(self):
        from zooter.serving.triton_client import client_module

        return client_module(self.protocol)

    def _connect(self):
        # One connection per worker thread: the tritonclient clients are not meant to be shared across threads.
        from zooter.serving.triton_client import connect

        client = getattr(self._local, "client", None)
        if client is None:
            options = {"network_timeout": self.sampling.timeout_s} if self.protocol == "http" else {}
            client, _ = connect(self.url, self.protocol, **options)
            self._local.client = client
        return client

    def _forget(self) -> None:
        client = getattr(self._local, "client", None)
        self._local.client = None
        if client is not None:
            try:
                client.close()
            except Exception:  # a broken connection may fail to close; it is dropped either way
                pass

    def _describe(self, client) -> None:
        if self.protocol == "grpc":
            meta = client.get_model_metadata(self.model, as_json=True)
            config = client.get_model_config(self.model, as_json=True)["config"]
        else:
            meta = client.get_model_metadata(self.model)
            config = client.get_model_config(self.model)
        self._inputs = {i["name"]: {"datatype": i["datatype"], "shape": [int(d) for d in i["shape"]]} for i in meta["inputs"]}
        self._decoupled = bool((config.get("model_transaction_policy") or {}).get("decoupled", False))
        if "text_input" not in self._inputs or "text_output" not in {o["name"] for o in meta["outputs"]}:
            raise CallError(f"triton model {self.model!r} at {self.url} lacks the ensemble I/O (text_input -> text_output)", False)

    def _shape(self, name: str) -> list[int]:
        # Metadata shapes include the batch dimension (-1) when the model batches; every other -1 is 1 here.
        return [1 if d < 0 else d for d in self._inputs[name]["shape"]]

    def _request(self):
        import numpy as np

        module = self._module()
        wanted = [("max_tokens", np.int32, self.sampling.max_tokens), ("stream", bool, False)]
        if self.sampling.temperature is not None:
            wanted.append(("temperature", np.float32, self.sampling.temperature))
        if self.sampling.top_p is not None:
            wanted.append(("top_p", np.float32, self.sampling.top_p))
        # Without this the TensorRT-LLM ensemble returns the prompt followed by the answer.
        wanted.append(("exclude_input_in_output", bool, True))
        inputs = []
        for name, dtype, value in wanted:
            if name not in self._inputs:
                if name == "max_tokens":
                    raise CallError(f"triton model {self.model!r} has no max_tokens input", False)
                continue
            shape = self._shape(name)
            tensor = module.InferInput(name, shape, self._inputs[name]["datatype"])
            tensor.set_data_from_numpy(np.full(shape, value, dtype=dtype))
            inputs.append(tensor)
        return inputs

    def complete(self, prompt: str) -> Answer:
        import numpy as np
        from tritonclient.utils import InferenceServerException

        module = self._module()
        try:
            client = self._connect()
            with self._lock:
                if self._inputs is None:
                    self._describe(client)
            shape = self._shape("text_input")
            text = module.InferInput("text_input", shape, "BYTES")
            text.set_data_from_numpy(np.full(shape, prompt.encode("utf-8"), dtype=object))
            inputs = [text] + self._request()
            outputs = [module.InferRequestedOutput("text_output")]
            if self._decoupled:
                return Answer(self._stream_infer(client, inputs, outputs))
            kwargs = {"client_timeout": self.sampling.timeout_s} if self.protocol == "grpc" else {}
            result = client.infer(self.model, inputs, outputs=outputs, **kwargs)
        except InferenceServerException as err:
            self._forget()
            status = str(err.status() or "")
            # A missing model or a malformed request cannot get better by asking again.
            retryable = not any(s in status for s in ("NOT_FOUND", "INVALID_ARG", "400", "404"))
            raise CallError(f"triton {self.model!r} at {self.url}: {err.message() or err}", retryable) from None
        except (ConnectionError, OSError) as err:
            self._forget()
            raise CallError(f"cannot reach triton at {self.url}: {err}", True) from None
        values = result.as_numpy("text_output")
        if values is None:
            raise CallError(f"triton {self.model!r} returned no text_output", False)
        return Answer(_text(values))

    def _stream_infer(self, client, inputs, outputs) -> str:
        """A decoupled model over gRPC. Responses are joined in order: with stream=False the answer comes
        whole in one response; a model that streams anyway sends deltas, which join to the same answer."""
        from zooter.serving.triton_client import TritonRequestError, stream

        if self.protocol != "grpc":
            raise CallError(f"triton model {self.model!r} is decoupled: set protocol: grpc in its serve entry", False)
        parts = []
        try:
            for result in stream(client, self.model, inputs, outputs, timeout=self.sampling.timeout_s):
                values = result.as_numpy("text_output")
                if values is not None:
                    parts.append(_text(values))
        except TritonRequestError as err:
            raise CallError(f"triton {self.model!r} at {self.url}: {err}", not err.client_error) from None
        return "".join(parts)


def _text(values) -> str:
    return "".join(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values.reshape(-1))
