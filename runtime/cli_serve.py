"""Subcommands: zooter serve, ask. Handlers import heavy libraries only when they run."""

from __future__ import annotations


def register(sub) -> None:
    pass
