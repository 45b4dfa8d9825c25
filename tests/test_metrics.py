"""Segmentation metrics: cross-checks against scikit-learn and MONAI, and the mmseg conventions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.metrics import DiceMetric, compute_iou
from sklearn.metrics import confusion_matrix, f1_score, jaccard_score

from decon_med.metrics import ConfusionMatrix, per_image_iou, segmentation_metrics

C = 4


def random_batch(seed: int, b: int = 3, h: int = 16, w: int = 20, c: int = C):
    """Random predictions that agree with the target on about half of the pixels."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, c, (b, h, w), generator=g)
    noise = torch.randint(0, c, (b, h, w), generator=g)
    pred = torch.where(torch.rand(b, h, w, generator=g) < 0.5, target, noise)
    return pred, target


def one_hot(x: torch.Tensor, c: int = C) -> torch.Tensor:
    return F.one_hot(x, c).permute(0, 3, 1, 2).float()


def test_matrix_and_scores_match_sklearn():
    pred, target = random_batch(0)
    cm = ConfusionMatrix(C)
    cm.update(pred, target)
    y_true, y_pred = target.flatten().numpy(), pred.flatten().numpy()
    np.testing.assert_array_equal(cm.matrix.numpy(), confusion_matrix(y_true, y_pred, labels=range(C)))
    assert cm.matrix.dtype == torch.int64 and cm.matrix.shape == (C, C)

    scores = cm.compute()
    iou = jaccard_score(y_true, y_pred, labels=range(C), average=None)
    dice = f1_score(y_true, y_pred, labels=range(C), average=None)
    np.testing.assert_allclose(list(scores["IoU"].values()), iou)
    np.testing.assert_allclose(list(scores["Dice"].values()), dice)
    assert scores["mIoU"] == pytest.approx(iou.mean())
    assert scores["mDice"] == pytest.approx(dice.mean())
    assert scores["aAcc"] == pytest.approx((y_true == y_pred).mean())
    assert scores["n_pixels"] == y_true.size


def test_scores_match_monai():
    pred, target = random_batch(1)
    cm = ConfusionMatrix(C)
    cm.update(pred, target)
    scores = cm.compute()

    # The whole split as one image: MONAI's per-class scores equal the accumulated ones.
    as_one = lambda x: x.reshape(1, -1, x.shape[-1])  # noqa: E731
    iou = compute_iou(one_hot(as_one(pred)), one_hot(as_one(target)), include_background=True)[0]
    dice_metric = DiceMetric(include_background=True, reduction="none")
    dice_metric(one_hot(as_one(pred)), one_hot(as_one(target)))
    dice = dice_metric.aggregate()[0]
    np.testing.assert_allclose(list(scores["IoU"].values()), iou.numpy(), rtol=1e-6)
    np.testing.assert_allclose(list(scores["Dice"].values()), dice.numpy(), rtol=1e-6)

    # Per image: MONAI's per-class IoU averaged over classes.
    per_image = compute_iou(one_hot(pred), one_hot(target), include_background=True).nanmean(dim=1)
    np.testing.assert_allclose(per_image_iou(pred, target, C).numpy(), per_image.numpy(), rtol=1e-6)


def test_accumulation_equals_one_update_on_concatenation():
    batches = [random_batch(seed, b=2 + seed) for seed in range(3)]
    cm = ConfusionMatrix(C)
    for pred, target in batches:
        cm.update(pred, target)
    whole = ConfusionMatrix(C)
    whole.update(torch.cat([p for p, _ in batches]), torch.cat([t for _, t in batches]))
    assert torch.equal(cm.matrix, whole.matrix)
    assert cm.compute() == whole.compute()


def test_split_miou_differs_from_mean_of_per_image_miou():
    # Image 0: all background, predicted perfectly -> per-image mIoU 1 (class 1 absent: NaN, skipped).
    # Image 1: one foreground pixel, predicted as background -> IoU 3/4 and 0, mIoU 0.375.
    target = torch.tensor([[[0, 0], [0, 0]], [[0, 0], [0, 1]]])
    pred = torch.zeros_like(target)
    per_image = per_image_iou(pred, target, 2)
    assert per_image.tolist() == [1.0, 0.375]

    cm = ConfusionMatrix(2)
    cm.update(pred, target)
    assert cm.matrix.tolist() == [[7, 0], [1, 0]]
    scores = cm.compute()
    assert scores["IoU"] == {"0": 7 / 8, "1": 0.0}
    assert scores["mIoU"] == pytest.approx(0.4375)
    assert per_image.mean().item() == pytest.approx(0.6875)


def test_ignore_index_pixels_are_excluded():
    pred, target = random_batch(2)
    ignored = torch.rand(target.shape, generator=torch.Generator().manual_seed(3)) < 0.3
    cm = ConfusionMatrix(C)
    cm.update(pred, target.masked_fill(ignored, 255))
    y_true, y_pred = target[~ignored].numpy(), pred[~ignored].numpy()
    np.testing.assert_array_equal(cm.matrix.numpy(), confusion_matrix(y_true, y_pred, labels=range(C)))
    assert cm.compute()["n_pixels"] == int((~ignored).sum())

    custom = ConfusionMatrix(C, ignore_index=-1)
    custom.update(pred, target.masked_fill(ignored, -1))
    assert torch.equal(custom.matrix, cm.matrix)

    everything = ConfusionMatrix(C, ignore_index=None)
    everything.update(pred, target)
    assert everything.matrix.sum() == target.numel()


def test_logits_equal_argmax():
    _, target = random_batch(4)
    logits = torch.randn(target.shape[0], C, *target.shape[1:], generator=torch.Generator().manual_seed(5))
    a, b = ConfusionMatrix(C), ConfusionMatrix(C)
    a.update(logits, target)
    b.update(logits.argmax(dim=1), target)
    assert torch.equal(a.matrix, b.matrix)
    assert torch.equal(per_image_iou(logits, target, C), per_image_iou(logits.argmax(1), target, C))


def test_absent_class_is_nan_and_excluded_from_means():
    pred, target = random_batch(6, c=3)  # class 3 never occurs
    cm = ConfusionMatrix(C)
    cm.update(pred, target)
    scores = cm.compute(class_names=["bg", "a", "b", "never"])
    assert math.isnan(scores["IoU"]["never"]) and math.isnan(scores["Dice"]["never"])
    assert math.isnan(scores["Acc"]["never"])
    present = [scores["IoU"][k] for k in ("bg", "a", "b")]
    assert scores["mIoU"] == pytest.approx(np.mean(present))
    assert scores["mAcc"] == pytest.approx(np.mean([scores["Acc"][k] for k in ("bg", "a", "b")]))


def test_class_only_in_prediction_scores_zero():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[[0, 2]]]), torch.tensor([[[0, 0]]]))
    scores = cm.compute()
    assert scores["IoU"]["0"] == 0.5 and scores["IoU"]["2"] == 0.0
    assert math.isnan(scores["IoU"]["1"])
    assert scores["mIoU"] == pytest.approx(0.25)


def test_perfect_prediction():
    _, target = random_batch(7)
    cm = ConfusionMatrix(C)
    cm.update(target.clone(), target)
    scores = cm.compute()
    for key in ("mIoU", "mDice", "aAcc", "mAcc"):
        assert scores[key] == 1.0
    assert per_image_iou(target, target, C).tolist() == [1.0] * target.shape[0]


def test_results_are_plain_json_floats():
    pred, target = random_batch(8)
    cm = ConfusionMatrix(C)
    cm.update(pred, target)
    scores = cm.compute()
    assert all(type(scores[k]) is float for k in ("mIoU", "mDice", "aAcc", "mAcc"))
    assert type(scores["n_pixels"]) is int
    assert all(type(v) is float for v in scores["IoU"].values())
    assert all(0.0 <= v <= 1.0 for v in scores["IoU"].values())
    json.dumps(scores)


def test_merge_adds_and_reset_zeroes():
    (p1, t1), (p2, t2) = random_batch(9), random_batch(10)
    a, b, both = ConfusionMatrix(C), ConfusionMatrix(C), ConfusionMatrix(C)
    a.update(p1, t1)
    b.update(p2, t2)
    both.update(p1, t1)
    both.update(p2, t2)
    expected = a.matrix + b.matrix
    a.merge(b)
    assert torch.equal(a.matrix, expected) and torch.equal(a.matrix, both.matrix)
    with pytest.raises(ValueError):
        a.merge(ConfusionMatrix(C + 1))
    a.all_reduce()  # no process group: unchanged
    assert torch.equal(a.matrix, expected)
    a.reset()
    assert a.matrix.sum() == 0


def test_segmentation_metrics_accepts_numpy():
    pred, target = random_batch(11)
    cm = ConfusionMatrix(C)
    cm.update(pred, target)
    assert segmentation_metrics(cm.matrix.numpy()) == segmentation_metrics(cm.matrix)
    with pytest.raises(ValueError):
        segmentation_metrics(np.zeros((2, 3)))
    with pytest.raises(ValueError):
        segmentation_metrics(cm.matrix, class_names=["only", "three", "names"])


def test_bad_inputs_raise():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"\[3, 7\]"):
        cm.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([[[0, 3], [7, 255]]]))
    with pytest.raises(ValueError, match=r"\[-1\]"):
        cm.update(torch.zeros(1, 1, 2, dtype=torch.long), torch.tensor([[[-1, 0]]]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="channels"):
        cm.update(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError):
        per_image_iou(torch.zeros(2, 2, 2, dtype=torch.long), torch.full((2, 2, 2), 5), 3)
    assert cm.matrix.sum() == 0


def test_per_image_iou_hand_made():
    target = torch.tensor(
        [
            [[0, 0, 1, 1]],  # IoU: class 0 = 1/3, class 1 = 1/2, class 2 = 0 (predicted only) -> 5/18
            [[2, 2, 2, 255]],  # only class 2, one ignored pixel -> 1
            [[255, 255, 255, 255]],  # nothing counted -> NaN
        ]
    )
    pred = torch.tensor([[[0, 2, 0, 1]], [[2, 2, 2, 0]], [[0, 1, 2, 0]]])
    out = per_image_iou(pred, target, 3)
    assert out.shape == (3,) and out.dtype == torch.float64
    assert out[0].item() == pytest.approx(5 / 18)
    assert out[1].item() == 1.0
    assert math.isnan(out[2].item())
