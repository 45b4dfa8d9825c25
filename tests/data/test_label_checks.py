"""Strict label checks on volumes, and empty-slice skipping that never touches labelled evaluation data."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from decon_med.data.check import check_dataset, format_summary
from decon_med.data.layouts import get_layout
from decon_med.errors import DataError
from tests.conftest import make_cfg

SHAPE = (24, 24, 8)
AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])
CASES = ["c0", "c1", "c2", "c3", "c4"]


def _case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Bright slices 2..5; slices 0, 1, 6, 7 dark, yet slice 1 holds 12 labelled voxels."""
    rng = np.random.default_rng(seed)
    image = np.zeros(SHAPE, dtype=np.float32)
    image[4:20, 4:20, 2:6] = rng.uniform(300, 900, (16, 16, 4))
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[8:14, 8:14, 2:6] = 1
    label[10:13, 10:14, 1] = 2
    return image, label


def _folder(root: Path) -> Path:
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True)
    for i, case in enumerate(CASES):
        image, label = _case(i)
        nib.save(nib.Nifti1Image(image, AFFINE), root / "images" / f"{case}.nii.gz")
        nib.save(nib.Nifti1Image(label, AFFINE), root / "masks" / f"{case}.nii.gz")
    (root / "splits.json").write_text(json.dumps({"train": CASES[:3], "val": ["c3"], "test": ["c4"]}))
    return root


def _cfg(root: Path, **data):
    return make_cfg("folder", root, num_classes=3, in_channels=1, modality="mr", **data)


def _replace_label(root: Path, label: np.ndarray, affine: np.ndarray = AFFINE, case: str = "c3") -> Path:
    path = root / "masks" / f"{case}.nii.gz"
    nib.save(nib.Nifti1Image(label, affine), path)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return _folder(tmp_path / "vols")


def _check_error(cfg) -> str:
    with pytest.raises(DataError) as info:
        check_dataset(cfg, progress=False)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_label_with_fewer_slices(folder: Path):
    path = _replace_label(folder, _case(3)[1][:, :, :6])
    message = _check_error(_cfg(folder))
    assert (
        message.startswith(str(path))
        and "label shape (24, 24, 6) differs from image shape (24, 24, 8)" in message
    )


def test_label_with_a_flipped_affine(folder: Path):
    flipped = AFFINE.copy()
    flipped[0, 0], flipped[0, 3] = -1.0, 23.0
    path = _replace_label(folder, _case(3)[1][::-1], flipped)  # same world positions, other voxel order
    message = _check_error(_cfg(folder))
    assert message.startswith(str(path)) and "label affine differs" in message and "by 23 mm" in message
    # within the tolerance: a 0.5 mm shift passes when the tolerance allows it
    shifted = AFFINE.copy()
    shifted[0, 3] = 0.5
    _replace_label(folder, _case(3)[1], shifted)
    assert "label affine" in _check_error(_cfg(folder))
    check_dataset(_cfg(folder, affine_tolerance=0.6), progress=False)


def test_non_integer_label_values_are_never_rounded(folder: Path):
    label = _case(3)[1].astype(np.float32)
    label[9, 9, 3] = 1.6
    path = _replace_label(folder, label)
    message = _check_error(_cfg(folder))
    assert message.startswith(str(path)) and "non-integer label values (e.g. 1.6)" in message


def test_label_values_outside_the_classes(folder: Path):
    label = _case(3)[1]
    label[9, 9, 3] = 5
    path = _replace_label(folder, label)
    message = _check_error(_cfg(folder))
    assert message.startswith(str(path)) and "[5] outside the expected set [0, 1, 2]" in message


def test_4d_image_needs_data_channels(folder: Path):
    image, _ = _case(1)
    path = folder / "images" / "c1.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([image, image * 2], axis=-1), AFFINE), path)
    message = _check_error(_cfg(folder))
    assert message.startswith(str(path)) and "4D image with 2 volumes; set data.channels" in message
    summary = check_dataset(_cfg(folder, channels=[1]), progress=False)
    assert summary["splits"]["train"]["n_scans"] == 3


def test_labelled_val_and_test_keep_every_slice(folder: Path):
    layout = get_layout(_cfg(folder).data)
    for split, n in (("train", 3), ("val", 1), ("test", 1)):
        items = layout.items(split)
        assert len(items) == n * SHAPE[2], split  # dark slices 0, 1, 6, 7 kept: slice 1 holds labels
    pretrain = layout.items("train", labeled=False)
    assert sorted({it["slice"] for it in pretrain}) == [2, 3, 4, 5]
    skipping = get_layout(_cfg(folder, skip_empty="train").data)
    assert len(skipping.items("train")) == 3 * 4 and len(skipping.items("test")) == SHAPE[2]


def test_check_data_reports_skipped_slices_per_split(folder: Path):
    summary = check_dataset(_cfg(folder, skip_empty="train"), progress=False)
    rule = "empty (foreground < 0.05)"
    assert summary["splits"]["train"]["skipped_slices"] == {rule: 12}
    assert summary["splits"]["val"]["skipped_slices"] == {rule: 0}
    assert summary["splits"]["train"]["n_items"] == 12 and summary["splits"]["test"]["n_items"] == 8
    text = format_summary(summary)
    assert f"train  volumes by modality: mr 3; slices skipped: {rule}: 12" in text
    assert f"test   volumes by modality: mr 1; slices skipped: {rule}: 0" in text
