"""Tests of the tensor transforms: exact overlap boxes, crop sampling, determinism, segmentation alignment."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torchvision.ops import roi_align

from decon_med.data.transforms import (
    SegEvalTransform,
    SegTrainTransform,
    TwoViewTransform,
    _intersection,
    _sample_crop,
    _sample_two_crops,
    default_normalisation,
)

MODALITIES = ["rgb", "gray", "mr", "ct"]


def coordinate_image(height: int, width: int) -> np.ndarray:
    """Channel 0 = x / W and channel 1 = y / H at pixel centres; channel 2 = their mean (all linear)."""
    x = (np.arange(width, dtype=np.float32) + 0.5) / width
    y = (np.arange(height, dtype=np.float32) + 0.5) / height
    xx, yy = np.meshgrid(x, y)
    return np.stack([xx, yy, 0.5 * (xx + yy)], axis=2)


def random_image(height: int, width: int, channels: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((height, width, channels), dtype=np.float32)


def pool_box(view: torch.Tensor, box: torch.Tensor, flipped: bool, out: int = 8) -> torch.Tensor:
    """Un-flip a (C, S, S) view and average it over ``out x out`` bins of its normalised box."""
    if flipped:
        view = view.flip(-1)
    size = view.shape[-1]
    rois = torch.cat([torch.zeros(1), box * size])[None]
    return roi_align(view[None], rois, output_size=out, spatial_scale=1.0, sampling_ratio=2, aligned=True)[0]


# --------------------------------------------------------------------------------------------------------------
# Two views
# --------------------------------------------------------------------------------------------------------------


def test_overlap_boxes_map_the_same_source_pixels():
    height, width, size, bins = 48, 64, 32, 8
    image = coordinate_image(height, width)
    t = TwoViewTransform(size, color=False, mean=(0, 0, 0), std=(1, 1, 1))
    grid = (np.arange(bins) + 0.5) / bins
    flipped = 0
    for seed in range(60):
        out = t({"image": image, "id": "c", "seed": seed})
        pooled = [pool_box(out[f"view{k}"], out[f"box{k}"], bool(out[f"flip{k}"])) for k in (1, 2)]
        assert (pooled[0] - pooled[1]).abs().max() < 0.5 / max(height, width), seed

        # The crops are the first draws of the seeded generator: rebuild the overlap rectangle in source pixels.
        crops = _sample_two_crops(
            np.random.default_rng(seed), height, width, t.crop_scale, t.ratio, t.min_overlap, t.max_tries
        )
        ix0, iy0, ix1, iy1 = _intersection(*crops)
        expected_x = torch.tensor((ix0 + grid * (ix1 - ix0)) / width, dtype=torch.float32)
        expected_y = torch.tensor((iy0 + grid * (iy1 - iy0)) / height, dtype=torch.float32)
        # Within half a source pixel: only the edge-clamping of the resize departs from exact linear values.
        for p in pooled:
            assert (p[0] - expected_x[None, :]).abs().max() < 0.5 / width, seed
            assert (p[1] - expected_y[:, None]).abs().max() < 0.5 / height, seed
        flipped += int(out["flip1"]) + int(out["flip2"])
    assert 0 < flipped < 120  # both the flipped and the unflipped paths were checked


def test_crop_sampler_follows_scale_and_ratio():
    rng = np.random.default_rng(0)
    for height, width in [(48, 64), (100, 30), (200, 200)]:
        for _ in range(200):
            x0, y0, w, h = _sample_crop(rng, height, width, (0.2, 0.6), (3 / 4, 4 / 3))
            assert 0 <= x0 and x0 + w <= width and 0 <= y0 and y0 + h <= height
            if (x0, y0) != ((width - w) // 2, (height - h) // 2):  # not the centre-crop fallback
                assert 0.15 <= w * h / (height * width) <= 0.65
                assert 0.6 <= w / h <= 1.6


@pytest.mark.parametrize(("min_overlap", "min_accepted"), [(0.0, 590), (0.01, 580), (0.3, 150)])
def test_crop_pairs_honour_min_overlap(min_overlap, min_accepted):
    rng = np.random.default_rng(1)
    accepted = 0
    for height, width in [(48, 64), (100, 30)]:
        for _ in range(300):
            crop1, crop2 = _sample_two_crops(
                rng, height, width, (0.08, 1.0), (3 / 4, 4 / 3), min_overlap, 100
            )
            inter = _intersection(crop1, crop2)
            assert inter is not None
            area = (inter[2] - inter[0]) * (inter[3] - inter[1])
            assert area >= min_overlap * height * width or crop2 == crop1
            accepted += crop2 != crop1
    assert accepted >= min_accepted  # crop 2 is mostly a new crop, not the fallback


def test_fallback_reuses_the_first_crop():
    rng = np.random.default_rng(0)
    crop1, crop2 = _sample_two_crops(rng, 40, 40, (0.08, 0.1), (1.0, 1.0), 0.9, 5)
    assert crop1 == crop2


def test_boxes_are_valid():
    t = TwoViewTransform(16, color=False, min_overlap=0.0)
    image = random_image(37, 53, 3)
    for seed in range(200):
        out = t({"image": image, "id": "b", "seed": seed})
        for k in (1, 2):
            x0, y0, x1, y1 = out[f"box{k}"].tolist()
            assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0


@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("image_channels", [1, 3])
def test_two_view_shapes_and_dtypes(modality, in_channels, image_channels):
    t = TwoViewTransform(24, modality=modality, in_channels=in_channels)
    data = {"image": random_image(40, 30, image_channels), "label": np.zeros((40, 30), np.int64), "id": "a"}
    out = t(dict(data, seed=5, extra=[1, 2]))
    assert "image" not in out and "label" not in out
    assert out["id"] == "a" and out["extra"] == [1, 2]
    for k in (1, 2):
        view = out[f"view{k}"]
        assert view.shape == (in_channels, 24, 24) and view.dtype == torch.float32
        assert torch.isfinite(view).all()
        assert out[f"box{k}"].shape == (4,) and out[f"box{k}"].dtype == torch.float32
        assert out[f"flip{k}"].dtype == torch.bool and out[f"flip{k}"].dim() == 0


@pytest.mark.parametrize("modality", MODALITIES)
def test_two_view_seed_determinism(modality):
    t = TwoViewTransform(24, modality=modality, in_channels=3)
    data = {"image": random_image(40, 50, 3), "id": "a"}
    a, b = t(dict(data, seed=11)), t(dict(data, seed=11))
    for key in ("view1", "view2", "box1", "box2", "flip1", "flip2"):
        assert torch.equal(a[key], b[key]), key
    c = t(dict(data, seed=12))
    assert not torch.equal(a["view1"], c["view1"])
    assert not torch.equal(a["view2"], c["view2"])


def test_internal_generator_is_seeded_by_the_constructor():
    data = {"image": random_image(40, 50, 3), "id": "a"}
    first, second = TwoViewTransform(24, seed=3), TwoViewTransform(24, seed=3)
    runs = [[t(data) for _ in range(3)] for t in (first, second)]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a["view1"], b["view1"]) and torch.equal(a["box2"], b["box2"])
    assert not torch.equal(runs[0][0]["view1"], runs[0][1]["view1"])
    assert "view1" not in data and "image" in data  # the input dict is not modified


def test_dataloader_workers_get_distinct_generators(monkeypatch):
    data = {"image": random_image(40, 50, 3), "id": "a"}
    views = []
    for worker_id in (0, 1):
        t = TwoViewTransform(24, seed=3)  # as copied into each worker process
        worker = SimpleNamespace(id=worker_id, seed=1000 + worker_id)
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda worker=worker: worker)
        views.append(t(data)["view1"])
    assert not torch.equal(views[0], views[1])


def test_greyscale_replicated_channels_stay_identical():
    t = TwoViewTransform(24, modality="mr", in_channels=3, mean=(0, 0, 0), std=(1, 1, 1))
    for seed in range(10):
        out = t({"image": random_image(30, 30, 1, seed), "id": "g", "seed": seed})
        for k in (1, 2):
            view = out[f"view{k}"]
            assert torch.equal(view[0], view[1]) and torch.equal(view[0], view[2])
            assert view.min() >= 0 and view.max() <= 1


@pytest.mark.parametrize("hflip", [0.0, 0.5, 1.0])
def test_flip_rate(hflip):
    t = TwoViewTransform(8, color=False, hflip=hflip)
    image = random_image(20, 20, 3)
    flips = [bool(t({"image": image, "id": "f", "seed": s})[f"flip{k}"]) for s in range(300) for k in (1, 2)]
    assert abs(np.mean(flips) - hflip) < 0.07


def test_identity_normalisation_and_defaults():
    assert default_normalisation(3, "rgb") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    mean, std = default_normalisation(1, "ct")
    assert len(mean) == len(std) == 1
    with pytest.raises(ValueError, match="modality"):
        default_normalisation(3, "xray")
    assert default_normalisation(2, "gray") == ((0.449, 0.449), (0.226, 0.226))  # C channels: grey statistics
    with pytest.raises(ValueError, match="in_channels"):
        default_normalisation(0, "gray")
    with pytest.raises(ValueError, match="mean and std"):
        TwoViewTransform(16, in_channels=1, mean=(0, 0, 0), std=(1, 1, 1))


# --------------------------------------------------------------------------------------------------------------
# Segmentation transforms
# --------------------------------------------------------------------------------------------------------------


def block_label(
    height: int, width: int, classes: tuple[int, ...], block: int = 8, seed: int = 0
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.choice(classes, size=(height // block + 1, width // block + 1))
    return np.kron(coarse, np.ones((block, block), dtype=np.int64))[:height, :width].astype(np.int64)


def stripe_label(height: int, width: int, axis: int, seed: int = 0) -> np.ndarray:
    """0/1 stripes of random widths (3-7 px) that vary along ``axis`` only (1: along x, 0: along y)."""
    rng = np.random.default_rng(seed)
    length = width if axis == 1 else height
    values = np.concatenate([np.full(rng.integers(3, 8), i % 2) for i in range(length)])[:length]
    return np.broadcast_to(values[None, :] if axis == 1 else values[:, None], (height, width)).astype(
        np.int64
    )


def assert_aligned(view: torch.Tensor, label: torch.Tensor) -> None:
    """A two-level image resized like its 0/1 stripe mask: pixels clearly above (below) the midpoint are 1 (0).

    Along one axis, bilinear interpolation crosses the midpoint exactly where nearest-neighbour sampling at pixel
    centres switches class; pixels within 5 % of the midpoint are ties and are not checked (when the crop shrinks,
    area averaging blends the thinnest stripes, so fewer pixels are decisive). The intensity jitter is affine, so
    the midpoint of the extreme values still separates the classes.
    """
    low, high = view.min(), view.max()
    threshold = (low + high) / 2
    decisive = (view - threshold).abs() > 0.05 * (high - low)
    assert decisive.float().mean() > 0.7
    assert torch.equal((view > threshold)[decisive].long(), label[decisive])


def test_seg_train_preserves_label_values():
    label = block_label(64, 80, (0, 2, 5))
    t = SegTrainTransform(40, vflip=0.5)
    for seed in range(20):
        out = t({"image": random_image(64, 80, 3), "label": label, "id": "s", "seed": seed})
        assert out["image"].shape == (3, 40, 40) and out["image"].dtype == torch.float32
        assert out["label"].shape == (40, 40) and out["label"].dtype == torch.int64
        assert set(out["label"].unique().tolist()) <= {0, 2, 5}


@pytest.mark.parametrize("size", [24, 48, 96])
@pytest.mark.parametrize("axis", [0, 1])
def test_seg_train_keeps_image_and_label_aligned(size, axis):
    label = stripe_label(64, 80, axis)
    image = (0.2 + 0.6 * label).astype(np.float32)[:, :, None]
    t = SegTrainTransform(size, hflip=0.5, vflip=0.5, modality="gray", in_channels=1, mean=(0,), std=(1,))
    for seed in range(20):
        out = t({"image": image, "label": label, "id": "s", "seed": seed})
        assert_aligned(out["image"][0], out["label"])


def test_shrinking_averages_detail_finer_than_a_pixel_instead_of_aliasing():
    # One-pixel stripes in a 500 px image resized to 64 px: each output pixel averages about 7.8 columns, half of
    # each value (bilinear sampling would pick nearly pure columns: values from 0.03 to 0.97).
    image = np.tile(np.array([0.0, 1.0], dtype=np.float32), 250)[None, :, None].repeat(500, axis=0)
    out = SegEvalTransform(64, modality="gray", in_channels=1, mean=(0,), std=(1,))(
        {"image": image, "id": "s"}
    )
    assert torch.allclose(out["image"], torch.full_like(out["image"], 0.5), atol=0.02)
    # Enlarging stays bilinear: a 2-pixel ramp becomes a smooth ramp, not blocks.
    ramp = np.array([[0.0, 1.0]], dtype=np.float32)[:, :, None].repeat(2, axis=0)
    big = SegEvalTransform(8, modality="gray", in_channels=1, mean=(0,), std=(1,))({"image": ramp, "id": "r"})
    assert len(torch.unique(big["image"][0, 0])) > 2


def test_seg_train_seed_determinism_and_missing_label():
    t = SegTrainTransform(32, vflip=0.5)
    data = {"image": random_image(50, 60, 3), "label": block_label(50, 60, (0, 1)), "id": "s"}
    a, b, c = t(dict(data, seed=1)), t(dict(data, seed=1)), t(dict(data, seed=2))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(a["image"], c["image"])
    for unlabeled in (
        {"image": data["image"], "id": "s"},
        {"image": data["image"], "label": None, "id": "s"},
    ):
        out = t(dict(unlabeled, seed=1))
        assert "label" not in out and out["image"].shape == (3, 32, 32)


@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_seg_eval_is_deterministic_and_records_size(modality, in_channels):
    t = SegEvalTransform(32, modality=modality, in_channels=in_channels)
    label = block_label(45, 70, (0, 1, 2))
    data = {"image": random_image(45, 70, 1), "label": label, "id": "e"}
    a, b = t(data), t(data)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert a["image"].shape == (in_channels, 32, 32) and a["image"].dtype == torch.float32
    assert a["label"].shape == (32, 32) and a["label"].dtype == torch.int64
    assert set(a["label"].unique().tolist()) <= {0, 1, 2}
    assert a["orig_size"] == (45, 70)
    assert "label" not in t({"image": data["image"], "id": "e"})
    assert "label" not in t({"image": data["image"], "label": None, "id": "e"})


@pytest.mark.parametrize("axis", [0, 1])
def test_seg_eval_keeps_image_and_label_aligned(axis):
    label = stripe_label(70, 45, axis)
    image = (0.2 + 0.6 * label).astype(np.float32)
    out = SegEvalTransform(50, modality="gray", in_channels=1, mean=(0,), std=(1,))(
        {"image": image, "label": label, "id": "e"}
    )
    assert_aligned(out["image"][0], out["label"])


@pytest.mark.parametrize("recipe", ["byol", "mocov2"])
def test_photometric_recipes(recipe):
    """BYOL / SlotCon blurs view 1 always and view 2 rarely, solarising view 2; MoCo v2 treats both views alike."""
    from decon_med.data.transforms import _pretrain_photometric

    def ops(view: int) -> dict[str, float]:
        compose = _pretrain_photometric(True, view, recipe)
        return {type(t).__name__: t.p for t in compose.transforms}

    def saturation(view: int) -> tuple[float, float]:
        jitter = next(
            t
            for t in _pretrain_photometric(True, view, recipe).transforms
            if type(t).__name__ == "ColorJitter"
        )
        return tuple(jitter.saturation)

    view1, view2 = ops(1), ops(2)
    if recipe == "byol":
        assert view1["GaussianBlur"] == 1.0 and view2["GaussianBlur"] == 0.1
        assert "Solarize" not in view1 and view2["Solarize"] == 0.2
        assert saturation(1) == pytest.approx((0.8, 1.2))
    else:
        assert view1 == view2 and view1["GaussianBlur"] == 0.5 and "Solarize" not in view1
        assert saturation(1) == pytest.approx((0.6, 1.4))
    assert view1["ColorJitter"] == 0.8 and view1["ToGray"] == 0.2


def test_pretrain_transform_takes_the_configured_recipe():
    from decon_med.config import PretrainConfig, load_config
    from decon_med.data.datasets import build_transform

    cfg = load_config(
        Path(__file__).resolve().parents[2] / "configs/pretrain/densecl.yaml",
        ["data.image_size=32"],
        schema=PretrainConfig,
    )
    t = build_transform(cfg, "pretrain")
    assert t.recipe == "mocov2"
    with pytest.raises(ValueError, match="recipe"):
        TwoViewTransform(32, recipe="simclr")


def test_blur_sigma_scales_with_the_view_size():
    """The recipes' blur (0.1-2.0 px at 224 px) is scaled to the view, so a 64-px view is blurred as much, relative
    to its content, as a 224-px view; ``augment.blur_sigma`` sets it in pixels."""
    from decon_med.config import PretrainConfig, load_config
    from decon_med.data.datasets import build_transform
    from decon_med.data.transforms import blur_sigma_for

    def sigma(t: TwoViewTransform, view: int, colour: bool = False) -> tuple[float, float]:
        blur = next(
            op for op in t._pipelines[colour][view - 1].transforms if type(op).__name__ == "GaussianBlur"
        )
        return tuple(blur.sigma_limit)

    assert blur_sigma_for(224) == pytest.approx((0.1, 2.0))
    assert sigma(TwoViewTransform(224), 1) == pytest.approx((0.1, 2.0))
    assert sigma(TwoViewTransform(64), 1) == pytest.approx((0.1 * 64 / 224, 2.0 * 64 / 224))
    assert sigma(TwoViewTransform(64), 2, colour=True) == pytest.approx((0.1 * 64 / 224, 2.0 * 64 / 224))
    assert sigma(TwoViewTransform(64, blur_sigma=(0.5, 1.5)), 2) == pytest.approx((0.5, 1.5))
    with pytest.raises(ValueError, match="blur_sigma"):
        TwoViewTransform(64, blur_sigma=(2.0, 1.0))

    # The same content at 64 and 224 px, blurred by the largest sigma of each size, keeps the same relative detail:
    # the blurred / sharp ratio of the pixel-difference energy agrees within a few percent.
    import albumentations as A

    def kept_detail(size: int, s: float | None = None) -> float:
        x = (np.arange(size) + 0.5) / size
        stripes = (0.5 + 0.5 * np.sin(2 * np.pi * 12 * x))[None, :].repeat(size, 0).astype(np.float32)
        s = blur_sigma_for(size)[1] if s is None else s
        blurred = A.GaussianBlur(blur_limit=0, sigma_limit=(s, s), p=1.0)(image=stripes)["image"]
        inner = slice(size // 4, 3 * size // 4)  # away from the border handling
        sharp = np.abs(np.diff(stripes[inner, inner], axis=1)).sum()
        return float(np.abs(np.diff(blurred[inner, inner], axis=1)).sum() / sharp)

    assert kept_detail(64) == pytest.approx(kept_detail(224), rel=0.05)
    assert kept_detail(64) > 0.7 and kept_detail(64, s=2.0) < 0.1  # the unscaled blur erases the stripes

    cfg = load_config(
        Path(__file__).resolve().parents[2] / "configs/pretrain/slotcon.yaml",
        ["data.image_size=32", "augment.blur_sigma=[0.2, 0.4]"],
        schema=PretrainConfig,
    )
    assert build_transform(cfg, "pretrain").blur_sigma == (0.2, 0.4)
