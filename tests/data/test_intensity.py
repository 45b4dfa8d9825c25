"""Intensity per file: modality by pattern / auto, CT windows as channels, MR z-score, contradiction warnings."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from decon_med.data.datasets import build_transform
from decon_med.data.intensity import channel_ranges, contradiction, guess_modality, match_modality
from decon_med.data.transforms import TwoViewTransform
from decon_med.data.volumes import SliceOptions, load_slice, scan_volume
from tests.conftest import make_cfg

SHAPE = (16, 16, 6)


def _ct(seed: int = 0) -> np.ndarray:
    volume = np.full(SHAPE, -1000.0, dtype=np.float32)
    volume[3:13, 3:13] = np.random.default_rng(seed).normal(40, 30, (10, 10, SHAPE[2]))
    volume[7:9, 7:9] = 700.0
    return volume


def _mr(seed: int = 0) -> np.ndarray:
    volume = np.zeros(SHAPE, dtype=np.float32)
    volume[3:13, 3:13] = np.random.default_rng(seed).uniform(200, 900, (10, 10, SHAPE[2]))
    return volume


def _save(path: Path, volume: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    return path


def test_auto_decides_per_file_and_logs_it(tmp_path: Path, caplog):
    ct, mr = _save(tmp_path / "a" / "ct.nii.gz", _ct()), _save(tmp_path / "b" / "t1.nii.gz", _mr())
    opts = SliceOptions(modality="auto", min_foreground=0.0, ct_window=(40.0, 400.0))
    with caplog.at_level(logging.INFO, logger="decon_med.data"):
        ct_items, mr_items = scan_volume(ct, opts), scan_volume(mr, opts)
    assert ct_items[0]["modality"] == "ct" and ct_items[0]["range"] == [(-160.0, 240.0)]
    assert mr_items[0]["modality"] == "mr" and mr_items[0]["range"][0][0] > 190
    decisions = [r.getMessage() for r in caplog.records]
    assert any(str(ct) in m and "modality ct (auto" in m for m in decisions)
    assert any(str(mr) in m and "modality mr (auto" in m for m in decisions)
    assert guess_modality(_ct())[0] == "ct" and guess_modality(_mr())[0] == "mr"


def test_modality_mapping_by_sub_folder_and_glob():
    spec = {"ct": "ct", "*_T1w.nii.gz": "mr", "scans/x*": "gray"}
    assert match_modality("/d/ct/p1/img.nii.gz", spec, root="/d") == "ct"
    assert match_modality("/d/site2/ct/img.nii.gz", spec, root="/d") == "ct"
    assert match_modality("/d/mr/sub-01_T1w.nii.gz", spec, root="/d") == "mr"
    assert match_modality("/d/scans/x1.nii.gz", spec, root="/d") == "gray"
    assert match_modality("/d/other/y.nii.gz", spec, root="/d") == "auto"
    assert match_modality("/d/any.nii.gz", "ct") == "ct"


def test_ct_windows_are_channels(tmp_path: Path):
    path = _save(tmp_path / "ct.nii.gz", _ct())
    windows = ((40.0, 400.0), (-600.0, 1500.0), (400.0, 1800.0))
    opts = SliceOptions(modality="ct", ct_window=windows, channels=3, min_foreground=0.0)
    item = scan_volume(path, opts)[2]
    assert item["range"] == [(-160.0, 240.0), (-1350.0, 150.0), (-500.0, 1300.0)]
    image = load_slice(item, opts)
    assert image.shape == (16, 16, 3)
    raw = _ct()[:, :, 2]
    for c, (lo, hi) in enumerate(item["range"]):
        np.testing.assert_allclose(image[:, :, c], np.clip((raw - lo) / (hi - lo), 0, 1), atol=1e-6)
    with pytest.raises(Exception, match="ct.nii.gz: gives 3 channels"):
        load_slice(item, SliceOptions(modality="ct", ct_window=windows, channels=1))


def test_zscore_over_foreground_matches_monai():
    from monai.transforms import NormalizeIntensity

    volume = _mr()
    ((lo, hi),) = channel_ranges(volume, "mr", mr_normalisation="zscore")
    z = np.asarray(NormalizeIntensity(nonzero=True)(volume.copy()))
    ours = np.clip((volume - lo) / (hi - lo), 0, 1)
    inside = volume != 0
    np.testing.assert_allclose(ours[inside], np.clip((z[inside] + 3) / 6, 0, 1), atol=1e-5)


def test_percentile_clip_matches_monai_over_foreground():
    from monai.transforms import ScaleIntensityRangePercentiles

    volume = _mr()
    ((lo, hi),) = channel_ranges(volume, "mr", percentiles=(1.0, 99.0))
    fg = volume[volume != 0]
    monai = ScaleIntensityRangePercentiles(1.0, 99.0, 0.0, 1.0, clip=True)(fg).numpy()
    np.testing.assert_allclose(np.clip((fg - lo) / (hi - lo), 0, 1), monai, atol=1e-5)


def test_contradicting_modality_is_one_warning_line(tmp_path: Path, caplog):
    mr_as_ct = _save(tmp_path / "ct" / "really_mr.nii.gz", _mr())
    stats: dict = {}
    with caplog.at_level(logging.WARNING, logger="decon_med.data"):
        scan_volume(mr_as_ct, SliceOptions(modality=(("ct", "ct"),), root=str(tmp_path)), stats=stats)
    (record,) = caplog.records
    assert record.getMessage().startswith(f"warning: {mr_as_ct}: declared ct but no intensity below -200")
    assert "\n" not in record.getMessage() and len(stats["warnings"]) == 1
    assert contradiction(_ct(), "mr").startswith("declared mr but 61 % near -1000 HU")
    assert contradiction(_ct(), "ct") is None and contradiction(_mr(), "mr") is None


def test_ct_and_mr_slices_never_get_rgb_photometric_augmentation(tmp_path: Path):
    """A pre-training config left at modality rgb, in_channels 3: volume slices get the intensity recipe."""
    cfg = make_cfg("unlabeled", tmp_path, in_channels=3)
    assert cfg.data.modality == "rgb"
    transform = build_transform(cfg, "pretrain")
    assert isinstance(transform, TwoViewTransform)
    image = np.random.default_rng(0).uniform(0, 1, (64, 64, 3)).astype(np.float32)
    colour = {type(t).__name__ for t in transform._pipelines[True][1].transforms}
    grey = {type(t).__name__ for t in transform._pipelines[False][1].transforms}
    assert {"Solarize", "ToGray"} <= colour and not {"Solarize", "ToGray"} & grey
    out_ct = transform({"image": image, "id": "a", "seed": 1, "modality": "ct"})
    out_gray = TwoViewTransform(64, modality="gray", in_channels=3)({"image": image, "id": "a", "seed": 1})
    out_rgb = transform({"image": image, "id": "a", "seed": 1, "modality": "rgb"})
    assert "modality" not in out_ct
    np.testing.assert_array_equal(out_ct["view2"].numpy(), out_gray["view2"].numpy())
    assert not np.array_equal(out_rgb["view2"].numpy(), out_gray["view2"].numpy())
