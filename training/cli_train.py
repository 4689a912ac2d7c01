"""Subcommands: zooter tag, train, eval, reproduce. Handlers import heavy libraries only when they run."""

from __future__ import annotations


def register(sub) -> None:
    pass
