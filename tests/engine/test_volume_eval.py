"""Per-case 3D scores of NIfTI cases, NIfTI predictions from evaluate, and scoring every case of a folder."""

import argparse
import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU
from monai.networks.utils import one_hot

from decon_med.cli_finetune import add_commands
from decon_med.config import DataConfig, FinetuneConfig, ModelConfig
from decon_med.data.synthetic import make_folder
from decon_med.engine.checkpoint import save_checkpoint
from decon_med.engine.evaluate import evaluate
from decon_med.engine.model_io import segmentation_state
from decon_med.engine.volume_metrics import METRICS, case_scores, summarise
from decon_med.models.network import build_network

CLASSES = 3


def _monai(prediction: np.ndarray, truth: np.ndarray, spacing) -> dict[str, np.ndarray]:
    """MONAI's own metrics on one-hot volumes, background excluded: one value per foreground class."""
    p = one_hot(torch.from_numpy(prediction.astype(np.int64))[None, None], CLASSES)
    t = one_hot(torch.from_numpy(truth.astype(np.int64))[None, None], CLASSES)
    kwargs = {"include_background": False, "reduction": "none"}
    return {
        "dice": DiceMetric(**kwargs)(p, t)[0].numpy(),
        "iou": MeanIoU(**kwargs)(p, t)[0].numpy(),
        "hd95": HausdorffDistanceMetric(percentile=95, **kwargs)(p, t, spacing=list(spacing))[0].numpy(),
    }


def test_case_scores_match_monai_with_anisotropic_spacing():
    truth = np.zeros((20, 24, 8), dtype=np.int64)
    truth[4:14, 5:15, 2:6] = 1
    truth[15:19, 16:22, 1:7] = 2
    prediction = np.zeros_like(truth)
    prediction[5:15, 5:13, 2:7] = 1
    prediction[15:18, 17:22, 0:5] = 2
    spacing = (0.8, 0.9, 2.5)
    got = case_scores(prediction, truth, CLASSES, spacing)
    want = _monai(prediction, truth, spacing)
    for metric in ("dice", "iou", "hd95"):
        np.testing.assert_allclose(got[metric], want[metric], rtol=1e-6)
    # the spacing matters: the same volumes on a 1 mm grid give another HD95
    assert not np.allclose(case_scores(prediction, truth, CLASSES, (1.0, 1.0, 1.0))["hd95"], got["hd95"])
    # a class missing from the ground truth but predicted is a false positive: Dice 0, never NaN or 1
    assert case_scores(prediction, np.where(truth == 2, 0, truth), CLASSES, spacing)["dice"][1] == 0.0


def test_summary_counts_what_it_leaves_out():
    rows = [
        {"case": "a", "dice_x": 0.5, "hd95_x": float("inf"), "empty_x": "none"},
        {"case": "b", "dice_x": float("nan"), "hd95_x": 2.0, "empty_x": "both"},
    ]
    summary = summarise(rows, ["x"])["x"]
    assert summary["dice"] == {"n": 1, "N": 2, "mean": 0.5, "sd": summary["dice"]["sd"], "median": 0.5}
    assert math.isnan(summary["dice"]["sd"]) and summary["hd95"]["n"] == 1 and summary["empty"]["both"] == 1


@pytest.fixture(scope="module")
def volume_run(tmp_path_factory) -> Path:
    """A randomly initialised 3-class MR checkpoint over a labelled NIfTI folder (5 cases, 1 test case)."""
    root = tmp_path_factory.mktemp("volumes")
    make_folder(root / "data", n=5, fmt="nifti", seed=1)
    cfg = FinetuneConfig(
        data=DataConfig(
            name="folder",
            root=str(root / "data"),
            image_size=64,
            num_workers=0,
            in_channels=1,
            modality="mr",
            num_classes=CLASSES,
        ),
        model=ModelConfig(arch="unet", encoder="resnet18"),
    )
    torch.manual_seed(0)
    network = build_network(cfg.model, in_channels=1, classes=CLASSES)
    (root / "run").mkdir()
    return save_checkpoint(
        segmentation_state(network, cfg, classes=CLASSES, step=3), root / "run" / "best.ckpt"
    )


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_per_case_csv_matches_monai_on_saved_nifti_predictions(volume_run, tmp_path, capsys):
    metrics = evaluate(volume_run, split="test", save_predictions=True, out=tmp_path, progress=False)
    data = Path(json.loads((tmp_path / "metrics_test.json").read_text())["data_root"])
    test_ids = json.loads((data / "splits.json").read_text())["test"]
    rows = _rows(tmp_path / "per_case_test.csv")
    assert [r["case"] for r in rows] == sorted(test_ids)
    assert metrics["per_case"]["n_cases"] == len(test_ids)
    names = ["class1", "class2"]
    assert list(rows[0]) == ["case", "image", "label"] + [
        f"{m}_{n}" for n in names for m in (*METRICS, "empty")
    ]
    for row in rows:
        image = nib.load(data / "images" / f"{row['case']}.nii.gz")
        saved = nib.load(tmp_path / "predictions_test" / f"{row['case']}_seg.nii.gz")
        assert saved.shape == image.shape and np.allclose(saved.affine, image.affine)
        prediction = np.asarray(saved.dataobj).astype(np.int64)
        truth = np.asarray(nib.load(data / "masks" / f"{row['case']}.nii.gz").dataobj).astype(np.int64)
        want = _monai(prediction, truth, [float(z) for z in image.header.get_zooms()[:3]])
        for c, name in enumerate(names):
            if row[f"empty_{name}"] != "none":  # MONAI's own NaN / inf: the rules of volume_metrics apply
                continue
            for metric in ("dice", "iou", "hd95"):
                np.testing.assert_allclose(float(row[f"{metric}_{name}"]), want[metric][c], rtol=1e-5)
    record = json.loads((tmp_path / "metrics_test.json").read_text())["per_case"]
    assert (
        record["n_cases"] == 1 and record["surface_tolerance_mm"] == 2.0 and "both_empty" in record["rules"]
    )
    assert set(record["classes"]) == set(names) and set(record["classes"]["class1"]["dice"]) == {
        "n",
        "N",
        "mean",
        "sd",
        "median",
    }
    out = capsys.readouterr().out
    assert out.startswith("evaluate: folder data at ")
    assert "per case (3D, 1 cases)" in out and "post-processing: none (no postprocessing.json)" in out
    assert not list((tmp_path / "predictions_test").glob("*.png"))  # volumes, not slice PNGs


def test_all_scores_every_case_of_an_external_folder(volume_run, tmp_path, capsys):
    other = tmp_path / "other_site"
    make_folder(other, n=4, fmt="nifti", seed=7)
    (other / "splits.json").unlink()  # no fixed split: the hold-out would score one case only
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        [
            "evaluate",
            str(volume_run),
            "--data-root",
            str(other),
            "--all",
            "--out",
            str(tmp_path / "eval"),
            "--quiet",
        ]
    )
    assert args.func(args) == 0
    rows = _rows(tmp_path / "eval" / "per_case_all.csv")
    assert [r["case"] for r in rows] == [f"case_{i:03d}" for i in range(4)]
    record = json.loads((tmp_path / "eval" / "metrics_all.json").read_text())
    assert record["split"] == "all" and record["data_root"] == str(other)
    assert record["n_pixels"] == 4 * 48 * 48 * 12  # every slice of every case, none skipped
    assert "data: all 4 volumes / 48 slices" in capsys.readouterr().out
