import torch

from decon_med.data.datasets import build_dataset, build_loader, sample_seed, set_epoch
from decon_med.data.layouts import get_layout
from decon_med.data.splits import split_fraction
from tests.conftest import make_cfg


def test_train_and_eval_batches(synth_root):
    cfg = make_cfg("isic2017", synth_root / "isic")
    train = build_loader(build_dataset(cfg, "train", "train"), batch_size=4, shuffle=True, seed=0)
    batch = next(iter(train))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (4, 64, 64) and batch["label"].dtype == torch.int64
    assert set(batch["label"].unique().tolist()) <= {0, 1}
    assert len(batch["id"]) == 4
    val = next(iter(build_loader(build_dataset(cfg, "val", "eval"), batch_size=2)))
    assert val["image"].shape == (2, 3, 64, 64)


def test_pretrain_views_need_no_masks(copy_of):
    root = copy_of("refuge")
    for mask_dir in root.glob("*GT*"):
        mask_dir.rename(root / ("moved_" + mask_dir.name))
    cfg = make_cfg("refuge", root)
    batch = next(iter(build_loader(build_dataset(cfg, "train", "pretrain"), batch_size=3)))
    assert batch["view1"].shape == (3, 3, 64, 64) and batch["view2"].shape == (3, 3, 64, 64)
    assert batch["box1"].shape == (3, 4) and batch["flip1"].shape == (3,)
    assert "label" not in batch


def test_mixed_unlabeled_tree_collates_single_channel(synth_root):
    cfg = make_cfg("unlabeled", synth_root / "nifti", modality="mr", in_channels=1)
    ds = build_dataset(cfg, "train", "pretrain")
    batch = next(iter(build_loader(ds, batch_size=4, shuffle=True, seed=1)))
    assert batch["view1"].shape == (4, 1, 64, 64)


def test_augmentation_depends_only_on_seed_epoch_and_id(synth_root):
    cfg = make_cfg("isic2017", synth_root / "isic")
    ds = build_dataset(cfg, "train", "train")
    first = ds[0]["image"]
    assert torch.equal(first, ds[0]["image"])  # same epoch, same id -> same augmentation
    set_epoch(ds, 1)
    assert not torch.equal(first, ds[0]["image"])
    set_epoch(ds, 0)
    assert torch.equal(first, ds[0]["image"])
    assert sample_seed(0, 0, "a") != sample_seed(0, 0, "b") != sample_seed(1, 0, "a")
    # with workers: the same batches as in the main process
    one = [b["image"] for b in build_loader(ds, batch_size=4, shuffle=True, seed=5, epoch=2)]
    two = [b["image"] for b in build_loader(ds, batch_size=4, shuffle=True, seed=5, epoch=2, num_workers=2)]
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))


def test_fraction_subset_and_cache(synth_root):
    cfg = make_cfg("isic2017", synth_root / "isic", cache_rate=1.0)
    train_items = get_layout(cfg.data).items("train")
    subset = split_fraction(train_items, 0.25, seed=0)
    ds = build_dataset(cfg, "train", "train", items=subset)
    assert len(ds) == 2
    assert {ds[i]["id"] for i in range(2)} == {it["id"] for it in subset}


def test_eval_batches_keep_original_masks(synth_root):
    from decon_med.data.datasets import collate_eval

    cfg = make_cfg("isic2017", synth_root / "isic")
    ds = build_dataset(cfg, "test", "eval", full_labels=True)
    batch = collate_eval([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 64, 64) and batch["label"].shape == (2, 64, 64)
    items = get_layout(cfg.data).items("test")
    for label, item in zip(batch["label_full"], items, strict=True):
        from decon_med.data.io import read_mask

        raw = read_mask(item["label"])
        assert tuple(label.shape) == raw.shape
        assert torch.equal(label, torch.from_numpy((raw == 255).astype("int64")))
