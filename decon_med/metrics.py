"""Segmentation metrics computed the way mmsegmentation computes them.

Conventions (those of mmseg's ``IoUMetric``):

* **Whole-split accumulation.** One ``(C, C)`` confusion matrix (rows = ground truth, columns =
  prediction) is summed over every pixel of the split, and the per-class scores are computed once from
  it. This is *not* the mean of per-image scores: a small image and a large one weigh by their pixels,
  and a class missing from one image does not count as a perfect or a zero score there.
* **Background included.** Class 0 is a class like any other and enters mIoU, mDice and mAcc.
* **Absent classes are NaN.** A class that occurs neither in the ground truth nor in the prediction
  over the whole split has IoU and Dice ``0 / 0 = NaN`` and is left out of the means (``nanmean``).
  Accuracy (recall) is NaN for a class absent from the ground truth.
* **Ignored pixels.** Pixels whose target equals ``ignore_index`` (255 by default) are not counted.

Scores are fractions in ``[0, 1]``, returned as plain Python floats so the result is JSON-ready.

Example:
    >>> cm = ConfusionMatrix(num_classes=2)
    >>> for logits, mask in [(torch.tensor([[[[2.0, -1.0]], [[0.0, 3.0]]]]), torch.tensor([[[0, 1]]]))]:
    ...     cm.update(logits, mask)          # (B, C, H, W) logits or (B, H, W) class indices
    >>> cm.all_reduce()                      # sums over processes under torchrun; no-op otherwise
    >>> scores = cm.compute(class_names=["background", "lesion"])
    >>> scores["mIoU"], scores["IoU"]
    (1.0, {'background': 1.0, 'lesion': 1.0})
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from decon_med.distributed import is_distributed

__all__ = ["ConfusionMatrix", "per_image_iou", "segmentation_metrics"]


def _valid_pixels(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check the inputs and return class indices of the counted pixels.

    Args:
        pred: ``(B, ...)`` integer class indices, or ``(B, C, ...)`` logits / probabilities.
        target: ``(B, ...)`` integer class indices.
        num_classes: Number of classes ``C``.
        ignore_index: Target value of pixels that are not counted, or None.

    Returns:
        ``(pred, target, mask)``: ``pred`` and ``target`` as int64 of the target's shape and the boolean
        mask of counted pixels.

    Raises:
        ValueError: If shapes do not match or a class index lies outside ``[0, C)``.
    """
    if pred.dim() == target.dim() + 1:
        if pred.shape[1] != num_classes:
            raise ValueError(f"logits have {pred.shape[1]} channels, expected num_classes={num_classes}")
        pred = pred.argmax(dim=1)
    elif pred.is_floating_point():
        raise ValueError("pred of the target's shape must hold integer class indices, not floats")
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}")
    if target.is_floating_point():
        if not torch.equal(target, target.round()):
            raise ValueError("target must hold integer class indices")
    pred, target = pred.long(), target.to(pred.device).long()

    mask = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    bad = mask & ((target < 0) | (target >= num_classes))
    if bad.any():
        values = torch.unique(target[bad]).tolist()
        raise ValueError(
            f"target holds values {values} outside [0, {num_classes}) (ignore_index={ignore_index})"
        )
    bad = mask & ((pred < 0) | (pred >= num_classes))
    if bad.any():
        values = torch.unique(pred[bad]).tolist()
        raise ValueError(f"pred holds values {values} outside [0, {num_classes})")
    return pred, target, mask


class ConfusionMatrix:
    """Accumulates a (C, C) confusion matrix (rows = ground truth, cols = prediction) over batches, on the tensors' device.

    Args:
        num_classes: Number of classes ``C``, background included.
        ignore_index: Target value of pixels that are not counted; None counts every pixel.
        device: Device of the matrix. None places it on the device of the first batch.

    Example:
        >>> cm = ConfusionMatrix(3)
        >>> cm.update(torch.tensor([[[0, 1, 2]]]), torch.tensor([[[0, 1, 255]]]))
        >>> cm.matrix.tolist()
        [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    """

    def __init__(
        self, num_classes: int, ignore_index: int | None = 255, device: torch.device | str | None = None
    ):
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._device_fixed = device is not None
        self._matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @property
    def matrix(self) -> torch.Tensor:
        """The accumulated int64 ``(C, C)`` counts (rows = ground truth, columns = prediction)."""
        return self._matrix

    def _follow(self, device: torch.device) -> None:
        """Move the matrix to ``device`` unless a device was given at construction."""
        if not self._device_fixed and self._matrix.device != device:
            self._matrix = self._matrix.to(device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch.

        Args:
            pred: ``(B, H, W)`` integer class indices, or ``(B, C, H, W)`` logits (argmax over dim 1).
                Volumes (extra spatial dimensions) work the same way.
            target: ``(B, H, W)`` integer class indices; ``ignore_index`` pixels are skipped.

        Raises:
            ValueError: If shapes do not match or the target holds values outside ``[0, C)`` other than
                ``ignore_index``.
        """
        pred, target, mask = _valid_pixels(pred, target, self.num_classes, self.ignore_index)
        c = self.num_classes
        counts = torch.bincount(target[mask] * c + pred[mask], minlength=c * c).reshape(c, c)
        self._follow(counts.device)
        self._matrix += counts.to(self._matrix.device)

    def reset(self) -> None:
        """Zero the counts."""
        self._matrix.zero_()

    def merge(self, other: ConfusionMatrix) -> None:
        """Add the counts of another matrix with the same number of classes."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        self._matrix += other.matrix.to(self._matrix.device)

    def all_reduce(self) -> None:
        """Sum the counts over torch.distributed processes; a no-op without a process group."""
        if is_distributed():
            dist.all_reduce(self._matrix, op=dist.ReduceOp.SUM)

    def compute(self, class_names: Sequence[str] | None = None) -> dict:
        """Scores of the accumulated counts; see :func:`segmentation_metrics`."""
        return segmentation_metrics(self._matrix, class_names)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with NaN where ``den`` is 0."""
    out = np.full(num.shape, np.nan, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean(values: np.ndarray) -> float:
    """Mean over the non-NaN entries (NaN when there are none, without a warning)."""
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def segmentation_metrics(matrix: torch.Tensor | np.ndarray, class_names: Sequence[str] | None = None) -> dict:
    """Per-class and mean scores of a confusion matrix (mmseg convention, background included).

    Args:
        matrix: ``(C, C)`` counts, rows = ground truth, columns = prediction.
        class_names: ``C`` names used as keys of the per-class dicts; defaults to ``"0"``, ``"1"``, ...

    Returns:
        ``{"mIoU", "mDice", "aAcc", "mAcc": float, "IoU", "Dice", "Acc": {name: float}, "n_pixels": int}``.
        Scores are fractions in ``[0, 1]``. IoU and Dice are NaN for a class absent from both ground truth
        and prediction, Acc (recall) for a class absent from the ground truth; means skip NaN.
        ``aAcc`` is the overall pixel accuracy.

    Raises:
        ValueError: If the matrix is not square or the names do not match its size.

    Example:
        >>> segmentation_metrics(np.array([[3, 1], [0, 0]]))["IoU"]
        {'0': 0.75, '1': 0.0}
    """
    if isinstance(matrix, torch.Tensor):
        matrix = matrix.detach().cpu().numpy()
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"confusion matrix must be square (C, C), got shape {m.shape}")
    c = m.shape[0]
    names = [str(i) for i in range(c)] if class_names is None else [str(n) for n in class_names]
    if len(names) != c:
        raise ValueError(f"{len(names)} class names for {c} classes")

    tp = np.diag(m)
    gt = m.sum(axis=1)
    pr = m.sum(axis=0)
    iou = _ratio(tp, gt + pr - tp)
    dice = _ratio(2 * tp, gt + pr)
    acc = _ratio(tp, gt)
    total = m.sum()
    return {
        "mIoU": _nanmean(iou),
        "mDice": _nanmean(dice),
        "aAcc": float(tp.sum() / total) if total > 0 else math.nan,
        "mAcc": _nanmean(acc),
        "IoU": dict(zip(names, iou.tolist(), strict=True)),
        "Dice": dict(zip(names, dice.tolist(), strict=True)),
        "Acc": dict(zip(names, acc.tolist(), strict=True)),
        "n_pixels": int(total),
    }


@torch.no_grad()
def per_image_iou(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = 255
) -> torch.Tensor:
    """mIoU of each image on its own, for best / worst case views (not the split score).

    Args:
        pred: ``(B, H, W)`` integer class indices or ``(B, C, H, W)`` logits.
        target: ``(B, H, W)`` integer class indices.
        num_classes: Number of classes ``C``, background included.
        ignore_index: Target value of pixels that are not counted, or None.

    Returns:
        ``(B,)`` float64 tensor: per image, the mean IoU over the classes present in its ground truth or
        prediction (NaN for an image with no counted pixel).

    Example:
        >>> per_image_iou(torch.tensor([[[0, 0]], [[0, 1]]]), torch.tensor([[[0, 0]], [[1, 1]]]), 2).tolist()
        [1.0, 0.25]
    """
    pred, target, mask = _valid_pixels(pred, target, num_classes, ignore_index)
    c, b = num_classes, target.shape[0]
    image = torch.arange(b, device=target.device).view(-1, *([1] * (target.dim() - 1))).expand_as(target)
    index = image[mask] * c * c + target[mask] * c + pred[mask]
    m = torch.bincount(index, minlength=b * c * c).reshape(b, c, c).double()
    tp = m.diagonal(dim1=1, dim2=2)
    union = m.sum(dim=2) + m.sum(dim=1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
    return iou.nanmean(dim=1)
