"""GLID-style masked image modelling of the whole encoder-decoder (Liu et al., CVPR 2024, on an smp U-Net).

Random square patches of the input are masked (``mask_ratio`` of them, exactly, per image) and filled with a
learnable mask token (one value per input channel) or with zeros. The full encoder-decoder runs on the masked image
and a 1x1 convolution on the decoder output (the map that feeds the segmentation head) predicts the pixels; when
that map is coarser than the input (FPN: 1/4), the head predicts ``C * r * r`` channels that are pixel-shuffled up
by ``r``. The loss is the mean squared error over the masked pixels only, optionally against per-patch normalised
targets (MAE's ``norm_pix_loss``). The reconstruction head is not part of ``network``: at fine-tuning the encoder
and the decoder are kept and only the segmentation head is new.

Only the first view of a pre-training batch is used: it is already a random resized crop with a random flip (the
augmentation GLID takes from MAE; set ``augment.color: false`` to leave out the colour changes), so the loader's
second view is decoded but not used.

This module is the ``mim`` method: its settings (``ssl.mim.*``, :class:`MIMSettings`), its builder and its
registration (no teacher: the student is exported; the decoder is pre-trained by the method itself, so it takes no
``ssl.decoder`` supervision).

Example:
    >>> method = build_mim(load_config("configs/pretrain/mim.yaml", ["model.encoder=resnet18"]))
    >>> out = method(batch)                   # {"loss", "masked_fraction"}
    >>> out["loss"].backward(); optimizer.step()
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from decon_med.config import MaskFill, PretrainConfig, check
from decon_med.models.network import build_network
from decon_med.ssl.base import SettingError, SSLMethod
from decon_med.ssl.health import embedding_std
from decon_med.ssl.registry import MethodSpec, register


class MaskedImageModeling(SSLMethod):
    """Masked image modelling of an smp encoder-decoder: reconstruct the pixels of masked patches.

    Args:
        network: the smp model whose encoder and decoder are pre-trained (and exported).
        in_channels: input channels (the pixels that are predicted).
        mask_ratio: fraction of the patches masked in each image (0.75).
        mask_patch: side of a square patch in pixels (32); must divide the input size.
        mask_fill: ``token`` (a learnable value per channel) or ``zero``.
        norm_pix_loss: normalise each target patch to mean 0 and variance 1 before the loss.
    """

    def __init__(
        self,
        network: nn.Module,
        in_channels: int = 3,
        mask_ratio: float = 0.75,
        mask_patch: int = 32,
        mask_fill: MaskFill = "token",
        norm_pix_loss: bool = True,
    ):
        super().__init__()
        self.network = network
        self.mask_ratio = mask_ratio
        self.mask_patch = mask_patch
        self.norm_pix_loss = norm_pix_loss
        channels, self.upscale = _decoder_output_shape(network, in_channels)
        self.head = nn.Conv2d(channels, in_channels * self.upscale**2, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, in_channels, 1, 1)) if mask_fill == "token" else None

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        image = batch["view1"]
        mask = self.random_mask(image)
        decoded = self.network.decoder(self.network.encoder(self.fill(image, mask)))
        pred = self._to_pixels(decoded)
        loss = masked_mse(pred.float(), image.float(), mask, self.mask_patch, self.norm_pix_loss)
        if self.record_health:
            # No projector: the spread of the decoder output that the reconstruction head reads (a decoder that
            # maps every pixel to one vector reads 0).
            self._health = {"dec_z_std": embedding_std(decoded)}
        return {"loss": loss, "masked_fraction": mask.float().mean().detach()}

    def health(self) -> dict[str, torch.Tensor]:
        """``dec_z_std``: per-channel std of the L2-normalised decoder output times sqrt(channels)."""
        return dict(getattr(self, "_health", {}))

    def random_mask(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) bool, True on masked pixels: exactly ``round(mask_ratio * patches)`` patches per image."""
        b, _, h, w = image.shape
        p = self.mask_patch
        if h % p or w % p:
            raise SettingError("mask_patch", f"mask patch {p} does not divide the input size {h} x {w}")
        grid_h, grid_w = h // p, w // p
        n = grid_h * grid_w
        keep_masked = round(self.mask_ratio * n)
        order = torch.rand(b, n, device=image.device).argsort(dim=1)
        patches = torch.zeros(b, n, dtype=torch.bool, device=image.device)
        patches.scatter_(1, order[:, :keep_masked], True)
        patches = patches.view(b, 1, grid_h, grid_w)
        return patches.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)

    def fill(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The image with its masked pixels replaced by the mask token (or zeros)."""
        fill = self.mask_token.to(image.dtype) if self.mask_token is not None else image.new_zeros(())
        return torch.where(mask, fill, image)

    def reconstruct(self, image: torch.Tensor) -> torch.Tensor:
        """Predicted pixels (B, C, H, W) from the decoder output through the 1x1 head."""
        return self._to_pixels(self.network.decoder(self.network.encoder(image)))

    def _to_pixels(self, decoded: torch.Tensor) -> torch.Tensor:
        out = self.head(decoded)
        return F.pixel_shuffle(out, self.upscale) if self.upscale > 1 else out


def masked_mse(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, patch: int, norm_pix: bool
) -> torch.Tensor:
    """Mean squared error over the masked pixels and all channels; visible pixels contribute nothing.

    With ``norm_pix``, each ``patch`` x ``patch`` target patch is normalised by its own mean and variance (over
    its pixels and channels, eps 1e-6) first.
    """
    if norm_pix:
        target = normalise_patches(target, patch)
    err = ((pred - target) ** 2).mean(dim=1, keepdim=True)
    weight = mask.to(err.dtype)
    return (err * weight).sum() / weight.sum().clamp_min(1.0)


def normalise_patches(image: torch.Tensor, patch: int, eps: float = 1e-6) -> torch.Tensor:
    """Each non-overlapping ``patch`` x ``patch`` block of ``image`` scaled to mean 0, variance 1."""
    b, c, h, w = image.shape
    blocks = image.view(b, c, h // patch, patch, w // patch, patch)
    mean = blocks.mean(dim=(1, 3, 5), keepdim=True)
    var = blocks.var(dim=(1, 3, 5), keepdim=True, unbiased=False)
    return ((blocks - mean) / (var + eps).sqrt()).view(b, c, h, w)


@torch.no_grad()
def _decoder_output_shape(network: nn.Module, in_channels: int) -> tuple[int, int]:
    """Channels of the decoder output and the factor by which it is coarser than the input (one probe pass)."""
    was_training = network.training
    network.eval()
    try:
        device = next(network.parameters()).device
        out = network.decoder(network.encoder(torch.zeros(1, in_channels, 64, 64, device=device)))
    finally:
        network.train(was_training)
    return out.shape[1], 64 // out.shape[-1]


@dataclass
class MIMSettings:
    """Masked image modelling's own keys, the ``ssl.mim`` section.

    Attributes:
        mask_ratio: fraction of patches masked (0.75).
        mask_patch: side of a masked patch in pixels (must divide data.image_size).
        mask_fill: masked patches are replaced by a learnable ``token`` or by ``zero``.
        norm_pix_loss: targets normalised per patch (mean 0, std 1) before the loss (MAE: better features).

    Example:
        >>> load_config(None, ["ssl.method=mim", "ssl.mim.mask_patch=16"]).ssl.mim.mask_patch
        16
    """

    mask_ratio: float = 0.75
    mask_patch: int = 32
    mask_fill: MaskFill = "token"
    norm_pix_loss: bool = True

    def validate(self) -> None:
        check(0.0 < self.mask_ratio < 1.0, "ssl.mim.mask_ratio", f"must be in (0, 1), got {self.mask_ratio}")
        check(self.mask_patch >= 1, "ssl.mim.mask_patch", "must be >= 1")


def check_patch(cfg: PretrainConfig) -> None:
    """``ssl.mim.mask_patch`` must divide ``data.image_size`` (every input is cut into whole patches)."""
    patch = cfg.ssl.settings.mask_patch
    check(
        cfg.data.image_size % patch == 0,
        "ssl.mim.mask_patch",
        f"must divide data.image_size ({cfg.data.image_size}), got {patch}",
    )


def build_mim(cfg: PretrainConfig) -> MaskedImageModeling:
    """The masked-image-modelling method of a pre-training config (``ssl.method: mim``).

    Example:
        >>> method = build_mim(load_config("configs/pretrain/mim.yaml"))
    """
    s: MIMSettings = cfg.ssl.settings
    return MaskedImageModeling(
        build_network(cfg.model, in_channels=cfg.data.in_channels, classes=1),
        in_channels=cfg.data.in_channels,
        mask_ratio=s.mask_ratio,
        mask_patch=s.mask_patch,
        mask_fill=s.mask_fill,
        norm_pix_loss=s.norm_pix_loss,
    )


register(
    MethodSpec(
        "mim",
        MIMSettings,
        build_mim,
        summary="GLID-style masked image modelling: the encoder-decoder reconstructs masked patches",
        export="student",
        teacher=False,
        trains_decoder=True,
        check=check_patch,
        config="pretrain/mim",
    )
)
