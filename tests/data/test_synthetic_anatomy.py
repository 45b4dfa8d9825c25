"""The anatomy task: deterministic, split by volume, nested and touching organs that intensity alone cannot tell."""

import json
import re

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_fill_holes

from decon_med.cli import main
from decon_med.data.synthetic_anatomy import NOISE_SD, anatomy_volume, make_anatomy

ID = re.compile(r"case_v(\d{3})_s(\d{2})")


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_layout_counts_splits_by_volume_and_determinism(tmp_path):
    counts = make_anatomy(tmp_path / "a", n_unlabeled=20, n_labeled=24, seed=3, size=64)
    assert counts == {"unlabeled": 20, "train": 12, "val": 4, "test": 8}
    make_anatomy(tmp_path / "b", n_unlabeled=20, n_labeled=24, seed=3, size=64)
    make_anatomy(tmp_path / "c", n_unlabeled=20, n_labeled=6, seed=4, size=64)
    root = tmp_path / "a"
    files = _files(root)
    assert len(files) == 20 + 2 * 24 + 3  # images, masks, splits.json, the folder marker and its manifest
    assert _files(tmp_path / "b") == files
    for rel in files:
        assert (root / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert [p.name for p in sorted((root / "unlabeled").iterdir())] == [f"img_{i:04d}.png" for i in range(20)]

    splits = json.loads((root / "labeled" / "splits.json").read_text())
    volumes = {}
    for split, ids in splits.items():
        parsed = [ID.fullmatch(case) for case in ids]
        assert all(parsed), ids
        volumes[split] = {int(m.group(1)) for m in parsed}
    assert {k: len(v) for k, v in volumes.items()} == {"train": 2, "val": 1, "test": 1}  # 6 + 6, 4, 8 slices
    assert len(volumes["train"] | volumes["val"] | volumes["test"]) == 4  # no volume in two splits
    ids = sorted(splits["train"] + splits["val"] + splits["test"])
    assert [p.stem for p in sorted((root / "labeled" / "images").iterdir())] == ids
    for case in ids:
        image = Image.open(root / "labeled" / "images" / f"{case}.png")
        mask = np.array(Image.open(root / "labeled" / "masks" / f"{case}.png"))
        assert image.mode == "L" and image.size == (64, 64) and mask.shape == (64, 64)
        assert set(np.unique(mask)) <= {0, 1, 2, 3} and (mask > 0).mean() >= 0.005, case

    for part in ("unlabeled", "labeled/images"):  # another seed, other images
        first, other = (
            {p.name: p.read_bytes() for p in (d / part).iterdir()} for d in (root, tmp_path / "c")
        )
        assert not set(first.items()) & set(other.items())


def test_volumes_nest_the_lesion_and_touch_the_organs():
    rng = np.random.default_rng(0)
    touching, with_lesion = 0, 0
    for _ in range(8):
        vol = anatomy_volume(rng, size=64)
        mask = vol.mask
        assert vol.image.shape == mask.shape and mask.shape[:2] == (64, 64) and 16 <= mask.shape[2] <= 24
        assert vol.image.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1, 2, 3}
        lesion = mask == 3
        with_lesion += bool(lesion.any())
        for z in range(mask.shape[2]):  # class 3 lies inside class 2's filled region, slice by slice
            assert not (lesion[..., z] & ~binary_fill_holes(mask[..., z] >= 2)).any()
        padded = np.pad(mask, ((1, 1), (1, 1), (0, 0)))
        neighbours = [padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        assert all(np.isin(n[lesion], (2, 3)).all() for n in neighbours)  # and is walled in by it
        big, small = mask == 1, mask == 2
        shared = (big[1:] & small[:-1]) | (big[:-1] & small[1:])
        shared = shared.any(axis=(0, 1)) | ((big[:, 1:] & small[:, :-1]) | (big[:, :-1] & small[:, 1:])).any(
            axis=(0, 1)
        )
        touching += bool(shared.any())
    assert touching >= 7 and with_lesion >= 4


def test_intensity_alone_cannot_segment_the_small_organ():
    """The two organs differ by about one noise SD (never zero, never two), and the best intensity window
    finds the small organ with an IoU far from 1."""
    rng = np.random.default_rng(1)
    for _ in range(6):
        vol = anatomy_volume(rng, size=64)
        assert 0.85 * NOISE_SD <= vol.noise_sd <= 1.15 * NOISE_SD
        grey, mask = vol.image.astype(np.float64), vol.mask
        gap = abs(grey[mask == 2].mean() - grey[mask == 1].mean()) / vol.noise_sd
        assert 0.2 < gap < 2.0
        target = (mask == 2).ravel()
        values = grey.ravel()
        edges = np.unique(np.percentile(values[target], np.linspace(0, 100, 21)))
        best = max(
            ((values >= lo) & (values <= hi) & target).sum()
            / ((values >= lo) & (values <= hi) | target).sum()
            for lo in edges
            for hi in edges
            if hi > lo
        )
        assert best < 0.3


def test_synth_command_writes_the_anatomy_task(tmp_path, capsys):
    assert main(["synth", "--kind", "anatomy", "--out", str(tmp_path / "t"), "--n", "5"]) == 0
    assert (
        "anatomy data to" in (out := capsys.readouterr().out)
        and "unlabeled 5, train 24, val 8, test 16" in out
    )
    assert len(list((tmp_path / "t" / "labeled" / "images").iterdir())) == 48
    assert len(list((tmp_path / "t" / "unlabeled").iterdir())) == 5


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="n_labeled must be at least 6"):
        make_anatomy(tmp_path / "a", n_unlabeled=0, n_labeled=5)
    with pytest.raises(ValueError, match="size must be at least 32"):
        make_anatomy(tmp_path / "b", n_unlabeled=0, n_labeled=6, size=16)
    assert make_anatomy(tmp_path / "c", n_unlabeled=0, n_labeled=6, size=32) == {
        "unlabeled": 0,
        "train": 3,
        "val": 1,
        "test": 2,
    }
