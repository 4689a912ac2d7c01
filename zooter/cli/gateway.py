"""zooter gateway: an OpenAI-compatible HTTP front door that routes every request; and zooter stub-llm, the
OpenAI-compatible stub (no LLM) that demos and benches put behind it."""

from __future__ import annotations

import argparse

from zooter.runtime.errors import UserError


def register(sub) -> None:
    p = sub.add_parser(
        "gateway", help="an OpenAI-compatible HTTP server that routes every request to a candidate LLM",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve POST /v1/chat/completions and /v1/completions (streaming or not), GET /v1/models, "
                    "/health and /metrics. model 'zooter' routes the request; a candidate's name goes straight "
                    "to it. Two back ends: --bundle B --candidates FILE routes in process and forwards to the "
                    "chosen candidate's serve.openai_base_url or serve.triton_model, falling back to the next "
                    "in the ranking when one fails before its first token; --triton URL sends every request "
                    "through the `zooter` model of a running `zooter serve`, which routes and falls back inside "
                    "Triton. Binds 127.0.0.1 unless --host says otherwise.",
        epilog="In an app:\n"
               "  from openai import OpenAI\n"
               "  client = OpenAI(base_url=\"http://127.0.0.1:8000/v1\", api_key=\"KEY\")\n"
               "  client.chat.completions.create(model=\"zooter\", messages=[{\"role\": \"user\", \"content\": \"...\"}])\n"
               "See docs/gateway.md.")
    p.add_argument("--host", default="127.0.0.1", metavar="ADDR",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--triton", metavar="URL",
                   help="route and answer through Triton's `zooter` model at this gRPC address "
                        "(grpc://host:port or host:port; `zooter serve` listens on 8001)")
    p.add_argument("--bundle", metavar="B", help="route in process with this bundle (from `zooter export`)")
    p.add_argument("--candidates", metavar="FILE",
                   help="candidates YAML: where each candidate is served (serve.openai_base_url, model, "
                        "api_key_env; or serve.triton_model, triton_url)")
    p.add_argument("--tolerance", type=float, default=None, metavar="X",
                   help="with --bundle: cost knob in reward units, the cheapest candidate expected within X of the "
                        "router's choice (default: the bundle's); a request may set its own in its zooter object")
    p.add_argument("--lambda", dest="lam", type=float, default=None, metavar="X",
                   help="with --bundle: the older cost weight of the in-process rule, >= 0 (default: the bundle's)")
    p.add_argument("--route-on", choices=["last-user", "conversation"], default=None,
                   help="which text of a chat is routed: the last user message (the default with --bundle) or the "
                        "whole conversation, cut to the router's max_length tokens keeping its start; with --triton "
                        "the default is the repository's (zooter triton build --route-on) and this overrides it")
    p.add_argument("--api-keys-file", metavar="FILE",
                   help="clients must send one of these keys (one a line) as a bearer token; default: no keys")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="larger request bodies are refused with 413 (default 1048576)")
    p.add_argument("--request-timeout", type=float, default=300.0, metavar="S",
                   help="seconds for a whole request from its first byte: headers and body must arrive within it "
                        "(else 408, or a closed connection), and the answer, stream included, must end within it "
                        "(default 300)")
    p.add_argument("--upstream-timeout", type=float, default=60.0, metavar="S",
                   help="seconds an upstream may take to its first token and between tokens after it (to its "
                        "whole answer when not streaming); past it, the next candidate takes over before the first "
                        "token, and a stream ends with an error event after it (default 60)")
    p.add_argument("--connect-timeout", type=float, default=5.0, metavar="S",
                   help="seconds to connect to an OpenAI-compatible upstream (default 5)")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="answer length for Triton models when a request sends no max_tokens (default 256)")
    p.add_argument("--max-tokens-limit", type=int, default=1 << 20, metavar="N",
                   help="a request's max_tokens or max_completion_tokens above N is refused with 400 "
                        "(default 1048576; at most 2147483647)")
    p.add_argument("--max-attempts", type=int, default=3, metavar="N",
                   help="with --bundle: candidates tried at most for one request when they fail before their first "
                        "token (HTTP 5xx, timeouts, refused connections); then 503 (default 3)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info",
                   help="log level (default info); request bodies and keys are never logged")
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser(
        "stub-llm", help="a local OpenAI-compatible server with deterministic text and no LLM (demos, benches)",
        description="Serves POST /v1/chat/completions and /v1/completions with a fixed function of (model, prompt): "
        "'<model> answers: ' and the prompt's words in reverse, streamed or not (zooter.bench.openai_stub). Models "
        "whose name holds a keyword (flaky, slow, broken, ...) misbehave on purpose. Prints 'listening on URL', then "
        "serves until stopped. Binds 127.0.0.1 unless --host.")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--delay", type=float, default=0.0, help="seconds each request takes (default 0)")
    p.add_argument("--tokens", type=int, help="answer every request with this many words")
    p.set_defaults(func=cmd_stub_llm)


def cmd_stub_llm(args) -> int:
    from zooter.bench.openai_stub import listen, serve, stub_app

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be 0-65535, got {args.port}")
    sock = listen(args.host, args.port)
    print(f"listening on http://{args.host}:{sock.getsockname()[1]}/v1", flush=True)
    serve(stub_app(delay_s=args.delay, tokens=args.tokens), sock)
    return 0


def cmd_gateway(args) -> int:
    import logging

    from zooter.servers.gateway import GatewaySettings, load_api_keys, serve

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be 0-65535, got {args.port}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = GatewaySettings(bundle=args.bundle, candidates=args.candidates, triton=args.triton, lam=args.lam, tolerance=args.tolerance,
                               api_keys=load_api_keys(args.api_keys_file) if args.api_keys_file else (),
                               max_body_bytes=args.max_body_bytes, request_timeout=args.request_timeout,
                               upstream_timeout=args.upstream_timeout, connect_timeout=args.connect_timeout,
                               max_tokens=args.max_tokens, max_tokens_limit=args.max_tokens_limit,
                               max_attempts=args.max_attempts, route_on=args.route_on)
    return serve(settings, args.host, args.port, args.log_level)
