"""predict --probabilities (softmax maps on the input grid) and ensembles of several runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from decon_med.cli import main
from decon_med.config import DataConfig, FinetuneConfig, ModelConfig
from decon_med.data.synthetic import make_nnunet
from decon_med.engine.checkpoint import save_checkpoint
from decon_med.engine.model_io import load_segmentation_model, segmentation_state
from decon_med.engine.predict import Predictor, check_ensemble, predict
from decon_med.errors import DeconError
from decon_med.models.network import build_network


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ensemble") / "Dataset004_Organ"
    make_nnunet(root, n=3, n_test=1, channel_names=["CT", "T2"], seed=4, test_labels=False)
    return root


def _run(folder: Path, root: Path, seed: int, **data) -> Path:
    """A fine-tuning run folder holding a randomly initialised network (no training needed here)."""
    cfg = FinetuneConfig(
        data=DataConfig(
            **{
                "name": "nnunet",
                "root": str(root),
                "image_size": 32,
                "in_channels": 2,
                "spacing": 3.0,
                **data,
            }
        ),
        model=ModelConfig(arch="unet", encoder="resnet18"),
        out_dir=str(folder),
    )
    torch.manual_seed(seed)
    network = build_network(cfg.model, in_channels=cfg.data.in_channels, classes=3)
    folder.mkdir(parents=True)
    save_checkpoint(segmentation_state(network, cfg, 3), folder / "best.ckpt")
    return folder


@pytest.fixture(scope="module")
def runs(dataset: Path, tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("runs")
    return _run(folder / "a", dataset, 0), _run(folder / "b", dataset, 1)


def _probabilities(out: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    image = nib.load(out / "test_000_probabilities.nii.gz")
    return image.get_fdata(), image


def test_probabilities_are_a_4d_map_on_the_input_grid_summing_to_one(dataset: Path, runs, tmp_path: Path):
    scan = nib.load(dataset / "imagesTs" / "test_000_0000.nii.gz")
    predict(runs[0], dataset / "imagesTs", tmp_path / "plain", progress=False)
    summary = predict(runs[0], dataset / "imagesTs", tmp_path / "probs", progress=False, probabilities=True)
    assert summary["predicted"][0]["probabilities"] == str(
        tmp_path / "probs" / "test_000_probabilities.nii.gz"
    )
    probs, image = _probabilities(tmp_path / "probs")
    assert probs.shape == (*scan.shape, 3) and image.get_data_dtype() == np.uint16  # 16-bit, scaled to [0, 1]
    assert (
        np.array_equal(image.affine, scan.affine) and image.header["sform_code"] == scan.header["sform_code"]
    )
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-4)
    assert probs.min() >= 0 and probs.max() <= 1 and probs.std() > 0
    labels = [np.asarray(nib.load(tmp_path / f / "test_000.nii.gz").dataobj) for f in ("plain", "probs")]
    assert np.array_equal(labels[0], labels[1])  # writing the probabilities does not change the labels


def test_an_ensemble_averages_the_probabilities_of_its_runs(dataset: Path, runs, tmp_path: Path):
    for name, run in zip("ab", runs, strict=True):
        predict(run, dataset / "imagesTs", tmp_path / name, progress=False, probabilities=True)
    out = tmp_path / "mean"
    status = main(
        ["predict", *map(str, runs), str(dataset / "imagesTs"), "--out", str(out), "--probabilities"]
    )
    assert status == 0
    (a, _), (b, _), (mean, _) = (_probabilities(tmp_path / name) for name in ("a", "b", "mean"))
    np.testing.assert_allclose(mean, (a + b) / 2, atol=5e-5)
    assert np.abs(a - b).max() > 0.01  # two different networks
    labels = np.asarray(nib.load(out / "test_000.nii.gz").dataobj)
    top2 = np.sort(mean, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 1e-3
    assert np.array_equal(labels[clear], mean.argmax(-1)[clear])


def test_ensemble_runs_must_agree_on_classes_channels_and_size(dataset: Path, runs, tmp_path: Path):
    loaded = [load_segmentation_model(run) for run in runs]
    check_ensemble(runs, loaded)
    net, cfg, state = loaded[1]
    bigger = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=64))
    with pytest.raises(DeconError) as info:
        check_ensemble(runs, [loaded[0], (net, bigger, state)])
    assert str(info.value) == (
        f"{runs[1]}: data.image_size 64 but 32 in {runs[0]}; the runs of an ensemble must agree on classes, "
        "input channels and image size"
    )
    more = {**state, "network_meta": {**state["network_meta"], "classes": 4}}
    with pytest.raises(DeconError, match=r"classes 4 but 3 in"):
        check_ensemble(runs, [loaded[0], (net, cfg, more)])
    named = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, channel_names=["T2", "CT"]))
    with pytest.raises(DeconError, match=r"channel names \('T2', 'CT'\) but \('CT', 'T2'\) in"):
        check_ensemble(runs, [loaded[0], (net, named, state)])


@pytest.mark.parametrize("tta", [False, True])
def test_outputs_give_the_masks_of_predict_images_and_softmax_maps(runs, tta: bool):
    network, cfg, _ = load_segmentation_model(runs[0])
    predictor = Predictor(network, cfg, device="cpu", tta=tta, largest_component=False)
    images = [np.random.default_rng(k).uniform(0, 1, (20 + k, 30, 2)).astype(np.float32) for k in range(3)]
    masks, probs = predictor.outputs(images)
    for mask, prob, expected, image in zip(
        masks, probs, predictor.predict_images(images), images, strict=True
    ):
        assert np.array_equal(mask, expected) and prob.shape == (3, *image.shape[:2])
        np.testing.assert_allclose(prob.sum(0), 1.0, atol=1e-5)
