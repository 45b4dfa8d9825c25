"""nnU-Net conventions: channel files per case end to end, splits_final.json, imagesTs for pre-training,
label maps kept out of pre-training, and predictions named <case>.nii.gz."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from decon_med.config import DataConfig, FinetuneConfig, ModelConfig, PretrainConfig, TrainConfig
from decon_med.data.layouts import get_layout
from decon_med.data.synthetic import make_nnunet
from decon_med.engine.evaluate import evaluate
from decon_med.engine.export import export
from decon_med.engine.finetune import finetune
from decon_med.engine.predict import _case_plan
from decon_med.engine.predict import predict as run_predict
from decon_med.engine.pretrain import pretrain
from decon_med.errors import DataError, DeconError

NAMES = ["CT", "T2", "ADC", "FLAIR"]


@pytest.fixture(scope="module")
def organ(tmp_path_factory) -> Path:
    """Two channels (CT, T2), 5 labelled training cases, 2 unlabelled test cases."""
    root = tmp_path_factory.mktemp("conventions") / "Dataset003_Organ"
    make_nnunet(root, n=5, n_test=2, channel_names=NAMES[:2], seed=2, test_labels=False)
    return root


def _data(root: Path, **extra) -> DataConfig:
    base = {"name": "nnunet", "root": str(root), "image_size": 32, "num_workers": 0, "in_channels": 2}
    return DataConfig(**{**base, "min_foreground": 0.0, "spacing": 3.0, **extra})


def _cases(items: list[dict]) -> set[str]:
    return {item["group"] for item in items}


def test_pretraining_reads_every_case_of_imagesTr_and_imagesTs_channels_grouped(organ: Path):
    layout = get_layout(_data(organ))
    items = layout.items("train", labeled=False)
    assert _cases(items) == {f"case_{i:03d}" for i in range(5)} | {"test_000", "test_001"}
    test_item = next(item for item in items if item["group"] == "test_001")
    assert [Path(p).name for p in test_item["channels"]] == ["test_001_0000.nii.gz", "test_001_0001.nii.gz"]
    assert all(item["label"] is None for item in items)
    labelled = _cases(layout.items("train")) | _cases(layout.items("val")) | _cases(layout.items("test"))
    assert labelled == {f"case_{i:03d}" for i in range(5)}  # unlabelled imagesTs never enters the splits


def test_splits_final_json_gives_train_and_val_of_the_fold(organ: Path, tmp_path: Path):
    folds = [
        {"train": ["case_000", "case_001", "case_002"], "val": ["case_003", "case_004"]},
        {"train": ["case_002", "case_003"], "val": ["case_000", "case_001"]},
    ]
    (organ / "splits_final.json").write_text(json.dumps(folds))
    try:
        layout = get_layout(_data(organ, fold=1))
        assert _cases(layout.items("train")) == {"case_002", "case_003"}
        assert _cases(layout.items("val")) == {"case_000", "case_001"}
        assert _cases(layout.items("test")) == {
            "case_004"
        }  # no labelled imagesTs: the cases the fold leaves out
        first = get_layout(_data(organ))  # data.fold null: fold 0
        assert _cases(first.items("val")) == {"case_003", "case_004"} == _cases(first.items("test"))
    finally:
        (organ / "splits_final.json").unlink()
    given = tmp_path / "my_splits.json"
    given.write_text(json.dumps(folds[:1]))
    assert _cases(get_layout(_data(organ, splits_file=str(given))).items("val")) == {"case_003", "case_004"}
    with pytest.raises(DataError, match=r"my_splits.json: has 1 fold\(s\); data.fold=1 is not one of them"):
        get_layout(_data(organ, splits_file=str(given), fold=1)).items("train")
    given.write_text(json.dumps([{"train": ["case_000"], "val": ["case_999"]}]))
    with pytest.raises(DataError, match=r"fold 0 lists cases with no image in imagesTr/: \['case_999'\]"):
        get_layout(_data(organ, splits_file=str(given))).items("train")


def test_a_pretraining_root_holding_label_maps_is_refused(organ: Path, tmp_path: Path):
    unlabeled = {"name": "unlabeled", "in_channels": 1, "modality": "mr"}
    with pytest.raises(DataError) as info:
        get_layout(_data(organ, **unlabeled)).items("train")
    message = str(info.value)
    assert message.startswith(f"{organ / 'labelsTr'}: holds label maps (folder name 'labelsTr'), not scans; ")
    assert "use data.name=nnunet for this nnU-Net dataset" in message and "data.include" in message
    kept = get_layout(_data(organ, include=["imagesTr/*_0001.nii.gz"], **unlabeled)).items("train")
    assert {Path(item["image"]).name for item in kept} == {f"case_{i:03d}_0001.nii.gz" for i in range(5)}

    mixed = tmp_path / "scans"
    mixed.mkdir()
    shutil.copy(organ / "imagesTr" / "case_000_0001.nii.gz", mixed / "a.nii.gz")
    shutil.copy(organ / "labelsTr" / "case_001.nii.gz", mixed / "b.nii.gz")  # a label map under a scan's name
    with pytest.raises(DataError) as info:
        get_layout(_data(mixed, **unlabeled)).items("train")
    assert str(info.value).startswith(
        f"{mixed / 'b.nii.gz'}: holds only the integer values [0, 1, 2]: a label map, not a scan;"
    )
    assert len(get_layout(_data(mixed, include=["a.nii.gz"], **unlabeled)).items("train")) == 12


def _pretrain_cfg(data: DataConfig, out: Path) -> PretrainConfig:
    cfg = PretrainConfig(
        data=data,
        model=ModelConfig(arch="unet", encoder="resnet18"),
        train=TrainConfig(batch_size=4, epochs=1, log_every=1, ckpt_every=1, optimizer="sgd", lr=1e-3),
        out_dir=str(out),
    )
    cfg.ssl.num_prototypes = cfg.ssl.num_prototypes_dec = 8
    cfg.ssl.dim_hidden, cfg.ssl.dim_out = 32, 16
    return cfg


@pytest.mark.parametrize("channels", [2, 4])
def test_multichannel_dataset_pretrains_finetunes_and_predicts_nnunet_cases(tmp_path: Path, channels: int):
    root = tmp_path / f"Dataset00{channels}_Mc"
    make_nnunet(root, n=4, n_test=1, channel_names=NAMES[:channels], seed=channels, test_labels=False)
    data = _data(root, in_channels=channels)
    pretrain(_pretrain_cfg(data, tmp_path / "pre"), progress=False, max_steps=1)
    init = tmp_path / "pre" / "last.ckpt"
    if channels == 2:  # through an export, which records the channels
        record = json.loads(export(init, tmp_path / "export")["meta"].read_text())
        assert record["in_channels"] == 2 and record["channel_names"] == ["CT", "T2"]
        init = tmp_path / "export"
    ft = FinetuneConfig(
        data=data,
        model=ModelConfig(arch="unet", encoder="resnet18"),
        init=str(init),
        transfer="encoder",
        train=TrainConfig(batch_size=2, iters=1, val_every=1, log_every=1, optimizer="sgd", lr=1e-3),
        out_dir=str(tmp_path / "ft"),
    )
    finetune(ft, progress=False)
    report = json.loads((tmp_path / "ft" / "init_report.json").read_text())
    assert (
        report["pretrained"]["in_channels"] == channels
        and report["pretrained"]["channel_names"] == NAMES[:channels]
    )
    summary = run_predict(tmp_path / "ft", root / "imagesTs", tmp_path / "pred", progress=False)
    assert [Path(r["output"]).name for r in summary["predicted"]] == ["test_000.nii.gz"]
    assert summary["skipped"] == [] and summary["warnings"] == []
    image, labels = (
        nib.load(root / "imagesTs" / "test_000_0000.nii.gz"),
        nib.load(tmp_path / "pred" / "test_000.nii.gz"),
    )
    assert labels.shape == image.shape and np.array_equal(labels.affine, image.affine)
    assert set(np.unique(np.asarray(labels.dataobj))) <= {0, 1, 2}
    if channels == 4:  # evaluate reads the channel files of each test case too
        scores = evaluate(tmp_path / "ft", "test", save_predictions=True, progress=False)
        assert scores["per_case"]["n_cases"] == 1 and 0.0 <= scores["mIoU"] <= 1.0
        (saved,) = (tmp_path / "ft" / "predictions_test").glob("*_seg.nii.gz")
        source = root / "imagesTr" / saved.name.replace("_seg.nii.gz", "_0000.nii.gz")
        assert np.array_equal(nib.load(saved).affine, nib.load(source).affine)


def test_case_plan_groups_channel_files_and_keeps_plain_files(tmp_path: Path):
    names = ["a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "sub/c_0001.nii.gz", "sub/c_0000.nii.gz"]
    files = [tmp_path / "in" / name for name in [*names, "plain.nii.gz"]]
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    planned, skipped = _case_plan(sorted(files), tmp_path / "in", tmp_path / "out", ".nii.gz", [0, 1])
    plan = {
        str(item.output.relative_to(tmp_path / "out")): [p.name for p in item.channels] for item in planned
    }
    assert plan == {
        "a.nii.gz": ["a_0000.nii.gz", "a_0001.nii.gz"],
        "plain_seg.nii.gz": [],
        "sub/c.nii.gz": ["c_0000.nii.gz", "c_0001.nii.gz"],
    }
    assert skipped == [{"path": str(files[2]), "reason": "channel file b_0001.nii.gz of case b is missing"}]


def test_a_run_saved_without_channel_names_resumes_with_them_filled():
    from decon_med.config import FinetuneConfig, to_dict
    from decon_med.engine.run_folder import check_resumable

    defaults = to_dict(FinetuneConfig())
    saved = to_dict(FinetuneConfig())
    saved["data"].pop("channel_names")  # written before the names were recorded
    filled = to_dict(FinetuneConfig())
    filled["data"]["channel_names"] = ["CT", "T2"]  # what loading fills in from dataset.json today
    check_resumable(saved, filled, Path("run"), defaults=defaults)
    saved["data"]["channel_names"] = ["T2", "CT"]  # recorded names must still match
    with pytest.raises(DeconError, match="data.channel_names"):
        check_resumable(saved, filled, Path("run"), defaults=defaults)
