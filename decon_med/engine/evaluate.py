"""Evaluate a fine-tuned network on a whole split: mIoU, mDice, accuracy and optional prediction masks.

Scores follow :mod:`decon_med.metrics` (one confusion matrix over every pixel of the split, background
included) and, as in mmseg, are computed at each image's original resolution: the image is resized to the
network input (:class:`~decon_med.data.transforms.SegEvalTransform`), the logits are resized back bilinearly to
the original size, and the arg-max is compared with the original mask. Validation during fine-tuning uses the
same function, so ``evaluate`` on a finished run reproduces its ``results.json``. Saved predictions are these
original-size arg-max masks.

Example:
    >>> metrics = evaluate("runs/finetune/isic", split="test", save_predictions=True)
    >>> round(metrics["mIoU"], 3)
    0.812
    >>> sorted(p.name for p in Path("runs/finetune/isic").glob("*_test*"))
    ['metrics_test.json', 'predictions_test']
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import DataLoader
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from decon_med.config import FinetuneConfig
from decon_med.data.datasets import build_dataset, collate_eval
from decon_med.data.layouts import get_layout
from decon_med.engine.checkpoint import check_finite_state
from decon_med.engine.loop import autocast
from decon_med.engine.model_io import load_segmentation_model, resolve_checkpoint
from decon_med.errors import ConfigError, DeconError
from decon_med.metrics import ConfusionMatrix

SPLITS = ("train", "val", "test")


def eval_batch_size(cfg: FinetuneConfig) -> int:
    """Images per evaluation forward pass: the training micro-batch (fixed, so scores are reproducible)."""
    return max(1, cfg.train.batch_size // cfg.train.accum_steps)


@torch.no_grad()
def predict_logits(network: nn.Module, images: torch.Tensor, amp: str = "none") -> torch.Tensor:
    """Float32 ``(B, C, H, W)`` logits of an eval-mode ``network`` for a normalised ``(B, C, H, W)`` batch.

    Example:
        >>> predict_logits(net.eval(), batch["image"], amp="bf16").argmax(1).shape
        torch.Size([4, 224, 224])
    """
    with autocast(images.device, amp):
        return network(images).float()


def class_names(cfg: FinetuneConfig, classes: int) -> list[str]:
    """``data.class_names``, else the layout's names when they fit ``classes``, else ``"0"``, ``"1"``, ...

    Raises:
        ConfigError: ``data.class_names`` is set and does not name ``classes`` classes.
    """
    if cfg.data.class_names is not None:
        if len(cfg.data.class_names) != classes:
            raise ConfigError(
                f"config key 'data.class_names': has {len(cfg.data.class_names)} names but the network has "
                f"{classes} classes"
            )
        return [str(n) for n in cfg.data.class_names]
    names = list(get_layout(cfg.data).class_names)
    return [str(n) for n in names] if len(names) == classes else [str(i) for i in range(classes)]


def eval_loader(cfg: FinetuneConfig, split: str) -> DataLoader:
    """Deterministic loader over a labelled split in ``eval`` mode (no shuffling, every image once)."""
    dataset = build_dataset(cfg, split, "eval", full_labels=True)
    return DataLoader(
        dataset,
        batch_size=eval_batch_size(cfg),
        shuffle=False,
        collate_fn=collate_eval,
        num_workers=cfg.data.num_workers,
        pin_memory=torch.cuda.is_available(),
        # a generator of its own, so evaluating never draws from the global generator
        generator=torch.Generator().manual_seed(0),
    )


def evaluate_network(
    network: nn.Module,
    cfg: FinetuneConfig,
    split: str,
    classes: int,
    predictions: Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Scores of ``network`` over every image of ``split`` (see :func:`decon_med.metrics.segmentation_metrics`).

    The network is evaluated in eval mode without gradients under ``train.amp`` autocast, on the device of its
    parameters, and put back in its previous mode.

    Args:
        network: the segmentation network.
        cfg: the fine-tuning config (data, image size, amp).
        split: ``val``, ``test`` or ``train``.
        classes: output classes of the network.
        predictions: write one PNG of class indices per image here, at the original image size.
        progress: show a progress bar.
    """
    device = next(network.parameters()).device
    names = class_names(cfg, classes)
    matrix = ConfusionMatrix(classes, ignore_index=255, device=device)
    save = _prediction_writer(predictions) if predictions is not None else None
    was_training = network.training
    network.eval()
    try:
        for batch in tqdm(
            eval_loader(cfg, split), disable=not progress, desc=split, unit="batch", leave=False
        ):
            images = batch["image"].to(device, non_blocking=True)
            logits = predict_logits(network, images, cfg.train.amp)
            for index, (sample_id, label) in enumerate(zip(batch["id"], batch["label_full"], strict=True)):
                full = F.interpolate(
                    logits[index : index + 1], size=tuple(label.shape), mode="bilinear", align_corners=False
                )
                prediction = full.argmax(1)
                matrix.update(prediction, label.to(device, non_blocking=True)[None])
                if save is not None:
                    save(sample_id, prediction[0])
    finally:
        network.train(was_training)
    return matrix.compute(class_names=names)


def evaluate(
    path: str | Path,
    split: str = "test",
    save_predictions: bool = False,
    out: str | Path | None = None,
    progress: bool = True,
    data_root: str | None = None,
    num_workers: int | None = None,
) -> dict[str, Any]:
    """Evaluate a fine-tuning run folder (its ``best.ckpt``, else ``last.ckpt``) or checkpoint on a split.

    Prints a per-class table and writes ``metrics_<split>.json`` (and with ``save_predictions`` the folder
    ``predictions_<split>/`` of ``<id>.png`` class-index masks at the original image sizes) next to the
    checkpoint, or into ``out``.

    Args:
        path: run folder or ``.ckpt`` file written by ``decon-med finetune``.
        split: ``val`` or ``test`` (``train`` works too).
        save_predictions: also write the predicted masks.
        out: output folder instead of the checkpoint's folder.
        progress: show a progress bar.
        data_root: read the data from here instead of the checkpoint config's ``data.root``.
        num_workers: DataLoader workers instead of the config's ``data.num_workers``.

    Returns:
        The scores (``mIoU``, ``mDice``, ``aAcc``, ``mAcc``, per-class ``IoU`` / ``Dice`` / ``Acc``,
        ``n_pixels``).

    Raises:
        DataError: the checkpoint or the data is missing or unreadable.
        DeconError: unknown split.

    Example:
        >>> evaluate("runs/finetune/isic/best.ckpt", split="val", data_root="/data/isic2017")["mDice"]
        0.873
    """
    if split not in SPLITS:
        raise DeconError(f"unknown split '{split}'; expected one of {', '.join(SPLITS)}")
    checkpoint = resolve_checkpoint(path)
    network, cfg, state = load_segmentation_model(checkpoint)
    check_finite_state(state["network"], checkpoint)
    if data_root is not None:
        cfg.data.root = str(data_root)
    if num_workers is not None:
        cfg.data.num_workers = num_workers
    network.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    folder = Path(out) if out is not None else checkpoint.parent
    predictions = folder / f"predictions_{split}" if save_predictions else None
    classes = int(state["network_meta"]["classes"])
    metrics = evaluate_network(network, cfg, split, classes, predictions=predictions, progress=progress)
    record = {
        "checkpoint": str(checkpoint),
        "split": split,
        "iter": int(state.get("step", 0)),
        "data_root": cfg.data.root,
        **metrics,
    }
    write_json(folder / f"metrics_{split}.json", record)
    print(f"{checkpoint} on {split} (iteration {record['iter']}):")
    print(format_table(metrics))
    return metrics


def format_table(metrics: dict[str, Any]) -> str:
    """Per-class IoU / Dice / Acc in percent, then mIoU, mDice and aAcc.

    Example:
        >>> print(format_table(segmentation_metrics(np.array([[3, 1], [0, 4]]), ["bg", "lesion"])))
        class        IoU    Dice     Acc
        bg         75.00   85.71   75.00
        lesion     80.00   88.89  100.00
        mIoU 77.50  mDice 87.30  aAcc 87.50
    """
    names = list(metrics["IoU"])
    width = max([len("class"), *(len(n) for n in names)]) + 2
    lines = [f"{'class':<{width}}{'IoU':>8}{'Dice':>8}{'Acc':>8}"]
    for name in names:
        row = (_percent(metrics[key][name]) for key in ("IoU", "Dice", "Acc"))
        lines.append(f"{name:<{width}}" + "".join(f"{value:>8}" for value in row))
    lines.append(
        f"mIoU {_percent(metrics['mIoU'])}  mDice {_percent(metrics['mDice'])}  aAcc {_percent(metrics['aAcc'])}"
    )
    return "\n".join(lines)


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` as indented JSON, atomically (NaN scores are written as ``NaN``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)


def _percent(value: float) -> str:
    return "nan" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _prediction_writer(folder: Path) -> Callable[[str, torch.Tensor], None]:
    """Writes an original-size arg-max mask as ``<folder>/<id>.png`` (uint8 class indices)."""
    folder.mkdir(parents=True, exist_ok=True)

    def save(sample_id: str, mask: torch.Tensor) -> None:
        name = str(sample_id).replace("/", "_").replace("\\", "_")
        array = mask.to(torch.uint8).cpu().numpy()
        Image.fromarray(np.ascontiguousarray(array)).save(folder / f"{name}.png")

    return save
