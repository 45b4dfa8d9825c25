"""Evaluation of fine-tuned runs: reproducing results.json, the metrics file, the table and saved predictions."""

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from decon_med.config import DataConfig, FinetuneConfig, ModelConfig, TrainConfig
from decon_med.data.layouts import get_layout
from decon_med.data.synthetic import make_isic
from decon_med.engine.checkpoint import save_checkpoint
from decon_med.engine.evaluate import evaluate, format_table, predict_logits
from decon_med.engine.finetune import finetune
from decon_med.errors import DataError, DeconError
from decon_med.metrics import segmentation_metrics
from decon_med.models.network import build_network


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Iterator[Path]:
    """A finished 4-iteration ISIC run (images of different, non-square sizes), best checkpoint selected."""
    root = tmp_path_factory.mktemp("evaluate")
    make_isic(root / "isic", n=8, seed=0)
    cfg = FinetuneConfig(
        data=DataConfig(name="isic2017", root=str(root / "isic"), image_size=64, num_workers=0),
        model=ModelConfig(arch="unet", encoder="resnet18"),
        train=TrainConfig(
            batch_size=4, iters=4, val_every=2, optimizer="sgd", lr=0.01, ckpt_every=100, log_every=2
        ),
        out_dir=str(root / "run"),
    )
    yield finetune(cfg, progress=False)
    shutil.rmtree(root, ignore_errors=True)


def _results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def test_evaluate_reproduces_results(finished, capsys):
    results = _results(finished)
    metrics = evaluate(finished, split="test", progress=False)
    assert metrics == results["test"]
    written = json.loads((finished / "metrics_test.json").read_text())
    assert written["iter"] == results["selected_iter"] and written["checkpoint"].endswith("best.ckpt")
    assert written["mIoU"] == results["test"]["mIoU"] and written["split"] == "test"
    out = capsys.readouterr().out
    assert "best.ckpt on test" in out and "background" in out and "lesion" in out
    assert f"mIoU {100 * metrics['mIoU']:.2f}" in out
    val = evaluate(finished / "best.ckpt", split="val", progress=False)
    assert val == results["val"]  # the val scores recorded when best.ckpt was selected


def test_save_predictions_at_original_sizes(finished, tmp_path):
    out = tmp_path / "eval"
    evaluate(finished, split="test", save_predictions=True, out=out, progress=False)
    assert (out / "metrics_test.json").is_file()
    cfg = DataConfig(name="isic2017", root=str(finished.parent / "isic"))
    items = get_layout(cfg).items("test")
    saved = sorted(p.name for p in (out / "predictions_test").iterdir())
    assert saved == sorted(f"{item['id']}.png" for item in items)
    for item in items:
        mask = np.asarray(Image.open(out / "predictions_test" / f"{item['id']}.png"))
        original = Image.open(item["image"])
        assert mask.shape == (original.height, original.width) and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) <= {0, 1}


def test_data_root_override(finished, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(finished.parent / "isic", moved)
    out = tmp_path / "eval"
    metrics = evaluate(finished, split="test", out=out, data_root=str(moved), progress=False)
    assert metrics == _results(finished)["test"]
    assert json.loads((out / "metrics_test.json").read_text())["data_root"] == str(moved)
    with pytest.raises(DataError, match="dataset root not found"):
        evaluate(finished, split="test", out=out, data_root=str(tmp_path / "nowhere"), progress=False)
    with pytest.raises(DeconError, match="holds the data root"):  # never a folder holding the data it scores
        evaluate(finished, split="test", out=tmp_path, data_root=str(moved), progress=False)


def test_bad_inputs(finished, tmp_path):
    with pytest.raises(DeconError, match="unknown split 'dev'"):
        evaluate(finished, split="dev")
    with pytest.raises(DataError, match="checkpoint not found"):
        evaluate(tmp_path / "missing.ckpt")
    not_finetune = save_checkpoint({"method": {}, "step": 1}, tmp_path / "pretrain.ckpt")
    with pytest.raises(DataError, match="not a fine-tuning checkpoint"):
        evaluate(not_finetune)


def test_format_table():
    table = format_table(segmentation_metrics(np.array([[3, 1], [0, 4]]), ["bg", "lesion"]))
    assert table.splitlines() == [
        "class        IoU    Dice     Acc",
        "bg         75.00   85.71   75.00",
        "lesion     80.00   88.89  100.00",
        "mIoU 77.50  mDice 87.30  aAcc 87.50",
    ]
    nan_table = format_table(segmentation_metrics(np.array([[2, 0], [0, 0]])))
    assert "nan" in nan_table.splitlines()[2] and math.isnan(segmentation_metrics(np.zeros((2, 2)))["mIoU"])


def test_predict_logits():
    torch.manual_seed(0)
    network = build_network(ModelConfig(arch="unet", encoder="resnet18"), in_channels=3, classes=3).eval()
    images = torch.randn(2, 3, 32, 32)
    logits = predict_logits(network, images, amp="bf16")
    assert logits.shape == (2, 3, 32, 32) and logits.dtype == torch.float32
    assert torch.equal(predict_logits(network, images), network(images).detach())
