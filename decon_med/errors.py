"""Exceptions that the command line turns into one clear error line, and the one place that finds them.

A :class:`DeconError` raised anywhere (inside a MONAI transform, which wraps it in ``RuntimeError: applying
transform ...``; inside a DataLoader worker, which re-raises it in the main process with the worker's traceback as
its text; or in the engines) is found by :func:`find_error` and printed by the CLI as ``error: <message>``.

Example:
    >>> try:
    ...     try:
    ...         raise DataError("/data/a.png", "unreadable image")
    ...     except DataError as exc:
    ...         raise RuntimeError("applying transform LoadSample") from exc
    ... except RuntimeError as wrapped:
    ...     print(error_line(wrapped))
    /data/a.png: unreadable image
"""

from __future__ import annotations

import os
import re

#: A ``decon_med`` exception line in a formatted traceback, e.g. ``decon_med.errors.DataError: a.png: truncated``.
_TRACEBACK_LINE = re.compile(r"^decon_med\.errors\.(\w+): (.+)$", re.MULTILINE)
#: The text DataLoader workers put in front of a re-raised exception's traceback.
_WORKER_TEXT = "Original Traceback"


class DeconError(Exception):
    """Base class: the CLI prints ``error: <message>`` and exits with status 2.

    Subclasses are rebuilt from their message alone (``type(exc)(str(exc))``), as pickling and DataLoader workers
    do, so a worker's error keeps its type in the main process.
    """


class ConfigError(DeconError):
    """A config key is unknown, has the wrong type or an invalid value."""


class DataError(DeconError):
    """A dataset file or folder is missing, unreadable or inconsistent.

    The message always starts with the offending path. ``DataError(message)`` (one argument) keeps a whole
    message, as when a DataLoader worker re-raises the error.

    Example:
        >>> str(DataError("/data/a.png", "unreadable image"))
        '/data/a.png: unreadable image'
    """

    def __init__(self, path: str | os.PathLike, problem: str | None = None):
        if problem is None:
            message = str(path)
            self.path, _, self.problem = message.partition(": ")
        else:
            self.path = str(path)
            self.problem = problem
            message = f"{self.path}: {problem}"
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (str(self),))


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and every exception it was raised from or during (``__cause__`` / ``__context__``), once each."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if current is None or any(current is s for s in seen):
            continue
        seen.append(current)
        todo += [current.__cause__, current.__context__]
    return seen


def _from_text(text: str) -> DeconError | None:
    """The first ``decon_med`` exception written in a traceback text (a DataLoader worker's), rebuilt."""
    match = _TRACEBACK_LINE.search(text)
    if match is None:
        return None
    cls = {c.__name__: c for c in (DeconError, *_subclasses(DeconError))}.get(match.group(1), DeconError)
    return cls(match.group(2).strip())


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def interrupted(exc: BaseException) -> bool:
    """True when a ``KeyboardInterrupt`` is in the cause / context chain of ``exc``."""
    return any(isinstance(current, KeyboardInterrupt) for current in _chain(exc))


def find_error(exc: BaseException) -> DeconError | None:
    """The :class:`DeconError` behind ``exc``: itself, one in its cause / context chain (MONAI's
    ``applying transform`` wrapper), or one written in the traceback text of a DataLoader worker."""
    chain = _chain(exc)
    for current in chain:
        if isinstance(current, DeconError):
            if _WORKER_TEXT in str(current):
                return _from_text(str(current)) or current
            return current
    for current in chain:
        if _WORKER_TEXT in str(current):
            found = _from_text(str(current))
            if found is not None:
                return found
    return None


def _os_error_line(exc: OSError) -> str:
    """``<path>: <reason>`` of an OSError (the first line of its text when it names no path)."""
    text = str(exc)
    if _WORKER_TEXT in text:  # re-raised by a DataLoader worker: the last line is the original error
        lines = [line for line in text.strip().splitlines() if line.strip()]
        return lines[-1].split(": ", 1)[-1] if lines else type(exc).__name__
    reason = exc.strerror or (text.splitlines()[0] if text else type(exc).__name__)
    if exc.filename is not None:
        target = f" -> {exc.filename2}" if exc.filename2 is not None else ""
        return f"{exc.filename}{target}: {reason}"
    return reason


def error_line(exc: BaseException) -> str | None:
    """The one-line message the CLI prints (after ``error: ``) for ``exc``, or ``None`` for a bug.

    A :class:`DeconError` anywhere in the chain gives its message; an ``OSError`` (a path that cannot be read
    or written) gives ``<path>: <reason>``; a ``UnicodeDecodeError`` gives the failing bytes.
    """
    found = find_error(exc)
    if found is not None:
        return str(found)
    current: BaseException | None = exc
    while current is not None:  # explicit causes only: an OSError handled earlier is no reason
        if isinstance(current, OSError):
            return _os_error_line(current)
        if isinstance(current, UnicodeDecodeError):
            return f"not UTF-8 text ({current.reason} at byte {current.start})"
        current = current.__cause__
    return None
