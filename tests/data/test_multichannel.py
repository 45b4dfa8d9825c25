"""Any number of input channels: channel files stacked in order, each channel handled by its name, C-channel
augmentation, and RGB encoder weights adapted to C channels."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from segmentation_models_pytorch.encoders import get_encoder
from segmentation_models_pytorch.encoders._utils import patch_first_conv

from decon_med.config import DataConfig, FinetuneConfig, ModelConfig, load_config
from decon_med.data.layouts import get_layout, slice_options
from decon_med.data.synthetic import make_nnunet
from decon_med.data.transforms import SegEvalTransform, SegTrainTransform, TwoViewTransform, _is_colour
from decon_med.data.volumes import load_slice
from decon_med.engine.transfer import load_init
from decon_med.errors import ConfigError, DataError, DeconError
from decon_med.models import encoder_weights as ew
from decon_med.models.network import adapt_first_conv, build_network
from decon_med.summary import run_summary


@pytest.fixture(scope="module")
def ct_t2(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multichannel") / "Dataset002_CtT2"
    make_nnunet(root, n=3, n_test=1, channel_names=["CT", "T2"], seed=1)
    return root


def _data(root: Path, **extra) -> DataConfig:
    base = {"name": "nnunet", "root": str(root), "image_size": 64, "num_workers": 0, "min_foreground": 0.0}
    return DataConfig(**{**base, **extra})


def _canonical(path: Path) -> np.ndarray:
    """The stored LPS volume in RAS voxel order, as the loader slices it."""
    return nib.as_closest_canonical(nib.load(path)).get_fdata(dtype=np.float32)


def _zscored(volume: np.ndarray, k: int) -> np.ndarray:
    foreground = volume[volume != 0].astype(np.float64)
    lo, hi = foreground.mean() - 3 * foreground.std(), foreground.mean() + 3 * foreground.std()
    return np.clip((volume[:, :, k] - lo) / (hi - lo), 0, 1)


def test_channel_files_stack_in_order_each_with_the_handling_its_name_says(ct_t2: Path):
    cfg = _data(ct_t2, in_channels=2, mr_normalisation="zscore")
    assert slice_options(cfg).channel_modalities == ("ct", "mr")
    item = get_layout(cfg).items("train")[5]
    case, k = item["group"], item["slice"]
    ct = _canonical(ct_t2 / "imagesTr" / f"{case}_0000.nii.gz")
    t2 = _canonical(ct_t2 / "imagesTr" / f"{case}_0001.nii.gz")
    image = load_slice(item, slice_options(cfg))
    assert image.shape == (48, 48, 2) and item["modality"] == "ct+mr"
    np.testing.assert_allclose(
        image[..., 0], np.clip((ct[:, :, k] + 160) / 400, 0, 1), atol=1e-5
    )  # W 40 / 400
    np.testing.assert_allclose(image[..., 1], _zscored(t2, k), atol=1e-5)

    swapped = _data(ct_t2, in_channels=2, mr_normalisation="zscore", channels=[1, 0])
    image = load_slice(get_layout(swapped).items("train")[5], slice_options(swapped))
    np.testing.assert_allclose(image[..., 0], _zscored(t2, k), atol=1e-5)
    np.testing.assert_allclose(image[..., 1], np.clip((ct[:, :, k] + 160) / 400, 0, 1), atol=1e-5)

    windows = _data(ct_t2, in_channels=3, ct_window=[[40.0, 400.0], [-600.0, 1500.0]])
    image = load_slice(get_layout(windows).items("train")[5], slice_options(windows))  # CT x 2 windows + T2
    np.testing.assert_allclose(image[..., 1], np.clip((ct[:, :, k] + 1350) / 1500, 0, 1), atol=1e-5)
    assert image.shape[2] == 3


def test_channel_names_are_recorded_summarised_and_counted(ct_t2: Path):
    cfg = load_config(
        None, ["data.name=nnunet", f"data.root={ct_t2}", "data.in_channels=2"], schema=FinetuneConfig
    )
    assert cfg.data.channel_names == ["CT", "T2"]  # filled in when loaded, so the run's config records them
    line = run_summary("finetune", cfg, None).splitlines()[0]
    assert "(channels CT + T2, 224 px, 2 channels)" in line
    with pytest.raises(DataError) as info:
        get_layout(_data(ct_t2, in_channels=3)).items("train")
    assert str(info.value) == (
        f"{ct_t2 / 'dataset.json'}: gives 2 input channels (CT, T2) but data.in_channels is 3; "
        "set data.in_channels=2"
    )
    with pytest.raises(ConfigError, match="'data.in_channels': must be >= 1, got 0"):
        load_config(None, ["data.in_channels=0"], schema=FinetuneConfig)


def test_c_channel_transforms_take_no_colour_augmentation():
    rng = np.random.default_rng(0)
    image = np.repeat(rng.uniform(0, 1, (40, 44, 1)).astype(np.float32), 4, axis=2)
    views = TwoViewTransform(32, modality="rgb", in_channels=4)
    out = views({"image": image, "id": "a", "seed": 3, "modality": "ct+mr"})
    assert out["view1"].shape == (4, 32, 32) and out["view2"].shape == (4, 32, 32)
    for c in range(1, 4):  # every channel drew the same jitter, gamma, blur and noise
        assert torch.equal(out["view2"][0], out["view2"][c])
    np.testing.assert_allclose(views.mean, [0.449] * 4)
    np.testing.assert_allclose(views.std, [0.226] * 4)
    assert (
        not _is_colour("rgb", 4, None) and not _is_colour("rgb", 3, "ct+mr") and _is_colour("rgb", 3, "rgb")
    )
    two = image[:, :, :2]
    label = (two[:, :, 0] > 0.5).astype(np.int64)
    train = SegTrainTransform(32, modality="mr", in_channels=2)({"image": two, "label": label, "seed": 1})
    evaluated = SegEvalTransform(32, modality="mr", in_channels=2)({"image": two, "label": label})
    assert train["image"].shape == evaluated["image"].shape == (2, 32, 32)
    assert torch.equal(train["image"][0], train["image"][1])


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache in a temporary folder; no download."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(ew, "download_weights", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))


def _rgb_encoder_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    encoder = get_encoder("resnet18", in_channels=3, weights=None)
    return {k: v.clone().contiguous() for k, v in encoder.state_dict().items()}


def test_rgb_encoder_weights_load_into_c_channel_encoders(tmp_path: Path, hub_cache):
    named = _rgb_encoder_state(1)
    path = ew.cached_weights_file("resnet18", "imagenet")
    path.parent.mkdir(parents=True)
    save_file(named, str(path))
    net = build_network(
        ModelConfig(arch="unet", encoder="resnet18", encoder_weights="imagenet"), in_channels=4
    )
    state = net.encoder.state_dict()
    assert torch.equal(state["conv1.weight"], adapt_first_conv(named["conv1.weight"], 4))
    assert torch.equal(state["layer3.0.conv1.weight"], named["layer3.0.conv1.weight"])

    local = tmp_path / "rgb.safetensors"
    save_file(named, str(local))
    net = build_network(
        ModelConfig(arch="unet", encoder="resnet18", encoder_weights=str(local)), in_channels=2
    )
    conv = torch.nn.Conv2d(3, 64, 7)
    conv.weight.data.copy_(named["conv1.weight"])
    patch_first_conv(torch.nn.Sequential(conv), 2, pretrained=True)  # smp's own rule
    assert torch.equal(net.encoder.state_dict()["conv1.weight"], conv.weight.detach())

    four = tmp_path / "four.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(four))  # the 4-channel encoder above
    with pytest.raises(ConfigError, match=r"four.safetensors does not fit encoder 'resnet18'.*conv1.weight"):
        build_network(ModelConfig(arch="unet", encoder="resnet18", encoder_weights=str(four)), in_channels=2)


def _export(folder: Path, record: dict, channels: int) -> dict[str, torch.Tensor]:
    folder.mkdir()
    torch.manual_seed(channels)
    net = build_network(ModelConfig(arch="unet", encoder="resnet18"), in_channels=channels)
    state = {k: v.contiguous() for k, v in net.state_dict().items() if k.startswith("encoder.")}
    save_file(state, str(folder / "encoder.safetensors"))
    (folder / "export.json").write_text(
        json.dumps({"encoder": "resnet18", "in_channels": channels, **record})
    )
    return state


def test_transfer_needs_the_pretrained_channels_except_rgb_imports(tmp_path: Path):
    names = ["CT", "T2", "ADC", "FLAIR"]
    pretrained = _export(tmp_path / "pre", {"arch": "unet", "channel_names": names}, 4)
    net = build_network(ModelConfig(arch="unet", encoder="resnet18"), in_channels=4, classes=3)
    report = load_init(net, tmp_path / "pre", "encoder", "unet", "resnet18", in_channels=4)
    assert torch.equal(net.state_dict()["encoder.conv1.weight"], pretrained["encoder.conv1.weight"])
    assert report["pretrained"]["channel_names"] == names and "adapted" not in report
    three = build_network(ModelConfig(arch="unet", encoder="resnet18"), in_channels=3, classes=3)
    with pytest.raises(DeconError) as info:
        load_init(three, tmp_path / "pre", "encoder", "unet", "resnet18", in_channels=3)
    assert str(info.value) == (
        f"{tmp_path / 'pre' / 'encoder.safetensors'}: pre-trained on 4-channel input (CT, T2, ADC, FLAIR), "
        "fine-tuning on 3; set data.in_channels=4 with data of those channels, or pre-train on this data"
    )

    imported = _export(tmp_path / "imported", {"arch": None, "format": "torchvision"}, 3)
    two = build_network(ModelConfig(arch="unet", encoder="resnet18"), in_channels=2, classes=3)
    report = load_init(two, tmp_path / "imported", "encoder", "unet", "resnet18", in_channels=2)
    assert report["adapted"] == ["encoder.conv1.weight: 3 -> 2 input channels (smp's rule)"]
    expected = adapt_first_conv(imported["encoder.conv1.weight"], 2)
    assert torch.equal(two.state_dict()["encoder.conv1.weight"], expected)
