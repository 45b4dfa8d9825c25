"""Per-case 3D scores of label volumes, and the volumes themselves, from slice predictions.

A NIfTI case is evaluated slice by slice (:mod:`decon_med.engine.evaluate`); :class:`VolumeCases` gathers the
predicted slices of each case, puts them back on the stored voxel grid (the exact inverse of the slicing,
:func:`~decon_med.data.volumes.labels_to_volume`) and scores the volume against the label file with MONAI's
metrics, per foreground class:

* ``dice``: :class:`monai.metrics.DiceMetric`;
* ``iou``: :class:`monai.metrics.MeanIoU`;
* ``hd95``: :class:`monai.metrics.HausdorffDistanceMetric` with ``percentile=95``, in mm (the voxel spacing of the
  file's affine is passed to MONAI).

A class absent from the ground truth scores NaN (MONAI's ``ignore_empty``); HD95 is NaN or inf when the
prediction or the ground truth of a class is empty. Optionally each case's predicted volume is written as
``<case>_seg.nii.gz`` with the image's affine and header.

Example:
    >>> scores = case_scores(prediction, truth, classes=3, spacing=(0.8, 0.8, 2.5))
    >>> sorted(scores), len(scores["dice"])
    (['dice', 'hd95', 'iou'], 2)
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU

from decon_med.data.geometry import to_canonical, voxel_spacing
from decon_med.data.layout_base import Layout
from decon_med.data.volumes import SliceOptions, VolumeSlices, labels_to_volume, read_volume, write_volume
from decon_med.errors import DataError
from decon_med.folders import atomic_write

#: Scores per foreground class, in CSV column order.
METRICS = ("dice", "iou", "hd95")

__all__ = ["METRICS", "VolumeCases", "case_scores", "mean_scores", "write_case_csv"]


def case_scores(
    prediction: np.ndarray, truth: np.ndarray, classes: int, spacing: Sequence[float]
) -> dict[str, list[float]]:
    """Dice, IoU and HD95 (mm) of each foreground class ``1..classes-1`` of one label volume.

    Args:
        prediction: integer class indices, any spatial shape.
        truth: ground-truth class indices of the same shape.
        classes: number of classes, background included.
        spacing: voxel size along each axis of the arrays, in mm.

    Returns:
        ``{"dice": [...], "iou": [...], "hd95": [...]}``, one value per foreground class.

    Example:
        >>> case_scores(np.ones((4, 4, 4)), np.ones((4, 4, 4)), 2, (1.0, 1.0, 1.0))
        {'dice': [1.0], 'iou': [1.0], 'hd95': [0.0]}
    """
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from truth shape {truth.shape}")
    if len(spacing) != truth.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match {truth.ndim} spatial axes")
    pred = torch.from_numpy(np.ascontiguousarray(prediction))
    true = torch.from_numpy(np.ascontiguousarray(truth))
    scores: dict[str, list[float]] = {name: [] for name in METRICS}
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=True)
    iou = MeanIoU(include_background=True, reduction="none", ignore_empty=True)
    hd95 = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    spacing = [float(s) for s in spacing]
    for cls in range(1, classes):  # one class at a time: two binary volumes in memory, never a one-hot stack
        p = (pred == cls)[None, None].float()
        t = (true == cls)[None, None].float()
        scores["dice"].append(float(dice(p, t)[0, 0]))
        scores["iou"].append(float(iou(p, t)[0, 0]))
        with warnings.catch_warnings():  # an empty class is NaN / inf by design, not a warning per case
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            scores["hd95"].append(float(hd95(p, t, spacing=spacing)[0, 0]))
        for metric in (dice, iou, hd95):
            metric.reset()
    return scores


class VolumeCases:
    """Gathers predicted slices per NIfTI case; scores and/or saves each case once all its slices are in.

    Args:
        items: the dataset items of the evaluated split (2D images among them are ignored).
        layout: their layout (maps raw label values to classes).
        opts: the slicing options the items were made with.
        names: the class names, background first (the CSV columns use the others).
        score: compute per-case scores (needs labels).
        out: write ``<case>_seg.nii.gz`` predictions here.

    Example:
        >>> cases = VolumeCases(items, layout, slice_options(cfg.data), ["background", "lesion"])
        >>> for sample_id, mask in predictions: cases.add(sample_id, mask)
        >>> rows = cases.finish()            # one dict per case: case, image, label, dice_<class>, ...
    """

    def __init__(
        self,
        items: Sequence[dict],
        layout: Layout,
        opts: SliceOptions,
        names: Sequence[str],
        score: bool = True,
        out: Path | None = None,
    ):
        self.layout, self.opts, self.names, self.score, self.out = layout, opts, list(names), score, out
        self.items = {item["id"]: item for item in items if "slice" in item}
        self.expected: dict[str, int] = {}
        for item in self.items.values():
            self.expected[_case(item)] = self.expected.get(_case(item), 0) + 1
        self.pending: dict[str, dict[int, np.ndarray]] = {}
        self.rows: list[dict[str, Any]] = []
        self.written: list[str] = []

    def handles(self, sample_id: str) -> bool:
        """True when ``sample_id`` is a slice of a NIfTI case."""
        return sample_id in self.items

    def add(self, sample_id: str, mask: np.ndarray) -> None:
        """One predicted slice ``(H, W)`` at its item's square-pixel size."""
        item = self.items[sample_id]
        case = _case(item)
        slices = self.pending.setdefault(case, {})
        slices[int(item["slice"])] = np.asarray(mask, dtype=np.uint8)
        if len(slices) == self.expected[case]:
            self._finish_case(case, item)

    def finish(self) -> list[dict[str, Any]]:
        """Close any case still open; the score rows, sorted by case."""
        for case in list(self.pending):
            first = next(it for it in self.items.values() if _case(it) == case)
            self._finish_case(case, first)
        return sorted(self.rows, key=lambda row: row["case"])

    def _finish_case(self, case: str, item: dict) -> None:
        slices = self.pending.pop(case)
        header = nib.load(item["image"])
        affine = np.asarray(header.affine, dtype=np.float64)
        shape = tuple(int(s) for s in (*header.shape[:3], 1, 1)[:3])  # a 2D file is one slice thick
        _, geometry = to_canonical(np.zeros(shape, dtype=np.uint8), affine, self.opts.orientation)
        axis = int(item["axis"])
        size = tuple(item["size"])
        masks = [slices.get(k, np.zeros(size, dtype=np.uint8)) for k in range(geometry.canonical_shape[axis])]
        volume = labels_to_volume(masks, VolumeSlices([], axis, geometry, item.get("modality", "")))
        if self.out is not None:
            target = self.out / f"{_safe(case)}_seg.nii.gz"
            write_volume(target, volume.astype(np.uint8), None, reference=item["image"])
            self.written.append(str(target))
        if self.score and item.get("label"):
            truth = self._truth(item["label"], shape)
            scores = case_scores(volume, truth, len(self.names), voxel_spacing(affine))
            row: dict[str, Any] = {"case": case, "image": item["image"], "label": item["label"]}
            for c, name in enumerate(self.names[1:]):
                for metric in METRICS:
                    row[f"{metric}_{name}"] = scores[metric][c]
            self.rows.append(row)

    def _truth(self, path: str, shape: tuple[int, ...]) -> np.ndarray:
        data, _ = read_volume(path)
        if data.ndim == 4:
            raise DataError(path, f"label must be a 2D or 3D image, got shape {tuple(data.shape)}")
        if tuple(data.shape) != tuple(shape):
            raise DataError(path, f"label shape {tuple(data.shape)} differs from image shape {tuple(shape)}")
        return self.layout.map_label(np.rint(data).astype(np.int64), path)


def _case(item: dict) -> str:
    return str(item.get("group") or item["image"])


def _safe(name: str) -> str:
    return name.replace("/", "_").replace("\\", "_")


def mean_scores(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean of each score column over the cases, ignoring NaN and inf (NaN when no case has a value).

    Example:
        >>> mean_scores([{"case": "a", "dice_lesion": 0.8}, {"case": "b", "dice_lesion": 0.6}])
        {'dice_lesion': 0.7}
    """
    columns = [key for key in (rows[0] if rows else {}) if key.split("_", 1)[0] in METRICS]
    means = {}
    for column in columns:
        values = [float(r[column]) for r in rows if math.isfinite(float(r[column]))]
        means[column] = float(np.mean(values)) if values else float("nan")
    return means


def write_case_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """One row per case (``case``, ``image``, ``label``, then ``<metric>_<class>`` columns), atomically."""
    columns = list(rows[0]) if rows else ["case", "image", "label"]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, text.getvalue())
