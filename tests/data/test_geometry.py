"""Volume geometry: RAS reorientation, square in-plane pixels, and predictions back on the stored grid."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations

from decon_med.data.geometry import from_canonical, plane_size, to_canonical
from decon_med.data.volumes import (
    SliceOptions,
    labels_to_volume,
    load_label_slice,
    load_slice,
    scan_volume,
    volume_slices,
    write_volume,
)

RAS_AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])
RAS_AFFINE[:3, 3] = (-20.0, 10.0, 5.0)
OPTS = SliceOptions(min_foreground=0.0)


def _ball(shape, affine, centre_mm, radius_mm) -> np.ndarray:
    """Voxels whose world position lies within ``radius_mm`` of ``centre_mm``."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    return np.linalg.norm(world - np.asarray(centre_mm), axis=-1) <= radius_mm


def _pair(tmp_path: Path, codes: str, spacing=(0.8, 0.8, 2.5)):
    """The same scan (image + label) saved in RAS and in the orientation ``codes``."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = RAS_AFFINE[:3, 3]
    shape = (30, 26, 12)
    rng = np.random.default_rng(0)
    image = rng.uniform(100, 900, shape).astype(np.float32)
    label = _ball(shape, affine, affine[:3, 3] + (12.0, 10.0, 15.0), 8.0).astype(np.uint8)
    label[:4, :3, :2] = 2  # an asymmetric corner, so any flip shows
    paths = {}
    for name, ornt in (("ras", None), ("other", codes)):
        img, seg = nib.Nifti1Image(image, affine), nib.Nifti1Image(label, affine)
        if ornt is not None:
            transform = orientations.ornt_transform(
                orientations.axcodes2ornt("RAS"), orientations.axcodes2ornt(ornt)
            )
            img, seg = img.as_reoriented(transform), seg.as_reoriented(transform)
        paths[name] = (tmp_path / f"{name}.nii.gz", tmp_path / f"{name}_seg.nii.gz")
        nib.save(img, paths[name][0])
        nib.save(seg, paths[name][1])
    return paths


@pytest.mark.parametrize("codes", ["LPI", "SAR", "PIL"])
def test_two_orientations_give_identical_slices(tmp_path: Path, codes: str):
    paths = _pair(tmp_path, codes)
    assert nib.aff2axcodes(nib.load(paths["other"][0]).affine) == tuple(codes)
    for axis in (0, 1, 2):
        opts = SliceOptions(axis=axis, min_foreground=0.0)
        ras, other = scan_volume(paths["ras"][0], opts), scan_volume(paths["other"][0], opts)
        assert len(ras) == len(other) > 1
        for a, b in zip(ras, other, strict=True):
            assert (a["axis"], a["slice"], a["size"]) == (b["axis"], b["slice"], b["size"])
            np.testing.assert_array_equal(load_slice(a, opts), load_slice(b, opts))
            a_lab = load_label_slice(a, opts, paths["ras"][1])
            np.testing.assert_array_equal(a_lab, load_label_slice(b, opts, paths["other"][1]))


def test_canonical_matches_monai_orientation():
    from monai.data import MetaTensor
    from monai.transforms import Orientation

    affine = np.array([[0.0, -0.9, 0.0, 20.0], [0.8, 0.0, 0.0, -31.5], [0.0, 0.0, -2.5, 7.0], [0, 0, 0, 1.0]])
    volume = np.random.default_rng(1).normal(size=(5, 6, 7)).astype(np.float32)
    canonical, geometry = to_canonical(volume, affine)
    monai = Orientation(axcodes="RAS")(MetaTensor(volume[None].copy(), affine=affine))
    np.testing.assert_array_equal(canonical, monai[0].numpy())
    np.testing.assert_allclose(geometry.spacing, (0.9, 0.8, 2.5))
    np.testing.assert_array_equal(from_canonical(canonical, geometry), volume)


@pytest.mark.parametrize("codes", ["LPI", "SAR"])
def test_predictions_go_back_to_each_files_own_grid(tmp_path: Path, codes: str):
    """A deterministic 'network' (threshold) predicted through both files: same labels in world space, and each
    output lines up with its own file voxel for voxel (isotropic in-plane, so no resampling is involved)."""
    paths = _pair(tmp_path, codes, spacing=(1.0, 1.0, 1.0))
    outputs = {}
    for name, (image_path, _) in paths.items():
        slices = volume_slices(image_path, OPTS)
        masks = [(im[:, :, 0] > 0.5).astype(np.uint8) for im in slices.images]
        labels = labels_to_volume(masks, slices)
        stored = nib.load(image_path)
        assert labels.shape == stored.shape
        lo, hi = scan_volume(image_path, OPTS)[0]["range"][0]
        expected = ((np.clip((stored.get_fdata() - lo) / (hi - lo), 0, 1)) > 0.5).astype(np.uint8)
        np.testing.assert_array_equal(labels, expected)
        out = tmp_path / "pred" / f"{name}_pred.nii.gz"
        write_volume(out, labels, None, reference=image_path)
        outputs[name] = nib.load(out)
        np.testing.assert_array_equal(outputs[name].affine, stored.affine)
    ras = np.asarray(outputs["ras"].dataobj)
    np.testing.assert_array_equal(np.asarray(nib.as_closest_canonical(outputs["other"]).dataobj), ras)


def test_anisotropic_spacing_keeps_the_slice_aspect(tmp_path: Path):
    """A 12 mm ball in 0.8 x 0.8 x 2.5 mm voxels is round in slices along every axis."""
    shape = (64, 64, 24)
    ball = _ball(shape, RAS_AFFINE, RAS_AFFINE[:3, 3] + (25.6, 25.6, 30.0), 12.0)
    nib.save(
        nib.Nifti1Image(np.where(ball, 800.0, 10.0).astype(np.float32), RAS_AFFINE), tmp_path / "b.nii.gz"
    )
    centre = {0: 32, 1: 32, 2: 12}
    for axis, expected in ((0, (64, 75)), (1, (64, 75)), (2, (64, 64))):
        opts = SliceOptions(axis=axis, min_foreground=0.0)
        items = scan_volume(tmp_path / "b.nii.gz", opts)
        item = items[centre[axis]]
        assert item["size"] == expected
        image = load_slice(item, opts)[:, :, 0] > 0.5
        rows, cols = np.flatnonzero(image.any(axis=1)), np.flatnonzero(image.any(axis=0))
        height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        # 24 mm = 30 px across at 0.8 mm; along z the ball is sampled every 2.5 mm (about 3 px)
        assert abs(height - width) <= 3, (axis, height, width)
        assert 28 <= height <= 31
    # without resampling the ball is squashed 3x along z
    flat = SliceOptions(axis=0, min_foreground=0.0, spacing=0)
    image = load_slice(scan_volume(tmp_path / "b.nii.gz", flat)[32], flat)[:, :, 0] > 0.5
    assert image.shape == (64, 24) and np.flatnonzero(image.any(axis=0)).size < 12


def test_anisotropic_labels_go_back_exactly(tmp_path: Path):
    shape = (40, 36, 10)
    label = _ball(shape, RAS_AFFINE, RAS_AFFINE[:3, 3] + (16.0, 14.0, 12.0), 9.0).astype(np.uint8)
    affine = RAS_AFFINE.copy()
    nib.save(nib.Nifti1Image(label.astype(np.float32) * 500, affine), tmp_path / "im.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "seg.nii.gz")
    opts = SliceOptions(axis=1, min_foreground=0.0)
    slices = volume_slices(tmp_path / "im.nii.gz", opts)
    assert slices.images[0].shape == (40, 31, 1)  # 10 slices x 2.5 mm = 25 mm = 31 px at 0.8 mm
    items = scan_volume(tmp_path / "im.nii.gz", opts)
    masks = [load_label_slice(it, opts, tmp_path / "seg.nii.gz") for it in items]
    np.testing.assert_array_equal(labels_to_volume(masks, slices), label)


def test_plane_size_uses_the_finer_spacing_or_the_given_one():
    _, geometry = to_canonical(np.zeros((64, 64, 20)), np.diag([0.8, 0.8, 2.5, 1.0]))
    assert plane_size(geometry, 0) == (64, 62) and plane_size(geometry, 2) == (64, 64)
    assert plane_size(geometry, 2, spacing=1.6) == (32, 32)
