"""Saving and loading fine-tuned segmentation models (checkpoints of ``decon-med finetune``).

A fine-tuning checkpoint is a dict of tensors and plain values (loadable with ``weights_only=True``)::

    {"kind": "finetune", "network": <smp state dict>, "network_meta": {"arch", "encoder", "in_channels", "classes"},
     "config": <the resolved FinetuneConfig as a dict>, "step": <iteration>, ...training state...}

Example:
    >>> net, cfg, ckpt = load_segmentation_model("runs/finetune/isic")     # a run folder or a .ckpt file
    >>> net(torch.zeros(1, 3, cfg.data.image_size, cfg.data.image_size)).shape[1] == ckpt["network_meta"]["classes"]
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from decon_med.config import FinetuneConfig, ModelConfig, from_dict, to_dict
from decon_med.engine.checkpoint import load_checkpoint
from decon_med.errors import ConfigError, DataError

KIND = "finetune"


def network_meta(cfg: FinetuneConfig, classes: int) -> dict[str, Any]:
    """What rebuilds the network: arch, encoder, input channels and classes."""
    return {
        "arch": cfg.model.arch,
        "encoder": cfg.model.encoder,
        "in_channels": cfg.data.in_channels,
        "classes": classes,
    }


def segmentation_state(network: nn.Module, cfg: FinetuneConfig, classes: int, **extra: Any) -> dict[str, Any]:
    """The model part of a fine-tuning checkpoint; ``extra`` adds training state (step, optimiser, ...)."""
    return {
        "kind": KIND,
        "network": network.state_dict(),
        "network_meta": network_meta(cfg, classes),
        "config": to_dict(cfg),
        **extra,
    }


#: The keys of a fine-tuning checkpoint that describe the model (the rest is training state).
MODEL_KEYS: tuple[str, ...] = ("kind", "network", "network_meta", "config", "step", "val")


def model_part(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A fine-tuning checkpoint without its training state (optimiser, RNG, counters): what ``best.ckpt`` holds."""
    return {key: checkpoint[key] for key in MODEL_KEYS if key in checkpoint}


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the one a fine-tuning run folder selects (``best.ckpt`` if present, else ``last.ckpt``)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.ckpt", "last.ckpt"):
            if (path / name).is_file():
                return path / name
        raise DataError(path, "run folder holds no best.ckpt or last.ckpt")
    if not path.is_file():
        raise DataError(path, "checkpoint not found")
    return path


def load_segmentation_model(path: str | Path) -> tuple[nn.Module, FinetuneConfig, dict[str, Any]]:
    """The fine-tuned network (eval mode, CPU), its config and the raw checkpoint.

    Raises:
        DataError: the file is missing, is not a fine-tuning checkpoint, records no usable network or config, or
            its weights do not fit its network.
    """
    from decon_med.models.network import build_network, check_recorded_network

    ckpt_path = resolve_checkpoint(path)
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.get("kind") != KIND or "network" not in ckpt:
        raise DataError(
            ckpt_path, "not a fine-tuning checkpoint (pre-training checkpoints go through export)"
        )
    meta = check_recorded_network(ckpt.get("network_meta"), ckpt_path)
    if not isinstance(ckpt.get("config"), dict):
        raise DataError(ckpt_path, "records no config, so its data settings are unknown")
    try:
        cfg = from_dict(FinetuneConfig, ckpt["config"])
    except ConfigError as exc:
        raise DataError(ckpt_path, f"its config cannot be read here ({exc})") from exc
    network = build_network(
        ModelConfig(arch=meta["arch"], encoder=meta["encoder"]),
        in_channels=meta["in_channels"],
        classes=meta["classes"],
    )
    try:
        network.load_state_dict(ckpt["network"])
    except RuntimeError as exc:
        raise DataError(ckpt_path, f"weights do not fit {meta['arch']}/{meta['encoder']} ({exc})") from exc
    return network.eval(), cfg, ckpt
