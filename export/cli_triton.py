"""Subcommands: zooter triton build. Handlers import heavy libraries only when they run."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    triton = sub.add_parser("triton", help="Triton Inference Server model repositories",
                            description="Triton Inference Server model repositories for a router bundle.")
    tsub = triton.add_subparsers(dest="triton_command", metavar="ACTION")
    tsub.required = True
    p = tsub.add_parser(
        "build", help="fill the triton_models/ templates from a bundle and a candidates file",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a Triton model repository: zooter_route (ensemble tokenize -> router -> decide, "
                    "routing only) and zooter (decoupled BLS: route, then stream the chosen candidate's answer "
                    "with fallback), plus CPU stand-ins for candidates without a Triton model (--stand-ins).",
        epilog="Serve it with `zooter serve REPO`; every config.pbtxt is checked against Triton's ModelConfig protobuf.")
    p.add_argument("bundle", help="bundle folder (router.json, tokenizer.json, the ONNX file) from `zooter export`")
    p.add_argument("--candidates", required=True, help="candidates YAML: names, costs, serve: {triton_model: NAME}")
    p.add_argument("--out", required=True, help="repository folder to write (replaced if zooter built it before)")
    p.add_argument("--router-backend", choices=["python", "onnxruntime"], default="python",
                   help="onnxruntime: Triton's ORT backend (production images); python: onnxruntime inside the "
                        "python backend, for servers without the ORT backend such as nvidia-pytriton's (default)")
    p.add_argument("--router-device", choices=["cpu", "gpu"], default="cpu",
                   help="instance kind of the onnxruntime-backend router (default cpu)")
    p.add_argument("--tensorrt", action="store_true",
                   help="add ORT's TensorRT execution accelerator (FP16) to the onnxruntime-backend router on GPU")
    p.add_argument("--stand-ins", action="store_true",
                   help="give every candidate without serve.triton_model a CPU stand-in (SmolLM2-135M-Instruct) "
                        "with TensorRT-LLM I/O")
    p.add_argument("--cost-lambda", type=float, default=None, metavar="X",
                   help="cost-aware rule: choose argmax p - X * cost / max(cost); default: the bundle's lambda, "
                        "as the in-process Router (0 = plain ZOOTER)")
    p.add_argument("--max-batch-size", type=int, default=32, help="max_batch_size of the routing models (default 32)")
    p.add_argument("--max-text-bytes", type=int, default=65536,
                   help="longer queries are refused with an error (default 65536); within it, the router reads "
                        "the first max_length tokens, as in-process")
    p.add_argument("--max-tokens", type=int, default=128, help="answer length when a request sends no max_tokens")
    p.set_defaults(func=build)


def build(args) -> int:
    from zooter.errors import UserError
    from zooter.export.triton_repo import build_repository
    from zooter.training.candidates import load_candidates

    if args.max_batch_size < 1:
        raise UserError("--max-batch-size must be >= 1")
    candidates = load_candidates(args.candidates)
    if args.stand_ins:
        print("preparing the stand-in LLM (converted once from GGUF, then cached) ...", flush=True)
    built = build_repository(args.bundle, args.out, candidates, router_backend=args.router_backend,
                             stand_ins=args.stand_ins, cost_lambda=args.cost_lambda,
                             max_batch_size=args.max_batch_size, max_text_bytes=args.max_text_bytes,
                             router_device=args.router_device, tensorrt=args.tensorrt,
                             default_max_tokens=args.max_tokens)
    print(f"wrote {built.path}: {len(built.models)} models ({', '.join(built.models[:5])}"
          f"{', ...' if len(built.models) > 5 else ''})")
    for label, s in built.serving.items():
        print(f"  {label:40s} -> {s['model'] or '(not servable)'}  [{s['why']}]")
    if built.unreachable:
        print(f"note: {len(built.unreachable)} candidate(s) cannot be called inside Triton; "
              "`zooter` falls back past them")
    return 0
