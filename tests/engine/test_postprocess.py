"""Post-processing chosen per class on validation: the decision, the run-folder file, predict and evaluate."""

import argparse
import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from decon_med.cli_predict import add_commands
from decon_med.config import DataConfig, FinetuneConfig, ModelConfig, TrainConfig
from decon_med.data.synthetic import make_folder
from decon_med.engine.checkpoint import load_checkpoint, save_checkpoint
from decon_med.engine.evaluate import evaluate
from decon_med.engine.finetune import finetune
from decon_med.engine.model_io import segmentation_state
from decon_med.engine.postprocess import (
    POSTPROCESSING,
    ComponentTrial,
    largest_components,
    prediction_postprocessing,
    read_decision,
    write_decision,
)
from decon_med.errors import DataError, DeconError
from decon_med.folders import Manifest
from decon_med.models.network import build_network

NAMES = ["background", "organ", "bone"]


def _case() -> tuple[np.ndarray, np.ndarray]:
    """Class 1 is one structure, predicted with a one-voxel false positive far away (the largest component
    helps); class 2 is two pieces, both predicted (the largest component cuts one away)."""
    truth = np.zeros((12, 12, 6), dtype=np.int64)
    truth[1:3, 1:3, 1:3] = 1  # 8 voxels
    truth[6:8, 6:8, 1:3] = 2  # 8 voxels
    truth[10:12, 10:11, 4:6] = 2  # 4 voxels: a second piece
    prediction = truth.copy()
    prediction[11, 0, 5] = 1
    return prediction, truth


def test_largest_component_only_where_it_raises_the_val_dice():
    prediction, truth = _case()
    trial = ComponentTrial(NAMES)
    trial("case_000", prediction, truth, (1.0, 1.0, 1.0))
    decision = trial.decide()
    assert decision["largest_component"] == [1]
    organ, bone = decision["classes"]["organ"], decision["classes"]["bone"]
    assert organ["largest_component"] and not bone["largest_component"]
    assert organ["dice"] == pytest.approx(16 / 17) and organ["dice_largest_component"] == pytest.approx(1.0)
    assert bone["dice"] == pytest.approx(1.0) and bone["dice_largest_component"] == pytest.approx(16 / 20)
    kept = largest_components(prediction, 3, only=decision["largest_component"])
    assert np.array_equal(kept, truth)  # the organ's false positive is gone, both bone pieces stay
    assert not np.array_equal(largest_components(prediction, 3), truth)  # every class: one bone piece lost


def test_decision_file_round_trip_and_bad_files(tmp_path):
    prediction, truth = _case()
    trial = ComponentTrial(NAMES)
    trial("case_000", prediction, truth, (1.0, 1.0, 1.0))
    write_decision(tmp_path / POSTPROCESSING, {"checkpoint": "best.ckpt", **trial.decide()})
    assert read_decision(tmp_path / POSTPROCESSING)["largest_component"] == [1]
    classes, note = prediction_postprocessing(tmp_path / "best.ckpt")
    assert classes == (1,) and note.startswith("largest component of organ (postprocessing.json")
    assert prediction_postprocessing(tmp_path / "last.ckpt")[0] == ()  # decided for another checkpoint
    assert prediction_postprocessing(tmp_path / "best.ckpt", largest_component=True)[0] is True
    assert prediction_postprocessing(tmp_path / "best.ckpt", postprocessing=False)[0] == ()
    with pytest.raises(DeconError, match="contradict"):
        prediction_postprocessing(tmp_path / "best.ckpt", largest_component=True, postprocessing=False)
    (tmp_path / POSTPROCESSING).write_text('{"largest_component": [0]}')
    with pytest.raises(DataError, match="postprocessing.json: malformed"):
        read_decision(tmp_path / POSTPROCESSING)


@pytest.fixture(scope="module")
def volume_run(tmp_path_factory) -> Path:
    """A finished 2-iteration fine-tuning run on a labelled NIfTI folder (3 classes, 1 case per split)."""
    root = tmp_path_factory.mktemp("pp")
    make_folder(root / "data", n=3, fmt="nifti", seed=1)
    cfg = FinetuneConfig(
        data=DataConfig(
            name="folder",
            root=str(root / "data"),
            image_size=32,
            num_workers=0,
            in_channels=1,
            modality="mr",
            num_classes=3,
        ),
        model=ModelConfig(arch="unet", encoder="resnet18"),
        train=TrainConfig(
            batch_size=4,
            iters=2,
            val_every=2,
            optimizer="sgd",
            lr=0.01,
            log_every=1,
            ckpt_every=100,
            loggers=["csv"],
        ),
        out_dir=str(root / "run"),
    )
    return finetune(cfg, progress=False)


def test_volume_run_selects_on_case_dice_and_records_its_decision(volume_run):
    results = json.loads((volume_run / "results.json").read_text())
    assert results["select_metric"] == "case_dice"
    with (volume_run / "val.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["iter"] for r in rows] == ["2"] and 0.0 <= float(rows[0]["case_dice"]) <= 1.0
    best = load_checkpoint(volume_run / "last.ckpt")["best"]  # a resumed run reads the metric from here
    assert best["metric"] == "case_dice" and best["score"] == pytest.approx(float(rows[0]["case_dice"]))
    decision = read_decision(volume_run / POSTPROCESSING)
    assert decision["checkpoint"] == "best.ckpt" and decision["split"] == "val" and decision["n_cases"] == 1
    assert list(decision["classes"]) == results["class_names"][1:]
    for c in decision["classes"].values():
        assert c["largest_component"] == (c["dice_largest_component"] > c["dice"])
    assert {POSTPROCESSING, "modalities.csv"} <= Manifest(volume_run).entries()
    with (volume_run / "modalities.csv").open() as f:
        files = list(csv.DictReader(f))
    assert {r["split"] for r in files} == {"train", "val", "test"} and {r["modality"] for r in files} == {
        "mr"
    }
    assert all(r["how"] == "declared" for r in files)


def test_evaluate_scores_the_volumes_with_the_recorded_decision(volume_run, tmp_path, capsys):
    raw = evaluate(
        volume_run, "test", save_predictions=True, out=tmp_path / "raw", progress=False, postprocessing=False
    )
    decision = read_decision(volume_run / POSTPROCESSING)
    write_decision(volume_run / POSTPROCESSING, {**decision, "largest_component": [1, 2]})
    try:
        kept = evaluate(volume_run, "test", save_predictions=True, out=tmp_path / "kept", progress=False)
    finally:
        write_decision(volume_run / POSTPROCESSING, decision)
    names = ", ".join(decision["classes"])
    assert raw["per_case"]["postprocessing"] == "none (--no-postprocessing)"
    assert kept["per_case"]["postprocessing"].startswith(f"largest component of {names} (postprocessing.json")
    assert f"post-processing: largest component of {names}" in capsys.readouterr().out
    assert kept["mIoU"] == raw["mIoU"]  # the pooled 2D scores are the network's own output
    (case,) = (tmp_path / "raw" / "predictions_test").glob("*_seg.nii.gz")
    before = np.asarray(nib.load(case).dataobj)
    after = np.asarray(nib.load(tmp_path / "kept" / "predictions_test" / case.name).dataobj)
    assert np.array_equal(after, largest_components(before, 3)) and not np.array_equal(after, before)


def test_predict_applies_the_recorded_decision(tmp_path):
    cfg = FinetuneConfig(
        data=DataConfig(
            name="folder", image_size=32, num_workers=0, in_channels=1, modality="mr", num_classes=3
        ),
        model=ModelConfig(arch="unet", encoder="resnet18"),
    )
    torch.manual_seed(0)
    network = build_network(cfg.model, in_channels=1, classes=3)
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(segmentation_state(network, cfg, classes=3, step=1), run / "best.ckpt")
    write_decision(run / POSTPROCESSING, {"checkpoint": "best.ckpt", "largest_component": [1], "classes": {}})
    image = np.random.default_rng(0).normal(300.0, 80.0, (40, 40, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.diag([0.9, 0.9, 2.5, 1.0])), tmp_path / "scan.nii.gz")
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))

    def run_predict(*flags: str) -> np.ndarray:
        out = tmp_path / ("out" + "".join(flags).replace("-", "_"))
        args = parser.parse_args(
            ["predict", str(run), str(tmp_path / "scan.nii.gz"), "--out", str(out), "--quiet", *flags]
        )
        assert args.func(args) == 0
        return np.asarray(nib.load(out / "scan_seg.nii.gz").dataobj)

    raw = run_predict("--no-postprocessing")
    assert not np.array_equal(largest_components(raw, 3, only=[1]), raw)  # the check below can fail
    assert np.array_equal(run_predict(), largest_components(raw, 3, only=[1]))
    with pytest.raises(SystemExit):  # the two flags exclude each other
        parser.parse_args(
            ["predict", str(run), "x", "--out", "y", "--largest-component", "--no-postprocessing"]
        )
