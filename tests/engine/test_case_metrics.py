"""Per-case 3D scores: empty-case rules, surface Dice, volumes, FP / FN, the summary, and checkpoint selection."""

import math
from pathlib import Path

import numpy as np
import pytest

from decon_med.cli_finetune import SURFACE_TOLERANCE_MM as CLI_TOLERANCE
from decon_med.config import FinetuneConfig, TrainConfig, to_dict
from decon_med.engine.evaluate import format_case_means
from decon_med.engine.finetune import resolve_select_metric, selection_score
from decon_med.engine.run_folder import check_resumable
from decon_med.engine.volume_metrics import (
    SURFACE_TOLERANCE_MM,
    case_columns,
    case_scores,
    foreground_dice,
    summarise,
)
from decon_med.errors import ConfigError, DeconError

SHAPE = (10, 12, 4)
SPACING = (1.0, 2.0, 3.0)
#: sqrt((10 * 1)^2 + (12 * 2)^2 + (4 * 3)^2) mm: the HD95 when exactly one side is empty
DIAGONAL = math.sqrt(10**2 + 24**2 + 12**2)


def _blob() -> np.ndarray:
    volume = np.zeros(SHAPE, dtype=np.int64)
    volume[2:5, 3:7, 1:3] = 1  # 3 x 4 x 2 = 24 voxels
    return volume


def test_false_positive_on_empty_truth_scores_zero_and_the_diagonal():
    scores = case_scores(_blob(), np.zeros(SHAPE, dtype=np.int64), 2, SPACING)
    assert scores["dice"] == [0.0] and scores["iou"] == [0.0] and scores["nsd"] == [0.0]
    assert scores["hd95"] == [pytest.approx(DIAGONAL)]
    assert scores["empty"] == ["gt"] and scores["fp_voxels"] == [24] and scores["fn_voxels"] == [0]


def test_empty_prediction_scores_zero_and_the_diagonal():
    scores = case_scores(np.zeros(SHAPE, dtype=np.int64), _blob(), 2, SPACING)
    assert scores["dice"] == [0.0] and scores["iou"] == [0.0] and scores["nsd"] == [0.0]
    assert scores["hd95"] == [pytest.approx(DIAGONAL)] and scores["empty"] == ["pred"]
    assert scores["fp_voxels"] == [0] and scores["fn_voxels"] == [24]


def test_both_empty_is_nan_and_counted_as_empty():
    empty = np.zeros(SHAPE, dtype=np.int64)
    scores = case_scores(empty, empty, 2, SPACING)
    assert all(math.isnan(scores[m][0]) for m in ("dice", "iou", "hd95", "nsd"))
    assert scores["empty"] == ["both"] and scores["vol_pred_ml"] == [0.0] and scores["fp_voxels"] == [0]
    row = {f"{m}_x": scores[m][0] for m in (*scores,)}
    good = {**row, "dice_x": 1.0, "iou_x": 1.0, "hd95_x": 0.0, "nsd_x": 1.0, "empty_x": "none"}
    summary = summarise([row, good], ["x"])["x"]
    assert summary["empty"] == {"gt": 0, "pred": 0, "both": 1}
    assert summary["dice"]["n"] == 1 and summary["dice"]["N"] == 2 and summary["dice"]["mean"] == 1.0


def test_surface_dice_of_two_boxes_by_hand():
    truth = np.zeros((10, 10, 10), dtype=np.int64)
    truth[2:6, 2:6, 2:6] = 1  # 4^3 cube: 56 surface voxels (64 minus the 2^3 inside)
    pred = np.zeros_like(truth)
    pred[2:6, 2:6, 2:7] = (
        1  # one slice longer: 68 surface voxels, its top face (16) one slice above the truth's
    )
    # 1 mm voxels, tolerance 0.5: the 52 shared surface voxels of each side count; the pred's top face (16) and
    # the truth's 4 top-face voxels that are inside the pred (1 mm from its surface) do not: (52 + 52) / 124
    assert case_scores(pred, truth, 2, (1, 1, 1), tolerance_mm=0.5)["nsd"][0] == pytest.approx(
        104 / 124, abs=1e-6
    )
    # 2 mm slices, tolerance 1.5: those 4 truth voxels are 1 mm (in-plane) from the pred's side wall and count;
    # the pred's top face is 2 mm above the truth: (56 + 52) / 124
    assert case_scores(pred, truth, 2, (1, 1, 2), tolerance_mm=1.5)["nsd"][0] == pytest.approx(
        108 / 124, abs=1e-6
    )
    assert case_scores(pred, truth, 2, (1, 1, 1), tolerance_mm=1.0)["nsd"] == [1.0]
    # the default tolerance is 2 mm, the same in the CLI
    assert SURFACE_TOLERANCE_MM == CLI_TOLERANCE == 2.0


def test_volumes_in_ml_and_fp_fn_counts():
    truth = np.zeros((8, 8, 8), dtype=np.int64)
    truth[0:4, 0:4, 0:4] = 2  # 64 voxels of class 2
    pred = np.zeros_like(truth)
    pred[1:5, 0:4, 0:4] = 2  # shifted by one: 48 shared, 16 false positive, 16 missed
    pred[7, 7, 7] = 1  # class 1 only in the prediction
    scores = case_scores(pred, truth, 3, (0.5, 0.5, 2.0))  # 0.5 mm^3 per voxel
    assert scores["vol_gt_ml"] == [0.0, pytest.approx(64 * 0.5 / 1000)]
    assert scores["vol_pred_ml"] == [pytest.approx(0.5 / 1000), pytest.approx(0.032)]
    assert scores["fp_voxels"] == [1, 16] and scores["fn_voxels"] == [0, 16]
    assert scores["empty"] == ["gt", "none"] and scores["dice"] == [0.0, pytest.approx(96 / 128)]


def test_summary_n_valid_sd_median_and_printout():
    dice = [0.5, 0.9, float("nan"), 0.7]
    hd95 = [4.0, 1.0, float("nan"), 2.5]
    rows = [
        {
            "case": f"c{i}",
            "dice_liver": d,
            "iou_liver": d / 2,
            "hd95_liver": h,
            "nsd_liver": d,
            "empty_liver": "both" if math.isnan(d) else "none",
        }
        for i, (d, h) in enumerate(zip(dice, hd95, strict=True))
    ]
    summary = summarise(rows, ["liver"])["liver"]
    assert summary["dice"] == {
        "n": 3,
        "N": 4,
        "mean": pytest.approx(0.7),
        "sd": pytest.approx(0.2),
        "median": 0.7,
    }
    assert summary["hd95"]["median"] == 2.5 and summary["hd95"]["sd"] == pytest.approx(1.5)
    assert summary["empty"] == {"gt": 0, "pred": 0, "both": 1}
    text = format_case_means({"n_cases": 4, "classes": {"liver": summary}, "postprocessing": "none"})
    lines = text.splitlines()
    assert lines[0].startswith("per case (3D, 4 cases): mean ± SD [median] over n valid of N")
    assert lines[2].split()[:2] == ["liver", "3/4"]
    assert "70.00 ± 20.00 [70.00]" in lines[2] and "2.50 ± 1.50 [2.50]" in lines[2]
    assert "1 empty in both (not scored)" in text and "post-processing: none" in text
    assert foreground_dice(rows, ["liver"]) == pytest.approx(0.7)


def test_foreground_dice_counts_failures_as_zero():
    truth = _blob()
    missed = case_scores(np.zeros(SHAPE, dtype=np.int64), truth, 2, SPACING, distances=False)
    perfect = case_scores(truth, truth, 2, SPACING, distances=False)
    rows = [{"dice_x": s["dice"][0]} for s in (missed, perfect)]
    assert foreground_dice(rows, ["x"]) == 0.5
    assert math.isnan(missed["hd95"][0])  # not computed without distances
    assert case_columns(["x"])[:4] == ["dice_x", "iou_x", "hd95_x", "nsd_x"]


def test_select_metric_case_dice_picks_the_checkpoint_with_the_higher_case_dice():
    early = {"mIoU": 0.80, "case_dice": 0.55}  # more pooled pixels right, but fewer cases found
    late = {"mIoU": 0.78, "case_dice": 0.71}
    assert max((early, late), key=lambda m: selection_score(m, "case_dice")) is late
    assert max((early, late), key=lambda m: selection_score(m, "miou")) is early
    assert selection_score({"mIoU": float("nan")}, "miou") == -math.inf
    volume_items, image_items = [{"id": "a_z000", "slice": 0}], [{"id": "a"}]
    assert resolve_select_metric("auto", volume_items) == "case_dice"
    assert resolve_select_metric("auto", image_items) == "miou"
    assert resolve_select_metric("miou", volume_items) == "miou"
    with pytest.raises(ConfigError, match="train.select_metric"):
        resolve_select_metric("case_dice", image_items)


def test_a_resumed_run_cannot_change_its_select_metric():
    saved, defaults = to_dict(FinetuneConfig()), to_dict(FinetuneConfig())
    changed = to_dict(FinetuneConfig(train=TrainConfig(select_metric="miou")))
    with pytest.raises(DeconError, match=r"train.select_metric \('auto' -> 'miou'\)"):
        check_resumable(saved, changed, Path("run"), defaults=defaults)
    del saved["train"]["select_metric"]  # a run saved before the key existed resumes at the default
    check_resumable(saved, to_dict(FinetuneConfig()), Path("run"), defaults=defaults)
