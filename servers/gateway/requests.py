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
# Errors quote at most this much of what a client sent: a 400 never grows with the request.
QUOTE_CHARS = 200
# Deeper bodies are refused before anything recurses over them (a chat request with a tool's JSON schema nests
# about 10 deep); integers longer than this are no count, id or seed any upstream takes.
MAX_DEPTH = 64
MAX_INTEGER_DIGITS = 32
INT32_MAX = 2**31 - 1
# Integer fields and their ranges. max_tokens and max_completion_tokens: up to --max-tokens-limit (at most
# INT32_MAX, Triton's INT32 input); n is checked on its own (the gateway asks for one answer).
INTEGERS = {"seed": (-2**63, 2**63 - 1), "top_k": (-1, INT32_MAX), "min_tokens": (0, INT32_MAX),
            "top_logprobs": (0, 20)}
# Number fields (besides temperature and top_p, which Triton also takes) and their ranges, as OpenAI documents them.
NUMBERS = {"frequency_penalty": (-2.0, 2.0), "presence_penalty": (-2.0, 2.0)}
LOGIT_BIAS = 100.0


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
    """The body as a JSON object, refused with 413 past `limit` bytes (announced or actually sent), and with 400
    when it nests too deep or holds a number no upstream could take (NaN, Infinity, an integer of 5,000 digits)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return parse_json(b"".join(chunks))


# Digits as 0, exponents as e, + as itself, anything else a space: a body's numbers, searchable at C speed.
_NUMBER_SHAPE = bytes(ord("0") if chr(c).isdigit() and c < 128 else ord("e") if c in b"eE" else c if c == ord("+")
                      else ord(" ") for c in range(256))


class _Refused:
    """A number JSON parsing met that no field may hold, left in place so that the check can say where it was."""

    __slots__ = ("what",)

    def __init__(self, what: str):
        self.what = what


def _as_int(text: str):
    digits = len(text.lstrip("-"))
    return int(text) if digits <= MAX_INTEGER_DIGITS else _Refused(f"an integer of {digits} digits")


def _as_float(text: str):
    value = float(text)
    return value if math.isfinite(value) else _Refused(f"{text[:40]} (beyond the largest number)")


def _as_constant(name: str):
    return _Refused(f"{name} (JSON has no such number)")


# Made once: json.loads with hooks builds a decoder on every call. The int and float hooks cost a Python call per
# number, so only a body with a run of digits or a 3-digit exponent (the only ways to a huge integer or an
# infinite float) is decoded with them.
_DECODE = json.JSONDecoder(parse_constant=_as_constant).decode
_DECODE_NUMBERS = json.JSONDecoder(parse_constant=_as_constant, parse_int=_as_int, parse_float=_as_float).decode


def parse_json(raw: bytes) -> dict:
    """A request body as a JSON object. Python's json takes NaN, Infinity, 1e999 and integers of any length, and
    recurses as deep as the body nests; upstreams choke on all of them (invalid JSON, OverflowError, a
    RecursionError), so they are refused here, each naming where it is."""
    if not raw.strip():
        raise invalid("the request body is empty: send a JSON object", code="invalid_json")
    shape = raw.translate(_NUMBER_SHAPE)
    long = b"0" * (MAX_INTEGER_DIGITS + 1) in shape or b"e000" in shape or b"e+000" in shape
    try:
        text = raw.decode(json.detect_encoding(raw), "surrogatepass")
        body = (_DECODE_NUMBERS if long else _DECODE)(text)
    except RecursionError:
        raise invalid(f"the request body nests deeper than {MAX_DEPTH} levels", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as err:    # JSONDecodeError is a ValueError
        raise invalid(f"the request body is not valid JSON: {quote(str(err), False)}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, not {_type_name(body)}", code="invalid_json")
    # A body cannot nest deeper than it has brackets, nor hold a refused number without these bytes: most bodies
    # need no walk at all.
    refused = long or b"NaN" in raw or b"Infinity" in raw
    if refused or raw.count(b"[") + raw.count(b"{") > MAX_DEPTH:
        _check_tree(body, refused)
    return body


_CONTAINERS = (dict, list)


def _check_tree(body: dict, refused: bool) -> None:
    """Depth at most MAX_DEPTH, and no _Refused number anywhere. Iterative (a recursive walk would hit the very
    limit it checks); paths are built only for the error."""
    stack = [(body, None, 1)]         # (container, its path as a (parent, key) chain, its depth)
    while stack:
        value, trail, depth = stack.pop()
        for key, item in (value.items() if type(value) is dict else enumerate(value)):
            if type(item) in _CONTAINERS:
                if depth >= MAX_DEPTH:
                    where = _path((trail, key))
                    raise invalid(f"the request body nests deeper than {MAX_DEPTH} levels (at {where})", where,
                                  "invalid_json")
                stack.append((item, (trail, key), depth + 1))
            elif refused and isinstance(item, _Refused):
                where = _path((trail, key))
                raise invalid(f"{where}: {item.what}: numbers must be finite, and integers at most "
                              f"{MAX_INTEGER_DIGITS} digits", where)


def _path(trail) -> str:
    keys = []
    while trail is not None:
        trail, key = trail
        keys.append(key)
    text = ""
    for key in reversed(keys):
        text += f"[{key}]" if isinstance(key, int) else f".{key}" if text else str(key)
    return quote(text, False)


def quote(value, as_repr: bool = True) -> str:
    """What a client sent, for an error message: its repr (or the text itself), cut to QUOTE_CHARS."""
    text = repr(value) if as_repr else str(value)
    if len(text) <= QUOTE_CHARS:
        return text
    return f"{text[:QUOTE_CHARS]}... ({len(text)} characters)"


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is over the gateway's {limit}-byte limit", code="request_too_large")


def _type_name(value) -> str:
    return "null" if value is None else {"str": "string", "dict": "object", "list": "array", "bool": "boolean",
                                         "int": "integer", "float": "number"}.get(type(value).__name__,
                                                                                  type(value).__name__)


def _optional_int(body: dict, name: str, low: int = 1, high: int = INT32_MAX) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{name} must be an integer, got {_type_name(value)}", name, "invalid_type")
    if not low <= value <= high:
        raise invalid(f"{name} must be an integer from {low} to {high}, got {quote(value)}", name)
    return value


def _optional_number(body: dict, name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(f"{name} must be a number, got {_type_name(value)}", name, "invalid_type")
    if not math.isfinite(value) or not low <= value <= high:
        raise invalid(f"{name} must be between {low:g} and {high:g}, got {quote(value)}", name)
    return float(value)


def _common(body: dict, kind: str, max_tokens_limit: int) -> dict:
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
    max_tokens = _optional_int(body, "max_tokens", 1, max_tokens_limit)
    if kind == "chat":
        max_tokens = _optional_int(body, "max_completion_tokens", 1, max_tokens_limit) or max_tokens
    for name, (low, high) in INTEGERS.items():
        _optional_int(body, name, low, high)
    if kind == "completions":          # chat's logprobs is a boolean
        _optional_int(body, "logprobs", 0, 20)
    for name, (low, high) in NUMBERS.items():
        _optional_number(body, name, low, high)
    _logit_bias(body.get("logit_bias"))
    sampling = {name: value for name, value in (("temperature", _optional_number(body, "temperature", 0.0, 2.0)),
                                                ("top_p", _optional_number(body, "top_p", 0.0, 1.0)))
                if value is not None}
    return {"model": model, "stream": stream, "max_tokens": max_tokens, "sampling": sampling,
            "options": _options(body.get("zooter"))}


def _logit_bias(raw) -> None:
    if raw is None:
        return
    if not isinstance(raw, dict):
        raise invalid(f"logit_bias must be an object {{token id: bias}}, got {_type_name(raw)}", "logit_bias",
                      "invalid_type")
    for token, bias in raw.items():
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -LOGIT_BIAS <= bias <= LOGIT_BIAS:
            raise invalid(f"logit_bias[{quote(token)}] must be a number from -100 to 100, got {quote(bias)}",
                          "logit_bias")


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
        raise invalid(f"zooter: unknown option(s) {quote(unknown)}; known: lambda, tolerance, candidates", "zooter")
    options = {}
    for name in ("lambda", "tolerance"):
        if raw.get(name) is not None:
            value = raw[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise invalid(f"zooter.{name} must be a finite number >= 0, got {quote(value)}", f"zooter.{name}")
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


def parse_chat(body: dict, max_tokens_limit: int = INT32_MAX) -> Call:
    common = _common(body, "chat", max_tokens_limit)
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
            raise invalid(f"{where}.role must be one of {list(ROLES)}, got {quote(role)}", f"{where}.role")
        turns.append((role, _content_text(message.get("content"), where)))
    if not any(text.strip() for _, text in turns):
        raise invalid("messages hold no text to answer", "messages")
    forwarded = {k: v for k, v in body.items() if k != "zooter"}
    return Call("chat", stream=common["stream"], model=common["model"], body=forwarded,
                turns=turns, prompt=prompt_from_messages(turns),
                max_tokens=common["max_tokens"], sampling=common["sampling"], options=common["options"])


def parse_completion(body: dict, max_tokens_limit: int = INT32_MAX) -> Call:
    common = _common(body, "completions", max_tokens_limit)
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
