"""Subcommands: zooter triton build. Handlers import heavy libraries only when they run."""

from __future__ import annotations


def register(sub) -> None:
    pass
