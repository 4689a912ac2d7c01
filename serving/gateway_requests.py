"""What a client may send to the gateway: the body read within its size limit, checked, and turned into a Call.

Every refusal is an ApiError, answered in OpenAI's shape `{"error": {"message", "type", "code", "param"}}`
with the status OpenAI would use, so the official clients raise their usual exceptions.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from zooter.runtime.conversation import transcript

ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class ApiError(Exception):
    """An answer in OpenAI's error shape; `message` is shown to the client, so it never holds secrets."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code=code, param=param)


@dataclass
class Call:
    """One checked request: what to forward and what to route on."""

    kind: str                    # "chat" or "completions"
    model: str                   # "zooter" or a candidate's name
    stream: bool
    body: dict                   # the client's body without `zooter`: forwarded to OpenAI-compatible upstreams
    turns: list                  # (role, text) of each message, a prompt as one user turn: the back end
                                 # routes on the part runtime.conversation.route_text picks
    prompt: str                  # text_input for Triton models (TensorRT-LLM I/O has no chat messages)
    max_tokens: int | None
    sampling: dict = field(default_factory=dict)   # temperature, top_p: the Triton inputs of the same name
    options: dict = field(default_factory=dict)    # the `zooter` object: lambda, tolerance, candidates


async def read_json(request, limit: int) -> dict:
    """The body as a JSON object, refused with 413 past `limit` bytes (announced or actually sent)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise invalid("the request body is empty: send a JSON object", code="invalid_json")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise invalid(f"the request body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, not {type(body).__name__}", code="invalid_json")
    return body


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is over the gateway's {limit}-byte limit", code="request_too_large")


def _type_name(value) -> str:
    return "null" if value is None else {"str": "string", "dict": "object", "list": "array", "bool": "boolean"}.get(
        type(value).__name__, type(value).__name__)


def _optional_int(body: dict, name: str, low: int = 1) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{name} must be an integer, got {_type_name(value)}", name, "invalid_type")
    if value < low:
        raise invalid(f"{name} must be >= {low}, got {value}", name)
    return value


def _optional_number(body: dict, name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(f"{name} must be a number, got {_type_name(value)}", name, "invalid_type")
    if not math.isfinite(value) or not low <= value <= high:
        raise invalid(f"{name} must be between {low:g} and {high:g}, got {value!r}", name)
    return float(value)


def _common(body: dict, kind: str) -> dict:
    model = body.get("model")
    if model is None:
        raise invalid("model is required: 'zooter' to route, or a candidate's name", "model", "missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise invalid(f"model must be a non-empty string, got {_type_name(model)}", "model", "invalid_type")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise invalid(f"stream must be a boolean, got {_type_name(stream)}", "stream", "invalid_type")
    n = _optional_int(body, "n")
    if n is not None and n != 1:
        raise invalid("n must be 1: the gateway asks one candidate for one answer", "n")
    max_tokens = _optional_int(body, "max_tokens")
    if kind == "chat":
        max_tokens = _optional_int(body, "max_completion_tokens") or max_tokens
    sampling = {name: value for name, value in (("temperature", _optional_number(body, "temperature", 0.0, 2.0)),
                                                ("top_p", _optional_number(body, "top_p", 0.0, 1.0)))
                if value is not None}
    return {"model": model, "stream": stream, "max_tokens": max_tokens, "sampling": sampling,
            "options": _options(body.get("zooter"))}


def _options(raw) -> dict:
    """The `zooter` object (the openai client's extra_body): lambda, tolerance, candidates. Shape only; the
    back end checks the values against its router and candidates."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise invalid(f"zooter must be an object {{lambda, tolerance, candidates}}, got {_type_name(raw)}", "zooter",
                      "invalid_type")
    unknown = sorted(set(raw) - {"lambda", "tolerance", "candidates"})
    if unknown:
        raise invalid(f"zooter: unknown option(s) {unknown}; known: lambda, tolerance, candidates", "zooter")
    options = {}
    for name in ("lambda", "tolerance"):
        if raw.get(name) is not None:
            value = raw[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise invalid(f"zooter.{name} must be a finite number >= 0, got {value!r}", f"zooter.{name}")
            options[name] = float(value)
    if raw.get("candidates") is not None:
        names = raw["candidates"]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise invalid("zooter.candidates must be a non-empty list of candidate names", "zooter.candidates")
        options["candidates"] = list(dict.fromkeys(names))
    return options


def _content_text(content, where: str) -> str:
    """The text of a message's content: a string, or the text parts of a list (images are not routed on)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise invalid(f"{where}.content[{i}] must be an object with a type", f"{where}.content", "invalid_type")
            if part["type"] == "text":
                if not isinstance(part.get("text"), str):
                    raise invalid(f"{where}.content[{i}].text must be a string", f"{where}.content", "invalid_type")
                texts.append(part["text"])
        return "\n".join(texts)
    raise invalid(f"{where}.content must be a string or a list of parts, got {_type_name(content)}",
                  f"{where}.content", "invalid_type")


def prompt_from_messages(turns: list[tuple[str, str]]) -> str:
    """text_input for a model with TensorRT-LLM I/O, which takes text, not messages: a lone user message
    as it is (the model's own chat template applies, as with `zooter ask`), else a role-labelled transcript."""
    if len(turns) == 1 and turns[0][0] == "user":
        return turns[0][1]
    return transcript(turns) + "\n\nassistant:"


def parse_chat(body: dict) -> Call:
    common = _common(body, "chat")
    messages = body.get("messages")
    if messages is None:
        raise invalid("messages is required", "messages", "missing_required_parameter")
    if not isinstance(messages, list):
        raise invalid(f"messages must be an array, got {_type_name(messages)}", "messages", "invalid_type")
    if not messages:
        raise invalid("messages must not be empty", "messages")
    turns = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"{where} must be an object, got {_type_name(message)}", where, "invalid_type")
        role = message.get("role")
        if role not in ROLES:
            raise invalid(f"{where}.role must be one of {list(ROLES)}, got {role!r}", f"{where}.role")
        turns.append((role, _content_text(message.get("content"), where)))
    if not any(text.strip() for _, text in turns):
        raise invalid("messages hold no text to answer", "messages")
    forwarded = {k: v for k, v in body.items() if k != "zooter"}
    return Call("chat", stream=common["stream"], model=common["model"], body=forwarded,
                turns=turns, prompt=prompt_from_messages(turns),
                max_tokens=common["max_tokens"], sampling=common["sampling"], options=common["options"])


def parse_completion(body: dict) -> Call:
    common = _common(body, "completions")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if prompt is None:
        raise invalid("prompt is required", "prompt", "missing_required_parameter")
    if not isinstance(prompt, str):
        raise invalid(f"prompt must be a string (or a list of one string), got {_type_name(prompt)}", "prompt",
                      "invalid_type")
    if not prompt.strip():
        raise invalid("prompt must not be empty", "prompt")
    forwarded = {k: v for k, v in body.items() if k != "zooter"}
    return Call("completions", stream=common["stream"], model=common["model"], body=forwarded,
                turns=[("user", prompt)], prompt=prompt, max_tokens=common["max_tokens"],
                sampling=common["sampling"], options=common["options"])
