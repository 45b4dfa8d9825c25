"""NIfTI volumes: reading, normalisation, slice selection, slice loading and writing back.

Most tests here slice in stored voxel order (``STORED``); canonical orientation and square pixels are tested in
test_geometry.py.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from decon_med.data.volumes import (
    SliceOptions,
    intensity_range,
    is_nifti,
    kept_slices,
    load_label_slice,
    load_slice,
    nifti_stem,
    normalise_intensity,
    read_volume,
    scan_volume,
    stack_slices,
    write_volume,
)
from decon_med.errors import DataError

SHAPE = (20, 24, 16)
AFFINE = np.array(
    [
        [0.0, -1.5, 0.0, 10.0],
        [2.0, 0.0, 0.0, -5.0],
        [0.0, 0.0, 3.0, 7.5],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
#: Stored voxel order, no resampling.
STORED = {"orientation": "none", "spacing": 0}
ALL = SliceOptions(min_foreground=0.0, **STORED)


def save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def random_volume(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).uniform(10.0, 100.0, shape).astype(np.float32)


@pytest.fixture
def volume_path(tmp_path: Path) -> Path:
    return save(tmp_path / "sub-01_T1w.nii.gz", random_volume())


# -- names -------------------------------------------------------------------------------------------------
def test_names():
    assert is_nifti("a/b.nii.gz") and is_nifti("b.NII") and not is_nifti("b.png") and not is_nifti("b.gz")
    assert nifti_stem("data/sub-01_T1w.nii.gz") == "sub-01_T1w"
    assert nifti_stem("scan.v2.NII") == "scan.v2"


def test_options_are_validated():
    for bad in (
        {"axis": 3},
        {"modality": "pet"},
        {"channels": 0},
        {"orientation": "LPS"},
        {"ct_window": ((40.0, -1.0),)},
        {"clip_percentiles": (99.0, 1.0)},
    ):
        with pytest.raises(ValueError):
            SliceOptions(**bad)


# -- reading -----------------------------------------------------------------------------------------------
def test_read_volume_keeps_voxels_and_affine(volume_path: Path):
    volume, affine = read_volume(volume_path)
    assert volume.dtype == np.float32 and volume.shape == SHAPE
    np.testing.assert_allclose(volume, random_volume())
    assert affine.dtype == np.float64 and affine.shape == (4, 4)
    np.testing.assert_allclose(affine, AFFINE)


def test_2d_and_4d_volumes(tmp_path: Path):
    image = random_volume(shape=(20, 24))
    volume, _ = read_volume(save(tmp_path / "flat.nii", image))
    assert volume.shape == (20, 24, 1)
    items = scan_volume(tmp_path / "flat.nii", SliceOptions(axis=0, min_foreground=0.0, **STORED))
    assert [(it["axis"], it["slice"]) for it in items] == [(2, 0)]
    assert load_slice(items[0], ALL).shape == (20, 24, 1)

    stack = np.stack([random_volume(1), random_volume(2)], axis=-1)
    path = save(tmp_path / "series.nii.gz", stack)
    with pytest.raises(DataError, match=r"series.nii.gz: 4D image with 2 volumes; set data.channels"):
        read_volume(path)
    with pytest.raises(DataError, match="series.nii.gz: 4D image"):
        scan_volume(path, ALL)
    volume, _ = read_volume(path, channels=[1])
    np.testing.assert_allclose(volume, stack[..., 1:])
    items = scan_volume(path, SliceOptions(min_foreground=0.0, select=(1, 0), channels=2, **STORED))
    image = load_slice(items[4], SliceOptions(select=(1, 0), channels=2, **STORED))
    lo, hi = intensity_range(stack[..., 1], ALL)
    np.testing.assert_allclose(image[:, :, 0], np.clip((stack[:, :, 4, 1] - lo) / (hi - lo), 0, 1), atol=1e-6)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_truncated_file_is_a_data_error(tmp_path: Path, suffix: str):
    whole = tmp_path / f"whole{suffix}"
    save(whole, random_volume())
    cut = tmp_path / f"cut{suffix}"
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=f"cut{suffix}"):
        read_volume(cut)
    with pytest.raises(DataError, match=f"cut{suffix}"):
        scan_volume(cut, ALL)


@pytest.mark.parametrize(
    "name", ["garbage.nii.gz", "garbage.nii", "empty.nii.gz", "notes.txt", "missing.nii"]
)
def test_bad_files_are_data_errors(tmp_path: Path, name: str):
    path = tmp_path / name
    if name != "missing.nii":
        path.write_bytes(b"" if name.startswith("empty") else np.random.default_rng(0).bytes(2000))
    with pytest.raises(DataError) as info:
        read_volume(path)
    assert name in str(info.value) and "\n" not in str(info.value)


# -- intensities -------------------------------------------------------------------------------------------
def test_ct_window_maps_edges_to_0_and_1():
    opts = SliceOptions(modality="ct", ct_window=(40.0, 400.0))
    volume = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0], dtype=np.float32).reshape(5, 1, 1)
    assert intensity_range(volume, opts) == (-160.0, 240.0)
    np.testing.assert_allclose(normalise_intensity(volume, opts).ravel(), [0.0, 0.0, 0.5, 1.0, 1.0])


def test_percentile_clip_ignores_an_outlier():
    volume = random_volume()
    volume[0, 0, 0] = 1e6
    result = normalise_intensity(volume, SliceOptions(modality="mr"))
    assert result.dtype == np.float32 and result.min() >= 0.0 and result.max() <= 1.0
    assert result[0, 0, 0] == 1.0
    rest = np.delete(result.ravel(), 0)
    assert 0.4 < np.median(rest) < 0.6 and np.percentile(rest, 95) > 0.9


def test_percentiles_use_nonzero_voxels():
    volume = np.zeros(SHAPE, dtype=np.float32)
    volume[5:15, 5:15, 4:12] = random_volume(shape=(10, 10, 8))
    lo, hi = intensity_range(volume, SliceOptions(clip_percentiles=(0.0, 100.0)))
    assert (lo, hi) == (float(volume[volume > 0].min()), float(volume.max()))


def test_binary_and_constant_volumes():
    binary = np.zeros(SHAPE, dtype=np.float32)
    binary[2:5] = 1.0
    np.testing.assert_array_equal(normalise_intensity(binary, ALL), binary)
    for value in (0.0, 7.0):
        result = normalise_intensity(np.full(SHAPE, value, dtype=np.float32), ALL)
        assert not np.isnan(result).any() and (result == 0).all()


def test_constant_volume_has_no_kept_slices(tmp_path: Path):
    path = save(tmp_path / "flat.nii.gz", np.full(SHAPE, 3.0, dtype=np.float32))
    assert scan_volume(path, SliceOptions()) == []


# -- slicing -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slices_along_each_axis(volume_path: Path, axis: int):
    opts = SliceOptions(axis=axis, min_foreground=0.0, **STORED)
    items = scan_volume(volume_path, opts)
    assert len(items) == SHAPE[axis]
    expected_hw = tuple(s for a, s in enumerate(SHAPE) if a != axis)
    volume01 = normalise_intensity(random_volume(), opts)
    for item in items:
        image = load_slice(item, opts)
        assert image.shape == (*expected_hw, 1) and image.dtype == np.float32
        np.testing.assert_allclose(image[:, :, 0], volume01.take(item["slice"], axis=axis), atol=1e-6)


def test_items_describe_the_slice(volume_path: Path):
    items = scan_volume(volume_path, SliceOptions(axis=1, min_foreground=0.0, **STORED))
    first = items[0]
    assert first["image"] == str(volume_path) and first["slice"] == 0 and first["axis"] == 1
    assert first["id"] == "sub-01_T1w_y000" and items[-1]["id"] == "sub-01_T1w_y023"
    assert first["shape"] == SHAPE
    assert first["range"] == [intensity_range(random_volume(), ALL)]
    assert first["size"] == (SHAPE[0], SHAPE[2]) and first["modality"] == "mr"
    assert scan_volume(volume_path, ALL, id_prefix="case7")[3]["id"] == "case7_z003"


def test_empty_slices_are_skipped(tmp_path: Path):
    volume = random_volume()
    volume[:, :, :3] = 0.0
    volume[:, :, -2:] = 0.0
    volume[:, :, 3] = 0.0
    volume[0, 0, 3] = 50.0  # one bright voxel: a foreground fraction far below 5 %
    path = save(tmp_path / "padded.nii.gz", volume)
    assert [it["slice"] for it in scan_volume(path, SliceOptions(**STORED))] == list(range(4, 14))
    assert len(scan_volume(path, SliceOptions(min_foreground=0.0, **STORED))) == SHAPE[2]
    stats: dict = {}
    assert len(scan_volume(path, SliceOptions(**STORED), skip_empty=False, stats=stats)) == SHAPE[2]
    assert sum(stats["skipped"].values()) == 0
    scan_volume(path, SliceOptions(**STORED), stats=stats)
    assert stats["skipped"] == {"empty (foreground < 0.05)": 6} and stats["modalities"] == {"mr": 2}
    assert kept_slices(normalise_intensity(volume, ALL), SliceOptions(axis=0)) == list(range(SHAPE[0]))


def test_load_slice_uses_the_stored_range(volume_path: Path):
    item = scan_volume(volume_path, ALL)[5]
    raw = random_volume()[:, :, 5]
    forced = load_slice({**item, "range": [0.0, 200.0]}, ALL)
    np.testing.assert_allclose(forced[:, :, 0], raw / 200.0, rtol=1e-6)


def test_three_channels_replicate_grey(volume_path: Path):
    item = scan_volume(volume_path, ALL)[2]
    grey = load_slice(item, ALL)
    rgb = load_slice(item, SliceOptions(channels=3, **STORED))
    assert rgb.shape == (*SHAPE[:2], 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[:, :, c], grey[:, :, 0])


def test_load_slice_rejects_a_changed_volume(tmp_path: Path):
    path = save(tmp_path / "v.nii.gz", random_volume())
    item = scan_volume(path, ALL)[0]
    save(path, random_volume(shape=(8, 8, 8)))
    with pytest.raises(DataError, match="v.nii.gz"):
        load_slice(item, ALL)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_stack_slices_inverts_slicing(axis: int):
    volume = random_volume()
    slices = [volume.take(k, axis=axis) for k in range(volume.shape[axis])]
    np.testing.assert_array_equal(stack_slices(slices, axis), volume)


# -- labels and writing ------------------------------------------------------------------------------------
def test_label_slices_are_integers(tmp_path: Path, volume_path: Path):
    labels = np.random.default_rng(0).integers(0, 4, SHAPE)
    path = save(tmp_path / "seg.nii.gz", labels.astype(np.float32) + 0.0001)  # float storage noise only
    item = scan_volume(volume_path, SliceOptions(axis=0, min_foreground=0.0, **STORED))[7]
    mask = load_label_slice(item, ALL, path)
    assert mask.dtype == np.int64 and mask.shape == SHAPE[1:]
    np.testing.assert_array_equal(mask, labels[7])
    with pytest.raises(DataError, match="seg.nii.gz"):
        load_label_slice({**item, "axis": 2, "slice": SHAPE[2]}, ALL, path)


def test_write_volume_keeps_reference_header(tmp_path: Path):
    reference = nib.Nifti1Image(random_volume(), AFFINE)
    reference.header.set_xyzt_units("mm", "sec")
    reference.header["descrip"] = b"reference scan"
    reference.set_qform(AFFINE, code=1)
    reference.set_sform(AFFINE, code=2)
    ref_path = tmp_path / "ref.nii.gz"
    nib.save(reference, ref_path)

    _, affine = read_volume(ref_path)
    labels = np.random.default_rng(0).integers(0, 3, SHAPE)  # int64: stored as uint8
    out = tmp_path / "pred" / "ref_seg.nii.gz"
    write_volume(out, labels, affine, reference=ref_path)

    written = nib.load(out)
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, AFFINE)
    ref_header, header = nib.load(ref_path).header, written.header
    np.testing.assert_allclose(header["pixdim"], ref_header["pixdim"])
    for key in ("descrip", "xyzt_units", "qform_code", "sform_code"):
        assert header[key] == ref_header[key]
    item = scan_volume(ref_path, ALL)[4]
    np.testing.assert_array_equal(load_label_slice(item, ALL, out), labels[:, :, 4])


def test_write_volume_without_reference(tmp_path: Path):
    volume = random_volume()
    write_volume(tmp_path / "plain.nii", volume, AFFINE)
    read, affine = read_volume(tmp_path / "plain.nii")
    np.testing.assert_allclose(read, volume)
    np.testing.assert_allclose(affine, AFFINE)
    with pytest.raises(DataError, match="plain.png"):
        write_volume(tmp_path / "plain.png", volume, AFFINE)
