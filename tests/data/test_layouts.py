import json
import shutil

import numpy as np
import pytest
from PIL import Image

from decon_med.data.datasets import LoadSample
from decon_med.data.io import read_mask
from decon_med.data.layouts import get_layout, slice_options
from decon_med.errors import DataError
from tests.conftest import make_cfg


def _layout(name, root, **data):
    return get_layout(make_cfg(name, root, **data).data)


def _load(layout, item):
    return LoadSample(layout, slice_options(layout.cfg))(item)


def test_isic_official_layout(synth_root):
    layout = _layout("isic2017", synth_root / "isic")
    counts = {s: len(layout.items(s)) for s in ("train", "val", "test")}
    assert counts == {"train": 8, "val": 2, "test": 2}
    items = layout.items("train")
    assert all(it["id"].startswith("ISIC_") and "superpixels" not in it["image"] for it in items)
    assert all(it["label"].endswith("_segmentation.png") for it in items)
    ids = [it["id"] for it in layout.items("train") + layout.items("val") + layout.items("test")]
    assert len(set(ids)) == len(ids)


def test_isic_masks_binarised(synth_root):
    layout = _layout("isic2017", synth_root / "isic")
    item = layout.items("train")[0]
    raw = read_mask(item["label"])
    sample = _load(layout, item)
    assert set(np.unique(raw)) == {0, 255}
    assert set(np.unique(sample["label"])) == {0, 1}
    np.testing.assert_array_equal(sample["label"] == 1, raw == 255)
    assert sample["image"].shape[:2] == raw.shape and sample["image"].dtype == np.float32
    assert 0.0 <= sample["image"].min() and sample["image"].max() <= 1.0


def test_refuge_official_layout_and_grey_mapping(synth_root):
    layout = _layout("refuge", synth_root / "refuge")
    counts = {s: len(layout.items(s)) for s in ("train", "val", "test")}
    assert counts == {"train": 8, "val": 2, "test": 2}
    item = layout.items("train")[0]
    raw = read_mask(item["label"])
    label = _load(layout, item)["label"]
    np.testing.assert_array_equal(label == 0, raw == 255)
    np.testing.assert_array_equal(label == 1, raw == 128)
    np.testing.assert_array_equal(label == 2, raw == 0)
    assert set(np.unique(label)) == {0, 1, 2}
    assert layout.class_names == ("background", "disc", "cup")


def test_refuge_known_variants(copy_of):
    root = copy_of("refuge")
    # lower-case folder names, a doubled folder level, png images instead of jpg, upper-case mask names
    (root / "Training400").rename(root / "training400")
    ann = root / "Annotation-Training400"
    nested = root / "annotation-training400-tmp"
    ann.rename(nested)
    (root / "Annotation-Training400").mkdir()
    nested.rename(root / "Annotation-Training400" / "Annotation-Training400")
    for jpg in (root / "REFUGE-Validation400").glob("*.jpg"):
        Image.open(jpg).save(jpg.with_suffix(".png"))
        jpg.unlink()
    for bmp in (root / "REFUGE-Validation400-GT").rglob("*.bmp"):
        bmp.rename(bmp.with_name(bmp.stem.upper() + ".BMP"))
    layout = _layout("refuge", root)
    assert len(layout.items("train")) == 8
    val = layout.items("val")
    assert len(val) == 2 and all(it["image"].endswith(".png") for it in val)
    assert set(np.unique(_load(layout, val[0])["label"])) <= {0, 1, 2}


def test_folder_with_splits_json(synth_root):
    root = synth_root / "folder"
    splits = json.loads((root / "splits.json").read_text())
    layout = _layout("folder", root, num_classes=3)
    for split in ("train", "val", "test"):
        assert [it["id"] for it in layout.items(split)] == sorted(splits[split])
    sample = _load(layout, layout.items("train")[0])
    assert set(np.unique(sample["label"])) <= {0, 1, 2}


def test_folder_without_splits_json_is_seeded_holdout(copy_of):
    root = copy_of("folder")
    (root / "splits.json").unlink()
    layout = _layout("folder", root, num_classes=3, val_fraction=0.2, test_fraction=0.2)
    parts = {s: [it["id"] for it in layout.items(s)] for s in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [6, 2, 2]
    assert len(set(sum(parts.values(), []))) == 10
    again = _layout("folder", root, num_classes=3, val_fraction=0.2, test_fraction=0.2)
    assert parts["val"] == [it["id"] for it in again.items("val")]


def test_folder_nifti_volumes_become_slices_kept_together(synth_root):
    layout = _layout(
        "folder", synth_root / "folder_nifti", num_classes=3, in_channels=1, modality="mr", min_foreground=0.0
    )
    train = layout.items("train")
    groups = {it["group"] for it in train}
    assert len(train) > len(groups) >= 1
    assert all("slice" in it and it["id"].startswith(it["group"]) for it in train)
    all_groups = [{it["group"] for it in layout.items(s)} for s in ("train", "val", "test")]
    assert not (all_groups[0] & all_groups[1]) and not (all_groups[0] & all_groups[2])
    sample = _load(layout, train[0])
    assert sample["image"].ndim == 3 and sample["image"].shape[2] == 1
    assert sample["label"].shape == sample["image"].shape[:2]


def test_unlabeled_tree_of_volumes_and_images(copy_of):
    root = copy_of("nifti")
    (root / "photos").mkdir()
    Image.fromarray(np.full((40, 50, 3), 120, np.uint8)).save(root / "photos" / "img_0001.png")
    keep_all = _layout("unlabeled", root, modality="mr", min_foreground=0.0).items("train")
    skipping = _layout("unlabeled", root, modality="mr", min_foreground=0.05).items("train")
    assert len(skipping) < len(keep_all)
    assert "photos/img_0001" in {it["id"] for it in keep_all}
    assert all(it["label"] is None for it in keep_all)
    assert len({it["id"] for it in keep_all}) == len(keep_all)
    assert _layout("unlabeled", root).items("val") == []


def test_images_only_listing_needs_no_masks(copy_of):
    root = copy_of("isic")
    shutil.rmtree(root / "ISIC-2017_Training_Part1_GroundTruth")
    layout = _layout("isic2017", root)
    assert len(layout.items("train", labeled=False)) == 8
    with pytest.raises(DataError, match="ground-truth folder not found"):
        layout.items("train")
