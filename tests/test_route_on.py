"""Which text is routed (runtime/conversation.py, one policy on every path) and how a Triton answer's end is
reported (finish_reason, usage): the policy on its own, then both gateway back ends in front of one real
tritonserver whose candidates are small fake models (one with TensorRT-LLM's LLM-API finish_reason, one
that counts tokens), so every path can be compared on the same request."""

from __future__ import annotations

import json

import pytest

from gateway_stubs import ServerThread
from tiny import LABELS, TEXTS

SYSTEM = "You are a careful assistant. Answer in plain English, cite nothing, keep it short. " * 12   # ~1,000 chars


# --- the policy -------------------------------------------------------------------------------------------
def test_route_text_reads_the_last_user_message_by_default_or_the_whole_conversation():
    from zooter.runtime.conversation import route_text

    turns = [("system", SYSTEM), ("user", "first question"), ("assistant", "an answer"), ("user", "second one"),
             ("assistant", "")]
    assert route_text(turns) == "second one"
    assert route_text(turns, "conversation") == (f"system: {SYSTEM}\n\nuser: first question\n\n"
                                                 "assistant: an answer\n\nuser: second one")
    # A lone user message (or a prompt) is routed as it is in both modes.
    assert route_text([("user", "just this")], "conversation") == route_text([("user", "just this")]) == "just this"
    # Without a user message with text, the last message that has text.
    assert route_text([("system", "be brief"), ("user", "  "), ("assistant", "hello")]) == "hello"


def test_route_text_refuses_nothing_to_route_and_unknown_modes():
    from zooter.runtime.conversation import route_text
    from zooter.runtime.tokenize import EmptyQueryError

    with pytest.raises(EmptyQueryError, match="no text to route on"):
        route_text([("system", " "), ("user", "")])
    with pytest.raises(ValueError, match=r"route_on must be one of \['last-user', 'conversation'\], got 'all'"):
        route_text([("user", "hi")], "all")


def test_route_text_keeps_the_head_within_the_byte_bound_without_splitting_a_character():
    from zooter.runtime.conversation import ROUTE_TEXT_BYTES, route_text

    long = "é" * ROUTE_TEXT_BYTES          # 2 bytes each: twice the bound
    cut = route_text([("user", long)])
    assert cut == "é" * (ROUTE_TEXT_BYTES // 2) and len(cut.encode()) == ROUTE_TEXT_BYTES
    odd = route_text([("user", "a" + "€" * ROUTE_TEXT_BYTES)], limit_bytes=8)   # € is 3 bytes: a€€ is 7
    assert odd == "a€€"
    conversation = route_text([("system", "S" * 100_000), ("user", "hi")], "conversation")
    assert conversation.startswith("system: SSS") and len(conversation) == ROUTE_TEXT_BYTES   # the start is kept
    assert route_text([("user", "bad \udcff surrogate")]) == "bad \ufffd surrogate"   # as the tokenizer cleans it


def test_messages_travel_as_json_and_bad_json_is_named():
    from zooter.runtime.conversation import turns_from_json, turns_to_json

    turns = [("system", "sé \udcff"), ("user", "hi")]
    assert turns_from_json(turns_to_json(turns)) == turns
    for raw, words in (("{", "not valid JSON"), ("[]", "non-empty JSON array"), ('[{"role": "user"}]', r"messages\[0\] must be an object"),
                       ('{"role": "user", "content": "x"}', "non-empty JSON array")):
        with pytest.raises(ValueError, match=words):
            turns_from_json(raw)


def test_finish_reason_from_the_model_else_from_the_counts():
    from zooter.runtime.conversation import finish_reason
    from zooter.servers.gateway.upstreams import Ending

    assert finish_reason("length", None, None) == "length" and finish_reason("stop", 99, 5) == "stop"
    assert finish_reason(None, 5, 5) == "length" and finish_reason(None, 4, 5) == "stop"
    assert finish_reason(None, None, 5) is None and finish_reason(None, 5, None) is None
    ending = Ending(max_tokens=4)
    ending.add({"text_output": "a", "finish_reason": "", "prompt_tokens": "", "completion_tokens": ""})
    assert ending.finish == "stop" and ending.usage is None          # nothing told: no usage made up
    ending.add({"text_output": "", "prompt_tokens": "7", "completion_tokens": "4"})
    assert ending.finish == "length" and ending.usage == {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}


def test_a_chat_call_keeps_every_turn_and_the_candidate_gets_the_whole_prompt():
    from zooter.servers.gateway.requests import parse_chat, parse_completion

    call = parse_chat({"model": "zooter", "messages": [{"role": "system", "content": SYSTEM},
                                                       {"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    assert call.turns == [("system", SYSTEM), ("user", "hi")]
    assert call.prompt == f"system: {SYSTEM}\n\nuser: hi\n\nassistant:"
    assert parse_completion({"model": "zooter", "prompt": "p"}).turns == [("user", "p")]


def test_route_on_is_a_build_and_a_gateway_setting(bundles, tmp_path):
    from zooter.cli import main
    from zooter.export.triton_repo import build_repository, validate_repository
    from zooter.runtime.errors import UserError
    from zooter.serving.candidates import parse_candidates
    from zooter.servers.gateway import GatewaySettings

    built = build_repository(bundles["int8"], tmp_path / "repo", parse_candidates([{"name": n} for n in LABELS]),
                             route_on="conversation")
    zooter = validate_repository(built.path)["zooter"]
    assert zooter.parameters["route_on"].string_value == "conversation"
    assert {"messages", "route_on"} <= {i.name for i in zooter.input}
    assert {"finish_reason", "prompt_tokens", "completion_tokens"} <= {o.name for o in zooter.output}
    with pytest.raises(UserError, match="--route-on must be one of"):
        build_repository(bundles["int8"], tmp_path / "r2", None, route_on="everything")
    with pytest.raises(UserError, match="--route-on must be one of"):
        GatewaySettings(triton="localhost:1", route_on="everything").check()
    with pytest.raises(SystemExit) as exited:
        main(["gateway", "--triton", "localhost:1", "--route-on", "everything"])
    assert exited.value.code == 2


# --- both back ends on one tritonserver ---------------------------------------------------------------------
NATURAL = 6      # the fake candidates' answers end by themselves after this many tokens (fake_models/fake_llmapi)


@pytest.fixture(scope="module")
def served(bundles, tmp_path_factory):
    """A tritonserver with the tiny router's repository (route_on default) and the fake candidates: the first two
    labels answered by fake_llmapi, the others by fake_counted."""
    from triton_helpers import fake_repository, tritonserver
    from zooter.export.triton_repo import build_repository
    from zooter.serving.candidates import parse_candidates

    folder = tmp_path_factory.mktemp("route_on")
    fake_repository(folder / "fakes", "fake_llmapi", "fake_counted")
    models = {label: ("fake_llmapi" if i < 2 else "fake_counted") for i, label in enumerate(LABELS)}
    candidates = parse_candidates([{"name": n, "serve": {"triton_model": models[n]}} for n in LABELS])
    built = build_repository(bundles["int8"], folder / "repo", candidates, default_max_tokens=4)
    with tritonserver(built.path, extra_repositories=[folder / "fakes"], log_file=folder / "server.log") as server:
        url = f"grpc://{server.grpc_url}"
        serve = [{"name": n, "serve": {"triton_model": models[n], "triton_url": url}} for n in LABELS]
        (folder / "candidates.yaml").write_text(json.dumps(serve))
        gateways = {}
        try:
            for route_on in (None, "conversation"):
                gateways["bundle", route_on] = start_gateway(bundle=bundles["int8"], candidates=folder / "candidates.yaml",
                                                             max_tokens=4, route_on=route_on)
                gateways["triton", route_on] = start_gateway(triton=url, route_on=route_on)
            yield {"gateways": gateways, "models": models}
        finally:
            for gateway in gateways.values():
                gateway.stop()


def start_gateway(**settings) -> ServerThread:
    from zooter.servers.gateway import GatewaySettings, create_app

    return ServerThread(create_app(GatewaySettings(**settings)))


def post(gateway: ServerThread, body: dict):
    import httpx

    return httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=120)


def chat(system: str, *turns: str) -> list[dict]:
    roles = ["user", "assistant"]
    return [{"role": "system", "content": system}] + [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


@pytest.mark.slow
@pytest.mark.triton
def test_the_same_request_gets_the_same_candidate_through_bundle_and_triton(served, router_int8):
    from zooter.runtime.conversation import route_text

    gateways = served["gateways"]
    # Texts the router sends to different candidates, so a path that routed on the system prompt would differ.
    texts = list({router_int8.route(t).candidate: t for t in TEXTS}.values())
    assert len(texts) >= 2
    for text in texts:
        body = {"model": "zooter", "messages": chat(SYSTEM, text), "max_tokens": 2}
        chosen = {back: post(gateways[back, None], body) for back in ("bundle", "triton")}
        assert {r.status_code for r in chosen.values()} == {200}, {b: r.text for b, r in chosen.items()}
        expected = router_int8.route(text).candidate
        assert {b: r.headers["x-zooter-candidate"] for b, r in chosen.items()} == {"bundle": expected, "triton": expected}
        # Both paths name the router that chose: the gateway's own, and the `zooter` model's router output.
        assert {b: r.headers.get("x-zooter-router") for b, r in chosen.items()} == \
            {"bundle": router_int8.router_id, "triton": router_int8.router_id}

    # A 72 KB system prompt with "hi": the router reads "hi" on both paths; the candidate gets it all.
    body = {"model": "zooter", "messages": chat("x" * 72_000, "hi"), "max_tokens": 2}
    answers = {back: post(gateways[back, None], body) for back in ("bundle", "triton")}
    assert {b: r.status_code for b, r in answers.items()} == {"bundle": 200, "triton": 200}, answers["triton"].text
    assert {r.headers["x-zooter-candidate"] for r in answers.values()} == {router_int8.route("hi").candidate}

    # --route-on conversation: the whole conversation, on both paths (for --triton, the request's route_on input).
    for text in texts:
        messages = chat(SYSTEM[:200], text, "an answer", "and then?")
        turns = [(m["role"], m["content"]) for m in messages]
        expected = router_int8.route(route_text(turns, "conversation")).candidate
        for back in ("bundle", "triton"):
            response = post(gateways[back, "conversation"], {"model": "zooter", "messages": messages, "max_tokens": 2})
            assert response.status_code == 200 and response.headers["x-zooter-candidate"] == expected, (back, text)


@pytest.fixture(scope="module")
def router_int8(bundles):
    from zooter.runtime.router import Router

    return Router.load(bundles["int8"])


@pytest.mark.slow
@pytest.mark.triton
def test_triton_answers_say_length_when_cut_and_carry_usage(served):
    import httpx

    gateways, models = served["gateways"], served["models"]
    llmapi = next(n for n, m in models.items() if m == "fake_llmapi")
    counted = next(n for n, m in models.items() if m == "fake_counted")
    for back in ("bundle", "triton"):
        gateway = gateways[back, None]
        for name in (llmapi, counted):
            for max_tokens, finish in ((3, "length"), (NATURAL + 4, "stop")):
                body = {"model": name, "messages": chat("be brief", "say some words"), "max_tokens": max_tokens}
                answer = post(gateway, body).raise_for_status().json()
                choice = answer["choices"][0]
                assert answer["model"] == name and choice["finish_reason"] == finish, (back, name, max_tokens)
                words = min(max_tokens, NATURAL)
                assert choice["message"]["content"] == " ".join(["word"] * words)
                if name == counted:      # the model counted: usage is its counts
                    prompt = len("system: be brief\n\nuser: say some words\n\nassistant:".split())
                    assert answer["usage"] == {"prompt_tokens": prompt, "completion_tokens": words,
                                               "total_tokens": prompt + words}, back
                else:                    # it did not: no usage is made up
                    assert "usage" not in answer, back
            # Streamed: the last chunk says how it ended.
            body = {"model": name, "messages": chat("be brief", "say some words"), "max_tokens": 3, "stream": True}
            with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, timeout=120) as response:
                events = [json.loads(line[5:]) for line in response.iter_lines()
                          if line.startswith("data:") and line.strip() != "data: [DONE]"]
            assert events[-1]["choices"][0]["finish_reason"] == "length", (back, name)
            assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])
    # The zooter model's own default max_tokens (4 here) cuts the answer too, and says so.
    answer = post(gateways["triton", None], {"model": counted, "messages": chat("s", "u")}).raise_for_status().json()
    assert answer["choices"][0]["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 4
