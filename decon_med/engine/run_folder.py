"""The run folder of ``pretrain`` and ``finetune``: start, resume, overwrite, one writer, and what a run may delete.

A run folder is marked by a ``.decon-run`` file written before anything else, and lists every path the run wrote
in its manifest (:mod:`decon_med.folders`). ``--overwrite`` removes exactly those paths; files the package did not
write stay, and a foreign file where a new run would write (a user's ``config.yaml``, ``metrics.csv``...) stops the
run before anything is deleted. A folder without the marker is never a run, whatever it holds. The run folder may
not be, hold or lie inside an input (the data root, the init weights): see :func:`run_inputs`.

``--resume`` continues from ``last.ckpt``; on a folder without a checkpoint yet it starts from step 0 (removing
the run's own files only, after the same checks as ``--overwrite``); on a finished run it does nothing and says
so. ``<path>.tmp`` files left by a killed write are removed, for recorded paths only, whenever a run starts.

While a command writes into a run folder it holds the folder's lock (:mod:`decon_med.locks`): a second writer
stops with one line naming the first.

Example:
    >>> with run_folder_lock(cfg.out_dir, "pretrain"):
    ...     checkpoint = prepare_run_folder(RunPaths(Path("runs/ml")), cfg, resume=True, overwrite=False)
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from decon_med import distributed
from decon_med.config import flatten, to_dict, upgrade_config
from decon_med.engine.checkpoint import load_checkpoint
from decon_med.errors import DeconError
from decon_med.folders import RUN_MARKER, OwnedFolder, check_deletable, check_not_input
from decon_med.locks import folder_lock

#: Marker file of a run folder, written first.
MARKER = RUN_MARKER

#: Config keys that may differ when a run is resumed (they do not change what is computed).
RESUMABLE_KEYS: tuple[str, ...] = (
    "train.epochs",
    "out_dir",
    "data.num_workers",
    "train.keep_checkpoints",
    "train.prune_finished",
    "train.checkpointing",  # recomputes activations, changes no value: switch it on to resume on a smaller GPU
    "train.health_patience",
    "data.cache_gb",
    "data.cache_dir",
    "train.loggers",  # where metrics are mirrored, not what is computed
    "train.mlflow_experiment",
)


def run_folder(root: str | Path) -> OwnedFolder:
    """The :class:`~decon_med.folders.OwnedFolder` of a run folder."""
    return OwnedFolder(Path(root), MARKER)


def is_run(root: str | Path) -> bool:
    """True for a folder holding the run marker."""
    return run_folder(root).is_marked()


def run_inputs(cfg: Any) -> list[tuple[str, Any]]:
    """``(description, path)`` of what a run reads and must never write into: the data root and the init."""
    inputs: list[tuple[str, Any]] = [("data root", cfg.data.root)]
    init = getattr(cfg, "init", None)
    if init:
        inputs.append(("init weights", init))
    return inputs


def check_config_files(out_dir: str | Path, files: list[str]) -> None:
    """Refuse an ``out_dir`` that is, holds or lies inside a config file the command read, unless that file is
    the run's own saved ``config.yaml`` (``--resume`` from it).

    Raises:
        DeconError: naming the config file.
    """
    root = Path(out_dir).expanduser()
    recorded = run_folder(root).recorded()
    for file in files:
        path = Path(file).expanduser()
        if path.resolve().parent == root.resolve() and path.name in recorded:
            continue
        check_not_input(root, [("config file", file)], "out_dir")


@contextlib.contextmanager
def run_folder_lock(root: str | Path, command: str) -> Iterator[None]:
    """Hold the run folder's lock (rank 0 only) for the body.

    A non-empty folder without the run marker is not locked (the run refuses it without writing anything).
    """
    root = Path(root).expanduser()
    owned = run_folder(root)
    lockable = distributed.is_main_process() and not (
        root.exists() and (not root.is_dir() or (not owned.is_empty() and not owned.is_marked()))
    )
    with folder_lock(root, command, enabled=lockable):
        yield


def resume_is_noop(paths: Any, cfg: Any, resume: bool, overwrite: bool) -> bool:
    """True for ``resume`` on a run whose ``done.json`` says it finished the schedule ``cfg`` asks for
    (pre-training resumed with more ``train.epochs`` is not finished); then it prints so on rank 0.

    Raises:
        DeconError: both ``resume`` and ``overwrite``.
    """
    if resume and overwrite:
        raise DeconError("pass either --resume or --overwrite, not both")
    if not (resume and already_finished(paths, cfg)):
        return False
    saved = _saved_config(paths)
    if saved is not None:  # a changed config is an error, not a silent no-op
        check_resumable(saved, to_dict(cfg), paths.root, defaults=to_dict(type(cfg)()))
    if distributed.is_main_process():
        print(f"{paths.root}: the run has already finished; nothing to resume", file=sys.stderr)
    return True


def _saved_config(paths: Any) -> dict[str, Any] | None:
    """The config a finished run saved (``config.yaml``), or ``None`` when it cannot be read."""
    try:
        saved = yaml.safe_load(paths.config.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return saved if isinstance(saved, dict) else None


def already_finished(paths: Any, cfg: Any) -> bool:
    """True when ``done.json`` says the run finished the schedule ``cfg`` asks for (pre-training resumed with
    more ``train.epochs`` is not finished)."""
    if not is_run(paths.root) or not paths.done.is_file():
        return False
    try:
        done = json.loads(paths.done.read_text())
    except (OSError, ValueError):
        return False
    epochs = done.get("epochs") if isinstance(done, dict) else None
    return not (isinstance(epochs, int) and cfg.train.epochs > epochs)


def prepare_run_folder(paths: Any, cfg: Any, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Check what ``paths.root`` holds against the flags, then make it ready; returns the checkpoint to resume
    from, or ``None`` to start at step 0.

    Under torchrun every process checks, then rank 0 alone changes the folder: it removes the run's own files
    (``overwrite``, or ``resume`` without a checkpoint), writes the marker and removes stale ``*.tmp`` files of
    recorded paths. Call it inside :func:`run_folder_lock`.

    Raises:
        DeconError: the folder is or overlaps an input, holds something other than a run, holds a run and
            neither ``resume`` nor ``overwrite`` was given, the resumed config differs, or a foreign file sits
            where the new run writes.
    """
    checkpoint, clear = _check(paths, cfg, resume=resume, overwrite=overwrite)
    distributed.barrier()  # every process has looked before rank 0 changes anything
    if distributed.is_main_process():
        owned = run_folder(paths.root)
        if clear:
            owned.clear(data_roots=[cfg.data.root], guard=overwrite)
        owned.create()
        owned.remove_stale_tmp()
    distributed.barrier()
    return checkpoint


def _check(paths: Any, cfg: Any, resume: bool, overwrite: bool) -> tuple[dict[str, Any] | None, bool]:
    """(checkpoint to resume from, whether the run's own files go first)."""
    root = paths.root
    if resume and overwrite:
        raise DeconError("pass either --resume or --overwrite, not both")
    if root.exists() and not root.is_dir():
        raise DeconError(f"{root}: exists and is not a folder")
    check_not_input(root, run_inputs(cfg), "out_dir")
    owned = run_folder(root)
    occupied = not owned.is_empty()
    if occupied and not owned.is_marked():
        raise DeconError(
            f"{root}: folder is not empty and holds no run ({owned.describe_foreign()}; no .decon-run marker); "
            "choose another out_dir"
        )
    if overwrite:
        if occupied:  # fail before any work, on every process
            check_deletable(root, [cfg.data.root])
            owned.check_no_collisions()
        return None, occupied
    if resume:
        if not paths.last.is_file():
            if paths.done.is_file() and cfg.train.prune_finished:
                raise DeconError(
                    f"{root}: finished run kept only its selected weights (train.prune_finished); nothing to resume"
                )
            owned.check_no_collisions()
            if distributed.is_main_process():
                print(f"{root}: no checkpoint yet; starting from step 0", file=sys.stderr)
            return None, occupied
        checkpoint = load_checkpoint(paths.last)
        if "optimizer" not in checkpoint:
            raise DeconError(
                f"{root}: finished run kept only its selected weights (train.prune_finished); nothing to resume"
            )
        check_resumable(checkpoint["config"], to_dict(cfg), root, defaults=to_dict(type(cfg)()))
        return checkpoint, False
    if paths.done.is_file():
        raise DeconError(f"{root}: finished run exists; pass --overwrite to replace it")
    if occupied:
        raise DeconError(
            f"{root}: unfinished run exists; pass --resume to continue it or --overwrite to replace it"
        )
    return None, False


def check_resumable(
    saved: dict[str, Any], new: dict[str, Any], root: Path, defaults: dict[str, Any] | None = None
) -> None:
    """Raise a DeconError naming every config key that differs (except :data:`RESUMABLE_KEYS`).

    ``train.epochs`` may only grow. A key the saved config does not hold (a run written before the key existed) is
    no difference when the new config leaves it at its value in ``defaults``. A saved config in the flat ``ssl``
    format is compared at the current keys (:func:`decon_med.config.upgrade_config`).
    """
    old_flat, new_flat = flatten(upgrade_config(saved)), flatten(new)
    default_flat = flatten(defaults) if defaults is not None else {}

    def differs(key: str) -> bool:
        if key in RESUMABLE_KEYS:
            return False
        if key not in old_flat and key in default_flat and new_flat.get(key) == default_flat[key]:
            return False
        if key == "data.channel_names" and old_flat.get(key) is None:
            return (
                False  # a run saved before the names were recorded: loading now fills them from dataset.json
            )
        return old_flat.get(key) != new_flat.get(key)

    differing = sorted(key for key in old_flat.keys() | new_flat.keys() if differs(key))
    if differing:
        details = ", ".join(f"{k} ({old_flat.get(k)!r} -> {new_flat.get(k)!r})" for k in differing)
        raise DeconError(f"{root}: cannot resume, the config differs from the saved run in {details}")
    old_epochs, new_epochs = old_flat["train.epochs"], new_flat["train.epochs"]
    if new_epochs < old_epochs:
        raise DeconError(
            f"{root}: cannot resume, train.epochs may only be extended (saved {old_epochs}, given {new_epochs})"
        )
