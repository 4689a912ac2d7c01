"""Subcommands of `zooter` that belong to zooter.training (registered by zooter.cli).

`data ...` lives here; training/evaluation commands in cli_train.py; answer collection and
reward scoring in cli_collect.py. Handlers import heavy libraries only when they run.
"""

from __future__ import annotations


def register(sub) -> None:
    from zooter.training import cli_collect, cli_train

    register_data(sub)
    cli_train.register(sub)
    cli_collect.register(sub)


def register_data(sub) -> None:
    pass
