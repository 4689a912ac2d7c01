"""Subcommands of `zooter` that belong to zooter.export: `export` here, `triton build` in cli_triton.py."""

from __future__ import annotations


def register(sub) -> None:
    from zooter.export import cli_triton

    register_export(sub)
    cli_triton.register(sub)


def register_export(sub) -> None:
    pass
