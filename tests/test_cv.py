"""``decon-med cv``: every fold of one config, one run folder per fold, continued when rerun."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from decon_med.cli import main
from decon_med.cli_cv import fold_overrides
from decon_med.data.synthetic import make_nnunet


def test_fold_overrides_come_last():
    assert fold_overrides(["data.fold=4", "seed=1"], "runs/cv", 0) == [
        "data.fold=4",
        "seed=1",
        "data.fold=0",
        "out_dir=runs/cv/fold_0",
    ]


def test_cv_trains_each_fold_once_and_the_folds_predict_as_an_ensemble(tmp_path: Path, capsys):
    root = tmp_path / "Dataset001_Toy"
    make_nnunet(root, n=4, n_test=1, seed=0)
    out = tmp_path / "cv"
    argv = [
        "cv", "finetune/folder", "data.name=nnunet", f"data.root={root}", "data.in_channels=1", "data.num_folds=2",
        "data.image_size=32", "data.num_workers=0", "model.encoder=resnet18", "train.amp=none",
        "train.batch_size=2", "train.iters=1", "train.val_every=1", "train.log_every=1", "train.ckpt_every=1",
        f"out_dir={out}", "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "mean test mIoU" in printed and f"decon-med predict {out / 'fold_0'} {out / 'fold_1'}" in printed
    trained = []
    for k in (0, 1):
        run = out / f"fold_{k}"
        assert (run / "done.json").is_file() and f"fold: {k}" in (run / "config.yaml").read_text()
        trained.append(set(json.loads((run / "train_ids.json").read_text())["ids"]))
    assert len(trained[0]) == len(trained[1]) == 2 and not trained[0] & trained[1]  # each case trains once
    stamp = (out / "fold_0" / "results.json").stat().st_mtime_ns
    assert main(argv) == 0  # a rerun trains nothing again
    assert "fold 0: finished earlier" in capsys.readouterr().out
    assert (out / "fold_0" / "results.json").stat().st_mtime_ns == stamp
    assert main(["predict", str(out / "fold_0"), str(out / "fold_1"), str(root / "imagesTs"),
                 "--out", str(tmp_path / "pred"), "--quiet"]) == 0  # fmt: skip
    (pred,) = (tmp_path / "pred").glob("*.nii.gz")
    image = nib.load(next((root / "imagesTs").glob("*.nii.gz")))
    assert np.array_equal(nib.load(pred).affine, image.affine)


def test_cv_refuses_a_layout_without_folds(tmp_path: Path, capsys):
    assert main(["cv", "isic", f"out_dir={tmp_path / 'cv'}"]) == 2
    assert "cross-validation needs a labelled layout" in capsys.readouterr().err
