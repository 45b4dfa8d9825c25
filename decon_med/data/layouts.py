"""Dataset layouts: which files make up each split, and how mask values map to classes.

A layout lists MONAI-style items ``{"image": path, "label": path | None, "id": str}``; NIfTI volumes are expanded
into one item per kept slice (with ``"slice"``, ``"axis"``, ``"range"`` and ``"group"`` = the volume's id, so
splits and label fractions never separate the slices of one scan).

Example:
    >>> layout = get_layout(DataConfig(name="isic2017", root="/data/isic2017"))
    >>> items = layout.items("train")            # 2000 dicts for the official training set
    >>> layout.num_classes, layout.class_names
    (2, ('background', 'lesion'))
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from decon_med.config import DataConfig
from decon_med.data.io import file_stem, is_image, is_nifti
from decon_med.data.volumes import SliceOptions, scan_volume
from decon_med.errors import DataError

SPLITS = ("train", "val", "test")


def slice_options(cfg: DataConfig) -> SliceOptions:
    """NIfTI slicing options from the data config."""
    return SliceOptions(
        axis=cfg.slice_axis,
        modality=cfg.modality,
        clip_percentiles=tuple(cfg.clip_percentiles),
        ct_window=tuple(cfg.ct_window),
        foreground_threshold=cfg.foreground_threshold,
        min_foreground=cfg.min_foreground,
        channels=cfg.in_channels,
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
    #: Human-readable description of the expected tree, used in error messages and docs.
    expected_tree = ""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.root = Path(cfg.root).expanduser()

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
        """Items of one split, sorted by id. ``labeled=False`` lists images only (masks need not exist)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split '{split}'; expected one of {SPLITS}")
        self.check_root()
        pairs = self._pairs(split, labeled)
        items = []
        for image, label in pairs:
            items.extend(self._expand(image, label))
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
    def _pairs(self, split: str, labeled: bool) -> list[tuple[Path, Path | None]]:
        raise NotImplementedError

    def _expand(self, image: Path, label: Path | None) -> list[dict]:
        """One item for a 2D image; one per kept slice for a NIfTI volume."""
        item_id = self._item_id(image)
        if not is_nifti(image):
            return [
                {
                    "image": str(image),
                    "label": None if label is None else str(label),
                    "id": item_id,
                    "group": item_id,
                }
            ]
        slices = scan_volume(image, slice_options(self.cfg), id_prefix=item_id)
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


# -- ISIC 2017 ------------------------------------------------------------------------------------------------
class Isic2017(Layout):
    """ISIC 2017 lesion segmentation (Part 1) in its official layout.

    Masks hold 0 (background) and 255 (lesion). ``*_superpixels.png`` files and CSVs in the data folders are
    ignored. The official splits have 2000 / 150 / 600 images.
    """

    name = "isic2017"
    class_names = ("background", "lesion")
    mask_values = (0, 255)
    official_counts = {"train": 2000, "val": 150, "test": 600}
    _split_words = {"train": "training", "val": "validation", "test": r"test(_v2)?"}
    expected_tree = (
        "  ROOT/ISIC-2017_Training_Data/ISIC_0000000.jpg\n"
        "  ROOT/ISIC-2017_Training_Part1_GroundTruth/ISIC_0000000_segmentation.png\n"
        "  ROOT/ISIC-2017_Validation_Data/ + ISIC-2017_Validation_Part1_GroundTruth/\n"
        "  ROOT/ISIC-2017_Test_v2_Data/ + ISIC-2017_Test_v2_Part1_GroundTruth/"
    )

    def _pairs(self, split, labeled):
        word = self._split_words[split]
        data_dir = _require(
            _find_dir(self.root, rf"isic-2017_{word}_data"),
            self.root,
            f"ISIC 2017 {split} image folder",
            self.expected_tree,
        )
        images = _by_key(_files(data_dir, [r"isic_\d+\.(jpe?g|png)"]), lambda p: p.stem.lower())
        if not images:
            raise DataError(data_dir, "no ISIC_*.jpg images in this folder")
        if not labeled:
            return [(images[k], None) for k in sorted(images)]
        gt_dir = _require(
            _find_dir(self.root, rf"isic-2017_{word}_part1_groundtruth"),
            self.root,
            f"ISIC 2017 {split} ground-truth folder",
            self.expected_tree,
        )
        masks = _by_key(
            _files(gt_dir, [r"isic_\d+_segmentation\.png"]),
            lambda p: p.stem.lower().removesuffix("_segmentation"),
        )
        return _match(images, masks, gt_dir)


# -- REFUGE ---------------------------------------------------------------------------------------------------
class Refuge(Layout):
    """REFUGE optic disc / cup segmentation in its official layout.

    Mask greys 255 / 128 / 0 become classes 0 background, 1 disc (rim), 2 cup. Images may be jpg, png or bmp,
    folder names in any capitalisation, with or without the ``REFUGE-`` prefix and with the doubled folder
    level that some archives unpack to.
    """

    name = "refuge"
    class_names = ("background", "disc", "cup")
    mask_values = (255, 128, 0)
    official_counts = {"train": 400, "val": 400, "test": 400}
    # (image folder pattern, ground-truth folder pattern) per split, matched against lower-cased names.
    _dirs = {
        "train": (r"(refuge-)?training400", r"(refuge-)?annotation-training400"),
        "val": (r"(refuge-)?validation400", r"(refuge-)?validation400-gt"),
        "test": (r"(refuge-)?test400", r"(refuge-)?test(400)?-gt"),
    }
    expected_tree = (
        "  ROOT/Training400/{Glaucoma,Non-Glaucoma}/g0001.jpg\n"
        "  ROOT/Annotation-Training400/Disc_Cup_Masks/{Glaucoma,Non-Glaucoma}/g0001.bmp\n"
        "  ROOT/REFUGE-Validation400/V0001.jpg + ROOT/REFUGE-Validation400-GT/Disc_Cup_Masks/V0001.bmp\n"
        "  ROOT/Test400/T0001.jpg + ROOT/REFUGE-Test-GT/Disc_Cup_Masks/{G,N}/T0001.bmp"
    )

    def _pairs(self, split, labeled):
        image_pat, gt_pat = self._dirs[split]
        data_dir = _require(
            _find_dir(self.root, image_pat, exclude=r"gt|annotation"),
            self.root,
            f"REFUGE {split} image folder",
            self.expected_tree,
        )
        images = _by_key(_files(data_dir), lambda p: p.stem.lower())
        if not images:
            raise DataError(data_dir, "no images in this folder")
        if not labeled:
            return [(images[k], None) for k in sorted(images)]
        gt_dir = _require(
            _find_dir(self.root, gt_pat), self.root, f"REFUGE {split} ground-truth folder", self.expected_tree
        )
        mask_dir = _find_dir(gt_dir, r"disc_cup_masks") or gt_dir
        masks = _by_key(_files(mask_dir), lambda p: p.stem.lower())
        return _match(images, masks, mask_dir)


# -- generic labelled folder ------------------------------------------------------------------------------------
class LabeledFolder(Layout):
    """A folder with ``images/`` and ``masks/`` matched by file stem; masks hold class indices.

    PNG/JPG/BMP/TIFF or NIfTI (3D volumes become 2D slices; splits keep each volume whole). Splits come from an
    optional ``splits.json`` (``{"train": [ids], "val": [...], "test": [...]}``), otherwise from a seeded random
    hold-out of ``data.val_fraction`` / ``data.test_fraction``.
    """

    name = "folder"
    expected_tree = (
        "  ROOT/images/<id>.png|.jpg|.nii.gz\n"
        "  ROOT/masks/<id>.png|.nii.gz   (class indices 0..num_classes-1)\n"
        "  ROOT/splits.json              (optional)"
    )

    def __init__(self, cfg: DataConfig):
        super().__init__(cfg)
        n = cfg.num_classes or 2
        self.class_names = tuple(cfg.class_names) if cfg.class_names else tuple(f"class{i}" for i in range(n))

    def _pairs(self, split, labeled):
        image_dir = _require(
            _find_dir(self.root, "images", depth=1), self.root, "images/ folder", self.expected_tree
        )
        images = _by_key(_files(image_dir), file_stem)
        if not images:
            raise DataError(image_dir, "no images in this folder")
        ids = self._split_ids(sorted(images), split)
        if not labeled:
            return [(images[k], None) for k in ids]
        mask_dir = _require(
            _find_dir(self.root, "masks|labels", depth=1), self.root, "masks/ folder", self.expected_tree
        )
        pairs = _match(images, _by_key(_files(mask_dir), file_stem), mask_dir)
        keep = set(ids)
        return [(img, mask) for img, mask in pairs if file_stem(img) in keep]

    def _split_ids(self, ids: list[str], split: str) -> list[str]:
        splits_file = self.root / "splits.json"
        if splits_file.is_file():
            try:
                splits = json.loads(splits_file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DataError(splits_file, f"not valid JSON ({exc})") from exc
            if not isinstance(splits, dict) or split not in splits:
                raise DataError(splits_file, f"has no '{split}' list")
            unknown = sorted(set(splits[split]) - set(ids))
            if unknown:
                raise DataError(splits_file, f"'{split}' lists ids with no image: {unknown[:5]}")
            return sorted(splits[split])
        return _holdout(ids, self.cfg.val_fraction, self.cfg.test_fraction, seed=0)[split]


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


# -- unlabelled folder tree ---------------------------------------------------------------------------------------
class UnlabeledFolder(Layout):
    """Any folder tree of 2D images and/or NIfTI volumes, for pre-training; no masks anywhere.

    Every file is one item (a volume: one per kept slice); ids are the path relative to the root without suffix,
    so scans with the same file name in different patient folders stay distinct. Only the ``train`` split has
    items.
    """

    name = "unlabeled"
    class_names = ()
    expected_tree = "  ROOT/**/<any name>.png|.jpg|.bmp|.tif|.nii|.nii.gz"

    def _pairs(self, split, labeled):
        if split != "train":
            return []
        files = _files(self.root)
        if not files:
            raise DataError(self.root, "no images or NIfTI volumes found below this folder")
        return [(p, None) for p in files]

    def _item_id(self, image: Path) -> str:
        rel = image.relative_to(self.root)
        return str(rel.parent / file_stem(rel)) if rel.parent != Path(".") else file_stem(rel)


LAYOUTS: dict[str, type[Layout]] = {
    "isic2017": Isic2017,
    "refuge": Refuge,
    "folder": LabeledFolder,
    "unlabeled": UnlabeledFolder,
}


def get_layout(cfg: DataConfig) -> Layout:
    """The layout class for ``cfg.name``; an unknown name lists the valid ones."""
    if cfg.name not in LAYOUTS:
        raise ValueError(f"unknown dataset '{cfg.name}'; choose one of {', '.join(LAYOUTS)}")
    return LAYOUTS[cfg.name](cfg)


def num_classes(cfg: DataConfig) -> int:
    """Number of classes for the config: ``data.num_classes`` if set, else the dataset's own."""
    return cfg.num_classes if cfg.num_classes is not None else get_layout(cfg).num_classes
