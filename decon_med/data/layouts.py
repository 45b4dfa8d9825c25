"""Dataset layouts: which files make up each split, and how mask values map to classes.

A layout lists MONAI-style items ``{"image": path, "label": path | None, "id": str}``; NIfTI volumes are expanded
into one item per kept slice (see :mod:`decon_med.data.layout_base`). Layouts: ``isic2017``, ``refuge``,
``folder`` (images/ + masks/), ``unlabeled`` (any tree), ``nnunet`` (nnU-Net raw) and ``datalist`` (MSD / MONAI
datalist JSON); the last two are in :mod:`decon_med.data.case_layouts`.

Example:
    >>> layout = get_layout(DataConfig(name="isic2017", root="/data/isic2017"))
    >>> items = layout.items("train")            # 2000 dicts for the official training set
    >>> layout.num_classes, layout.class_names
    (2, ('background', 'lesion'))
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

from decon_med.config import DataConfig
from decon_med.data.case_layouts import Datalist, NnUNetRaw
from decon_med.data.io import file_stem
from decon_med.data.layout_base import (
    SPLITS,
    Layout,
    _by_key,
    _files,
    _find_dir,
    _match,
    _require,
    assign_splits,
    slice_options,
)
from decon_med.data.splits import check_split_lists
from decon_med.errors import DataError

__all__ = ["LAYOUTS", "SPLITS", "Layout", "get_layout", "num_classes", "slice_options"]


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
    hold-out of ``data.val_fraction`` / ``data.test_fraction``; ``data.fold`` picks a cross-validation fold as
    val instead (see :func:`~decon_med.data.layout_base.assign_splits`).
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
        if splits_file.exists() and not splits_file.is_file():  # never fall back to random splits silently
            raise DataError(splits_file, "is not a file; splits.json must be a JSON file of id lists")
        if splits_file.is_file():
            try:
                splits = json.loads(splits_file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DataError(splits_file, f"not valid JSON ({exc})") from exc
            if not isinstance(splits, dict) or split not in splits:
                raise DataError(splits_file, f"has no '{split}' list")
            check_split_lists(splits, splits_file)
            unknown = sorted(set(splits[split]) - set(ids))
            if unknown:
                raise DataError(splits_file, f"'{split}' lists ids with no image: {unknown[:5]}")
            return assign_splits(ids, self.cfg, fixed=splits)[split]
        return assign_splits(ids, self.cfg)[split]


# -- unlabelled folder tree ---------------------------------------------------------------------------------------
#: Folder names (lower case) that hold label maps, never scans.
LABEL_FOLDER = re.compile(
    r"(labels?(tr|ts|va|val)?|masks?|segmentations?|seg|gt|annotations?)|.*ground_?truth.*"
)
#: File stems (lower case) of label maps.
LABEL_FILE = re.compile(r".*[_-](seg|dseg|segmentation|mask|masks|label|labels|gt)")


class UnlabeledFolder(Layout):
    """Any folder tree of 2D images and/or NIfTI volumes, for pre-training; no masks anywhere.

    Every file is one item (a volume: one per kept slice); ids are the path relative to the root without suffix,
    so scans with the same file name in different patient folders stay distinct. Only the ``train`` split has
    items.

    A tree holding label maps is refused, so that they are never pre-trained on as scans: a folder named like
    ``labelsTr``, ``masks``, ``segmentations`` or ``*GroundTruth``, a file named ``*_seg`` / ``*_mask`` /
    ``*_label``, or a volume whose voxels hold only a few integer values. ``data.include`` (globs of the scans,
    relative to the root) reads only the matching files and turns these checks off.
    """

    name = "unlabeled"
    images_only = True
    class_names = ()
    expected_tree = "  ROOT/**/<any name>.png|.jpg|.bmp|.tif|.nii|.nii.gz"

    def _pairs(self, split, labeled):
        if split != "train":
            return []
        files = _files(self.root)
        include = self.cfg.include
        if include is not None:
            files = [p for p in files if _included(p.relative_to(self.root).as_posix(), include)]
            if not files:
                raise DataError(self.root, f"no images or NIfTI volumes match data.include {list(include)}")
        elif files:
            self._refuse_label_maps(files)
        if not files:
            raise DataError(self.root, "no images or NIfTI volumes found below this folder")
        return [(p, None) for p in files]

    def items(self, split: str = "train", labeled: bool = True) -> list[dict]:
        found = super().items(split, labeled)
        labels = self.stats.get(split, {}).get("label_values") or {}
        if labels and self.cfg.include is None:
            path = min(labels)
            raise DataError(
                path,
                f"holds only the integer values {labels[path]}: a label map, not a scan; {self._hint()}",
            )
        return found

    def _refuse_label_maps(self, files: list[Path]) -> None:
        for path in files:
            rel = path.relative_to(self.root)
            folder = next((part for part in rel.parts[:-1] if LABEL_FOLDER.fullmatch(part.lower())), None)
            if folder is not None:
                where = self.root / Path(*rel.parts[: rel.parts.index(folder) + 1])
                raise DataError(
                    where, f"holds label maps (folder name '{folder}'), not scans; {self._hint()}"
                )
            if LABEL_FILE.fullmatch(file_stem(path).lower()):
                raise DataError(path, f"is named as a label map, not a scan; {self._hint()}")

    def _hint(self) -> str:
        nnunet = (self.root / "dataset.json").is_file() and (self.root / "imagesTr").is_dir()
        also = "use data.name=nnunet for this nnU-Net dataset (imagesTr and imagesTs), " if nnunet else ""
        return (
            f"pre-training reads scans only: {also}point data.root at the scans folder, or list the scans with "
            "data.include (globs relative to data.root, e.g. data.include=[imagesTr/*])"
        )

    def _item_id(self, image: Path) -> str:
        rel = image.relative_to(self.root)
        return str(rel.parent / file_stem(rel)) if rel.parent != Path(".") else file_stem(rel)


def _included(relative: str, globs: list[str]) -> bool:
    """``relative`` (a posix path below the root) matches one of ``globs``, as a whole or by its file name."""
    name = relative.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(relative, g.strip("/")) or fnmatch.fnmatchcase(name, g) for g in globs)


LAYOUTS: dict[str, type[Layout]] = {
    "isic2017": Isic2017,
    "refuge": Refuge,
    "folder": LabeledFolder,
    "unlabeled": UnlabeledFolder,
    "nnunet": NnUNetRaw,
    "datalist": Datalist,
}


def get_layout(cfg: DataConfig) -> Layout:
    """The layout class for ``cfg.name``; an unknown name lists the valid ones."""
    if cfg.name not in LAYOUTS:
        raise ValueError(f"unknown dataset '{cfg.name}'; choose one of {', '.join(LAYOUTS)}")
    return LAYOUTS[cfg.name](cfg)


def num_classes(cfg: DataConfig) -> int:
    """Number of classes for the config: ``data.num_classes`` if set, else the dataset's own."""
    return cfg.num_classes if cfg.num_classes is not None else get_layout(cfg).num_classes
