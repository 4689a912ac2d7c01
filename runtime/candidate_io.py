"""The one candidate-calling core: how a request and an answer look on each I/O a candidate LLM can have.

    llmapi    TensorRT-LLM's LLM-API Triton model (triton_backend/all_models/llmapi/tensorrt_llm, container
              tritonserver:<yy.mm>-trtllm-python-py3): text_input, streaming, sampling_param_max_tokens,
              sampling_param_temperature/top_p/seed/stop, return_finish_reason -> text_output (streamed
              text is the whole answer so far, not a delta), finish_reason
    ensemble  the older inflight_batcher_llm ensemble/BLS I/O (and Zooter's own `zooter` model): text_input,
              max_tokens, stream, temperature, top_p, random_seed, stop_words, exclude_input_in_output ->
              text_output (streamed deltas); Zooter's stand-ins add finish_reason and token counts
    openai    an OpenAI-compatible server (trtllm-serve, Triton's OpenAI front end, vLLM): chat completions

Transport-free on purpose: the sync tritonclient face (serving/clients.py, `zooter generate`), the async
gRPC face (servers/gateway/upstreams.py, the gateway) and the `zooter` BLS model in Triton (which builds
pb_utils tensors) all build their inputs from `specs()` and read their answers with `Reading`, so a
sampling knob or an output is mapped in one place. It lives in runtime/ because Triton models may import
only the runtime (docs/architecture.md); it needs numpy and the standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from zooter.runtime.conversation import finish_reason
from zooter.runtime.errors import UserError

LLMAPI, ENSEMBLE, OPENAI = "llmapi", "ensemble", "openai"
IOS = (LLMAPI, ENSEMBLE, OPENAI)
TRITON_IOS = (LLMAPI, ENSEMBLE)

# A request's knobs -> the input that carries it on each Triton I/O.
INPUT_NAMES = {
    LLMAPI: {"prompt": "text_input", "max_tokens": "sampling_param_max_tokens", "stream": "streaming",
             "temperature": "sampling_param_temperature", "top_p": "sampling_param_top_p",
             "top_k": "sampling_param_top_k", "seed": "sampling_param_seed", "stop": "sampling_param_stop"},
    ENSEMBLE: {"prompt": "text_input", "max_tokens": "max_tokens", "stream": "stream", "temperature": "temperature",
               "top_p": "top_p", "top_k": "top_k", "seed": "random_seed", "stop": "stop_words"},
}
# Inputs sent with a fixed value where the model declares them: without them the ensemble answers with the
# prompt followed by the answer, and the LLM-API model leaves finish_reason out.
FIXED_INPUTS = {
    LLMAPI: {"return_finish_reason": True, "sampling_param_exclude_input_from_output": True},
    ENSEMBLE: {"exclude_input_in_output": True},
}
# The inputs as the models declare them (datatype, dims without the batch dimension): used where no
# metadata can be read (the `zooter` BLS model calling a candidate of its own server) and by the stand-ins.
DECLARED = {
    LLMAPI: {"text_input": ("BYTES", [-1]), "streaming": ("BOOL", [1]), "sampling_param_max_tokens": ("INT32", [1]),
             "sampling_param_temperature": ("FP32", [1]), "sampling_param_top_p": ("FP32", [1]),
             "sampling_param_top_k": ("INT32", [1]), "sampling_param_seed": ("UINT64", [1]),
             "sampling_param_stop": ("BYTES", [-1]), "sampling_param_exclude_input_from_output": ("BOOL", [1]),
             "return_finish_reason": ("BOOL", [1])},
    ENSEMBLE: {"text_input": ("BYTES", [-1]), "max_tokens": ("INT32", [-1]), "stream": ("BOOL", [1]),
               "temperature": ("FP32", [1]), "top_p": ("FP32", [1]), "top_k": ("INT32", [1]),
               "random_seed": ("UINT64", [1]), "stop_words": ("BYTES", [-1]), "exclude_input_in_output": ("BOOL", [1])},
}
# Whether the I/O's model batches (max_batch_size > 0: every input has a leading batch dimension): the LLM-API
# model's model.yaml sets max_batch_size 0 (its text_input must be 1-D), the ensemble batches.
BATCHED = {LLMAPI: False, ENSEMBLE: True}
# What a Triton model may say about its answer's end, besides text_output: the LLM-API model gives
# finish_reason; Zooter's stand-ins and `zooter` model also give the token counts.
END_OUTPUTS = ("finish_reason", "prompt_tokens", "completion_tokens")
NUMPY = {"BYTES": object, "BOOL": bool, "INT32": np.int32, "INT64": np.int64, "UINT64": np.uint64,
         "FP32": np.float32, "FP64": np.float64}

# HTTP statuses: the request itself is wrong (no other candidate can help, the client must fix it) ...
CLIENT_ERRORS = (400, 413, 422)
# ... or the server's momentary trouble (the same request may succeed when asked again).
RETRYABLE = (408, 409, 425, 429)


class IOMismatch(UserError):
    """A candidate model has none of the known I/Os, or not the one its `serve.io` names."""


@dataclass
class Ask:
    """One request to a candidate, whatever its I/O."""

    prompt: str
    max_tokens: int
    stream: bool = False
    temperature: float | None = None      # None: the server's default
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: Sequence[str] = ()


def config_inputs(io: str) -> str:
    """The input block of a config.pbtxt declaring `io` (every input optional but text_input)."""
    types = {"BYTES": "TYPE_STRING", "BOOL": "TYPE_BOOL", "INT32": "TYPE_INT32", "UINT64": "TYPE_UINT64", "FP32": "TYPE_FP32"}
    return ",\n".join(f'  {{ name: "{n}" data_type: {types[dt]} dims: [ {", ".join(map(str, dims))} ]'
                       f'{"" if n == "text_input" else " optional: true"} }}' for n, (dt, dims) in DECLARED[io].items())


def text(values) -> str:
    """A BYTES tensor's strings joined, decoded as UTF-8 (one home for what five helpers did)."""
    if values is None:
        return ""
    return "".join(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in np.asarray(values).reshape(-1))


def detect(model: str, inputs: dict, outputs: Sequence[str], named: str | None = None) -> str:
    """The Triton I/O of `model` from its metadata (`inputs`: name -> anything; `outputs`: names), or the
    `named` one (serve.io) checked against it. IOMismatch names the model and the inputs it has."""
    have = set(inputs)
    core = "text_input" in have and "text_output" in set(outputs)
    fits = {io for io in TRITON_IOS if core and INPUT_NAMES[io]["max_tokens"] in have}
    if named:
        if named not in TRITON_IOS:
            raise IOMismatch(f"model {model!r}: serve.io {named!r} is not a Triton I/O (one of {', '.join(TRITON_IOS)})")
        if named not in fits:
            raise IOMismatch(f"model {model!r} lacks the {named} I/O its serve.io names; its inputs: {sorted(have)}, "
                             f"outputs: {sorted(outputs)}")
        return named
    if not fits:
        raise IOMismatch(f"model {model!r} has none of the known I/Os (llmapi: text_input, sampling_param_max_tokens "
                         f"-> text_output; ensemble: text_input, max_tokens -> text_output); its inputs: {sorted(have)}, "
                         f"outputs: {sorted(outputs)}")
    if len(fits) > 1:
        raise IOMismatch(f"model {model!r} fits both the llmapi and the ensemble I/O; name one in its serve entry "
                         f"(serve.io: llmapi | ensemble); its inputs: {sorted(have)}")
    return fits.pop()


@dataclass
class TritonModel:
    """A candidate's Triton model as far as calling it goes: its I/O, inputs (name -> (datatype, shape with
    every -1 as 1: the batch dimension and the variable ones hold one item here)), outputs and decoupling."""

    name: str
    io: str
    inputs: dict
    outputs: list[str] = field(default_factory=lambda: ["text_output"])
    decoupled: bool = True

    @classmethod
    def from_metadata(cls, name: str, meta: dict, config: dict | None = None, named: str | None = None):
        """From Triton's model metadata (JSON form: inputs/outputs with name, datatype, shape) and config."""
        inputs = {i["name"]: (i["datatype"], [1 if int(d) < 0 else int(d) for d in i["shape"]]) for i in meta["inputs"]}
        outputs = [o["name"] for o in meta["outputs"]]
        io = detect(name, inputs, outputs, named)
        decoupled = bool(((config or {}).get("model_transaction_policy") or {}).get("decoupled", False))
        return cls(name, io, inputs, ["text_output", *(n for n in END_OUTPUTS if n in outputs)], decoupled)

    @classmethod
    def declared(cls, name: str, io: str, batched: bool | None = None, only: Sequence[str] | None = None):
        """As the I/O declares it (`only` these inputs, when given; batched as BATCHED says unless told), for a
        caller that cannot read metadata (a model in Triton calling another)."""
        lead = [1] if (BATCHED[io] if batched is None else batched) else []
        inputs = {n: (dt, lead + [1 if d < 0 else d for d in dims]) for n, (dt, dims) in DECLARED[io].items()
                  if only is None or n in only}
        return cls(name, io, inputs, ["text_output", *END_OUTPUTS], True)

    def specs(self, ask: Ask) -> list[tuple[str, str, list[int], np.ndarray]]:
        """The request's inputs as (name, datatype, shape, value): only those the model declares (a model
        without temperature gets none), text_input and max_tokens always."""
        names = INPUT_NAMES[self.io]
        wanted = [(names["prompt"], ask.prompt.encode("utf-8")), (names["max_tokens"], int(ask.max_tokens)),
                  (names["stream"], self.streams(ask))]
        for knob in ("temperature", "top_p", "top_k", "seed"):
            if getattr(ask, knob) is not None:
                wanted.append((names[knob], getattr(ask, knob)))
        if ask.stop:
            wanted.append((names["stop"], [s.encode("utf-8") for s in ask.stop]))
        wanted += list(FIXED_INPUTS[self.io].items())
        out = []
        for name, value in wanted:
            if name not in self.inputs:
                if name in (names["prompt"], names["max_tokens"]):
                    raise IOMismatch(f"model {self.name!r} has no {name} input")
                continue
            datatype, shape = self.inputs[name]
            out.append((name, datatype, *filled(datatype, shape, value)))
        return out

    def streams(self, ask: Ask) -> bool:
        """Whether the model is asked to stream: only a decoupled model can (the LLM-API model refuses
        streaming otherwise); a caller that streams gets the whole answer as one piece."""
        return bool(ask.stream) and self.decoupled

    def reading(self, ask: Ask) -> "Reading":
        return Reading(self.io, ask.max_tokens, self.streams(ask))


def filled(datatype: str, shape: list[int], value) -> tuple[list[int], np.ndarray]:
    """(shape, array): a scalar fills the shape; a list takes the last dimension (stop words)."""
    dtype = NUMPY[datatype]
    if isinstance(value, list):
        shape = [*shape[:-1], len(value)] if shape else [len(value)]
        return shape, np.array(value, dtype=dtype).reshape(shape)
    return list(shape), np.full(shape, value, dtype=dtype)


class Reading:
    """One answer read from its responses, in order: `add(outputs)` gives each response's new text, and
    remembers how the answer ended. The LLM-API model streams the whole text so far in every response,
    so its deltas are computed here; the other I/Os stream deltas."""

    def __init__(self, io: str, max_tokens: int | None, stream: bool = True):
        self.io, self.max_tokens, self.stream = io, max_tokens, stream
        self.values: dict[str, str] = {}
        self.so_far = ""

    def add(self, outputs: dict) -> str:
        """`outputs`: name -> a numpy array, a decoded string, or None (an output this response lacks)."""
        for name in END_OUTPUTS:
            value = outputs.get(name)
            value = value if isinstance(value, str) else text(value)
            if value and value != "None":       # the LLM-API model says "None" before the answer ends
                self.values[name] = value
        piece = outputs.get("text_output")
        piece = piece if isinstance(piece, str) else text(piece)
        if self.io == LLMAPI and self.stream:
            delta = piece[len(self.so_far):] if piece.startswith(self.so_far) else piece
            self.so_far = piece if piece.startswith(self.so_far) else self.so_far + piece
            return delta
        self.so_far += piece
        return piece

    def count(self, name: str) -> int | None:
        try:
            return int(self.values[name])
        except (KeyError, ValueError):
            return None

    @property
    def finish(self) -> str:
        """"length" when max_tokens cut the answer: the model's finish_reason, else inferred from its
        completion_tokens, else "stop" (nothing tells)."""
        return finish_reason(self.values.get("finish_reason"), self.count("completion_tokens"), self.max_tokens) or "stop"

    @property
    def completion_tokens(self) -> int | None:
        return self.count("completion_tokens")

    @property
    def usage(self) -> dict | None:
        """OpenAI usage when the model counted both sides (never estimated)."""
        prompt, answer = self.count("prompt_tokens"), self.count("completion_tokens")
        if prompt is None or answer is None:
            return None
        return {"prompt_tokens": prompt, "completion_tokens": answer, "total_tokens": prompt + answer}


def ask_from_inputs(io: str, get, max_tokens: int) -> Ask:
    """The Ask that a request in `io`'s inputs carries (`get(name)` -> numpy array or None): how a model that
    takes one I/O (the `zooter` model, a stand-in) forwards to a candidate with another."""
    names = INPUT_NAMES[io]

    def scalar(knob, cast):
        values = get(names[knob])
        if values is None or not np.asarray(values).size:
            return None
        value = np.asarray(values).reshape(-1)[0]
        return cast(value.item() if isinstance(value, np.generic) else value)

    stop = get(names["stop"])
    return Ask(prompt=text(get(names["prompt"])), max_tokens=scalar("max_tokens", int) or max_tokens,
               stream=bool(scalar("stream", bool)), temperature=scalar("temperature", float),
               top_p=scalar("top_p", float), top_k=scalar("top_k", int), seed=scalar("seed", int),
               stop=[text([s]) for s in np.asarray(stop).reshape(-1)] if stop is not None else ())


# --- errors ------------------------------------------------------------------------------------------------
def status_kind(status: int) -> str:
    """An HTTP status from a candidate: "client" (the request is wrong: tell the client, try nobody else),
    "retry" (momentary: the same or the next candidate may answer), "refused" (this candidate cannot: its
    key, model name or route is wrong; the next one may answer, asking again will not)."""
    if status in CLIENT_ERRORS:
        return "client"
    if status in RETRYABLE or status >= 500:
        return "retry"
    return "refused"


def error_message(raw: bytes | str, limit: int = 500) -> str:
    """The message of an error body: OpenAI's {"error": {"message"}} or {"error": "..."}, else the text."""
    import json

    body = raw[:4096].decode("utf-8", "replace") if isinstance(raw, bytes) else raw[:4096]
    try:
        error = json.loads(body).get("error")
        message = error.get("message") if isinstance(error, dict) else error
        if isinstance(message, str) and message:
            return message[:limit]
    except (ValueError, AttributeError):
        pass
    return body.strip()[:limit]


def triton_kind(status: str, message: str) -> str:
    """A Triton error (its gRPC/HTTP status text and message): "bad_request" (INVALID_ARG, HTTP 400: the
    request is wrong), "refused" (cannot connect), "timeout", "missing" (the server does not know the
    model: asking again will not help), "unloaded" (the model is not ready now) or "model_error"."""
    if "INVALID_ARG" in status or status == "400":
        return "bad_request"
    if "UNAVAILABLE" in status:
        return "refused"
    if "DEADLINE_EXCEEDED" in status:
        return "timeout"
    if "NOT_FOUND" in status or status == "404":
        return "missing"
    if any(s in message for s in ("unknown model", "not found", "not ready", "unavailable")):
        return "unloaded"
    return "model_error"
