"""Subcommands: zooter serve, ask. Handlers import heavy libraries only when they run."""

from __future__ import annotations



def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="run tritonserver on a repository from `zooter triton build`",
        description="Start tritonserver on a model repository: the one on PATH, else the one inside the "
                    "nvidia-pytriton wheel (with the python-backend stub for this Python). Waits until the "
                    "server is ready, prints the endpoints, and stops it cleanly on Ctrl-C or SIGTERM.")
    p.add_argument("repository", help="model repository folder (zooter triton build --out)")
    p.add_argument("--model-repository", action="append", default=[], metavar="DIR",
                   help="another repository to serve alongside, e.g. the TensorRT-LLM ensembles the candidates "
                        "file names (repeatable; model names must be unique across repositories)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP/REST port (default 8000; 0 = any free port)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001; 0 = any free port)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default 8002; 0 = any free)")
    p.add_argument("--explicit", action="store_true",
                   help="explicit model control: load all models at start, then load/unload through the API")
    p.add_argument("--log-file", help="write the server log here (default: a temporary file, tail shown on failure)")
    p.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level (default 0)")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for readiness (default 300)")
    p.set_defaults(func=serve)

    a = sub.add_parser(
        "ask", help="ask a question through Triton: route it, then the chosen candidate answers",
        description="Send a query to the `zooter` model of a running server: it routes the query, forwards it "
                    "to the chosen candidate (falling back to the next most probable one if that fails) and "
                    "returns the answer, streamed with --stream. Prints which candidate answered.")
    a.add_argument("text", help="the query")
    a.add_argument("--triton", required=True, metavar="URL",
                   help="server: host:port or http://host:port (HTTP), grpc://host:port (gRPC)")
    a.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    a.add_argument("--max-tokens", type=int, default=128, help="answer length limit (default 128)")
    a.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: greedy)")
    a.add_argument("--json", action="store_true", help="print one JSON object {candidate, note, text}")
    a.set_defaults(func=ask)


def serve(args) -> int:
    from zooter.runtime.triton_server import TritonServer, serve_forever

    server = TritonServer(args.repository, extra_repositories=args.model_repository, http_port=args.http_port,
                          grpc_port=args.grpc_port, metrics_port=args.metrics_port, explicit=args.explicit, log_file=args.log_file,
                          log_verbose=args.log_verbose)
    print(f"starting tritonserver on {server.repository} ...", flush=True)

    def ready(server):
        print(f"ready: http {server.http_url}  grpc {server.grpc_url}  metrics {server.metrics_url}", flush=True)
        print(f"  zooter ask --triton {server.http_url} --stream \"...\"   (Ctrl-C stops the server)", flush=True)

    return serve_forever(server, timeout=args.timeout, on_ready=ready)


def ask(args) -> int:
    import json
    import sys

    from zooter.errors import UserError
    from zooter.runtime.triton_client import TritonRequestError, ask as ask_triton

    if args.max_tokens < 1:
        raise UserError("--max-tokens must be >= 1")
    sampling = {} if args.temperature is None else {"temperature": args.temperature}
    text, candidate, note = [], "", ""
    try:
        for chunk in ask_triton(args.triton, args.text, stream=args.stream, max_tokens=args.max_tokens, **sampling):
            if chunk.candidate != candidate or (chunk.note and chunk.note != note):
                if text and not args.json:
                    print(f"\n[{chunk.candidate} takes over: {chunk.note}]", file=sys.stderr)
                candidate, note = chunk.candidate, chunk.note
                if not args.json:
                    print(f"[{candidate}]" + (f" ({note})" if note else ""), file=sys.stderr, flush=True)
            text.append(chunk.text)
            if not args.json:
                print(chunk.text, end="", flush=True)
    except TritonRequestError as err:
        raise UserError(f"Triton: {err}") from None
    if args.json:
        print(json.dumps({"candidate": candidate, "note": note, "text": "".join(text)}))
    else:
        print()
    return 0
