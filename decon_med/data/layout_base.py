"""What every dataset layout shares: the :class:`Layout` base class, file helpers and split assignment.

A layout lists MONAI-style items ``{"image": path, "label": path | None, "id": str}``; NIfTI volumes are expanded
into one item per kept slice (with ``"slice"``, ``"axis"``, ``"range"``, ``"size"``, ``"modality"`` and
``"group"`` = the volume's id, so splits and label fractions never separate the slices of one scan).

Example:
    >>> class MyLayout(Layout):
    ...     name = "mine"
    ...     def _pairs(self, split, labeled):
    ...         return [(Path("a.nii.gz"), Path("a_seg.nii.gz"))]
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from decon_med.config import DataConfig
from decon_med.data.intensity import channel_handling
from decon_med.data.io import file_stem, is_image, is_nifti
from decon_med.data.splits import kfold_split
from decon_med.data.volume_cache import scan_progress
from decon_med.data.volumes import SliceOptions, scan_volume
from decon_med.errors import DataError

SPLITS = ("train", "val", "test")


def slice_options(cfg: DataConfig) -> SliceOptions:
    """NIfTI slicing options from the data config (each channel's handling from :func:`channel_names`)."""
    names = channel_names(cfg)
    modality = (
        cfg.modality if isinstance(cfg.modality, str) else tuple((str(k), v) for k, v in cfg.modality.items())
    )
    windows = cfg.ct_window
    ct_window = (
        tuple(tuple(w) for w in windows) if windows and isinstance(windows[0], list) else tuple(windows)
    )
    root = Path(cfg.root).expanduser()
    return SliceOptions(
        axis=cfg.slice_axis,
        modality=modality,
        root=str(root if root.is_dir() else root.parent),
        clip_percentiles=tuple(cfg.clip_percentiles),
        ct_window=ct_window,
        mr_normalisation=cfg.mr_normalisation,
        foreground_threshold=cfg.foreground_threshold,
        min_foreground=cfg.min_foreground,
        channels=cfg.in_channels // (2 * cfg.context_slices + 1),  # one slice's channels (2.5D stacks 2k+1)
        orientation=cfg.orientation,
        spacing=cfg.spacing,
        select=None if cfg.channels is None else tuple(cfg.channels),
        affine_tolerance=cfg.affine_tolerance,
        cache_dir=cfg.cache_dir,
        cache_gb=cfg.cache_gb,
        channel_modalities=None if names is None else tuple(channel_handling(n) for n in names),
    )


def channel_names(cfg: DataConfig) -> tuple[str, ...] | None:
    """The names of the input channels: ``data.channel_names``, else (``nnunet``, ``datalist``) those of the
    dataset's JSON, else ``None`` (every channel follows ``data.modality``).

    Example:
        >>> channel_names(DataConfig(name="nnunet", root="Dataset005_Prostate"))
        ('T2', 'ADC')
    """
    if cfg.channel_names is not None:
        return tuple(str(n) for n in cfg.channel_names)
    if cfg.name in ("nnunet", "datalist"):
        return dataset_channel_names(cfg)
    return None


def dataset_channel_names(cfg: DataConfig) -> tuple[str, ...] | None:
    """``channel_names`` (nnU-Net) or ``modality`` (MSD) of the dataset's JSON, in ``data.channels`` order; ``None``
    when the file, the entry or a selected channel is missing (the layout reports a broken file itself).

    Example:
        >>> dataset_channel_names(DataConfig(name="nnunet", root="Dataset001_BraTS", channels=[3, 0]))
        ('FLAIR', 'T1')
    """
    root = Path(cfg.root).expanduser()
    if cfg.name == "nnunet" and not root.is_dir():
        return None
    path = root / "dataset.json" if root.is_dir() else root
    try:
        names = _json_channel_names(str(path), path.stat().st_mtime_ns)
    except OSError:
        return None
    if names is None:
        return None
    order = sorted(names) if cfg.channels is None else list(cfg.channels)
    return tuple(names[c] for c in order) if all(c in names for c in order) else None


@functools.lru_cache(maxsize=16)
def _json_channel_names(path: str, mtime: int) -> dict[int, str] | None:
    try:
        meta = json.loads(Path(path).read_text())
        names = meta.get("channel_names") or meta.get("modality")
        return {int(k): str(v) for k, v in names.items()} if isinstance(names, dict) and names else None
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def data_channels(cfg: DataConfig, names: tuple[str, ...]) -> int:
    """Network input channels that channels ``names`` give: one per channel, one per CT window for a CT channel,
    times the ``2k + 1`` slices of ``data.context_slices: k``.

    Example:
        >>> data_channels(DataConfig(ct_window=[[40, 400], [-600, 1500]]), ("CT", "T2"))
        3
    """
    windows = len(cfg.ct_window) if cfg.ct_window and isinstance(cfg.ct_window[0], list) else 1
    per_slice = sum(windows if channel_handling(n) == "ct" else 1 for n in names)
    return per_slice * (2 * getattr(cfg, "context_slices", 0) + 1)


def check_in_channels(cfg: DataConfig, source: str | Path) -> None:
    """Raise when the named channels (:func:`channel_names`) give more than one channel per slice and
    ``data.in_channels`` is not their count (a single channel is replicated); ``source`` names the dataset file.

    Raises:
        DataError: e.g. ``dataset.json: gives 2 input channels (T2, ADC) but data.in_channels is 3; set
            data.in_channels=2``.

    Example:
        >>> check_in_channels(DataConfig(name="nnunet", root="Dataset005_Prostate", in_channels=2), "dataset.json")
    """
    names = channel_names(cfg)
    if names is None:
        return
    count = data_channels(cfg, names)
    per_slice = count // (2 * getattr(cfg, "context_slices", 0) + 1)
    if per_slice > 1 and cfg.in_channels != count:
        raise DataError(
            source,
            f"gives {count} input channels ({', '.join(names)}) but data.in_channels is {cfg.in_channels}; "
            f"set data.in_channels={count}",
        )


class Layout:
    """Base class: a dataset's file layout and mask encoding.

    Subclasses set ``name``, ``class_names`` and ``mask_values`` (raw grey value of each class, in class order)
    and implement :meth:`_pairs`.
    """

    name = ""
    class_names: tuple[str, ...] = ()
    #: Raw mask value of each class index; ``None`` means the masks already hold class indices.
    mask_values: tuple[int, ...] | None = None
    #: True for layouts without labels anywhere (their items are always pre-training images).
    images_only = False
    #: Human-readable description of the expected tree, used in error messages and docs.
    expected_tree = ""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.root = Path(cfg.root).expanduser()
        #: Per split listed: ``{"skipped": Counter(rule -> slices), "modalities": Counter, "warnings": [...]}``.
        self.stats: dict[str, dict] = {}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def check_root(self) -> None:
        """Raise :class:`DataError` if the root folder is missing or empty."""
        if not self.root.is_dir():
            raise DataError(self.root, f"dataset root not found (data.name={self.name})")
        if not any(self.root.iterdir()):
            raise DataError(self.root, "dataset root is empty")

    def items(self, split: str = "train", labeled: bool = True) -> list[dict]:
        """Items of one split, sorted by id. ``labeled=False`` lists images only (masks need not exist).

        The empty-slice rule (``data.min_foreground``) applies to the training split listed without labels
        (pre-training), and to the labelled training split only with ``data.skip_empty: train``; labelled val and
        test volumes keep every slice. What each rule skipped is in ``self.stats[split]``.
        """
        if split not in SPLITS:
            raise ValueError(f"unknown split '{split}'; expected one of {SPLITS}")
        self.check_root()
        pairs = self._pairs(split, labeled)
        skip = split == "train" and (not labeled or self.images_only or self.cfg.skip_empty == "train")
        stats: dict = {"skipped": Counter(), "modalities": Counter(), "warnings": []}
        items = []
        volumes = sum(is_nifti(image[0] if isinstance(image, list) else image) for image, _ in pairs)
        for image, label in scan_progress(pairs, f"scanning {split} volumes", volumes):
            items.extend(self._expand(image, label, skip, stats))
        self.stats[split] = stats
        return sorted(items, key=lambda it: it["id"])

    def label_lut(self) -> np.ndarray | None:
        """Lookup table raw value -> class index (-1 for values that are not allowed), or ``None``."""
        if self.mask_values is None:
            return None
        lut = np.full(256, -1, dtype=np.int64)
        for index, value in enumerate(self.mask_values):
            lut[value] = index
        return lut

    def allowed_values(self) -> set[int]:
        """Raw mask values a valid mask may contain."""
        if self.mask_values is not None:
            return set(self.mask_values)
        return set(range(self.num_classes))

    def map_label(self, raw: np.ndarray, path: str | Path) -> np.ndarray:
        """Raw mask values -> int64 class indices; an unexpected value is a :class:`DataError` naming the file."""
        bad = sorted(set(np.unique(raw).tolist()) - self.allowed_values())
        if bad:
            allowed = sorted(self.allowed_values())
            raise DataError(path, f"mask values {bad[:8]} outside the expected set {allowed}")
        lut = self.label_lut()
        return raw.astype(np.int64) if lut is None else lut[raw]

    # -- for subclasses ------------------------------------------------------------------------------------
    def _pairs(self, split: str, labeled: bool) -> list[tuple[Path | list[Path], Path | None]]:
        """``(image, label)`` pairs of a split; ``image`` may be a list of files, one per channel."""
        raise NotImplementedError

    def _expand(
        self, image: Path | list[Path], label: Path | None, skip: bool = True, stats: dict | None = None
    ) -> list[dict]:
        """One item for a 2D image; one per (kept) slice for a NIfTI volume (or one file per channel)."""
        files = image if isinstance(image, list) else [image]
        image = files[0]
        item_id = self._item_id(image)
        if not is_nifti(image):
            if len(files) > 1:
                raise DataError(image, "several channel files are supported for NIfTI volumes only")
            return [
                {
                    "image": str(image),
                    "label": None if label is None else str(label),
                    "id": item_id,
                    "group": item_id,
                }
            ]
        source = files if len(files) > 1 else image
        slices = scan_volume(source, slice_options(self.cfg), id_prefix=item_id, skip_empty=skip, stats=stats)
        if not slices:
            raise DataError(
                image,
                f"yields no 2D slice: constant or all-NaN intensities, or no slice has {self.cfg.min_foreground:g} "
                "foreground (data.min_foreground); remove the file or lower data.min_foreground",
            )
        for item in slices:
            item["label"] = None if label is None else str(label)
            item["group"] = item_id
        return slices

    def _item_id(self, image: Path) -> str:
        return file_stem(image)


# -- helpers shared by the official layouts ------------------------------------------------------------------
def _find_dir(root: Path, pattern: str, exclude: str | None = None, depth: int = 3) -> Path | None:
    """First folder (breadth-first, up to ``depth`` levels) whose lower-cased name fully matches ``pattern``."""
    regex = re.compile(pattern)
    skip = re.compile(exclude) if exclude else None
    level = [root]
    for _ in range(depth):
        nxt = []
        for folder in level:
            for child in sorted(p for p in folder.iterdir() if p.is_dir()):
                name = child.name.lower()
                if regex.fullmatch(name) and not (skip and skip.search(name)):
                    return child
                nxt.append(child)
        level = nxt
    return None


def _files(folder: Path, keep: Iterable[str] | None = None) -> list[Path]:
    """Image files below ``folder`` (recursive, hidden files skipped), sorted."""
    found = []
    for path in sorted(folder.rglob("*")):
        if path.name.startswith(".") or not path.is_file():
            continue
        if is_image(path) or is_nifti(path):
            found.append(path)
    if keep is not None:
        regex = re.compile("|".join(keep))
        found = [p for p in found if regex.fullmatch(p.name.lower())]
    return found


def _by_key(paths: list[Path], key) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in paths:
        k = key(path)
        if k in out:
            raise DataError(path, f"duplicate id '{k}' (also {out[k]})")
        out[k] = path
    return out


def _match(images: dict[str, Path], masks: dict[str, Path], mask_dir: Path) -> list[tuple[Path, Path]]:
    """Pair images with masks by key; a missing partner is a :class:`DataError` naming the file."""
    for key, image in images.items():
        if key not in masks:
            raise DataError(image, f"image has no mask in {mask_dir}")
    for key, mask in masks.items():
        if key not in images:
            raise DataError(mask, "mask has no matching image")
    return [(images[k], masks[k]) for k in sorted(images)]


def _require(folder: Path | None, root: Path, what: str, tree: str) -> Path:
    if folder is None:
        raise DataError(root, f"{what} not found; expected layout:\n{tree}")
    if not any(folder.iterdir()):
        raise DataError(folder, f"{what} is empty")
    return folder


def _holdout(ids: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[str]]:
    """Seeded train / val / test split of ids; each held-out split gets at least one id when asked for."""
    ids = sorted(ids)
    n_test = max(1, round(len(ids) * test_fraction)) if test_fraction > 0 else 0
    n_val = max(1, round(len(ids) * val_fraction)) if val_fraction > 0 else 0
    if n_test + n_val >= len(ids):
        raise DataError("splits", f"{len(ids)} images are too few for a val/test hold-out; add a splits.json")
    rest, test = train_test_split(ids, test_size=n_test, random_state=seed) if n_test else (ids, [])
    train, val = train_test_split(rest, test_size=n_val, random_state=seed) if n_val else (rest, [])
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}


def assign_splits(
    ids: list[str],
    cfg: DataConfig,
    fixed: dict[str, list[str]] | None = None,
    test_ids: list[str] | None = None,
) -> dict[str, list[str]]:
    """Train / val / test case ids of a labelled layout, seeded and deterministic.

    * ``fixed`` (a ``splits.json``): used as given, unless ``data.fold`` is set, which re-splits its train + val
      cases into ``data.num_folds`` folds (fold ``data.fold`` is val) and keeps its test cases.
    * ``test_ids`` (a labelled test set shipped apart from ``ids``): the test split; ``ids`` give train and val.
    * otherwise ``data.test_fraction`` of ``ids`` is held out for test, and the rest is split by fold
      (``data.fold``) or by ``data.val_fraction``.

    Example:
        >>> assign_splits([f"case{i}" for i in range(10)], DataConfig(name="nnunet", fold=0, num_folds=5))["val"]
        ['case3', 'case9']
    """
    ids = sorted(ids)
    if fixed is not None and cfg.fold is None:
        return {split: sorted(fixed.get(split, [])) for split in SPLITS}
    if fixed is not None:
        pool, test = (
            sorted(set(fixed.get("train", [])) | set(fixed.get("val", []))),
            sorted(fixed.get("test", [])),
        )
    elif test_ids is not None:
        pool, test = ids, sorted(test_ids)
    elif cfg.fold is None:
        return _holdout(ids, cfg.val_fraction, cfg.test_fraction, seed=0)
    else:
        rest = _holdout(ids, 0.0, cfg.test_fraction, seed=0)
        pool, test = rest["train"], rest["test"]
    if cfg.fold is not None:
        train, val = kfold_split(pool, cfg.num_folds, cfg.fold, seed=0)
        return {"train": train, "val": val, "test": test}
    split = _holdout(pool, cfg.val_fraction, 0.0, seed=0)
    return {"train": split["train"], "val": split["val"], "test": test}
