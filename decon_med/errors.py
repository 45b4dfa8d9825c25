"""Exceptions that the command line turns into one clear error line."""

from __future__ import annotations

import os


class DeconError(Exception):
    """Base class: the CLI prints ``error: <message>`` and exits with status 2."""


class ConfigError(DeconError):
    """A config key is unknown, has the wrong type or an invalid value."""


class DataError(DeconError):
    """A dataset file or folder is missing, unreadable or inconsistent.

    The message always starts with the offending path.

    Example:
        >>> str(DataError("/data/a.png", "unreadable image"))
        '/data/a.png: unreadable image'
    """

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
