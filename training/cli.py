"""Subcommands of `zooter` that belong to zooter.training (registered by zooter.cli)."""

from __future__ import annotations


def register(sub) -> None:
    """Add this area's subcommands to the `zooter` parser. Keep imports inside handlers."""
