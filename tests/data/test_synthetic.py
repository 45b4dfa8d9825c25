"""Synthetic datasets: official layouts, determinism, mask values and NIfTI geometry."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from decon_med.data.synthetic import SYNTH_KINDS, make_folder, make_isic, make_nifti, make_refuge, synthesize
from decon_med.errors import DeconError

REFUGE_TRAIN_MASKS = "Annotation-Training400/Disc_Cup_Masks"


def _array(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _files(root: Path, pattern: str) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.glob(pattern))


# -- ISIC 2017 -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def isic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("isic")
    assert make_isic(root, n=8, seed=0) == {"train": 8, "val": 2, "test": 2}
    return root


def test_isic_layout(isic):
    assert _files(isic, "ISIC-2017_Training_Data/ISIC_???????.jpg") == [
        f"ISIC-2017_Training_Data/ISIC_{i:07d}.jpg" for i in range(8)
    ]
    assert _files(isic, "ISIC-2017_Validation_Data/*.jpg") == [
        "ISIC-2017_Validation_Data/ISIC_0000008.jpg",
        "ISIC-2017_Validation_Data/ISIC_0000009.jpg",
    ]
    assert _files(isic, "ISIC-2017_Test_v2_Data/*.jpg") == [
        "ISIC-2017_Test_v2_Data/ISIC_0000010.jpg",
        "ISIC-2017_Test_v2_Data/ISIC_0000011.jpg",
    ]
    for data, gt in [
        ("ISIC-2017_Training_Data", "ISIC-2017_Training_Part1_GroundTruth"),
        ("ISIC-2017_Validation_Data", "ISIC-2017_Validation_Part1_GroundTruth"),
        ("ISIC-2017_Test_v2_Data", "ISIC-2017_Test_v2_Part1_GroundTruth"),
    ]:
        for image in (isic / data).glob("ISIC_???????.jpg"):
            assert (isic / gt / f"{image.stem}_segmentation.png").is_file()
        assert len(list((isic / gt).iterdir())) == len(list((isic / data).glob("ISIC_???????.jpg")))
        assert (isic / data / f"{data}_metadata.csv").is_file()
    assert _files(isic, "ISIC-2017_Training_Data/*_superpixels.png") == [
        "ISIC-2017_Training_Data/ISIC_0000000_superpixels.png",
        "ISIC-2017_Training_Data/ISIC_0000004_superpixels.png",
    ]


def test_isic_metadata(isic):
    lines = (
        (isic / "ISIC-2017_Training_Data" / "ISIC-2017_Training_Data_metadata.csv").read_text().splitlines()
    )
    assert lines[0] == "image_id,age_approximate,sex"
    assert [line.split(",")[0] for line in lines[1:]] == [f"ISIC_{i:07d}" for i in range(8)]


def test_isic_images_and_masks(isic):
    sizes = set()
    for image_path in sorted((isic / "ISIC-2017_Training_Data").glob("ISIC_???????.jpg")):
        image = Image.open(image_path)
        mask_path = isic / "ISIC-2017_Training_Part1_GroundTruth" / f"{image_path.stem}_segmentation.png"
        mask = Image.open(mask_path)
        assert image.mode == "RGB" and mask.mode == "L"
        assert mask.size == image.size
        w, h = image.size
        assert 96 <= h <= 128 and 120 <= w <= 160
        sizes.add(image.size)
        m = np.asarray(mask)
        assert set(np.unique(m).tolist()) == {0, 255}
        grey = np.asarray(image.convert("L"), dtype=np.float32)
        assert grey[m == 255].mean() < grey[m == 0].mean() - 40  # lesion clearly darker than skin
    assert len(sizes) > 1
    superpixels = Image.open(isic / "ISIC-2017_Training_Data" / "ISIC_0000000_superpixels.png")
    assert superpixels.mode == "RGB"
    assert superpixels.size == Image.open(isic / "ISIC-2017_Training_Data" / "ISIC_0000000.jpg").size


def test_isic_deterministic(isic, tmp_path):
    make_isic(tmp_path / "same", n=8, seed=0)
    make_isic(tmp_path / "other", n=8, seed=1)
    for rel in [
        "ISIC-2017_Training_Data/ISIC_0000000.jpg",
        "ISIC-2017_Training_Part1_GroundTruth/ISIC_0000003_segmentation.png",
        "ISIC-2017_Test_v2_Data/ISIC_0000011.jpg",
        "ISIC-2017_Validation_Data/ISIC-2017_Validation_Data_metadata.csv",
    ]:
        assert (tmp_path / "same" / rel).read_bytes() == (isic / rel).read_bytes()
    rel = "ISIC-2017_Training_Data/ISIC_0000000.jpg"
    assert (tmp_path / "other" / rel).read_bytes() != (isic / rel).read_bytes()


def test_split_sizes(tmp_path):
    assert make_isic(tmp_path / "one", n=1) == {"train": 1, "val": 2, "test": 2}
    assert make_refuge(tmp_path / "r", n=12) == {"train": 12, "val": 3, "test": 3}


# -- REFUGE ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def refuge(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("refuge")
    assert make_refuge(root, n=10, seed=0) == {"train": 10, "val": 2, "test": 2}
    return root


def test_refuge_layout(refuge):
    assert _files(refuge, "Training400/Glaucoma/*") == ["Training400/Glaucoma/g0001.jpg"]
    assert _files(refuge, "Training400/Non-Glaucoma/*") == [
        f"Training400/Non-Glaucoma/n{i:04d}.jpg" for i in range(1, 10)
    ]
    assert _files(refuge, f"{REFUGE_TRAIN_MASKS}/Glaucoma/*") == [f"{REFUGE_TRAIN_MASKS}/Glaucoma/g0001.bmp"]
    assert len(_files(refuge, f"{REFUGE_TRAIN_MASKS}/Non-Glaucoma/n*.bmp")) == 9
    assert _files(refuge, "REFUGE-Validation400/*") == [
        "REFUGE-Validation400/V0001.jpg",
        "REFUGE-Validation400/V0002.jpg",
    ]
    assert _files(refuge, "REFUGE-Validation400-GT/Disc_Cup_Masks/*") == [
        "REFUGE-Validation400-GT/Disc_Cup_Masks/V0001.bmp",
        "REFUGE-Validation400-GT/Disc_Cup_Masks/V0002.bmp",
    ]
    assert _files(refuge, "Test400/*") == ["Test400/T0001.jpg", "Test400/T0002.jpg"]
    glaucoma = _files(refuge, "REFUGE-Test-GT/Disc_Cup_Masks/G/*.bmp")
    normal = _files(refuge, "REFUGE-Test-GT/Disc_Cup_Masks/N/*.bmp")
    assert len(glaucoma) == 1 and len(normal) == 1
    assert sorted(Path(p).stem for p in glaucoma + normal) == ["T0001", "T0002"]


def _refuge_pairs(root: Path) -> list[tuple[Path, Path]]:
    pairs = [
        (image, root / REFUGE_TRAIN_MASKS / image.parent.name / f"{image.stem}.bmp")
        for image in sorted((root / "Training400").glob("*/*.jpg"))
    ]
    pairs += [
        (image, root / "REFUGE-Validation400-GT" / "Disc_Cup_Masks" / f"{image.stem}.bmp")
        for image in sorted((root / "REFUGE-Validation400").glob("*.jpg"))
    ]
    pairs += [
        (image, next((root / "REFUGE-Test-GT" / "Disc_Cup_Masks").glob(f"*/{image.stem}.bmp")))
        for image in sorted((root / "Test400").glob("*.jpg"))
    ]
    return pairs


def test_refuge_masks(refuge):
    pairs = _refuge_pairs(refuge)
    assert len(pairs) == 14
    for image_path, mask_path in pairs:
        image, mask = Image.open(image_path), Image.open(mask_path)
        assert image.mode == "RGB" and mask.mode == "L"
        assert mask.size == image.size
        assert image.size == ((128, 128) if "Training400" in str(image_path) else (112, 112))
        m = np.asarray(mask)
        assert set(np.unique(m).tolist()) == {0, 128, 255}
        # The cup lies inside the disc: every cup pixel has no background pixel among its 4 neighbours.
        padded = np.pad(m, 1, constant_values=255)
        neighbours = [padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        cup = m == 0
        assert not any((cup & (n == 255)).any() for n in neighbours)
        # Fundus look: black corners, a bright disc.
        grey = np.asarray(image.convert("L"), dtype=np.float32)
        assert grey[:4, :4].max() < 20
        assert grey[m < 255].mean() > grey[m == 255].mean() + 40


def test_refuge_glaucoma_has_larger_cup(refuge):
    def cup_to_disc(mask_path: Path) -> float:
        m = _array(mask_path)
        return float((m == 0).sum() / (m < 255).sum())

    glaucoma = cup_to_disc(refuge / REFUGE_TRAIN_MASKS / "Glaucoma" / "g0001.bmp")
    normal = max(cup_to_disc(p) for p in (refuge / REFUGE_TRAIN_MASKS / "Non-Glaucoma").glob("*.bmp"))
    assert glaucoma > normal


def test_refuge_deterministic(refuge, tmp_path):
    make_refuge(tmp_path / "same", n=10, seed=0)
    make_refuge(tmp_path / "other", n=10, seed=3)
    for rel in [
        "Training400/Non-Glaucoma/n0004.jpg",
        f"{REFUGE_TRAIN_MASKS}/Glaucoma/g0001.bmp",
        "Test400/T0002.jpg",
    ]:
        assert (tmp_path / "same" / rel).read_bytes() == (refuge / rel).read_bytes()
        assert (tmp_path / "other" / rel).read_bytes() != (refuge / rel).read_bytes()


# -- generic labelled folder -----------------------------------------------------------------------------------
def test_folder_png(tmp_path):
    assert make_folder(tmp_path / "f", n=10, seed=0) == {"train": 6, "val": 2, "test": 2}
    root = tmp_path / "f"
    ids = [f"case_{i:03d}" for i in range(10)]
    assert _files(root, "images/*") == [f"images/{i}.png" for i in ids]
    assert _files(root, "masks/*") == [f"masks/{i}.png" for i in ids]
    splits = json.loads((root / "splits.json").read_text())
    assert sorted(splits) == ["test", "train", "val"]
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == ids
    for case in ids:
        image, mask = Image.open(root / "images" / f"{case}.png"), Image.open(root / "masks" / f"{case}.png")
        assert image.mode == "RGB" and mask.mode == "L" and image.size == mask.size
        assert set(np.unique(np.asarray(mask)).tolist()) == {0, 1, 2}


def test_folder_small_n_keeps_every_split(tmp_path):
    counts = make_folder(tmp_path / "f", n=3)
    assert counts == {"train": 1, "val": 1, "test": 1}
    with pytest.raises(ValueError, match="at least 3"):
        make_folder(tmp_path / "g", n=2)
    with pytest.raises(ValueError, match="fmt"):
        make_folder(tmp_path / "h", n=4, fmt="jpg")


def test_folder_nifti(tmp_path):
    assert make_folder(tmp_path / "f", n=5, seed=0, fmt="nifti") == {"train": 3, "val": 1, "test": 1}
    root = tmp_path / "f"
    assert _files(root, "images/*") == [f"images/case_{i:03d}.nii.gz" for i in range(5)]
    assert _files(root, "masks/*") == [f"masks/case_{i:03d}.nii.gz" for i in range(5)]
    image = nib.load(root / "images" / "case_002.nii.gz")
    mask = nib.load(root / "masks" / "case_002.nii.gz")
    assert image.shape == mask.shape == (48, 48, 12)
    assert image.get_data_dtype() == np.float32 and mask.get_data_dtype() == np.uint8
    np.testing.assert_allclose(image.affine, mask.affine)
    np.testing.assert_allclose(np.diag(image.affine)[:3], [0.9, 0.9, 2.5], rtol=1e-6)
    assert not np.allclose(image.affine[:3, 3], 0)
    labels = np.asarray(mask.dataobj)
    assert set(np.unique(labels).tolist()) == {0, 1, 2}
    volume = image.get_fdata()
    assert volume[labels == 1].mean() > volume[labels == 0].mean() + 100  # image aligned with mask
    other = tmp_path / "g"
    make_folder(other, n=5, seed=0, fmt="nifti")
    for rel in ["images/case_002.nii.gz", "masks/case_004.nii.gz", "splits.json"]:
        assert (other / rel).read_bytes() == (root / rel).read_bytes()


# -- NIfTI scans -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("modality", ["mr", "ct"])
def test_nifti_scans(tmp_path, modality):
    assert make_nifti(tmp_path / "s", n=2, seed=0, modality=modality) == {"volumes": 2}
    if modality == "mr":
        rels = ["sub-001/anat/sub-001_T1w.nii.gz", "sub-002/anat/sub-002_T1w.nii.gz"]
    else:
        rels = ["patient_001/ct.nii.gz", "patient_002/ct.nii.gz"]
    assert _files(tmp_path / "s", "**/*.nii.gz") == rels

    image = nib.load(tmp_path / "s" / rels[0])
    assert image.shape == (64, 64, 20)
    assert image.get_data_dtype() == (np.float32 if modality == "mr" else np.int16)
    affine = image.affine
    assert not np.allclose(affine, np.eye(4))
    spacing = (0.8, 0.8, 3.0) if modality == "mr" else (0.7, 0.7, 2.5)
    np.testing.assert_allclose(image.header.get_zooms(), spacing, rtol=1e-6)
    sform, sform_code = image.header.get_sform(coded=True)
    qform, qform_code = image.header.get_qform(coded=True)
    assert sform_code == qform_code == 1
    np.testing.assert_allclose(sform, affine, atol=1e-5)
    np.testing.assert_allclose(qform, affine, atol=1e-5)

    # Round trip through nibabel keeps data and geometry.
    copy = tmp_path / "copy.nii.gz"
    nib.save(image, copy)
    again = nib.load(copy)
    np.testing.assert_allclose(again.affine, affine)
    np.testing.assert_array_equal(again.get_fdata(), image.get_fdata())

    volume = image.get_fdata()
    ends = np.concatenate([volume[:, :, :3], volume[:, :, -3:]], axis=2)
    middle = volume[:, :, 10]
    if modality == "mr":
        assert np.abs(ends).max() < 20
        assert np.percentile(middle, 90) > 300
        assert volume.max() > 2 * np.percentile(volume[volume != 0], 99.5)  # bright outliers
    else:
        assert np.abs(ends + 1000).max() < 60
        assert volume.min() >= -1024
        assert volume.max() > 500  # bone
        assert np.abs(np.median(volume[np.abs(volume - 40) < 60]) - 40) < 20  # soft tissue
    assert all(np.abs(volume[:, :, k]).max() > 100 for k in range(4, 16))


def test_nifti_deterministic(tmp_path):
    make_nifti(tmp_path / "a", n=1, seed=5)
    make_nifti(tmp_path / "b", n=1, seed=5)
    make_nifti(tmp_path / "c", n=1, seed=6)
    rel = "sub-001/anat/sub-001_T1w.nii.gz"
    assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert (tmp_path / "a" / rel).read_bytes() != (tmp_path / "c" / rel).read_bytes()
    with pytest.raises(ValueError, match="modality"):
        make_nifti(tmp_path / "d", modality="pet")


# -- overwrite protection and dispatch -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", SYNTH_KINDS)
def test_overwrite_protection(tmp_path, kind):
    out = tmp_path / kind
    synthesize(kind, out, n=3)
    with pytest.raises(FileExistsError):
        synthesize(kind, out, n=3)
    first = sorted(p.relative_to(out) for p in out.rglob("*"))
    (out / "notes.txt").write_text("mine")  # foreign files stay where they are, wherever they are
    inner = next(p for p in sorted(out.rglob("*")) if p.is_dir())
    (inner / "mine.txt").write_text("mine too")
    synthesize(kind, out, n=3, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (inner / "mine.txt").read_text() == "mine too"
    (out / "notes.txt").unlink()
    (inner / "mine.txt").unlink()
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == first


def test_overwrite_refuses_a_foreign_file_where_it_writes(tmp_path):
    out = tmp_path / "data"
    synthesize("refuge", out, n=3)
    (out / "splits.json").write_text("my own splits")  # where the folder generator writes its splits
    with pytest.raises(DeconError, match=r"holds splits\.json, which decon-med did not write"):
        synthesize("folder", out, n=3, overwrite=True)
    assert (out / "splits.json").read_text() == "my own splits"
    assert any((out / "Training400").rglob("*.jpg"))  # nothing was deleted before the refusal


def test_overwrite_never_empties_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    synthesize("folder", ".", n=4)
    with pytest.raises(DeconError, match="current folder"):
        synthesize("folder", ".", n=4, overwrite=True)
    assert (tmp_path / "splits.json").is_file()


def test_existing_empty_folder_is_fine(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert make_isic(out, n=2) == {"train": 2, "val": 2, "test": 2}


def test_synthesize_dispatch(tmp_path):
    assert synthesize("folder", tmp_path / "f", n=5) == {"train": 3, "val": 1, "test": 1}
    assert synthesize("nifti", tmp_path / "n", n=1) == {"volumes": 1}
    assert (tmp_path / "n" / "sub-001" / "anat" / "sub-001_T1w.nii.gz").is_file()
    with pytest.raises(ValueError, match="isic, refuge, folder, nifti"):
        synthesize("brats", tmp_path / "x", n=2)
