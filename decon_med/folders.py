"""Folders the package owns: a marker file written first, and deletion of only what the package wrote.

``--overwrite`` (runs, ``synth``) may delete a folder's contents only when all of these hold:

- the folder is marked (its marker file, e.g. ``.decon-run``, was written before anything else), or, for folders
  written before markers existed, every entry in it is something the package writes;
- it holds no foreign entry (anything the package does not write); foreign entries are listed in the error and
  never touched;
- it is not the file-system root, the home folder, the current folder or one of its parents, and not a data root
  (or a folder holding one).

Then only the package's own entries are removed; the folder itself stays.

Example:
    >>> owned = OwnedFolder(Path("runs/x"), marker=".decon-run", patterns=("config.yaml", "*.ckpt", "tb"))
    >>> owned.create()                       # makes the folder and writes the marker first
    >>> owned.clear(data_roots=["data/isic2017"])   # removes config.yaml, *.ckpt, tb/ (after the checks above)
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from decon_med.errors import DeconError

#: Foreign entries named in an error before "... and N more".
MAX_LISTED = 5


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


@dataclass(frozen=True)
class OwnedFolder:
    """A folder the package writes: its marker file and the glob patterns of the entries it writes.

    Attributes:
        root: the folder.
        marker: name of the marker file written first (it matches no foreign entry).
        patterns: ``fnmatch`` patterns of the top-level entries the package writes there.
    """

    root: Path
    marker: str
    patterns: Sequence[str]

    def is_marked(self) -> bool:
        return (self.root / self.marker).is_file()

    def entries(self) -> list[Path]:
        """Top-level entries, sorted (empty when the folder does not exist)."""
        return sorted(self.root.iterdir()) if self.root.is_dir() else []

    def is_own(self, entry: Path) -> bool:
        """True for the marker, ``*.tmp`` leftovers and entries matching :attr:`patterns`."""
        name = entry.name
        return (
            name == self.marker
            or name.endswith(".tmp")
            or any(fnmatch.fnmatch(name, p) for p in self.patterns)
        )

    def foreign(self) -> list[Path]:
        """Entries the package does not write."""
        return [e for e in self.entries() if not self.is_own(e)]

    def is_empty(self) -> bool:
        """No entry other than the marker."""
        return all(e.name == self.marker for e in self.entries())

    def is_owned(self) -> bool:
        """Marked, or (written before markers existed) non-empty with only entries the package writes."""
        return self.is_marked() or (bool(self.entries()) and not self.foreign())

    def describe_foreign(self) -> str:
        names = [e.name + ("/" if e.is_dir() else "") for e in self.foreign()]
        more = f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
        return ", ".join(names[:MAX_LISTED]) + more

    def create(self) -> None:
        """Make the folder (and parents) and write the marker, before anything else goes in."""
        self.root.mkdir(parents=True, exist_ok=True)
        marker = self.root / self.marker
        if not marker.is_file():
            marker.write_text("written by decon-med; --overwrite removes only what decon-med wrote here\n")

    def clear(
        self,
        data_roots: Iterable[str | os.PathLike | None] = (),
        what: str = "folder",
        keep_foreign: bool = False,
    ) -> None:
        """Remove the package's own entries (not the marker), after the checks of :func:`check_deletable`.

        ``keep_foreign`` (a run restarted from step 0) leaves foreign entries in place instead of refusing, and
        skips :func:`check_deletable`: only the package's own entries go.

        Raises:
            DeconError: the folder is not owned, holds foreign entries (listed), or must never be emptied.
        """
        if not self.root.is_dir():
            return
        if not keep_foreign:
            check_deletable(self.root, data_roots)
        if self.foreign() and not keep_foreign:
            raise DeconError(
                f"{self.root}: holds files that decon-med did not write ({self.describe_foreign()}); "
                f"refusing to overwrite this {what}: move them or choose another folder"
            )
        if not self.is_owned():
            raise DeconError(f"{self.root}: not a {what} written by decon-med; refusing to overwrite it")
        for entry in self.entries():
            if entry.name == self.marker or not self.is_own(entry):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def remove_stale_tmp(self, subfolders: Sequence[str] = ()) -> list[Path]:
        """Delete ``*.tmp`` files a killed write left behind, in the folder and in ``subfolders``."""
        removed = []
        for folder in (self.root, *(self.root / s for s in subfolders)):
            if folder.is_dir():
                for tmp in folder.glob("*.tmp"):
                    if tmp.is_file() and not tmp.is_symlink():
                        tmp.unlink()
                        removed.append(tmp)
        return removed
