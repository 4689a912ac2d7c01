"""How to ask one candidate LLM for an answer, from its candidates-file `serve` entry.

Two ways to reach a candidate:

    serve: {openai_base_url: http://host:8000/v1, model: NAME, api_key_env: VAR}
        POST {base}/chat/completions over plain HTTP (urllib); the key, if any, is read from $VAR.
    serve: {triton_model: NAME, triton_url: host:8001, protocol: grpc|http, io: llmapi|ensemble}
        TensorRT-LLM's LLM-API model or the older ensemble/BLS I/O through tritonclient; the I/O is read
        from the model's metadata (serve.io when both fit), and runtime.candidate_io maps the request
        onto it and reads the answer (text, finish_reason, token counts).

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

from zooter.runtime.candidate_io import error_message, status_kind
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
    seed: int | None = None
    stop: tuple[str, ...] = ()


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
        if self.sampling.seed is not None:
            body["seed"] = self.sampling.seed
        if self.sampling.stop:
            body["stop"] = list(self.sampling.stop)
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.sampling.timeout_s) as response:
                payload = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as err:
            detail = error_message(err.read(), 300)
            # 408/409/425/429 and 5xx are the server's momentary trouble; other 4xx are our request's fault.
            raise CallError(f"HTTP {err.code} from {self.url}: {detail}", status_kind(err.code) == "retry",
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
    """A candidate's Triton model, over tritonclient (sync): the LLM-API or the ensemble I/O.

    The model's metadata and config are read once (runtime.candidate_io detects the I/O, or checks the
    one serve.io names): only the optional inputs the model declares are sent, shapes follow its dims
    and batching, and a decoupled model is called over a gRPC stream.
    """

    def __init__(self, serve: dict, sampling: Sampling):
        self.model = str(serve["triton_model"])
        self.protocol = str(serve.get("protocol") or "grpc").lower()
        if self.protocol not in ("grpc", "http"):
            raise UserError(f"triton model {self.model!r}: protocol must be grpc or http, got {self.protocol!r}")
        self.url = str(serve.get("triton_url") or ("localhost:8001" if self.protocol == "grpc" else "localhost:8000"))
        self.io = serve.get("io")
        self.sampling = sampling
        self.described = None          # runtime.candidate_io.TritonModel, once read
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

    def close(self) -> None:
        """Close this thread's connection."""
        self._forget()

    def describe(self, client=None):
        """The model as runtime.candidate_io sees it (read once); IOMismatch when it has no known I/O, a
        tritonclient InferenceServerException or OSError when the server cannot tell."""
        from zooter.runtime.candidate_io import TritonModel

        if self.described is None:
            client = client or self._connect()
            if self.protocol == "grpc":
                timeout = {"client_timeout": self.sampling.timeout_s}
                meta = client.get_model_metadata(self.model, as_json=True, **timeout)
                config = client.get_model_config(self.model, as_json=True, **timeout)["config"]
            else:
                meta = client.get_model_metadata(self.model)
                config = client.get_model_config(self.model)
            self.described = TritonModel.from_metadata(self.model, meta, config, self.io)
        return self.described

    def complete(self, prompt: str) -> Answer:
        from tritonclient.utils import InferenceServerException

        from zooter.runtime.candidate_io import Ask, IOMismatch, triton_kind

        module = self._module()
        s = self.sampling
        ask = Ask(prompt, s.max_tokens, False, s.temperature, s.top_p, seed=s.seed, stop=s.stop)
        try:
            client = self._connect()
            with self._lock:
                model = self.describe(client)
            inputs = []
            for name, datatype, shape, value in model.specs(ask):
                tensor = module.InferInput(name, shape, datatype)
                tensor.set_data_from_numpy(value)
                inputs.append(tensor)
            outputs = [module.InferRequestedOutput(name) for name in model.outputs]
            reading = model.reading(ask)
            if model.decoupled:
                self._stream_infer(client, inputs, outputs, model.outputs, reading)
            else:
                kwargs = {"client_timeout": s.timeout_s} if self.protocol == "grpc" else {}
                result = client.infer(self.model, inputs, outputs=outputs, **kwargs)
                reading.add({name: result.as_numpy(name) for name in model.outputs})
        except IOMismatch as err:
            raise CallError(f"triton at {self.url}: {err}", False) from None
        except InferenceServerException as err:
            self._forget()
            # A missing model or a malformed request cannot get better by asking again.
            kind = triton_kind(str(err.status() or ""), err.message() or str(err))
            raise CallError(f"triton {self.model!r} at {self.url}: {err.message() or err}",
                            kind not in ("bad_request", "missing")) from None
        except (ConnectionError, OSError) as err:
            self._forget()
            raise CallError(f"cannot reach triton at {self.url}: {err}", True) from None
        return Answer(reading.so_far, reading.finish, reading.completion_tokens)

    def _stream_infer(self, client, inputs, outputs, names, reading) -> None:
        """A decoupled model over gRPC: its responses, in order, into `reading`."""
        from zooter.serving.triton_client import TritonRequestError, stream

        if self.protocol != "grpc":
            raise CallError(f"triton model {self.model!r} is decoupled: set protocol: grpc in its serve entry", False)
        try:
            for result in stream(client, self.model, inputs, outputs, timeout=self.sampling.timeout_s):
                reading.add({name: result.as_numpy(name) for name in names})
        except TritonRequestError as err:
            raise CallError(f"triton {self.model!r} at {self.url}: {err}", not err.client_error) from None
