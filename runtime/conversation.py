"""A conversation with a candidate: which of its text the router reads, and how an answer's end is named.

One policy for every path a request can take (the gateway's --bundle and --triton back ends, the
Triton `zooter` model called directly), so the same request gets the same candidate on each:

    last-user (default)  the last user message that has text (else the last message that has text):
                         what is being asked now. A system prompt or an earlier turn does not move the
                         decision, so a long system prompt shared by every request cannot send them all
                         to one candidate.
    conversation         every message that has text, oldest first, as a "role: text" transcript (a lone
                         user message as it is, so a one-turn chat is routed as with last-user).

Truncation, the same on every path: the text is cut to ROUTE_TEXT_BYTES UTF-8 bytes keeping its head,
then the router's tokenizer keeps the head of that, max_length tokens (runtime/tokenize.py). The head
is kept because it is what the router was trained and exported on (the tokenizer truncates at the end
of every text) and, for a conversation, it holds the system prompt and the first request, which set the
task; who wants the newest turn to decide routes with last-user. ROUTE_TEXT_BYTES is far beyond what
max_length (at most 512) tokens span, so the byte cut only bounds the work and never changes a decision.

`finish_reason` names an answer's end as OpenAI does: "length" when max_tokens cut it, else "stop".
"""

from __future__ import annotations

import json

from zooter.runtime.tokenize import EmptyQueryError, clean_query

ROUTE_ON = ("last-user", "conversation")
DEFAULT_ROUTE_ON = "last-user"
ROUTE_TEXT_BYTES = 32768


def check_route_on(value, where: str = "--route-on") -> str:
    if value not in ROUTE_ON:
        raise ValueError(f"{where} must be one of {list(ROUTE_ON)}, got {value!r}")
    return value


def transcript(turns) -> str:
    """The messages that have text as "role: text" paragraphs, oldest first."""
    return "\n\n".join(f"{role}: {text}" for role, text in turns if text.strip())


def cut_utf8(text: str, limit: int) -> str:
    """The head of `text` within `limit` UTF-8 bytes, never splitting a character."""
    if len(text) * 4 <= limit:         # no character takes more than 4 bytes
        return text
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore")


def route_text(turns, route_on: str = DEFAULT_ROUTE_ON, limit_bytes: int = ROUTE_TEXT_BYTES) -> str:
    """What the router reads from a conversation: `turns` are (role, text) pairs in order. A prompt (the
    completions API, a plain Triton client) is one user turn. EmptyQueryError when no turn has text."""
    check_route_on(route_on, "route_on")
    turns = [(str(role), clean_query(text) if str(text).strip() else "") for role, text in turns]
    with_text = [(role, text) for role, text in turns if text]
    if not with_text:
        raise EmptyQueryError("the conversation holds no text to route on")
    if route_on == "conversation" and not (len(with_text) == 1 and with_text[0][0] == "user"):
        text = transcript(with_text)
    else:
        users = [text for role, text in with_text if role == "user"]
        text = (users or [with_text[-1][1]])[-1]
    return cut_utf8(text, limit_bytes)


def turns_to_json(turns) -> str:
    """The conversation as the `zooter` model's `messages` input: [{"role", "content"}, ...], content as text."""
    return json.dumps([{"role": role, "content": text} for role, text in turns], separators=(",", ":"))


def turns_from_json(raw: str) -> list[tuple[str, str]]:
    """(role, text) pairs from a `messages` input; ValueError says what is wrong with it."""
    try:
        messages = json.loads(raw)
    except ValueError as err:
        raise ValueError(f"messages is not valid JSON: {err}") from None
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty JSON array of {role, content} objects")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{i}] must be an object with string role and content")
        turns.append((message["role"], message["content"]))
    return turns


def finish_reason(reported: str | None, completion_tokens: int | None, max_tokens: int | None) -> str | None:
    """"length" or "stop": the model's own word where it gives one (TensorRT-LLM's LLM-API `finish_reason`),
    else "length" when it generated max_tokens tokens; None when neither is known."""
    if reported:
        return "length" if reported.lower() == "length" else "stop"
    if completion_tokens is not None and max_tokens:
        return "length" if completion_tokens >= max_tokens else "stop"
    return None
