"""One writer per folder: an exclusive lock file naming its holder.

Every command that writes into a run folder (``pretrain``, ``finetune``, ``evaluate --save-predictions``,
``--overwrite``) holds ``<folder>/.decon-lock`` while it works. The lock is an ``flock`` on that file, so the
kernel releases it when the holder dies, even by ``kill -9``; the file itself records the holder (PID, host,
command, start time) for the error a second writer gets. A lock file whose ``flock`` is free was left by a
process that died: it is taken over with one line on stderr.

``flock`` is advisory and local to one machine; on a network file system shared by several hosts it may not
exclude a writer on another host.

Example:
    >>> with folder_lock(Path("runs/ml"), "pretrain"):
    ...     ...   # nobody else writes into runs/ml meanwhile
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from decon_med.errors import DeconError
from decon_med.folders import LOCK


class FolderLock:
    """An exclusive, crash-safe lock on a folder (see the module docstring).

    Example:
        >>> lock = FolderLock(Path("runs/ml")); lock.acquire("finetune"); ...; lock.release()
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self._fd: int | None = None

    def acquire(self, command: str) -> None:
        """Take the lock or raise a DeconError naming the live holder."""
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(_read(fd))
                os.close(fd)
                raise DeconError(
                    f"{self.folder}: another decon-med process is writing here ({holder}); wait for it to "
                    "finish or stop it, then run again"
                ) from None
            # The holder may have removed the file between our open and our flock: lock the file that is there.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            break
        previous = _read(fd)
        if previous:
            print(
                f"warning: {self.folder}: taking over the lock left by a process that ended ({_describe(previous)})",
                file=sys.stderr,
            )
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file and drop the lock (a no-op when not held)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _read(fd: int) -> dict | None:
    try:
        data = os.pread(fd, 4096, 0)
        record = json.loads(data.decode() or "null")
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _describe(record: dict | None) -> str:
    if not record:
        return "holder unknown"
    return (
        f"{record.get('command', '?')}, pid {record.get('pid', '?')} on {record.get('host', '?')}, "
        f"since {record.get('started', '?')}"
    )


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, command: str, enabled: bool = True) -> Iterator[FolderLock]:
    """Hold :class:`FolderLock` on ``folder`` for the body (``enabled=False``: hold nothing, e.g. ranks > 0).

    A folder created only to hold the lock is removed again when the body leaves it empty.
    """
    folder = Path(folder).expanduser()
    lock = FolderLock(folder)
    if not enabled:
        yield lock
        return
    created = not folder.exists()
    lock.acquire(command)
    try:
        yield lock
    finally:
        lock.release()
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
