"""Subcommands of `zooter` that belong to zooter.runtime: `route` and `bench` here, `serve` and `ask` in cli_serve.py."""

from __future__ import annotations


def register(sub) -> None:
    from zooter.runtime import cli_serve

    register_route_bench(sub)
    cli_serve.register(sub)


def register_route_bench(sub) -> None:
    pass
