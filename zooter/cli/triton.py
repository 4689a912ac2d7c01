"""zooter triton build, zooter serve, zooter ask: the Triton deployment."""

from __future__ import annotations

import argparse

from zooter.runtime.errors import UserError


def register(sub) -> None:
    triton = sub.add_parser("triton", help="Triton Inference Server model repositories",
                            description="Triton Inference Server model repositories for a router bundle.")
    tsub = triton.add_subparsers(dest="triton_command", metavar="ACTION")
    tsub.required = True
    p = tsub.add_parser(
        "build", help="fill the triton_models/ templates from a bundle and a candidates file",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a Triton model repository: zooter_route (routing only: the decision with expected "
                    "rewards and confidence; one python model running the in-process Router on CPU, or tokenize -> "
                    "router -> decide with the router on Triton's onnxruntime backend) and zooter (decoupled BLS: "
                    "route, in its own stub on CPU repositories or through zooter_route with the onnxruntime "
                    "backend, then stream the chosen candidate's answer with fallback), plus CPU stand-ins for "
                    "candidates without a Triton model (--stand-ins). The repository is written beside --out and "
                    "renamed into place, so a failed build leaves what was there.",
        epilog="Serve it with `zooter serve REPO`; every config.pbtxt is checked against Triton's ModelConfig protobuf.")
    p.add_argument("bundle", help="bundle folder (router.json, tokenizer.json, the ONNX file) from `zooter export`")
    p.add_argument("--candidates", required=True, help="candidates YAML: names, costs, serve: {triton_model: NAME}")
    p.add_argument("--out", required=True, help="repository folder to write (replaced if zooter built it before)")
    p.add_argument("--router-backend", choices=["python", "onnxruntime"], default="python",
                   help="python (default): one python model runs the Router (tokenize, ONNX, decide) in one step, "
                        "for CPU servers and those without the ORT backend such as nvidia-pytriton's; onnxruntime: "
                        "the router on Triton's ORT backend in an ensemble (production images, GPU)")
    p.add_argument("--router-device", choices=["cpu", "gpu"], default="cpu",
                   help="instance kind of the onnxruntime-backend router (default cpu)")
    p.add_argument("--tensorrt", action="store_true",
                   help="add ORT's TensorRT execution accelerator (FP16) to the onnxruntime-backend router on GPU")
    p.add_argument("--stand-ins", action="store_true",
                   help="give every candidate without serve.triton_model a CPU stand-in (SmolLM2-135M-Instruct) "
                        "with TensorRT-LLM I/O")
    p.add_argument("--stand-in-io", choices=["ensemble", "llmapi"], default="ensemble",
                   help="the stand-ins' I/O: the older ensemble/BLS one (default) or that of TensorRT-LLM's LLM-API "
                        "Triton model (text_input, streaming, sampling_param_* -> text_output, finish_reason)")
    p.add_argument("--tolerance", type=float, default=None, metavar="X",
                   help="cost knob in reward units: the cheapest candidate expected within X of the router's choice; "
                        "default: the bundle's, as the in-process Router")
    p.add_argument("--lambda", dest="lam", type=float, default=None, metavar="X",
                   help="older cost knob: argmax p - X * cost / max(cost), X >= 0; default: the bundle's")
    p.add_argument("--max-batch-size", type=int, default=32, help="max_batch_size of the routing models (default 32)")
    p.add_argument("--max-text-bytes", type=int, default=65536,
                   help="zooter_route refuses longer texts with an error (default 65536; `zooter` cuts the text it "
                        "routes on to fit); within it, the router reads the first max_length tokens, as in-process")
    p.add_argument("--max-prompt-bytes", type=int, default=1 << 20,
                   help="`zooter` refuses a longer text_input, the prompt the candidate gets (default 1048576, the "
                        "gateway's --max-body-bytes)")
    p.add_argument("--route-on", choices=["last-user", "conversation"], default="last-user",
                   help="which text `zooter` routes on when the client sends the conversation (`messages`, as the "
                        "gateway does): the last user message (default) or the whole conversation; a request may "
                        "send its own route_on (docs/triton.md)")
    p.add_argument("--max-tokens", type=int, default=128, help="answer length when a request sends no max_tokens")
    p.set_defaults(func=cmd_triton_build)

    r = tsub.add_parser(
        "reload", help="swap the router of a running server without dropping requests",
        description="Write a new bundle as the next version of zooter_route in REPO (and of zooter, which routes "
                    "in its own stub in CPU repositories; with --router-backend onnxruntime, of the ensemble's "
                    "tokenize, router and decide steps, then pin the ensemble to it) and have the running server load "
                    "them through the repository API (`zooter serve --model-control`; needs the control key): "
                    "requests in flight finish on the old router, new ones go to the new one. The bundle must keep "
                    "the encoder and the labels; anything else is refused and the running router keeps serving.")
    r.add_argument("repository", help="the repository the server runs (zooter triton build --out)")
    r.add_argument("--bundle", required=True, help="the new bundle folder")
    r.add_argument("--triton", default="127.0.0.1:8000", metavar="URL", help="the server's HTTP address (default 127.0.0.1:8000)")
    r.add_argument("--control-key-file", metavar="FILE",
                   help="the file `zooter serve --control-key-file` wrote; $ZOOTER_CONTROL_KEY gives the key instead")
    r.set_defaults(func=cmd_triton_reload)

    register_serve(sub)


def cmd_triton_build(args) -> int:
    from zooter.export.triton_repo import RepositoryOptions, build_repository
    from zooter.serving.candidates import load_candidates

    if args.max_batch_size < 1:
        raise UserError("--max-batch-size must be >= 1")
    candidates = load_candidates(args.candidates)
    if args.stand_ins:
        print("preparing the stand-in LLM (converted once from GGUF, then cached) ...", flush=True)
    options = RepositoryOptions(router_backend=args.router_backend, router_device=args.router_device,
                                tensorrt=args.tensorrt, lam=args.lam, tolerance=args.tolerance, stand_ins=args.stand_ins,
                                stand_in_io=args.stand_in_io, max_batch_size=args.max_batch_size,
                                max_text_bytes=args.max_text_bytes, max_prompt_bytes=args.max_prompt_bytes,
                                default_max_tokens=args.max_tokens, route_on=args.route_on)
    built = build_repository(args.bundle, args.out, candidates, options)
    print(f"wrote {built.path}: {len(built.models)} models ({', '.join(built.models[:5])}"
          f"{', ...' if len(built.models) > 5 else ''})")
    for label, s in built.serving.items():
        print(f"  {label:40s} -> {s['model'] or '(not servable)'}  [{s['why']}]")
    if built.unreachable:
        print(f"note: {len(built.unreachable)} candidate(s) cannot be called inside Triton; "
              "`zooter` falls back past them")
    return 0


def cmd_triton_reload(args) -> int:
    import os
    from pathlib import Path

    from zooter.export.triton_reload import reload_router

    key = os.environ.get("ZOOTER_CONTROL_KEY") or None
    if args.control_key_file:
        try:
            key = Path(args.control_key_file).read_text().strip()
        except OSError as err:
            raise UserError(f"--control-key-file {args.control_key_file}: {err.strerror}") from None
    done = reload_router(args.repository, args.bundle, args.triton, key)
    print(f"reloaded: {done.describe()}")
    return 0


def register_serve(sub) -> None:
    p = sub.add_parser(
        "serve", help="run tritonserver on a repository from `zooter triton build`",
        description="Start tritonserver on a model repository: the one on PATH, else the one inside the "
                    "nvidia-pytriton wheel (with the python-backend stub for this Python). Waits until the "
                    "server is ready, prints the addresses it listens on, and stops it cleanly on Ctrl-C or "
                    "SIGTERM. Safe by default: every endpoint binds 127.0.0.1 (--host opens them), model control "
                    "is off (--model-control turns it on), and the repository, logging, trace and shared-memory APIs "
                    "always need the control key, written to --control-key-file (mode 0600), in the "
                    "zooter-control-key header. See docs/triton.md, Security. At start it removes what dead "
                    "servers left (work folders in the temporary folder, python-backend regions in /dev/shm).")
    p.add_argument("repository", help="model repository folder (zooter triton build --out)")
    p.add_argument("--model-repository", action="append", default=[], metavar="DIR",
                   help="another repository to serve alongside, e.g. the TensorRT-LLM ensembles the candidates "
                        "file names (repeatable; model names must be unique across repositories)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP/REST port (default 8000; 0 = any free port)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001; 0 = any free port)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default 8002; 0 = any free)")
    p.add_argument("--host", default="127.0.0.1", metavar="ADDR",
                   help="address every endpoint binds (default 127.0.0.1: this machine only; 0.0.0.0: every interface, "
                        "put it behind a proxy, see docs/triton.md)")
    p.add_argument("--model-control", "--explicit", dest="model_control", action="store_true",
                   help="explicit model control: load all models at start, then load/unload through the repository "
                        "API, which needs the control key (off by default)")
    p.add_argument("--control-key-file", metavar="FILE",
                   help="write the control key here, readable by you alone (default: a private temporary folder, "
                        "printed at start); $ZOOTER_CONTROL_KEY sets the key instead of a random one")
    p.add_argument("--log-file", help="write the server log here (default: a temporary file, tail shown on failure)")
    p.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level (default 0)")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for readiness (default 300)")
    p.set_defaults(func=cmd_serve)

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
    a.set_defaults(func=cmd_ask)


def cmd_serve(args) -> int:
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from zooter.servers.tritonserver import TritonServer, serve_forever

    server = TritonServer(args.repository, extra_repositories=args.model_repository, http_port=args.http_port,
                          grpc_port=args.grpc_port, metrics_port=args.metrics_port, host=args.host,
                          model_control=args.model_control, control_key=os.environ.get("ZOOTER_CONTROL_KEY") or None,
                          log_file=args.log_file, log_verbose=args.log_verbose)
    if args.control_key_file and Path(args.control_key_file).is_dir():
        raise UserError(f"--control-key-file {args.control_key_file}: is a folder")
    # Without --control-key-file the key goes to a private temporary folder, removed when the server stops.
    own = None if args.control_key_file else Path(tempfile.mkdtemp(prefix="zooter-serve-"))
    key_file = Path(args.control_key_file) if args.control_key_file else own / "control.key"
    key_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(server.control_key + "\n")
    os.chmod(key_file, 0o600)
    print(f"starting tritonserver on {server.repository} ...", flush=True)

    def ready(server):
        bound = server.bound()
        print(f"ready: http {bound['http']}  grpc {bound['grpc']}  metrics {bound['metrics']}", flush=True)
        if server.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"  listening on {server.host}: reachable from other machines; keep it behind a proxy "
                  f"(docs/triton.md, Security)", flush=True)
        print(f"  model control: {'on' if server.model_control else 'off'}; repository, logging, trace and "
              f"shared-memory APIs need the key in {key_file} (header zooter-control-key)", flush=True)
        if server.http_stack < 2 * 64 << 20:
            print(f"  warning: tritonserver's threads have {server.http_stack >> 20} MiB stacks (RLIMIT_STACK): a "
                  f"form-encoded HTTP body over ~{server.http_stack >> 21} MB crashes it; raise `ulimit -s` "
                  f"(docs/triton.md, Oversized requests)", flush=True)
        print(f"  zooter ask --triton {server.http_url} --stream \"...\"   (Ctrl-C stops the server)", flush=True)

    try:
        return serve_forever(server, timeout=args.timeout, on_ready=ready)
    finally:
        if own is not None:
            shutil.rmtree(own, ignore_errors=True)


def cmd_ask(args) -> int:
    import json
    import sys

    from zooter.serving.triton_client import TritonRequestError, ask as ask_triton

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
