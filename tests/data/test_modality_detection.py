"""Modality detection from robust evidence; per-file decisions in check-data and odd files as one warning each."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np

from decon_med.data.check import check_dataset, format_summary, write_modalities
from decon_med.data.intensity import contradiction, detect_modality, recorded_decision, resolve_modality
from decon_med.data.layouts import slice_options
from tests.conftest import make_cfg

SHAPE = (25, 20, 10)  # 5000 voxels: 5 of them are 0.1 %


def _mr(rng: np.random.Generator) -> np.ndarray:
    """A head-like MR: 0 background with faint noise, tissue between 200 and 900."""
    volume = np.abs(rng.normal(0.0, 3.0, SHAPE))
    volume[4:20, 4:20] = rng.uniform(200, 900, (16, 16, SHAPE[2]))
    return volume.astype(np.float32)


def _ct_with_little_air(rng: np.random.Generator) -> np.ndarray:
    """A CT cropped inside the body: soft tissue and fat in HU, a bone, and 0.1 % of the voxels air."""
    volume = rng.normal(40.0, 15.0, SHAPE)
    volume[:4, :4] = -100.0
    volume[10:13, 10:13] = 700.0
    flat = volume.reshape(-1)
    flat[rng.choice(flat.size, round(0.001 * flat.size), replace=False)] = -1000.0
    return np.round(volume).astype(np.int16)


def test_mr_offset_by_minus_1000_is_mr_with_a_doubt():
    offset = _mr(np.random.default_rng(0)) - 1000.0  # 0.5th percentile -1000: the old rule said CT
    decision = detect_modality(offset)
    assert decision.modality == "mr" and not decision.certain
    assert "offset by about -1000" in decision.reason
    assert contradiction(offset, "mr") is None  # a declared MR is not contradicted by it


def test_ct_with_0_1_percent_air_is_ct():
    volume = _ct_with_little_air(np.random.default_rng(0))
    assert np.percentile(volume, 0.5) > -500  # the old rule (0.5th percentile <= -500) said MR
    decision = detect_modality(volume)
    assert decision.modality == "ct" and decision.certain
    assert decision.reason.startswith("0.1 % near -1000 HU")
    assert detect_modality(_mr(np.random.default_rng(1))).modality == "mr"


def test_auto_decisions_are_recorded_and_an_odd_file_warns_once(tmp_path: Path, caplog):
    offset = _mr(np.random.default_rng(2)) - 1000.0
    path = str(tmp_path / "odd.nii.gz")
    with caplog.at_level(logging.WARNING, logger="decon_med.data"):
        for _ in range(2):  # a second scan of the same file does not warn again
            assert resolve_modality(path, "auto", None, offset)[0] == "mr"
    (record,) = caplog.records
    assert record.getMessage().startswith(f"warning: {path}: auto modality mr is uncertain")
    modality, how, certain = recorded_decision(path)
    assert (modality, certain) == ("mr", False) and how.startswith("auto: uncertain: ")


def test_check_data_lists_each_file_and_warns_without_stopping(tmp_path: Path):
    rng = np.random.default_rng(3)
    root = tmp_path / "scans"
    root.mkdir()
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    for name, volume in (
        ("ct.nii.gz", _ct_with_little_air(rng)),
        ("mr.nii.gz", _mr(rng)),
        ("odd.nii.gz", _mr(rng) - 1000.0),
    ):
        nib.save(nib.Nifti1Image(volume, affine), root / name)
    cfg = make_cfg("unlabeled", root, modality="auto", in_channels=1, min_foreground=0.0)
    summary = check_dataset(cfg, progress=False)
    modalities = {Path(r["file"]).name: (r["modality"], r["certain"]) for r in summary["files"]}
    assert modalities == {"ct.nii.gz": ("ct", True), "mr.nii.gz": ("mr", True), "odd.nii.gz": ("mr", False)}
    (warning,) = summary["splits"]["train"]["warnings"]
    assert warning.startswith(f"{root / 'odd.nii.gz'}: auto modality mr is uncertain")
    text = format_summary(summary)
    assert "modality per volume (how it was decided):" in text
    assert (
        "train  odd.nii.gz: mr (auto: uncertain: " in text
        and "train  ct.nii.gz: ct (auto: 0.1 % near" in text
    )
    out = tmp_path / "modalities.csv"
    items = {"train": [{"image": str(root / "ct.nii.gz"), "slice": 0, "modality": "ct"}]}
    assert write_modalities(out, items, slice_options(cfg.data))
    assert out.read_text().splitlines()[0] == "split,file,modality,how,certain"
    assert not write_modalities(
        tmp_path / "none.csv", {"train": [{"image": "a.png"}]}, slice_options(cfg.data)
    )
