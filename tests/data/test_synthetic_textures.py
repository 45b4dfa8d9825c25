"""The texture task: deterministic, in the documented layout, and not solvable from intensity alone."""

import json

import numpy as np
import pytest
from PIL import Image

from decon_med.cli import main
from decon_med.data.synthetic_textures import TEXTURE_SIZE, make_textures, texture_image


def test_layout_counts_and_determinism(tmp_path):
    counts = make_textures(tmp_path / "a", n_unlabeled=5, n_labeled=12, seed=3)
    assert counts == {"unlabeled": 5, "train": 6, "val": 2, "test": 4}
    make_textures(tmp_path / "b", n_unlabeled=5, n_labeled=12, seed=3)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 5 + 2 * 12 + 3  # images, masks, splits.json, the folder marker and its manifest
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    splits = json.loads((tmp_path / "a" / "labeled" / "splits.json").read_text())
    ids = splits["train"] + splits["val"] + splits["test"]
    assert sorted(ids) == [f"case_{i:03d}" for i in range(12)]
    mask = np.array(Image.open(tmp_path / "a" / "labeled" / "masks" / "case_000.png"))
    assert mask.shape == (TEXTURE_SIZE, TEXTURE_SIZE) and set(np.unique(mask)) <= {0, 1, 2}


def test_overwrite_replaces_only_its_own_files(tmp_path):
    make_textures(tmp_path, n_unlabeled=2, n_labeled=6)
    with pytest.raises(FileExistsError):
        make_textures(tmp_path, n_unlabeled=2, n_labeled=6)
    make_textures(tmp_path, n_unlabeled=3, n_labeled=6, overwrite=True)
    assert len(list((tmp_path / "unlabeled").iterdir())) == 3
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "unlabeled" / "my_scan.png").write_bytes(b"mine too")  # a user's file among generated ones
    make_textures(tmp_path, n_unlabeled=2, n_labeled=6, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "unlabeled" / "my_scan.png").read_bytes() == b"mine too"
    assert len(list((tmp_path / "unlabeled").glob("img_*.png"))) == 2


def test_synth_command_writes_the_texture_task(tmp_path, capsys):
    assert main(["synth", "--kind", "textures", "--out", str(tmp_path / "t"), "--n", "4"]) == 0
    assert "unlabeled 4" in capsys.readouterr().out
    assert len(list((tmp_path / "t" / "labeled" / "images").iterdir())) == 48


def test_classes_share_one_intensity_distribution():
    """Per image, every class has the image's mean and std (within sensor noise): intensity alone cannot tell
    the classes apart, while texture (the local gradient energy's orientation) can."""
    rng = np.random.default_rng(0)
    mean_gaps, std_ratios, seen = [], [], set()
    for _ in range(30):
        image, mask = texture_image(rng)
        grey = image[..., 0].astype(np.float64)
        assert np.array_equal(image[..., 0], image[..., 1])
        for cls in np.unique(mask):
            region = grey[mask == cls]
            if region.size < 50:
                continue
            seen.add(int(cls))
            mean_gaps.append(abs(region.mean() - grey.mean()) / grey.std())
            std_ratios.append(region.std() / grey.std())
    assert seen == {0, 1, 2}
    assert max(mean_gaps) < 0.25
    assert 0.85 < min(std_ratios) and max(std_ratios) < 1.15
