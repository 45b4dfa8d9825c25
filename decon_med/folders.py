"""Folders the package owns: a marker written first, a manifest of every path written, deletion of only those.

A folder the package writes (a run folder, a synthetic dataset, an export, an experiment) holds a marker file
(``.decon-run``, ``.decon-synth``, ``.decon-export``, ``.decon-experiment``) written before anything else, and a
manifest ``.decon-manifest``: one line per path the package created there, appended *before* the path is created,
so that a process killed at any moment leaves no file it wrote unrecorded. Ownership is decided by the manifest, never by a file's name:

- ``--overwrite`` removes exactly the recorded files, then the recorded folders that are left empty; anything else
  (a user's ``notes.txt``, a copy placed in ``checkpoints/``) stays where it is;
- a write never replaces an existing file the manifest does not list (:func:`record_written` refuses it);
- ``*.tmp`` leftovers of a killed write are removed only when their final path is recorded;
- a folder without a marker is never treated as the package's, whatever it holds.

A marked folder without a manifest (written before manifests existed, or marked by hand) owns nothing: its
files are all treated as foreign, so they are never deleted or replaced.

:func:`atomic_write` is the one write-to-temporary-then-rename of the package; it records the path first.
:func:`check_not_input` keeps every output away from the inputs of a command.

Example:
    >>> owned = OwnedFolder(Path("runs/x"), RUN_MARKER)
    >>> owned.create()                                  # makes the folder, writes the marker and the manifest
    >>> atomic_write(Path("runs/x/config.yaml"), "a: 1\\n")   # recorded, then written
    >>> owned.clear()                                   # removes config.yaml; the marker stays
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from decon_med.errors import DeconError

#: Foreign entries named in an error before "... and N more".
MAX_LISTED = 5

RUN_MARKER = ".decon-run"
SYNTH_MARKER = ".decon-synth"
EXPORT_MARKER = ".decon-export"
EXPERIMENT_MARKER = ".decon-experiment"
MANIFEST = ".decon-manifest"
LOCK = ".decon-lock"

#: marker -> (what the folder is, names of the top-level entries the package writes there). The names are used
#: only to refuse starting over a foreign file at a name the package would write; never to decide what may be
#: deleted.
MARKERS: dict[str, tuple[str, tuple[str, ...]]] = {
    RUN_MARKER: (
        "run folder",
        (
            "config.yaml",
            "metrics.csv",
            "tb",
            "checkpoints",
            "last.ckpt",
            "best.ckpt",
            "done.json",
            "val.csv",
            "results.json",
            "init_report.json",
            "train_ids.json",
            "metrics_*.json",
            "metrics_*.csv",
            "per_case_*.csv",
            "predictions_*",
            "health*",
            "probe.csv",
            "mlflow.json",
        ),
    ),
    SYNTH_MARKER: (
        "synthetic dataset folder",
        (
            "ISIC-2017_*",
            "Annotation-Training400",
            "REFUGE-*",
            "Training400",
            "Test400",
            "images",
            "masks",
            "splits.json",
            "sub-*",
            "unlabeled",
            "labeled",
            "imagesTr",
            "labelsTr",
            "imagesTs",
            "dataset.json",
            "datalist.json",
        ),
    ),
    EXPORT_MARKER: (
        "export folder",
        ("encoder.safetensors", "encoder_decoder.safetensors", "smp", "export.json"),
    ),
    EXPERIMENT_MARKER: (
        "experiment folder",
        ("experiment.yaml", "results.csv", "summary.csv", "paired.csv", "overwrite.json", "failed", "runs"),
    ),
}

#: Files of the package's own bookkeeping in a marked folder.
BOOKKEEPING: tuple[str, ...] = (*MARKERS, MANIFEST, LOCK)


def resolved_path(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def check_deletable(folder: str | os.PathLike, data_roots: Iterable[str | os.PathLike | None] = ()) -> None:
    """Raise a DeconError if ``folder`` is ``/``, the home folder, the current folder or a parent of it, or a
    data root or a folder holding one.

    Example:
        >>> check_deletable(".")
        Traceback (most recent call last):
        decon_med.errors.DeconError: .: refusing to delete the contents of the current folder or a parent of it
    """
    target = resolved_path(folder)
    if target == Path(target.anchor):
        raise DeconError(f"{folder}: refusing to delete the contents of the file-system root")
    if target == resolved_path(Path.home()):
        raise DeconError(f"{folder}: refusing to delete the contents of the home folder")
    cwd = resolved_path(Path.cwd())
    if cwd == target or target in cwd.parents:
        raise DeconError(f"{folder}: refusing to delete the contents of the current folder or a parent of it")
    for root in data_roots:
        if root is None:
            continue
        data = resolved_path(root)
        if data == target or target in data.parents:
            raise DeconError(f"{folder}: refusing to delete the contents of the data root {root}")


def overlap(target: Path, path: str | os.PathLike, description: str) -> str | None:
    """How the resolved ``target`` meets ``path`` (named ``description``): ``"is the <description>"``, ``"holds the
    <description> <path>"``, ``"lies inside the <description> <path>"``, or ``None`` when they are apart."""
    source = resolved_path(path)
    if target == source:
        return f"is the {description}"
    if target in source.parents:
        return f"holds the {description} {path}"
    if source in target.parents:
        return f"lies inside the {description} {path}"
    return None


def check_not_input(
    destination: str | os.PathLike,
    inputs: Iterable[tuple[str, str | os.PathLike | None]],
    what: str = "output",
) -> None:
    """Raise a DeconError when ``destination`` is an input, holds one, or lies inside an input folder.

    Args:
        destination: the file or folder a command is about to write.
        inputs: ``(description, path)`` pairs of what the command reads (``None`` paths are skipped).
        what: how the destination is named in the error (``"--out"``, ``"out_dir"``...).

    ``--overwrite`` never overrides this rule.

    Example:
        >>> check_not_input("data/isic/masks", [("data root", "data/isic")], "--out")
        Traceback (most recent call last):
        decon_med.errors.DeconError: data/isic/masks: --out lies inside the data root data/isic; ...
    """
    target = resolved_path(destination)
    for description, path in inputs:
        if path is None or str(path) == "":
            continue
        problem = overlap(target, path, description)
        if problem is None:
            continue
        raise DeconError(
            f"{destination}: {what} {problem}; decon-med never writes where it reads its inputs "
            "(--overwrite does not change this): choose another destination"
        )


# -- the manifest --------------------------------------------------------------------------------------------


def owning_folder(path: str | os.PathLike) -> Path | None:
    """The nearest folder above ``path`` holding one of the package's markers, or ``None``."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    for folder in path.parents:
        if any((folder / marker).is_file() for marker in MARKERS):
            return folder
    return None


def _marker_of(folder: Path) -> str | None:
    return next((m for m in MARKERS if (folder / m).is_file()), None)


class Manifest:
    """The ``.decon-manifest`` of a marked folder: relative POSIX paths, folders ending in ``/``.

    Lines are appended with one ``write`` on an ``O_APPEND`` descriptor, so a killed process leaves at worst a
    torn last line, which is ignored.
    """

    _cache: dict[Path, tuple[int, set[str]]] = {}

    def __init__(self, root: Path):
        self.root = Path(root)
        self.path = self.root / MANIFEST

    def entries(self) -> set[str]:
        """Every recorded path (none when the manifest is missing)."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return set()
        cached = Manifest._cache.get(self.path)
        if cached is not None and cached[0] == size:
            return cached[1]
        entries: set[str] = set()
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    value = json.loads(line)
                except ValueError:
                    continue  # a torn last line
                if isinstance(value, str):
                    entries.add(value)
        Manifest._cache[self.path] = (size, entries)
        return entries

    def add(self, relative: Iterable[str]) -> None:
        """Append the paths that are not recorded yet."""
        known = self.entries()
        new = [r for r in dict.fromkeys(relative) if r not in known]
        if not new:
            return
        data = "".join(json.dumps(r) + "\n" for r in new).encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        known.update(new)
        Manifest._cache[self.path] = (self.path.stat().st_size, known)

    def rewrite(self, entries: Iterable[str]) -> None:
        """Replace the manifest by ``entries`` (sorted), atomically."""
        text = "".join(json.dumps(r) + "\n" for r in sorted(set(entries)))
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.path)
        Manifest._cache.pop(self.path, None)


def _relative(root: Path, path: Path, directory: bool) -> str:
    rel = Path(os.path.abspath(path)).relative_to(Path(os.path.abspath(root))).as_posix()
    return rel + "/" if directory else rel


def record_written(path: str | os.PathLike, directory: bool = False, just_written: bool = False) -> None:
    """Record ``path`` (and the folders above it that do not exist yet) in the manifest of the marked folder that
    holds it, before it is created. Outside any marked folder this does nothing.

    ``just_written``: the package's own call has just created ``path`` through a library that names its files
    itself (TensorBoard, smp); record it although it exists.

    Raises:
        DeconError: ``path`` exists in a marked folder and the package did not write it.
    """
    path = Path(os.path.abspath(Path(path).expanduser()))
    root = owning_folder(path)
    if root is None:
        return
    manifest = Manifest(root)
    rel = _relative(root, path, directory)
    known = manifest.entries()
    if rel in known:
        return
    if os.path.lexists(path) and not (directory and path.is_dir()) and not just_written:
        raise DeconError(
            f"{path}: exists and decon-med did not write it; refusing to replace it (move it or choose another "
            "folder)"
        )
    new = []
    for parent in reversed(path.parents):
        if parent == root or root not in parent.parents:
            continue
        parent_rel = _relative(root, parent, True)
        if parent_rel not in known and not parent.exists():
            new.append(parent_rel)
    if not (directory and path.is_dir()):
        new.append(rel)
    manifest.add(new)


def make_folder(path: str | os.PathLike) -> Path:
    """``mkdir -p`` that records the folders it creates inside a marked folder."""
    path = Path(path)
    record_written(path, directory=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


def record_new_files(folder: Path, before: set[Path]) -> None:
    """Record the files that appeared in ``folder`` since ``before`` (for writers that name their own files, such
    as TensorBoard's event files)."""
    for entry in sorted(folder.iterdir()):
        if entry not in before and entry.is_file():
            record_written(entry, just_written=True)


def atomic_write(path: str | os.PathLike, content: str | bytes | Callable[[IO[bytes]], None]) -> Path:
    """Write ``content`` (text, bytes, or a function writing to a binary file) to ``path`` atomically: recorded
    first, written to ``<path>.tmp``, flushed, fsynced and renamed over ``path``, so a crash leaves either the old
    file or the new one.

    Example:
        >>> atomic_write(Path("runs/x/done.json"), json.dumps({"step": 10}))
        PosixPath('runs/x/done.json')
    """
    path = Path(path)
    record_written(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def remove_written(path: str | os.PathLike) -> bool:
    """Delete the file ``path`` when the manifest of its marked folder lists it; anything else stays. Returns
    whether it was deleted."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    root = owning_folder(path)
    if root is None or not (path.is_file() or path.is_symlink()):
        return False
    if _relative(root, path, False) not in Manifest(root).entries():
        return False
    path.unlink()
    return True


# -- owned folders -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OwnedFolder:
    """A folder the package writes, identified by its marker file.

    Attributes:
        root: the folder.
        marker: name of the marker file written first (a key of :data:`MARKERS`).
    """

    root: Path
    marker: str

    @property
    def what(self) -> str:
        return MARKERS[self.marker][0]

    @property
    def names(self) -> tuple[str, ...]:
        """Patterns of the top-level names the package writes in such a folder."""
        return MARKERS[self.marker][1]

    @property
    def manifest(self) -> Manifest:
        return Manifest(self.root)

    def is_marked(self) -> bool:
        return (self.root / self.marker).is_file()

    def entries(self) -> list[Path]:
        """Top-level entries other than the package's bookkeeping files, sorted (empty for a missing folder)."""
        if not self.root.is_dir():
            return []
        return sorted(e for e in self.root.iterdir() if e.name not in BOOKKEEPING)

    def recorded(self) -> set[str]:
        return self.manifest.entries() if self.is_marked() else set()

    def foreign(self) -> list[Path]:
        """Top-level entries the manifest does not list (everything, in an unmarked folder)."""
        recorded = self.recorded()
        return [e for e in self.entries() if e.name not in recorded and e.name + "/" not in recorded]

    def is_empty(self) -> bool:
        """No entry other than the package's bookkeeping files."""
        return not self.entries()

    def describe(self, entries: Sequence[Path]) -> str:
        names = [e.name + ("/" if e.is_dir() else "") for e in entries]
        more = f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
        return ", ".join(names[:MAX_LISTED]) + more

    def describe_foreign(self) -> str:
        return self.describe(self.foreign())

    def collisions(self) -> list[Path]:
        """Foreign top-level files at the fixed names the package writes here (a fresh start must not write over
        them). A foreign folder at such a name is shared: the files written into it are checked one by one."""
        fixed = {p for p in self.names if not any(c in p for c in "*?[")}
        return [e for e in self.foreign() if e.name in fixed and not (e.is_dir() and not e.is_symlink())]

    def check_no_collisions(self) -> None:
        """Raise a DeconError naming the foreign entries that sit where the package is about to write."""
        clashing = self.collisions()
        if clashing:
            raise DeconError(
                f"{self.root}: holds {self.describe(clashing)}, which decon-med did not write, where a new "
                f"{self.what} writes; move them or choose another folder"
            )

    def create(self) -> None:
        """Make the folder (and parents) and write the marker and an empty manifest, before anything else."""
        self.root.mkdir(parents=True, exist_ok=True)
        marker = self.root / self.marker
        if not marker.is_file():
            marker.write_text(
                "written by decon-med; --overwrite removes only the paths listed in .decon-manifest\n"
            )
        if not self.manifest.path.is_file():
            self.manifest.rewrite(())

    def clear(self, data_roots: Iterable[str | os.PathLike | None] = (), guard: bool = True) -> list[Path]:
        """Remove the recorded files, then the recorded folders left empty; returns what was kept (foreign
        entries and recorded folders that still hold foreign files). The marker stays.

        ``guard`` first applies :func:`check_deletable` (never the root, home, current folder or a data root).

        Raises:
            DeconError: the folder is not marked, or must never be emptied.
        """
        if not self.root.is_dir():
            return []
        if guard:
            check_deletable(self.root, data_roots)
        if not self.is_marked():
            raise DeconError(f"{self.root}: not a {self.what} written by decon-med; refusing to overwrite it")
        recorded = self.manifest.entries()
        kept_dirs = []
        for rel in sorted((r for r in recorded if not r.endswith("/")), key=len, reverse=True):
            target = self.root / rel
            if target.is_symlink() or target.is_file():
                target.unlink()
            (target.with_name(target.name + ".tmp")).unlink(missing_ok=True)
        for rel in sorted((r for r in recorded if r.endswith("/")), key=lambda r: r.count("/"), reverse=True):
            target = self.root / rel.rstrip("/")
            if target.is_dir() and not target.is_symlink():
                try:
                    target.rmdir()
                except OSError:
                    kept_dirs.append(rel)
        self.manifest.rewrite(kept_dirs)
        return [self.root / r.rstrip("/") for r in kept_dirs] + self.foreign()

    def remove_stale_tmp(self) -> list[Path]:
        """Delete the ``<path>.tmp`` files a killed write left behind, for recorded paths only."""
        removed = []
        for rel in sorted(self.recorded()):
            if rel.endswith("/"):
                continue
            tmp = self.root / (rel + ".tmp")
            if tmp.is_file() and not tmp.is_symlink():
                tmp.unlink()
                removed.append(tmp)
        return removed
