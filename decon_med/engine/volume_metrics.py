"""Per-case 3D scores of label volumes, and the volumes themselves, from slice predictions.

A NIfTI case is evaluated slice by slice (:mod:`decon_med.engine.evaluate`); :class:`VolumeCases` gathers the
predicted slices of each case, puts them back on the stored voxel grid (the exact inverse of the slicing,
:func:`~decon_med.data.volumes.labels_to_volume`) and scores the volume against the label file, per foreground
class (:func:`case_scores`; the CSV column is ``<score>_<class>``):

* ``dice``: :class:`monai.metrics.DiceMetric`; ``iou``: :class:`monai.metrics.MeanIoU`;
* ``hd95``: :class:`monai.metrics.HausdorffDistanceMetric` with ``percentile=95``, in mm (the voxel spacing of the
  file's affine is passed to MONAI);
* ``nsd``: normalised surface Dice (:func:`monai.metrics.compute_surface_dice`) at a tolerance in mm, default
  :data:`SURFACE_TOLERANCE_MM` = 2 mm: the share of both boundaries lying within the tolerance of the other. 2 mm
  is about one voxel of the scans this package slices (in-plane 0.5-1.5 mm, slices 1-3 mm), so a one-voxel
  disagreement at the boundary, which is within the variation between human raters, is not counted as an error;
  1 mm would fail a boundary one 2.5 mm slice off. Set it per structure with ``decon-med evaluate
  --surface-tolerance MM``;
* ``vol_pred_ml`` / ``vol_gt_ml``: volume of the class in the prediction and the ground truth, in ml (voxels x
  the voxel volume from the spacing);
* ``fp_voxels`` / ``fn_voxels``: voxels predicted as the class outside it, and voxels of the class missed;
* ``empty``: ``none``, ``gt`` (the class is absent from the ground truth), ``pred`` (absent from the prediction)
  or ``both``.

**Empty-case rules** (:data:`RULES`, also written into ``metrics_<split>.json``):

* ground truth empty, prediction not: Dice, IoU and NSD are 0 (a false positive is an error, as in nnU-Net);
* both empty: Dice, IoU, NSD and HD95 are NaN, the case is counted as ``empty`` for that class and left out of
  that class's means (nnU-Net's default, ``ignore_empty``): the summary shows ``n`` valid of ``N`` cases;
* exactly one of the two empty: HD95 is the diagonal of the image in mm (the largest distance the volume holds),
  as some challenges score a missed or hallucinated structure; never NaN, never dropped.

:func:`summarise` gives, per class and score, ``n`` (finite values), ``N`` (cases), mean, SD (``ddof=1``) and
median, and the counts of each empty case. Optionally each case's predicted volume is written as
``<case>_seg.nii.gz`` with the image's affine and header, after the recorded post-processing
(:mod:`decon_med.engine.postprocess`) when given.

Example:
    >>> scores = case_scores(prediction, truth, classes=3, spacing=(0.8, 0.8, 2.5))
    >>> len(scores["dice"]), scores["empty"]
    (2, ['none', 'gt'])
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU, compute_surface_dice

from decon_med.data.geometry import to_canonical, voxel_spacing
from decon_med.data.layout_base import Layout
from decon_med.data.volumes import SliceOptions, VolumeSlices, labels_to_volume, read_volume, write_volume
from decon_med.engine.postprocess import largest_components
from decon_med.errors import DataError
from decon_med.folders import atomic_write

#: Numeric scores per foreground class, in CSV column order (each followed by the class's ``empty`` column).
METRICS = ("dice", "iou", "hd95", "nsd", "vol_pred_ml", "vol_gt_ml", "fp_voxels", "fn_voxels")
#: Scores that need surface distances (skipped by ``distances=False``).
DISTANCE_METRICS = ("hd95", "nsd")
#: Default surface-Dice tolerance in mm (see the module docstring for why 2 mm).
SURFACE_TOLERANCE_MM = 2.0
#: Values of the per-class ``empty`` column.
EMPTY_STATES = ("none", "gt", "pred", "both")

#: The empty-case rules, as written into ``metrics_<split>.json``.
RULES = {
    "gt_empty_pred_not": "Dice, IoU and NSD are 0 (false positive on an empty ground truth)",
    "both_empty": "Dice, IoU, NSD and HD95 are NaN: counted as 'both' under empty and left out of n valid",
    "hd95_one_empty": "HD95 is the image diagonal in mm when exactly one of prediction and ground truth is empty",
    "sd": "sample standard deviation (ddof=1) over the n valid cases; NaN when n < 2",
}

__all__ = [
    "METRICS",
    "RULES",
    "SURFACE_TOLERANCE_MM",
    "VolumeCases",
    "case_columns",
    "case_scores",
    "foreground_dice",
    "summarise",
    "write_case_csv",
]


def case_scores(
    prediction: np.ndarray,
    truth: np.ndarray,
    classes: int,
    spacing: Sequence[float],
    tolerance_mm: float = SURFACE_TOLERANCE_MM,
    distances: bool = True,
) -> dict[str, list]:
    """Every score of :data:`METRICS`, and ``empty``, of each foreground class ``1..classes-1`` of one volume.

    The empty-case rules of the module docstring apply.

    Args:
        prediction: integer class indices, any spatial shape.
        truth: ground-truth class indices of the same shape.
        classes: number of classes, background included.
        spacing: voxel size along each axis of the arrays, in mm.
        tolerance_mm: surface-Dice tolerance in mm.
        distances: also compute HD95 and NSD (the costly part); ``False`` leaves them NaN.

    Returns:
        ``{"dice": [...], "iou": [...], "hd95": [...], ..., "empty": [...]}``, one value per foreground class.

    Example:
        >>> scores = case_scores(np.ones((4, 4, 4)), np.ones((4, 4, 4)), 2, (1.0, 1.0, 1.0))
        >>> scores["dice"], scores["hd95"], scores["vol_gt_ml"], scores["empty"]
        ([1.0], [0.0], [0.064], ['none'])
    """
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from truth shape {truth.shape}")
    if len(spacing) != truth.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match {truth.ndim} spatial axes")
    if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise ValueError(f"surface tolerance must be a finite number of mm >= 0, got {tolerance_mm}")
    pred = torch.from_numpy(np.ascontiguousarray(prediction))
    true = torch.from_numpy(np.ascontiguousarray(truth))
    scores: dict[str, list] = {name: [] for name in (*METRICS, "empty")}
    # ignore_empty=False: an empty truth with a non-empty prediction scores 0; both empty is set to NaN below
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    iou = MeanIoU(include_background=True, reduction="none", ignore_empty=False)
    hd95 = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    spacing = [float(s) for s in spacing]
    voxel_ml = float(np.prod(spacing)) / 1000.0
    diagonal = float(np.sqrt(sum((n * s) ** 2 for n, s in zip(truth.shape, spacing, strict=True))))
    nan = float("nan")
    for cls in range(1, classes):  # one class at a time: two binary volumes in memory, never a one-hot stack
        p_mask, t_mask = pred == cls, true == cls
        n_pred, n_true = int(p_mask.sum()), int(t_mask.sum())
        overlap = int((p_mask & t_mask).sum())
        empty = EMPTY_STATES[(n_true == 0) + 2 * (n_pred == 0)]
        scores["empty"].append(empty)
        scores["vol_pred_ml"].append(n_pred * voxel_ml)
        scores["vol_gt_ml"].append(n_true * voxel_ml)
        scores["fp_voxels"].append(n_pred - overlap)
        scores["fn_voxels"].append(n_true - overlap)
        if empty == "both":
            for metric in ("dice", "iou", "hd95", "nsd"):
                scores[metric].append(nan)
            continue
        p, t = p_mask[None, None].float(), t_mask[None, None].float()
        scores["dice"].append(float(dice(p, t)[0, 0]))
        scores["iou"].append(float(iou(p, t)[0, 0]))
        if not distances:
            scores["hd95"].append(nan)
            scores["nsd"].append(nan)
        elif empty != "none":
            scores["hd95"].append(diagonal)
            scores["nsd"].append(0.0)
        else:
            with warnings.catch_warnings():  # MONAI's deprecation notes, not one warning per case
                warnings.simplefilter("ignore", UserWarning)
                warnings.simplefilter("ignore", FutureWarning)
                scores["hd95"].append(float(hd95(p, t, spacing=spacing)[0, 0]))
                nsd = compute_surface_dice(
                    p, t, [float(tolerance_mm)], include_background=True, spacing=spacing
                )
                scores["nsd"].append(float(nsd[0, 0]))
        for metric in (dice, iou, hd95):
            metric.reset()
    return scores


def case_columns(names: Sequence[str]) -> list[str]:
    """The score columns of the per-case CSV for foreground class ``names``: ``<score>_<class>``, class by class.

    Example:
        >>> case_columns(["liver"])[:3], case_columns(["liver"])[-1]
        (['dice_liver', 'iou_liver', 'hd95_liver'], 'empty_liver')
    """
    return [f"{metric}_{name}" for name in names for metric in (*METRICS, "empty")]


class VolumeCases:
    """Gathers predicted slices per NIfTI case; scores and/or saves each case once all its slices are in.

    Args:
        items: the dataset items of the evaluated split (2D images among them are ignored).
        layout: their layout (maps raw label values to classes).
        opts: the slicing options the items were made with.
        names: the class names, background first (the CSV columns use the others).
        score: compute per-case scores (needs labels).
        out: write ``<case>_seg.nii.gz`` predictions here.
        tolerance_mm: surface-Dice tolerance.
        distances: compute HD95 and NSD (``False``: Dice, IoU, volumes and counts only, for validation).
        postprocess: classes whose largest 3D connected component alone is kept before scoring and saving.
        on_case: called as ``on_case(case, prediction, truth, spacing)`` for every scored case (the prediction
            after ``postprocess``), e.g. to try post-processing (:class:`~decon_med.engine.postprocess.ComponentTrial`).

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
        tolerance_mm: float = SURFACE_TOLERANCE_MM,
        distances: bool = True,
        postprocess: Sequence[int] = (),
        on_case: Callable[[str, np.ndarray, np.ndarray, Sequence[float]], None] | None = None,
    ):
        self.layout, self.opts, self.names, self.score, self.out = layout, opts, list(names), score, out
        self.tolerance_mm, self.distances, self.on_case = tolerance_mm, distances, on_case
        self.postprocess = tuple(int(c) for c in postprocess)
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
        if self.postprocess:
            volume = largest_components(volume, len(self.names), only=self.postprocess)
        if self.out is not None:
            target = self.out / f"{_safe(case)}_seg.nii.gz"
            write_volume(target, volume.astype(np.uint8), None, reference=item["image"])
            self.written.append(str(target))
        if self.score and item.get("label"):
            truth = self._truth(item["label"], shape)
            spacing = voxel_spacing(affine)
            scores = case_scores(
                volume, truth, len(self.names), spacing, self.tolerance_mm, distances=self.distances
            )
            row: dict[str, Any] = {"case": case, "image": item["image"], "label": item["label"]}
            for c, name in enumerate(self.names[1:]):
                for metric in (*METRICS, "empty"):
                    row[f"{metric}_{name}"] = scores[metric][c]
            self.rows.append(row)
            if self.on_case is not None:
                self.on_case(case, volume, truth, spacing)

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


def _stats(values: Sequence[float], total: int) -> dict[str, float | int]:
    """``n`` finite values of ``total`` cases, their mean, sample SD and median (NaN when undefined)."""
    finite = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    nan = float("nan")
    return {
        "n": int(finite.size),
        "N": int(total),
        "mean": float(finite.mean()) if finite.size else nan,
        "sd": float(finite.std(ddof=1)) if finite.size > 1 else nan,
        "median": float(np.median(finite)) if finite.size else nan,
    }


def summarise(rows: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """Per foreground class: the count of each empty case and, per score, ``n`` valid of ``N``, mean, SD, median.

    Nothing is dropped silently: a NaN (both empty) lowers ``n``, and ``empty`` says why.

    Args:
        rows: the per-case rows of :class:`VolumeCases`.
        names: the foreground class names (the CSV columns' suffixes).

    Example:
        >>> rows = [{"dice_liver": 0.9, "empty_liver": "none"}, {"dice_liver": float("nan"), "empty_liver": "both"}]
        >>> summarise(rows, ["liver"])["liver"]["dice"]
        {'n': 1, 'N': 2, 'mean': 0.9, 'sd': nan, 'median': 0.9}
    """
    summary: dict[str, Any] = {}
    for name in names:
        per_class: dict[str, Any] = {
            "empty": {state: sum(r.get(f"empty_{name}") == state for r in rows) for state in EMPTY_STATES[1:]}
        }
        for metric in METRICS:
            column = f"{metric}_{name}"
            if rows and column in rows[0]:
                per_class[metric] = _stats([float(r[column]) for r in rows], len(rows))
        summary[name] = per_class
    return summary


def foreground_dice(rows: Sequence[dict[str, Any]], names: Sequence[str]) -> float:
    """Mean over the foreground classes of each class's mean per-case Dice (the checkpoint-selection score).

    Failures count: a missed structure and a false positive on an empty ground truth are Dice 0; a class empty in
    both is not scored for that case; a class never scored is left out (NaN when none is scored).

    Example:
        >>> foreground_dice([{"dice_a": 1.0, "dice_b": 0.0}, {"dice_a": 0.5, "dice_b": float("nan")}], ["a", "b"])
        0.375
    """
    means = [_stats([float(r[f"dice_{name}"]) for r in rows], len(rows))["mean"] for name in names]
    means = [m for m in means if math.isfinite(m)]
    return float(np.mean(means)) if means else float("nan")


def write_case_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """One row per case (``case``, ``image``, ``label``, then ``<score>_<class>`` columns), atomically."""
    columns = list(rows[0]) if rows else ["case", "image", "label"]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, text.getvalue())
