"""Errors the user can act on: the CLI prints them as one line and exits 2, without a traceback.

They live at the bottom layer (zooter.runtime) because every layer raises them, an app that embeds
the Router included.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A problem with the user's input (a file, a flag, a bundle), described so they can fix it."""


class DataError(UserError):
    """A data file (routing data, queries, answers) is unreadable or breaks its contract; the message
    names the file and, when known, the line: `FILE:LINE: reason`."""

    def __init__(self, path: str | Path, line: int | None, reason: str):
        self.path, self.line, self.reason = str(path), line, reason
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {reason}")


def missing_extra(extra: str, err: ImportError) -> UserError:
    """The error for a command whose optional dependencies are not installed: names the extra to install."""
    name = getattr(err, "name", None) or str(err)
    return UserError(f"this needs the '{extra}' extra ({name} is not installed): pip install 'zooter[{extra}]'"
                     + (" (and torch==2.13.0 first on this machine)" if extra == "train" else ""))


class SettingError(UserError, ValueError):
    """A bad value for a setting (a cost weight, a batch size, a tolerance): a UserError for the CLI
    and a ValueError for code that embeds the runtime."""
