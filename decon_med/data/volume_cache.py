"""A persistent, size-bounded disk cache of decoded volumes and of slice indexes.

Decoding a compressed NIfTI volume costs about a second; a shuffled epoch over slices of many volumes would decode
a volume for a large share of its samples if every DataLoader worker kept only a few decoded volumes in memory.
This cache stores each decoded, reoriented volume once as a ``.npy`` file, laid out slice-major (the sliced axis
first), and reads it back memory-mapped: any worker, and any later run, reads one slice without decoding, and the
operating system's page cache is shared by all workers. The slice index of a volume (the items
:func:`decon_med.data.volumes.scan_volume` lists) is cached as a small JSON file, so every run of a grid reuses
the start-up scan.

Entries are keyed by a hash of the absolute file paths, their size and modification time (ns), and every option
that changes the stored content; a rewritten file gets a new key and is read again. Files are written to a
temporary name in the cache folder and renamed into place (``os.replace``), so a reader never sees a half-written
entry, whatever the number of writers. The total size of the folder's entries is kept under ``max_gb`` by deleting
the least recently used entries (modification time, refreshed on use); the cache only ever deletes files whose
names it gives (``<32 hex>.vol.npy``, ``<32 hex>.vol.json``, ``<32 hex>.index.json`` and its own temporary files).

Layout of ``folder``: ``volumes/<key>.vol.npy`` + ``volumes/<key>.vol.json`` (geometry and sliced axis),
``index/<key>.index.json``.

Example:
    >>> cache = VolumeCache(None, max_gb=20)                  # ~/.cache/decon-med (XDG_CACHE_HOME respected)
    >>> key = cache_key("image", ["ct_001.nii.gz"], orientation="RAS", axis=2)
    >>> cache.store_array(key, slices_first, {"axis": 2})
    True
    >>> array, meta = cache.load_array(key)                     # read-only memory map
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from decon_med.errors import DataError

#: Bump when the stored format changes: old entries are then never read (and age out by LRU).
CACHE_VERSION = 1

_ENTRY = re.compile(r"^[0-9a-f]{32}\.(vol\.npy|vol\.json|index\.json)$")
_TMP = re.compile(r"^\.[0-9a-f]{32}\.[0-9a-f]{32}\.tmp$")
#: Temporary files older than this (seconds) are left-overs of a killed writer and may be removed.
_STALE_TMP_S = 3600.0

__all__ = ["CACHE_VERSION", "VolumeCache", "cache_key", "default_cache_dir", "file_stamp", "scan_progress"]


def scan_progress(pairs: Sequence, desc: str, volumes: int) -> Iterable:
    """``pairs`` wrapped in a progress bar when ``volumes`` (the NIfTI files among them) is at least 2.

    The bar goes to stderr, only on a terminal (``TQDM_DISABLE=1`` hides it), and is cleared when done.
    """
    if volumes < 2:
        return pairs
    return tqdm(pairs, desc=desc, unit="volume", leave=False, disable=None, dynamic_ncols=True)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/decon-med``, or ``~/.cache/decon-med`` when the variable is unset or empty.

    Example:
        >>> default_cache_dir()
        PosixPath('/home/me/.cache/decon-med')
    """
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "decon-med"


def file_stamp(path: str | os.PathLike) -> tuple[str, int, int]:
    """``(absolute path, size in bytes, modification time in ns)`` of a file: what makes a cache entry valid.

    Raises:
        OSError: the file does not exist.
    """
    stat = os.stat(path)
    return str(Path(path).resolve()), int(stat.st_size), int(stat.st_mtime_ns)


def cache_key(kind: str, paths: Sequence[str | os.PathLike], **params) -> str:
    """32-hex-digit key of an entry: its kind, each file's :func:`file_stamp` and the options that shape it.

    ``params`` must be JSON-serialisable (tuples become lists); their order does not matter.

    Example:
        >>> cache_key("image", ["a.nii.gz"], orientation="RAS", axis=2)
        '5f0c...'
    """
    record = {
        "version": CACHE_VERSION,
        "kind": kind,
        "files": [file_stamp(p) for p in paths],
        "params": params,
    }
    text = json.dumps(record, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class VolumeCache:
    """Decoded volumes (memory-mapped ``.npy``) and slice indexes (JSON) in one size-bounded folder.

    Args:
        folder: cache folder; ``None`` takes :func:`default_cache_dir`. Created on first write.
        max_gb: bound on the total size of the entries in GB (1e9 bytes); ``0`` disables the cache (every
            ``load_*`` misses and every ``store_*`` does nothing).

    Example:
        >>> cache = VolumeCache("/scratch/me/decon-cache", max_gb=50)
        >>> if cache.load_json(key) is None:
        ...     cache.store_json(key, {"items": items})
    """

    def __init__(self, folder: str | os.PathLike | None = None, max_gb: float = 0.0):
        if max_gb < 0:
            raise ValueError(f"max_gb must be >= 0, got {max_gb}")
        self.folder = Path(folder).expanduser() if folder else default_cache_dir()
        self.max_bytes = int(max_gb * 1e9)
        if self.max_bytes > 0 and self.folder.exists() and not self.folder.is_dir():  # no write would land
            raise DataError(self.folder, "cache folder (data.cache_dir) exists and is not a folder")

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    # -- paths ---------------------------------------------------------------------------------------------
    def _volume(self, key: str) -> tuple[Path, Path]:
        folder = self.folder / "volumes"
        return folder / f"{key}.vol.npy", folder / f"{key}.vol.json"

    def _index(self, key: str) -> Path:
        return self.folder / "index" / f"{key}.index.json"

    # -- volumes -------------------------------------------------------------------------------------------
    def load_array(self, key: str) -> tuple[np.ndarray, dict] | None:
        """``(read-only memory map, metadata)`` of a stored array, or ``None`` when absent or unreadable.

        A hit refreshes the entry's modification time (its place in the LRU order).
        """
        if not self.enabled:
            return None
        data_path, meta_path = self._volume(key)
        try:
            array = np.load(data_path, mmap_mode="r", allow_pickle=False)
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return None
        if list(array.shape) != meta.get("shape") or str(array.dtype) != meta.get("dtype"):
            return None
        _touch(data_path)
        return array, meta

    def store_array(self, key: str, array: np.ndarray, meta: dict) -> bool:
        """Store ``array`` (any layout; written in C order) with JSON ``meta``; ``False`` when it cannot fit.

        The metadata is written first and the array last, each atomically, so a reader that finds the array
        also finds its metadata. Older entries are then evicted until the folder fits ``max_gb``.
        """
        if not self.enabled or array.nbytes > self.max_bytes:
            return False
        data_path, meta_path = self._volume(key)
        meta = {**meta, "shape": list(array.shape), "dtype": str(array.dtype)}
        try:
            self._write(meta_path, lambda f: f.write(json.dumps(meta).encode()))
            self._write(data_path, lambda f: np.save(f, array, allow_pickle=False))
        except OSError:
            return False
        self.evict(keep={data_path, meta_path})
        return True

    # -- indexes -------------------------------------------------------------------------------------------
    def load_json(self, key: str) -> dict | None:
        """A stored slice index (any JSON object), or ``None``."""
        if not self.enabled:
            return None
        path = self._index(key)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        _touch(path)
        return data if isinstance(data, dict) else None

    def store_json(self, key: str, data: dict) -> bool:
        """Store a JSON object atomically; ``False`` when the cache is disabled or the folder is not writable."""
        if not self.enabled:
            return False
        path = self._index(key)
        try:
            self._write(path, lambda f: f.write(json.dumps(data).encode()))
        except OSError:
            return False
        self.evict(keep={path})
        return True

    # -- housekeeping ----------------------------------------------------------------------------------------
    def entries(self) -> list[Path]:
        """The cache's own files (entries only, no temporary files), in no particular order."""
        found = []
        for sub in ("volumes", "index"):
            try:
                names = os.listdir(self.folder / sub)
            except OSError:
                continue
            found.extend(self.folder / sub / n for n in names if _ENTRY.match(n))
        return found

    def size_bytes(self) -> int:
        """Total size of the entries."""
        return sum(_size(p) for p in self.entries())

    def evict(self, keep: Iterable[Path] = ()) -> list[Path]:
        """Delete least recently used entries until the total fits ``max_bytes``; returns what was deleted.

        ``keep`` is never deleted (the entry just written). A volume's array and metadata go together; stale
        temporary files of killed writers are removed as well. Files deleted by a concurrent process are skipped.
        """
        keep = {Path(p) for p in keep}
        self._remove_stale_tmp()
        groups: dict[str, list[Path]] = {}
        for path in self.entries():
            groups.setdefault(path.name.split(".")[0] + path.parent.name, []).append(path)
        stamped = []
        total = 0
        for files in groups.values():
            size = sum(_size(p) for p in files)
            total += size
            if not keep.intersection(files):
                stamped.append((max(_mtime(p) for p in files), size, files))
        deleted: list[Path] = []
        for _, size, files in sorted(stamped, key=lambda s: s[0]):
            if total <= self.max_bytes:
                break
            # the array first: without it the metadata alone is never read
            for path in sorted(files, key=lambda p: not p.name.endswith(".npy")):
                try:
                    path.unlink()
                    deleted.append(path)
                except FileNotFoundError:
                    pass
            total -= size
        return deleted

    def _remove_stale_tmp(self) -> None:
        now = time.time()
        for sub in ("volumes", "index"):
            folder = self.folder / sub
            try:
                names = os.listdir(folder)
            except OSError:
                continue
            for name in names:
                if _TMP.match(name) and now - _mtime(folder / name) > _STALE_TMP_S:
                    try:
                        (folder / name).unlink()
                    except OSError:
                        pass

    @staticmethod
    def _write(path: Path, write) -> None:
        """Write through a uniquely named temporary file in the same folder, then rename it into place."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name[:32]}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as f:
                write(f)
            os.replace(tmp, path)
        except BaseException:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass
