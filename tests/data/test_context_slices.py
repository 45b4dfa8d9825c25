"""2.5D input (``data.context_slices``): neighbouring slices stacked as channels, clamped at the volume's ends."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from decon_med import cli
from decon_med.config import DataConfig, FinetuneConfig
from decon_med.data.datasets import (
    build_dataset,
    context_indices,
    input_slice_options,
    load_context,
    read_pair,
    stack_context,
)
from decon_med.data.synthetic_vessels import make_vessels, vessel_volume
from decon_med.data.volumes import SliceOptions, load_slice, scan_volume, volume_slices
from decon_med.engine.predict import Predictor
from decon_med.errors import ConfigError, DataError

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
OPTS = SliceOptions(axis=2, modality="mr", min_foreground=0.0, channels=1)


def _volume(path: Path, shape=(20, 24, 5), seed: int = 0) -> Path:
    """A volume whose slices along axis 2 all differ (1 mm voxels, stored RAS)."""
    data = np.random.default_rng(seed).uniform(10.0, 500.0, shape).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def test_context_indices_clamp_at_the_ends():
    assert context_indices(0, 5, 1) == [0, 0, 1]
    assert context_indices(4, 5, 1) == [3, 4, 4]
    assert context_indices(2, 5, 2) == [0, 1, 2, 3, 4]
    assert context_indices(0, 1, 2) == [0, 0, 0, 0, 0]  # a single-slice volume repeats its slice


def test_stack_middle_channel_is_the_plain_slice_and_ends_are_clamped(tmp_path):
    items = scan_volume(_volume(tmp_path / "v.nii.gz"), OPTS)
    plain = [load_slice(item, OPTS) for item in items]  # (20, 24, 1) each
    assert len(plain) == 5 and not np.array_equal(plain[0], plain[1])
    for item in items:
        k = item["slice"]
        stack, _ = read_pair(item, OPTS, context=1)
        assert stack.shape == (20, 24, 3)
        assert np.array_equal(stack[..., 1:2], plain[k])
        expected = [plain[max(k - 1, 0)], plain[k], plain[min(k + 1, 4)]]
        assert np.array_equal(stack, np.concatenate(expected, axis=2))
    first, _ = read_pair(items[0], OPTS, context=2)
    assert np.array_equal(first, np.concatenate([plain[0], plain[0], plain[0], plain[1], plain[2]], axis=2))
    # predict builds the same stacks from the whole volume's slices
    images = volume_slices(tmp_path / "v.nii.gz", OPTS).images
    for item in items:
        assert np.array_equal(stack_context(images, item["slice"], 1), load_context(item, OPTS, 1))


def test_dataset_and_predictor_feed_the_stack_with_per_slice_channels(synth_root):
    root = synth_root / "folder_nifti"
    data = {"name": "folder", "root": str(root), "num_classes": 3, "image_size": 64, "num_workers": 0}
    data |= {"modality": "mr", "sampling": "patch", "spacing": 0.9}  # no resize: exact pixels
    plain = build_dataset(FinetuneConfig(data=DataConfig(**data, in_channels=1)), "val", "eval")
    cfg = FinetuneConfig(data=DataConfig(**data, in_channels=3, context_slices=1))
    assert input_slice_options(cfg.data).channels == 1
    stacked = build_dataset(cfg, "val", "eval")
    for index in (0, 5, len(plain) - 1):
        one, three = plain[index], stacked[index]
        assert three["image"].shape == (3, 64, 64) and one["id"] == three["id"]
        assert torch.equal(three["image"][1:2], one["image"]) and torch.equal(three["label"], one["label"])
    assert torch.equal(
        stacked[0]["image"][0], stacked[0]["image"][1]
    )  # slice 0: its lower neighbour is itself
    network = torch.nn.Conv2d(3, 3, 1)
    predictor = Predictor(network, cfg, device="cpu")
    assert predictor.transform.mean.tolist() == pytest.approx([0.449] * 3)
    slices, masks = predictor.predict_slices(sorted((root / "images").glob("*.nii.gz"))[0])
    assert slices.images[0].shape == (48, 48, 1) and masks[0].shape == (48, 48)


def test_in_channels_must_be_a_multiple_of_the_stack():
    with pytest.raises(ConfigError, match=r"data.in_channels.*4 is not a multiple of the 3 stacked slices"):
        DataConfig(name="folder", num_classes=2, in_channels=4, context_slices=1).validate()
    DataConfig(name="folder", num_classes=2, in_channels=5, context_slices=2).validate()  # 5 x 1 channel
    DataConfig(name="folder", num_classes=2, in_channels=6, context_slices=1).validate()  # 3 x 2 CT windows
    with pytest.raises(ConfigError, match="data.context_slices"):
        DataConfig(name="folder", num_classes=2, in_channels=3, context_slices=-1).validate()


def test_2d_images_with_context_are_refused_with_one_line(synth_root, tmp_path, capsys):
    with pytest.raises(
        ConfigError, match=r"data.context_slices.: 1 needs NIfTI volumes .*data.name=isic2017 holds 2D images"
    ) as exc:
        DataConfig(name="isic2017", in_channels=3, context_slices=1).validate()
    assert "\n" not in str(exc.value)
    cfg = FinetuneConfig(
        data=DataConfig(name="folder", root=str(synth_root / "folder"), num_classes=3, context_slices=1)
    )
    with pytest.raises(DataError, match=r"case_\d+\.png: a 2D image has no neighbouring slices"):
        build_dataset(cfg, "train", "train")
    argv = ["finetune", "configs/finetune/folder.yaml", f"data.root={synth_root / 'folder'}"]
    argv += ["data.context_slices=1", "data.num_workers=0", f"out_dir={tmp_path / 'run'}", "--quiet"]
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and err[0].startswith("error: ")
        and "data.context_slices=1 needs NIfTI volumes" in err[0]
    )


def test_vessel_task_needs_the_neighbouring_slices(tmp_path):
    volume, mask = vessel_volume(np.random.default_rng(0), shape=(40, 40, 8), tubes=3)
    bright = volume > 200
    assert volume.shape == mask.shape == (40, 40, 8) and set(np.unique(mask)) == {0, 1}
    assert (bright & (mask == 1)).sum() > 0.9 * mask.sum()  # tubes are bright ...
    for z in range(8):  # ... and so are the single-slice look-alikes, in every slice
        lookalike = bright[:, :, z] & (mask[:, :, z] == 0)
        assert lookalike.sum() > 10 and not (lookalike & bright[:, :, (z + 4) % 8]).all()
    counts = make_vessels(tmp_path / "v", n_train=2, n_val=1, n_test=1, shape=(24, 24, 4))
    assert counts == {"train": 2, "val": 1, "test": 1}
    splits = json.loads((tmp_path / "v" / "splits.json").read_text())
    assert splits == {"train": ["case_000", "case_001"], "val": ["case_002"], "test": ["case_003"]}
    assert nib.load(tmp_path / "v" / "masks" / "case_003.nii.gz").shape == (24, 24, 4)


def test_context_benchmark_pairs_cases_by_seed():
    spec = importlib.util.spec_from_file_location("context_slices", BENCH / "context_slices.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    records = [
        {"k": k, "seed": s, "case": c, "dice": 0.5 + 0.1 * k + 0.01 * s + (0.05 if c == "b" else 0.0)}
        for k in (0, 1)
        for s in (0, 1)
        for c in ("a", "b")
    ]
    rows = bench.summary(records, [0, 1], {0: 10.0, 1: 12.0})
    assert rows[0]["mean_dice"] == 53.0 and rows[1]["seed_means"] == [62.5, 63.5]
    assert rows[1]["vs_k0"]["mean_diff"] == 10.0 and rows[1]["vs_k0"]["n_better"] == 4
    assert "| 1 | 3 | 63.00 | 62.5, 63.5 | +10.00 [+10.00, +10.00] | 4 / 4 | 12 |" in bench.table(rows)
