"""Errors the user can act on: the CLI prints them as one line and exits 2, without a traceback."""


class UserError(Exception):
    """A problem with the user's input (a file, a flag, a bundle), described so they can fix it."""
