"""The `zooter` command: one argparse tree, filled by each area's cli module.

Each area registers its subcommands without importing anything heavy; a subcommand
imports torch, transformers or tritonclient only inside the function that runs it.
"""

from __future__ import annotations

import argparse
import sys

from zooter import __version__
from zooter.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from zooter.export import cli as export_cli
    from zooter.runtime import cli as runtime_cli
    from zooter.training import cli as training_cli

    parser = argparse.ArgumentParser(
        prog="zooter",
        description="Reward-guided LLM router: learn from rewards which candidate LLM answers "
        "a query best, then run only that candidate.",
    )
    parser.add_argument("--version", action="version", version=f"zooter {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for area in (training_cli, export_cli, runtime_cli):
        area.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except UserError as err:
        print(f"zooter {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
