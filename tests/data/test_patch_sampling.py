"""Physical scale (``data.sampling: patch``): fixed mm pixels, exact patches, sliding windows at inference."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from decon_med.config import DataConfig, FinetuneConfig, ModelConfig
from decon_med.data.datasets import build_transform, input_slice_options
from decon_med.data.transforms import SegPatchTransform, TwoViewTransform
from decon_med.data.volumes import load_label_slice, load_slice, scan_volume
from decon_med.engine import evaluate as evaluate_module
from decon_med.engine import predict as predict_module
from decon_med.engine.checkpoint import save_checkpoint
from decon_med.engine.model_io import segmentation_state
from decon_med.engine.predict import Predictor, default_mode, predict, sliding_logits
from decon_med.errors import ConfigError
from decon_med.models.network import build_network

PATCH = {"sampling": "patch", "spacing": 1.0, "image_size": 64, "num_workers": 0, "in_channels": 1}
PATCH |= {"modality": "mr", "name": "folder", "num_classes": 2}


def _disk_volume(folder: Path, voxel: float, fov: float = 20.0) -> tuple[Path, Path]:
    """A 3-slice volume of ``fov`` mm square holding a disk of 10 mm diameter, with its label volume."""
    n = int(round(fov / voxel))
    centres = (np.arange(n) + 0.5) * voxel - fov / 2  # mm from the field's centre
    disk = (centres[:, None] ** 2 + centres[None, :] ** 2) < 5.0**2
    affine = np.diag([voxel, voxel, 3.0, 1.0])
    image = np.repeat(np.where(disk, 400.0, 100.0)[:, :, None], 3, axis=2).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, affine), folder / "image.nii.gz")
    nib.save(
        nib.Nifti1Image(np.repeat(disk[:, :, None], 3, axis=2).astype(np.uint8), affine),
        folder / "mask.nii.gz",
    )
    return folder / "image.nii.gz", folder / "mask.nii.gz"


def test_a_10_mm_disk_has_the_same_pixels_at_any_voxel_size(tmp_path):
    opts = input_slice_options(DataConfig(**PATCH, root=str(tmp_path)))
    assert opts.spacing == 1.0
    counts = []
    for voxel in (0.5, 1.25):
        image, mask = _disk_volume(tmp_path / str(voxel), voxel)
        item = {**scan_volume(image, opts)[1], "label": str(mask)}
        assert tuple(item["size"]) == (20, 20)  # 20 mm at 1 mm pixels, whatever the stored grid
        labels = load_label_slice(item, opts)
        pixels = load_slice(item, opts)[..., 0] > 0.5
        counts += [int(labels.sum()), int(pixels.sum())]
    area, ring = np.pi * 5.0**2, 2 * np.pi * 5.0  # 78.5 pixels of 1 mm, one ring of pixels is ~31
    assert all(abs(c - area) <= ring for c in counts), counts
    assert max(counts) - min(counts) <= ring, counts


def _pattern(height: int, width: int) -> np.ndarray:
    """Every pixel a different value in (0, 1]: a crop's position can be read from its first pixel."""
    return ((np.arange(height * width, dtype=np.float32) + 1) / (height * width)).reshape(height, width, 1)


def test_patch_training_crops_exact_patches_without_resizing():
    image = _pattern(100, 90)
    label = (np.arange(100)[:, None] + 2 * np.arange(90)[None, :]) % 3
    t = SegPatchTransform(32, modality="gray", in_channels=1, mean=(0,), std=(1,), color=False, hflip=0.5)
    flipped = 0
    for seed in range(12):
        out = t({"image": image, "label": label, "id": "a", "seed": seed})
        patch, mask = out["image"][0].numpy(), out["label"].numpy()
        assert patch.shape == mask.shape == (32, 32)
        if patch[0, 0] > patch[0, 1]:  # flipped horizontally
            patch, mask, flipped = patch[:, ::-1], mask[:, ::-1], flipped + 1
        y0, x0 = divmod(int(round(patch[0, 0] * 100 * 90)) - 1, 90)
        assert np.array_equal(patch, image[y0 : y0 + 32, x0 : x0 + 32, 0])
        assert np.array_equal(mask, label[y0 : y0 + 32, x0 : x0 + 32])
    assert 0 < flipped < 12
    big = SegPatchTransform(64, modality="gray", in_channels=1, mean=(0,), std=(1,), color=False, hflip=0.0)
    small = big({"image": _pattern(40, 50), "label": np.ones((40, 50), np.int64), "id": "s", "seed": 0})
    inside = np.zeros((64, 64), bool)
    inside[12:52, 7:57] = True  # padded evenly: 24 rows and 14 columns
    assert np.array_equal(small["image"][0].numpy()[inside].reshape(40, 50), _pattern(40, 50)[..., 0])
    assert not small["image"][0].numpy()[~inside].any() and np.array_equal(small["label"].numpy(), inside)


def test_patch_mode_transforms_and_config():
    cfg = FinetuneConfig(data=DataConfig(**PATCH))
    assert isinstance(build_transform(cfg, "train"), SegPatchTransform)
    assert build_transform(cfg, "eval").patch and build_transform(cfg, "pretrain").patch
    with pytest.raises(ConfigError, match=r"data.sampling.: patch needs a fixed pixel size in mm.*got null"):
        DataConfig(**{**PATCH, "spacing": None}).validate()
    with pytest.raises(ConfigError, match="got 0"):
        DataConfig(**{**PATCH, "spacing": 0.0}).validate()


def test_a_third_of_patches_hold_foreground():
    image = np.zeros((200, 200, 1), np.float32)
    label = np.zeros((200, 200), np.int64)
    label[150, 20] = 1

    def share(foreground: float) -> float:
        t = SegPatchTransform(32, foreground=foreground, modality="gray", in_channels=1, color=False)
        return np.mean(
            [t({"image": image, "label": label, "id": "f", "seed": s})["label"].any() for s in range(90)]
        )

    assert 0.25 <= share(1 / 3) <= 0.5  # 1/3 centred on it, plus a few uniform ones that hold it
    assert share(0.0) < 0.12 and share(1.0) == 1.0


def test_pretraining_views_are_cut_from_a_patch_at_full_resolution():
    image = _pattern(150, 120)
    exact = {"color": False, "modality": "gray", "in_channels": 1, "mean": (0,), "std": (1,)}
    t = TwoViewTransform(48, crop_scale=(1, 1), ratio=(1, 1), hflip=0.0, patch=True, **exact)
    for seed in range(4):
        view = t({"image": image, "id": "p", "seed": seed})["view1"][0].numpy()
        y0, x0 = divmod(int(round(view[0, 0] * 150 * 120)) - 1, 120)
        assert np.array_equal(view, image[y0 : y0 + 48, x0 : x0 + 48, 0])


class _WindowMean(torch.nn.Module):
    """A 1x1 convolution of the input minus its own mean: the output depends on the window it sees."""

    def __init__(self, channels: int = 2, classes: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(channels, classes, 1)
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return self.conv(x - x.mean(dim=(2, 3), keepdim=True))


def test_sliding_windows_without_overlap_equal_the_patchwise_forward_pass():
    net = _WindowMean()
    x = torch.randn(1, 2, 128, 192)
    with torch.no_grad():
        out = sliding_logits(net, x, 64, batch_size=4, overlap=0.0)
        tiles = torch.cat(
            [torch.cat([net(x[..., r : r + 64, c : c + 64]) for c in range(0, 192, 64)], 3) for r in (0, 64)],
            2,
        )
        whole = net(x)
    assert out.shape == (1, 3, 128, 192)
    assert torch.allclose(out, tiles, atol=1e-5) and not torch.allclose(out, whole, atol=1e-2)
    small = torch.randn(1, 2, 40, 50)  # padded evenly with the fill value, then cropped back
    with torch.no_grad():
        padded = torch.tensor([-1.0, 2.0]).view(1, 2, 1, 1).repeat(1, 1, 64, 64)
        padded[..., 12:52, 7:57] = small
        expected = net(padded)[..., 12:52, 7:57]
        assert torch.allclose(
            sliding_logits(net, small, 64, 1, overlap=0.0, fill=(-1.0, 2.0)), expected, atol=1e-5
        )


def test_patch_runs_predict_and_evaluate_with_sliding_windows(synth_root, tmp_path, monkeypatch):
    calls: list[tuple[int, ...]] = []

    def recording(forward, images, *args, **kwargs):
        calls.append(tuple(images.shape))
        return sliding_logits(forward, images, *args, **kwargs)

    monkeypatch.setattr(predict_module, "sliding_logits", recording)
    monkeypatch.setattr(evaluate_module, "sliding_logits", recording)
    cfg = FinetuneConfig(
        data=DataConfig(**{**PATCH, "root": str(synth_root / "folder_nifti"), "num_classes": 3})
    )
    assert default_mode(cfg) == "sliding" and default_mode(FinetuneConfig()) == "resize"
    net = _WindowMean(channels=1)
    predictor = Predictor(net, cfg, device="cpu")
    (mask,) = predictor.predict_images([np.random.default_rng(0).random((150, 100, 1), dtype=np.float32)])
    assert predictor.mode == "sliding" and mask.shape == (150, 100) and calls == [(1, 1, 150, 100)]
    assert {shape[1:] for shape in net.shapes} == {(1, 64, 64)}
    # validation / evaluate: every whole slice (48 x 48 at 0.9 mm -> 43 x 43 at 1 mm) through the windows
    calls.clear()
    metrics = evaluate_module.evaluate_network(net, cfg, "val", 3)
    assert calls and set(calls) == {(1, 1, 43, 43)} and 0.0 <= metrics["mIoU"] <= 1.0
    # a saved run's predict takes sliding windows without being asked
    cfg.model = ModelConfig(arch="unet", encoder="resnet18")
    network = build_network(cfg.model, in_channels=1, classes=3)
    ckpt = save_checkpoint(
        segmentation_state(network, cfg, classes=3, step=0), tmp_path / "run" / "best.ckpt"
    )
    calls.clear()
    volume = sorted((synth_root / "folder_nifti" / "images").glob("*.nii.gz"))[0]
    predict(ckpt, volume, tmp_path / "out", progress=False)
    assert calls == [(8, 1, 43, 43), (4, 1, 43, 43)]  # 12 slices in passes of 8
