"""Online linear probe: how well frozen pre-training features segment a small labelled set, while pre-training runs.

Every ``probe.every`` optimiser steps (and before the first step and after the last) the engine hands the network
that is exported (``SSLMethod.export_prefix``) to :class:`OnlineProbe`, which, in eval mode and without gradient,

1. reads ``probe.images`` labelled training and ``probe.val_images`` validation images once (any labelled layout
   the loaders read, at the pre-training image size, kept in memory);
2. takes two feature maps of each image: the encoder's last level and the decoder output (the map that feeds
   the segmentation head), both resized (bilinear) to ``probe.size`` x ``probe.size``, the masks by nearest
   neighbour;
3. fits one linear 1x1 classifier per map (standardised features, ``probe.steps`` full-batch Adam steps on at
   most :data:`MAX_PIXELS` sampled training pixels, a fixed seed) and scores it on the validation images with
   the mmseg-style mIoU of :mod:`decon_med.metrics`.

The scores go to ``probe.csv`` (step, enc_mIoU, dec_mIoU, seconds), TensorBoard (``probe/enc_mIoU``, ...) and the
progress bar. The probe measures linear separability at a coarse grid, not fine-tuned accuracy: read its trend.

Example:
    >>> probe = OnlineProbe(cfg)                        # a PretrainConfig with probe.root set
    >>> probe(method.teacher)                           # {'enc_mIoU': 0.61, 'dec_mIoU': 0.55, 'seconds': 0.8}
"""

from __future__ import annotations

import csv
import dataclasses
import io
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from decon_med.config import PretrainConfig
from decon_med.folders import atomic_write
from decon_med.metrics import ConfusionMatrix
from decon_med.models.network import features

#: Training pixels sampled for each linear fit (bounds the probe's memory and time at wide encoder levels).
MAX_PIXELS = 8192
#: Adam learning rate and weight decay of the linear fits (on standardised features).
PROBE_LR = 0.1
PROBE_WEIGHT_DECAY = 1e-4
IGNORE_INDEX = 255
_BATCH = 4


class OnlineProbe:
    """Fits linear 1x1 probes on the frozen encoder and decoder features of a network (see the module docstring).

    Args:
        cfg: pre-training config; ``cfg.probe.root`` names the labelled data.
        device: where the features and fits are computed (the network's device).
    """

    def __init__(self, cfg: PretrainConfig, device: torch.device | str = "cpu"):
        from decon_med.data.datasets import build_dataset
        from decon_med.data.layouts import num_classes

        probe = cfg.probe
        data = dataclasses.replace(
            cfg.data, name=probe.name, root=str(probe.root), num_classes=probe.num_classes, cache_rate=0.0
        )
        probe_cfg = dataclasses.replace(cfg, data=data)
        self.cfg = probe
        self.device = torch.device(device)
        self.num_classes = num_classes(data)
        self.train = _load(build_dataset(probe_cfg, "train", "eval"), probe.images, self.device)
        self.val = _load(build_dataset(probe_cfg, "val", "eval"), probe.val_images, self.device)

    @torch.no_grad()
    def features(self, network: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"enc": (N, C, s, s), "dec": (N, c, s, s)}`` at the probe size, in eval mode."""
        size = (self.cfg.size, self.cfg.size)
        was_training = network.training
        network.eval()
        maps: dict[str, list[torch.Tensor]] = {"enc": [], "dec": []}
        try:
            for start in range(0, len(images), _BATCH):
                enc, dec = features(network, images[start : start + _BATCH])
                for name, level in (("enc", enc[-1]), ("dec", dec[-1])):
                    maps[name].append(
                        F.interpolate(level.float(), size=size, mode="bilinear", align_corners=False)
                    )
        finally:
            network.train(was_training)
        return {name: torch.cat(parts) for name, parts in maps.items()}

    def __call__(self, network: nn.Module) -> dict[str, float]:
        """Val mIoU (fraction in [0, 1]) of the encoder and decoder probes, and the seconds the probe took."""
        start = time.perf_counter()
        size = self.cfg.size
        train_feats = self.features(network, self.train[0])
        val_feats = self.features(network, self.val[0])
        train_labels = _resize_labels(self.train[1], size)
        val_labels = _resize_labels(self.val[1], size)
        scores = {
            f"{name}_mIoU": linear_probe_miou(
                train_feats[name], train_labels, val_feats[name], val_labels, self.num_classes, self.cfg.steps
            )
            for name in ("enc", "dec")
        }
        return {**scores, "seconds": time.perf_counter() - start}


@torch.enable_grad()
def linear_probe_miou(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    steps: int = 100,
    seed: int = 0,
) -> float:
    """mIoU on the validation pixels of a linear 1x1 classifier fitted on the training pixels.

    Args:
        train_feats, val_feats: (N, C, H, W) feature maps.
        train_labels, val_labels: (N, H, W) class indices (``255`` is ignored).
        num_classes: classes, background included.
        steps: full-batch Adam steps.
        seed: seed of the pixel sample and of the classifier's initialisation.

    Example:
        >>> x = torch.randn(2, 3, 8, 8); y = (x[:, 0] > 0).long()
        >>> linear_probe_miou(x, y, x, y, num_classes=2) > 0.9
        True
    """
    generator = torch.Generator().manual_seed(seed)
    x = train_feats.detach().float().permute(0, 2, 3, 1).flatten(0, 2)
    y = train_labels.flatten()
    keep = (y >= 0) & (y < num_classes)
    x, y = x[keep], y[keep]
    if len(y) > MAX_PIXELS:
        index = torch.randperm(len(y), generator=generator)[:MAX_PIXELS].to(y.device)
        x, y = x[index], y[index]
    mean, std = x.mean(dim=0), x.std(dim=0).clamp_min(1e-6)
    x = (x - mean) / std
    linear = nn.Linear(x.shape[1], num_classes).to(x.device)
    with torch.no_grad():
        weight = torch.randn(linear.weight.shape, generator=generator) * 0.01
        linear.weight.copy_(weight.to(x.device))
        linear.bias.zero_()
    optimizer = torch.optim.Adam(linear.parameters(), lr=PROBE_LR, weight_decay=PROBE_WEIGHT_DECAY)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(linear(x), y).backward()
        optimizer.step()
    matrix = ConfusionMatrix(num_classes, ignore_index=IGNORE_INDEX)
    with torch.no_grad():
        for feats, labels in zip(val_feats, val_labels, strict=True):
            pixels = (feats.float().permute(1, 2, 0) - mean) / std
            matrix.update(linear(pixels).argmax(dim=-1)[None], labels[None])
    return float(matrix.compute()["mIoU"])


class ProbeLog:
    """``probe.csv`` of a run folder: one row per probe; on resume, rows past the resumed step are dropped.

    Example:
        >>> log = ProbeLog(Path("runs/x/probe.csv"), resumed_step=None)
        >>> log.write(500, {"enc_mIoU": 0.6, "dec_mIoU": 0.55, "seconds": 0.8})
    """

    columns = ("step", "enc_mIoU", "dec_mIoU", "seconds")

    def __init__(self, path: Path, resumed_step: int | None):
        self.path = path
        rows: list[dict[str, str]] = []
        if resumed_step is not None and path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) <= resumed_step]
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, self.columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(path, text.getvalue())

    def write(self, step: int, scores: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerow(
                {"step": step, **{k: round(float(v), 6) for k, v in scores.items()}}
            )


def _load(dataset: Any, count: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` images and masks of ``dataset`` as (N, C, H, W) and (N, H, W) tensors."""
    samples = [dataset[i] for i in range(min(count, len(dataset)))]
    images = torch.stack([s["image"] for s in samples]).to(device)
    labels = torch.stack([torch.as_tensor(s["label"]).long() for s in samples]).to(device)
    return images, labels


def _resize_labels(labels: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(labels[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
