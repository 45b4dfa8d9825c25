"""Masked image modelling: exact mask ratio, loss on masked pixels only, fills, and a falling over-fit loss."""

import pytest
import segmentation_models_pytorch as smp
import torch
from safetensors.torch import load_file

from decon_med.config import PretrainConfig, load_config
from decon_med.engine.export import export
from decon_med.engine.pretrain import pretrain
from decon_med.errors import ConfigError
from decon_med.ssl import build_method
from decon_med.ssl.mim import MaskedImageModeling, masked_mse, normalise_patches
from tests.ssl.test_pretrain_methods import cfg_for
from tests.ssl.test_pretrain_methods import isic as isic  # noqa: F401  (module fixture)


def mim_cfg(*extra: str) -> PretrainConfig:
    overrides = [
        "ssl.method=mim",
        "model.encoder=resnet18",
        "data.image_size=64",
        "ssl.mask_patch=16",
        *extra,
    ]
    return load_config(None, overrides, schema=PretrainConfig)


def test_mask_ratio_is_exact_per_image_and_masks_whole_patches():
    method = build_method(mim_cfg("ssl.mask_ratio=0.6"))
    mask = method.random_mask(torch.zeros(5, 3, 64, 64))
    assert mask.shape == (5, 1, 64, 64)
    patches = mask.view(5, 4, 16, 4, 16)
    per_patch = patches.float().mean(dim=(2, 4))  # (B, 4, 4): each patch all masked or all visible
    assert torch.all((per_patch == 0) | (per_patch == 1))
    assert per_patch.sum(dim=(1, 2)).tolist() == [round(0.6 * 16)] * 5
    assert not torch.equal(mask[0], mask[1])  # drawn per image


def test_loss_ignores_visible_pixels_of_the_target():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 1, 32, 32, dtype=torch.bool)
    mask[:, :, :16, :16] = True
    for norm_pix in (False, True):
        loss = masked_mse(pred, target, mask, 16, norm_pix)
        changed_visible = target.clone()
        changed_visible[:, :, 16:, :] += 5.0
        assert torch.allclose(masked_mse(pred, changed_visible, mask, 16, norm_pix), loss)
        changed_masked = target.clone()
        changed_masked[:, :, 3, 5] += 5.0
        assert not torch.allclose(masked_mse(pred, changed_masked, mask, 16, norm_pix), loss)
    expected = ((pred - target) ** 2)[:, :, :16, :16].mean()
    assert torch.allclose(masked_mse(pred, target, mask, 16, False), expected)


def test_normalised_patches_have_zero_mean_and_unit_variance():
    image = torch.rand(2, 3, 32, 32) * 4 + 2
    blocks = normalise_patches(image, 16).view(2, 3, 2, 16, 2, 16)
    assert torch.allclose(blocks.mean(dim=(1, 3, 5)), torch.zeros(2, 2, 2), atol=1e-5)
    assert torch.allclose(blocks.var(dim=(1, 3, 5), unbiased=False), torch.ones(2, 2, 2), atol=1e-3)


@pytest.mark.parametrize("fill", ["token", "zero"])
def test_masked_pixels_get_the_fill_and_visible_pixels_are_kept(fill):
    method = build_method(mim_cfg(f"ssl.mask_fill={fill}"))
    if fill == "token":
        assert isinstance(method.mask_token, torch.nn.Parameter)
        with torch.no_grad():
            method.mask_token.copy_(torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1))
    else:
        assert method.mask_token is None
    image = torch.randn(2, 3, 64, 64)
    mask = method.random_mask(image)
    filled = method.fill(image, mask)
    expected = torch.tensor([1.0, 2.0, 3.0]) if fill == "token" else torch.zeros(3)
    m = mask.expand_as(image)
    assert torch.equal(filled[~m], image[~m])
    assert torch.equal(filled.permute(0, 2, 3, 1)[m.permute(0, 2, 3, 1)].view(-1, 3)[0], expected)


@pytest.mark.parametrize("arch", ["unet", "fpn"])
def test_reconstruction_has_the_input_shape(arch):
    method = build_method(mim_cfg(f"model.arch={arch}"))
    assert method.upscale == (1 if arch == "unet" else 4)
    assert method.reconstruct(torch.randn(2, 3, 64, 64)).shape == (2, 3, 64, 64)


def test_bad_patch_size_names_the_key():
    method = MaskedImageModeling(build_method(mim_cfg()).network, mask_patch=24)
    with pytest.raises(ValueError, match="mask patch 24 does not divide the input size 64 x 64"):
        method({"view1": torch.randn(1, 3, 64, 64)})  # the model names no config key
    with pytest.raises(ConfigError, match="ssl.mim.mask_patch"):
        mim_cfg("ssl.mask_patch=24")


def test_loss_falls_on_an_overfitted_batch():
    torch.manual_seed(0)
    method = build_method(mim_cfg("ssl.norm_pix_loss=false"))
    batch = {"view1": torch.rand(2, 3, 64, 64)}
    optimizer = torch.optim.AdamW(method.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        torch.manual_seed(1)  # the same mask every step: a pure over-fit
        loss = method(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_exported_mim_weights_load_into_smp_encoder_and_decoder(isic, tmp_path):  # noqa: F811
    run = pretrain(cfg_for(isic, tmp_path / "run", "mim"), progress=False, max_steps=1)
    files = export(run / "last.ckpt", tmp_path / "export")
    model = smp.create_model("unet", encoder_name="resnet18", encoder_weights=None, classes=2)
    weights = load_file(files["encoder_decoder"])
    result = model.load_state_dict(weights, strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.startswith("segmentation_head.") for k in result.missing_keys)
    assert not any(k.startswith(("head.", "mask_token")) for k in weights)
