"""nnU-Net raw folders and MSD / MONAI datalists: splits, channels, classes, k-fold, pre-train and fine-tune."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from decon_med.config import DataConfig, FinetuneConfig, ModelConfig, PretrainConfig, TrainConfig
from decon_med.data.datasets import build_dataset
from decon_med.data.layouts import get_layout, num_classes, slice_options
from decon_med.data.splits import kfold_split
from decon_med.data.synthetic import make_nnunet
from decon_med.data.volumes import load_slice
from decon_med.engine.finetune import finetune
from decon_med.engine.pretrain import pretrain
from decon_med.errors import DataError

DATA = {"image_size": 64, "num_workers": 0, "in_channels": 1, "modality": "mr", "min_foreground": 0.0}


@pytest.fixture(scope="module")
def nnunet(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nnunet") / "Dataset001_Organ"
    make_nnunet(root, n=6, seed=0, channels=2, n_test=2)
    return root


def _data(name: str, root: Path, **extra) -> DataConfig:
    return DataConfig(name=name, root=str(root), **{**DATA, **extra})


def _groups(items: list[dict]) -> set[str]:
    return {it["group"] for it in items}


def test_nnunet_raw_splits_channels_and_classes(nnunet: Path):
    layout = get_layout(_data("nnunet", nnunet, in_channels=2, channels=[1, 0], num_folds=3, fold=1))
    assert layout.class_names == ("background", "organ", "lesion") and layout.num_classes == 3
    train, val, test = (layout.items(s) for s in ("train", "val", "test"))
    assert _groups(test) == {"test_000", "test_001"}  # imagesTs + labelsTs is the test split
    assert len(_groups(train)) == 4 and len(_groups(val)) == 2 and not _groups(train) & _groups(val)
    first = val[0]
    assert [Path(p).name for p in first["channels"]] == [
        f"{first['group']}_0001.nii.gz",
        f"{first['group']}_0000.nii.gz",
    ]
    assert first["label"].endswith(f"labelsTr/{first['group']}.nii.gz")
    one, other = (build_dataset(_cfg_ft(nnunet, "nnunet", channels=[c]), "val", "eval")[0] for c in (0, 1))
    assert tuple(one["image"].shape) == (1, 64, 64) and int(one["label"].max()) <= 2
    # channel 1 holds twice channel 0's intensities: after the per-file percentile clip both look alike
    np.testing.assert_allclose(one["image"].numpy(), other["image"].numpy(), atol=1e-4)
    three = _data("nnunet", nnunet, in_channels=3)
    with pytest.raises(
        DataError, match=r"dataset.json: gives 2 input channels \(MR0, MR1\) but data.in_channels is 3"
    ):
        get_layout(three).items("val")
    item = get_layout(_data("nnunet", nnunet, in_channels=2)).items("val")[0]
    with pytest.raises(DataError, match="_0000.nii.gz: gives 2 channels"):
        load_slice(item, slice_options(three))


def test_kfold_is_seeded_deterministic_and_partitions():
    ids = [f"case{i}" for i in range(10)]
    folds = [kfold_split(ids[::-1], 5, k) for k in range(5)]
    assert folds == [kfold_split(ids, 5, k) for k in range(5)]
    vals = [v for _, v in folds]
    assert sorted(sum(vals, [])) == sorted(ids) and all(len(v) == 2 for v in vals)
    for train, val in folds:
        assert sorted(train + val) == sorted(ids)
    with pytest.raises(DataError, match="too few for 5 folds"):
        kfold_split(ids[:3], 5, 0)


def test_folder_layout_k_fold(synth_root):
    data = _data("folder", synth_root / "folder", num_classes=3, in_channels=3, modality="rgb")
    splits = json.loads((synth_root / "folder" / "splits.json").read_text())
    pool = set(splits["train"]) | set(splits["val"])
    seen = []
    for fold in range(2):
        layout = get_layout(DataConfig(**{**data.__dict__, "fold": fold, "num_folds": 2}))
        val = {it["id"] for it in layout.items("val")}
        assert {it["id"] for it in layout.items("test")} == set(splits["test"])
        assert val | {it["id"] for it in layout.items("train")} == pool
        seen.append(val)
    assert seen[0] | seen[1] == pool and not seen[0] & seen[1]


def test_msd_datalist_with_validation_and_unlabelled_test(nnunet: Path, tmp_path: Path):
    full = json.loads((nnunet / "datalist.json").read_text())
    custom = {
        "labels": full["labels"],
        "training": full["training"][:5],
        "validation": full["training"][5:],
        "test": [e["image"] for e in full["test"]],  # MSD style: images only
    }
    path = nnunet / "custom_datalist.json"
    path.write_text(json.dumps(custom))
    try:
        layout = get_layout(_data("datalist", path, channels=[0]))
        assert layout.class_names == ("background", "organ", "lesion")
        assert _groups(layout.items("val")) == {"case_005_0000"}
        train, test = _groups(layout.items("train")), _groups(layout.items("test"))
        assert len(train) == 4 and len(test) == 1 and not train & test  # test held out from training
    finally:
        path.unlink()


def _cfg_ft(root: Path, name: str, out: Path | None = None, **extra) -> FinetuneConfig:
    return FinetuneConfig(
        data=_data(name, root, **extra),
        model=ModelConfig(arch="unet", encoder="resnet18"),
        train=TrainConfig(batch_size=2, iters=2, val_every=2, log_every=1, optimizer="adamw", lr=1e-3),
        out_dir=str(out or root / "unused"),
    )


@pytest.mark.parametrize("name", ["nnunet", "datalist"])
def test_pretrain_and_finetune_run(nnunet: Path, tmp_path: Path, name: str):
    root = nnunet if name == "nnunet" else nnunet / "datalist.json"
    extra = {"channels": [0]}
    pre = PretrainConfig(
        data=_data(name, root, min_foreground=0.05, **extra),
        model=ModelConfig(arch="unet", encoder="resnet18"),
        train=TrainConfig(batch_size=4, epochs=1, log_every=1, ckpt_every=2, optimizer="adamw", lr=1e-3),
        out_dir=str(tmp_path / "pre"),
    )
    pre.ssl.num_prototypes = pre.ssl.num_prototypes_dec = 16
    pre.ssl.dim_hidden, pre.ssl.dim_out = 64, 32
    assert num_classes(pre.data) == 3
    pretrain(pre, progress=False, max_steps=2)
    assert (tmp_path / "pre" / "last.ckpt").is_file()
    ft = _cfg_ft(root, name, tmp_path / "ft", **extra)
    run = finetune(ft, progress=False)
    assert (run / "config.yaml").is_file()
    test_items = get_layout(ft.data).items("test")
    assert len(test_items) == 2 * 12  # every slice of both labelled test volumes is scored
