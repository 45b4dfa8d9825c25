import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from decon_med.cli_predict import add_commands
from decon_med.config import DataConfig, FinetuneConfig, ModelConfig
from decon_med.data.io import read_image
from decon_med.data.layouts import slice_options
from decon_med.data.transforms import SegEvalTransform
from decon_med.data.volumes import labels_to_volume, volume_slices
from decon_med.engine.checkpoint import save_checkpoint
from decon_med.engine.model_io import load_segmentation_model, segmentation_state
from decon_med.engine.predict import Predictor, predict
from decon_med.errors import DeconError
from decon_med.models.network import build_network

AFFINE = np.array(
    [[0.0, -0.9, 0.0, 20.0], [0.8, 0.0, 0.0, -31.5], [0.0, 0.0, 2.5, 7.0], [0.0, 0.0, 0.0, 1.0]]
)


def _checkpoint(path: Path, in_channels: int, modality: str) -> Path:
    cfg = FinetuneConfig(
        data=DataConfig(
            name="isic2017", image_size=64, num_workers=0, in_channels=in_channels, modality=modality
        ),
        model=ModelConfig(arch="unet", encoder="resnet18"),
    )
    torch.manual_seed(0)
    network = build_network(cfg.model, in_channels=in_channels, classes=2)
    return save_checkpoint(segmentation_state(network, cfg, classes=2, step=0), path)


@pytest.fixture(scope="module")
def rgb_ckpt(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "rgb.ckpt", 3, "rgb")


@pytest.fixture(scope="module")
def mr_ckpt(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "mr.ckpt", 1, "mr")


def _png(path: Path, height: int, width: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def _nifti(path: Path, shape: tuple[int, ...], seed: int = 0) -> Path:
    data = np.random.default_rng(seed).normal(300.0, 80.0, shape).astype(np.float32)
    image = nib.Nifti1Image(data, AFFINE)
    image.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


def _direct(ckpt: Path, images: list[np.ndarray]) -> list[np.ndarray]:
    """Masks from one batched forward pass of the checkpoint's network on the evaluation preprocessing."""
    network, cfg, _ = load_segmentation_model(ckpt)
    transform = SegEvalTransform(cfg.data.image_size, cfg.data.modality, cfg.data.in_channels)
    samples = [transform({"image": image}) for image in images]
    with torch.no_grad():
        logits = network(torch.stack([s["image"] for s in samples]))
    return [
        F.interpolate(logits[k : k + 1], size=s["orig_size"], mode="bilinear", align_corners=False)[0]
        .argmax(0)
        .numpy()
        for k, s in enumerate(samples)
    ]


def test_png_masks_match_direct_forward_at_original_size(rgb_ckpt, tmp_path):
    a = _png(tmp_path / "in" / "a.png", 70, 90, seed=1)
    b = _png(tmp_path / "in" / "sub" / "b.PNG", 100, 64, seed=2)
    summary = predict(rgb_ckpt, tmp_path / "in", tmp_path / "out", progress=False, mode="resize")
    assert [r["path"] for r in summary["predicted"]] == [str(a), str(b)] and summary["skipped"] == []
    outputs = [tmp_path / "out" / "a.png", tmp_path / "out" / "sub" / "b.png"]
    expected = _direct(rgb_ckpt, [read_image(a, 3), read_image(b, 3)])
    for output, want, size in zip(outputs, expected, [(70, 90), (100, 64)], strict=True):
        mask = np.asarray(Image.open(output))
        assert mask.dtype == np.uint8 and mask.shape == size
        assert set(np.unique(mask).tolist()) <= {0, 1}
        assert np.array_equal(mask, want)
    assert not list((tmp_path / "out").rglob("*_overlay.png"))


def test_overlay_keeps_background_pixels(rgb_ckpt, tmp_path):
    a = _png(tmp_path / "a.png", 70, 90, seed=1)
    summary = predict(rgb_ckpt, a, tmp_path / "out", overlay=True, batch_size=1, progress=False)
    assert summary["predicted"][0]["overlay"] == str(tmp_path / "out" / "a_overlay.png")
    overlay = np.asarray(Image.open(tmp_path / "out" / "a_overlay.png"))
    mask = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    original = np.asarray(Image.open(a))
    assert overlay.shape == (70, 90, 3)
    assert np.array_equal(overlay[mask == 0], original[mask == 0])
    if (mask == 1).any():
        assert not np.array_equal(overlay[mask == 1], original[mask == 1])


def test_nifti_volume_keeps_shape_affine_and_header(mr_ckpt, tmp_path):
    vol = _nifti(tmp_path / "in" / "sub-01_T1w.nii.gz", (40, 48, 6))
    summary = predict(mr_ckpt, tmp_path / "in", tmp_path / "out", batch_size=4, progress=False, mode="resize")
    out = tmp_path / "out" / "sub-01_T1w_seg.nii.gz"
    assert summary["predicted"] == [{"path": str(vol), "output": str(out)}] and summary["warnings"] == []
    ref, seg = nib.load(vol), nib.load(out)
    assert seg.shape == ref.shape and seg.get_data_dtype() == np.uint8
    assert np.allclose(seg.affine, ref.affine) and np.allclose(seg.header.get_zooms(), ref.header.get_zooms())
    labels = np.asarray(seg.dataobj)
    assert set(np.unique(labels).tolist()) <= {0, 1}

    _, cfg, _ = load_segmentation_model(mr_ckpt)
    slices = volume_slices(vol, slice_options(cfg.data))  # RAS, square pixels, as in training
    want = labels_to_volume(_direct(mr_ckpt, slices.images), slices)
    assert want.shape == ref.shape and np.array_equal(labels, want)


def test_2d_nifti_is_one_slice(mr_ckpt, tmp_path):
    vol = _nifti(tmp_path / "slice.nii", (40, 48))
    predict(mr_ckpt, vol, tmp_path / "out", progress=False)
    seg = nib.load(tmp_path / "out" / "slice_seg.nii.gz")
    assert seg.shape == (40, 48) and np.allclose(seg.affine, nib.load(vol).affine)


def test_unreadable_inputs_are_skipped_by_name(mr_ckpt, tmp_path):
    good_png = _png(tmp_path / "in" / "good.png", 50, 60, seed=3)
    bad_png = tmp_path / "in" / "bad.png"
    bad_png.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    good_vol = _nifti(tmp_path / "in" / "vols" / "good.nii.gz", (40, 48, 3))
    bad_vol = tmp_path / "in" / "vols" / "trunc.nii.gz"
    bad_vol.write_bytes(good_vol.read_bytes()[: good_vol.stat().st_size // 2])
    (tmp_path / "in" / "notes.txt").write_text("not an image")

    summary = predict(mr_ckpt, tmp_path / "in", tmp_path / "out", progress=False)
    assert [s["path"] for s in summary["skipped"]] == [str(bad_png), str(bad_vol)]
    assert all(s["reason"] for s in summary["skipped"])
    assert [r["path"] for r in summary["predicted"]] == [str(good_png), str(good_vol)]
    assert (tmp_path / "out" / "good.png").is_file()
    assert (tmp_path / "out" / "vols" / "good_seg.nii.gz").is_file()


def test_errors(rgb_ckpt, tmp_path):
    image = _png(tmp_path / "in" / "a.png", 40, 40, seed=0)
    with pytest.raises(DeconError, match="input not found"):
        predict(rgb_ckpt, tmp_path / "missing", tmp_path / "out", progress=False)
    bad_ckpt = tmp_path / "bad.ckpt"
    bad_ckpt.write_bytes(b"garbage")
    with pytest.raises(DeconError, match="bad.ckpt"):
        predict(bad_ckpt, image, tmp_path / "out", progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.txt").write_text("x")
    with pytest.raises(DeconError, match="not empty"):
        predict(rgb_ckpt, image, tmp_path / "full", progress=False)
    predict(rgb_ckpt, image, tmp_path / "full", progress=False, overwrite=True)
    assert (tmp_path / "full" / "a.png").is_file() and (tmp_path / "full" / "old.txt").is_file()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.jpg").write_bytes(b"nope")
    with pytest.raises(DeconError, match="x.jpg"):
        predict(rgb_ckpt, broken, tmp_path / "out2", progress=False)


def test_cli_round_trip(rgb_ckpt, tmp_path, capsys):
    _png(tmp_path / "in" / "a.png", 70, 90, seed=1)
    (tmp_path / "in" / "b.png").write_bytes(b"broken")
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["predict", str(rgb_ckpt), str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--overlay"]
        + ["--batch-size", "2", "--quiet"]
    )
    assert args.func(args) == 3  # an input was skipped: not a success
    captured = capsys.readouterr()
    assert "predicted 1 of 2" in captured.out
    assert "skipped 1 of 2 inputs" in captured.err
    assert f"skipped {tmp_path / 'in' / 'b.png'}" in captured.err
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"a.png", "a_overlay.png"}


class _Recorder(torch.nn.Module):
    """The checkpoint's network, recording the shape of every batch it is called on."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return self.network(x)


def _predictor(ckpt: Path, **kwargs) -> tuple[Predictor, _Recorder]:
    network, cfg, _ = load_segmentation_model(ckpt)
    recorder = _Recorder(network)
    return Predictor(recorder, cfg, device="cpu", **kwargs), recorder


def _normalised(image: np.ndarray) -> torch.Tensor:
    return ((torch.from_numpy(image).permute(2, 0, 1) - 0.449) / 0.226)[None].float()


def test_sliding_window_runs_at_native_resolution_on_image_size_windows(mr_ckpt):
    image = np.random.default_rng(0).random((150, 100, 1)).astype(np.float32)
    predictor, recorder = _predictor(mr_ckpt, batch_size=2, mode="sliding")
    (mask,) = predictor.predict_images([image])
    assert mask.shape == (150, 100) and mask.dtype == np.uint8
    assert {shape[1:] for shape in recorder.shapes} == {(1, 64, 64)}
    # MONAI's scan: ceil((150 - 64) / 48) + 1 = 3 rows x ceil((100 - 64) / 48) + 1 = 2 columns of windows
    assert sum(shape[0] for shape in recorder.shapes) == 6


def test_one_window_is_the_plain_forward_pass_and_tta_averages_flips(mr_ckpt):
    image = np.random.default_rng(1).random((64, 64, 1)).astype(np.float32)
    predictor, recorder = _predictor(mr_ckpt, mode="sliding")
    network = recorder.network.eval()
    x = _normalised(image)
    with torch.no_grad():
        logits = network(x)
        flips = [torch.softmax(logits, 1)] + [
            torch.flip(torch.softmax(network(torch.flip(x, d)), 1), d) for d in ((3,), (2,))
        ]
    assert np.array_equal(predictor.predict_images([image])[0], logits.argmax(1)[0].numpy())
    tta, _ = _predictor(mr_ckpt, tta=True, mode="sliding")
    assert np.array_equal(tta.predict_images([image])[0], (sum(flips) / 3).argmax(1)[0].numpy())


def test_largest_component_keeps_the_biggest_blob_per_class(mr_ckpt):
    predictor, _ = _predictor(mr_ckpt, largest_component=True)
    labels = np.zeros((20, 20, 4), dtype=np.uint8)
    labels[1:8, 1:8, :] = 1
    labels[12:14, 12:14, 1:3] = 1  # smaller class-1 blob: removed
    expected = labels.copy()
    expected[12:14, 12:14, 1:3] = 0
    assert np.array_equal(predictor.clean(labels), expected)
    assert np.array_equal(_predictor(mr_ckpt)[0].clean(labels), labels)


def test_large_nifti_keeps_shape_and_affine_with_overlay_grid(mr_ckpt, tmp_path):
    vol = _nifti(tmp_path / "in" / "big.nii.gz", (110, 90, 3))
    summary = predict(mr_ckpt, vol, tmp_path / "out", overlay=True, progress=False, tta=True, mode="sliding")
    seg = nib.load(tmp_path / "out" / "big_seg.nii.gz")
    assert seg.shape == (110, 90, 3) and np.allclose(seg.affine, nib.load(vol).affine)
    grid = np.asarray(Image.open(summary["predicted"][0]["overlay"]))
    assert summary["predicted"][0]["overlay"] == str(tmp_path / "out" / "big_seg_overlay.png")
    assert grid.ndim == 3 and grid.shape[2] == 3 and grid.shape[0] % 128 == 0 and grid.shape[1] % 128 == 0


def test_modality_mismatch_warns_once_per_file(mr_ckpt, tmp_path, capsys):
    ct = tmp_path / "in" / "ct.nii.gz"
    ct.parent.mkdir(parents=True)
    data = np.full((40, 48, 3), -1000.0, dtype=np.float32)
    data[10:30, 10:30] = 40.0
    nib.save(nib.Nifti1Image(data, AFFINE), ct)
    _nifti(tmp_path / "in" / "mr.nii.gz", (40, 48, 3))
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["predict", str(mr_ckpt), str(tmp_path / "in"), "--out", str(tmp_path / "out")])
    assert args.func(args) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert lines == [f"warning: {ct}: looks like ct but the model was trained on mr data (data.modality)"]
    assert captured.out.startswith("predict: isic2017 data at ")
