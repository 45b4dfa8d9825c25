"""Named encoder weights (``model.encoder_weights: imagenet``): read from the Hub cache, one-line error offline."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from segmentation_models_pytorch.encoders import get_encoder

from decon_med.config import ModelConfig
from decon_med.errors import ConfigError, DeconError
from decon_med.models import encoder_weights as ew
from decon_med.models.network import build_network


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache in a temporary folder; any download attempt fails at once."""
    cache = tmp_path / "hub"
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    calls = []

    def no_network(*args, **kwargs):
        calls.append(args)
        raise OSError("network is unreachable")

    monkeypatch.setattr(ew, "download_weights", no_network)
    return cache, calls


def _fake_weights(path, seed=0):
    """A randomly initialised resnet18 encoder's state dict saved where the cache keeps smp's file."""
    torch.manual_seed(seed)
    encoder = get_encoder("resnet18", in_channels=3, weights=None)
    for tensor in encoder.state_dict().values():
        if tensor.is_floating_point():
            tensor.normal_()  # BN statistics too, so that a tensor left unloaded cannot equal the file's
    state = {k: v.clone().contiguous() for k, v in encoder.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return state


def test_cache_path_follows_the_hub_variables(tmp_path, monkeypatch):
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    path = ew.cached_weights_file("resnet50", "imagenet")
    import segmentation_models_pytorch as smp

    revision = smp.encoders.encoders["resnet50"]["pretrained_settings"]["imagenet"]["revision"]
    assert path == tmp_path / "hf" / "hub" / "models--smp-hub--resnet50.imagenet" / "snapshots" / revision / (
        "model.safetensors"
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "direct"))
    assert ew.cached_weights_file("resnet50", "imagenet").parents[3] == tmp_path / "direct"


def test_cached_imagenet_weights_load_exactly(hub_cache):
    cache, calls = hub_cache
    state = _fake_weights(ew.cached_weights_file("resnet18", "imagenet"))
    cfg = ModelConfig(arch="unet", encoder="resnet18", encoder_weights="imagenet")
    cfg.validate()
    net = build_network(cfg, in_channels=3, classes=2)
    loaded = net.encoder.state_dict()
    assert set(loaded) == set(state)
    for key, tensor in state.items():
        assert torch.equal(loaded[key], tensor), key
    assert calls == []  # a cached file is read without any download attempt


def test_named_weights_adapt_the_first_conv_like_smp(hub_cache):
    state = _fake_weights(ew.cached_weights_file("resnet18", "imagenet"), seed=1)
    net = build_network(
        ModelConfig(arch="fcn", encoder="resnet18", encoder_weights="imagenet"), in_channels=1
    )
    conv1 = net.encoder.state_dict()["conv1.weight"]
    assert conv1.shape == (64, 1, 7, 7)
    # smp's patch_first_conv sums the RGB filters for a 1-channel input
    assert torch.equal(conv1, state["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(net.encoder.state_dict()["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])


def test_offline_without_cached_file_is_one_line_naming_the_path(hub_cache):
    cache, calls = hub_cache
    cfg = ModelConfig(arch="unet", encoder="resnet18", encoder_weights="imagenet")
    cfg.validate()  # a name is valid config; the file is looked for when the network is built
    with pytest.raises(DeconError) as info:
        build_network(cfg)
    message = str(info.value)
    expected = ew.cached_weights_file("resnet18", "imagenet")
    assert "\n" not in message
    assert str(expected) in message and str(expected).startswith(str(cache))
    assert "model.safetensors" in message and "smp-hub/resnet18.imagenet" in message
    assert len(calls) == 1  # one attempt, failing at once


def test_hf_hub_offline_skips_the_download(hub_cache, monkeypatch):
    cache, calls = hub_cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DeconError, match="HF_HUB_OFFLINE"):
        build_network(ModelConfig(arch="unet", encoder="resnet18", encoder_weights="ssl"))
    assert calls == []


def test_unknown_weights_name_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model.encoder_weights.*imagenet"):
        ModelConfig(arch="unet", encoder="resnet18", encoder_weights="imagenet21k").validate()
