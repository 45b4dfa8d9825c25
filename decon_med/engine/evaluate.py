"""Evaluate a fine-tuned network on a whole split: mIoU, mDice, accuracy and optional prediction masks.

Scores follow :mod:`decon_med.metrics` (one confusion matrix over every pixel of the split, background
included) and, as in mmseg, are computed at each image's original resolution: the image is resized to the
network input (:class:`~decon_med.data.transforms.SegEvalTransform`), the logits are resized back bilinearly to
the original size, and the arg-max is compared with the original mask. Validation during fine-tuning uses the
same function, so ``evaluate`` on a finished run reproduces its ``results.json``. Saved predictions are these
original-size arg-max masks. A run trained on patches (``data.sampling: patch``) is scored without any resize:
Gaussian-weighted sliding windows of ``data.image_size`` over each whole slice (:func:`window_logits`).

NIfTI cases are also scored as volumes: the predicted slices of each case go back to its stored voxel grid and
per-case 3D Dice, IoU, HD95, surface Dice, volumes in ml and FP / FN voxels per class (MONAI's metrics, distances
in mm from the voxel spacing, empty-case rules in :mod:`decon_med.engine.volume_metrics`) are written to
``per_case_<split>.csv``; their summary per class (``n`` valid of ``N`` cases, mean, SD, median, and the empty
cases) is in ``metrics_<split>.json`` under ``per_case``. The per-case volumes are scored with the run folder's
recorded post-processing (``postprocessing.json``, :mod:`decon_med.engine.postprocess`) unless
``postprocessing=False``; the pooled 2D scores are always those of the network's own output. Saved predictions of
NIfTI cases are ``<case>_seg.nii.gz`` volumes on the original grid, with the image's affine and header (after
that post-processing). ``all_cases`` scores every case of the data folder (all splits together, as split
``all``), for an external data set.

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
from collections.abc import Callable, Sequence
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
from decon_med.data.datasets import build_dataset, collate_eval, input_fill
from decon_med.data.layouts import SPLITS as LAYOUT_SPLITS
from decon_med.data.layouts import get_layout, slice_options
from decon_med.engine.checkpoint import check_finite_state
from decon_med.engine.loop import autocast
from decon_med.engine.model_io import load_segmentation_model, resolve_checkpoint
from decon_med.engine.postprocess import recorded_classes
from decon_med.engine.predict import sliding_logits
from decon_med.engine.volume_metrics import (
    RULES,
    SURFACE_TOLERANCE_MM,
    VolumeCases,
    summarise,
    write_case_csv,
)
from decon_med.errors import ConfigError, DataError, DeconError
from decon_med.folders import atomic_write, check_not_input, make_folder
from decon_med.locks import folder_lock
from decon_med.metrics import ConfusionMatrix

SPLITS = ("train", "val", "test")

#: Split name of ``evaluate(..., all_cases=True)``: every case of the data folder.
ALL = "all"


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


#: Overlap of the sliding windows that score patch-trained runs (``predict``'s default too).
WINDOW_OVERLAP = 0.25


def window_logits(network: nn.Module, image: torch.Tensor, cfg: FinetuneConfig) -> torch.Tensor:
    """Float32 ``(B, K, H, W)`` logits of a normalised ``(B, C, H, W)`` whole slice at its own resolution, as runs
    trained on patches are validated and scored: Gaussian-weighted sliding windows of ``data.image_size``
    (overlap :data:`WINDOW_OVERLAP`, :func:`eval_batch_size` windows per pass); a slice smaller than a window is
    padded as training pads it.

    Example:
        >>> window_logits(net.eval(), batch["image_full"][0][None], cfg).shape     # (1, K, H, W) of the slice
    """
    return sliding_logits(
        lambda x: predict_logits(network, x, cfg.train.amp),
        image,
        cfg.data.image_size,
        eval_batch_size(cfg),
        overlap=WINDOW_OVERLAP,
        fill=input_fill(cfg.data),
    )


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


def eval_loader(cfg: FinetuneConfig, split: str, items: list[dict] | None = None) -> DataLoader:
    """Deterministic loader over a labelled split (or ``items``) in ``eval`` mode (no shuffling, every image once)."""
    dataset = build_dataset(cfg, split, "eval", items=items, full_labels=True)
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
    items: list[dict] | None = None,
    per_case: bool = False,
    tolerance_mm: float = SURFACE_TOLERANCE_MM,
    distances: bool = True,
    postprocess: Sequence[int] = (),
    on_case: Callable[..., None] | None = None,
) -> dict[str, Any]:
    """Scores of ``network`` over every image of ``split`` (see :func:`decon_med.metrics.segmentation_metrics`).

    The network is evaluated in eval mode without gradients under ``train.amp`` autocast, on the device of its
    parameters, and put back in its previous mode.

    Args:
        network: the segmentation network.
        cfg: the fine-tuning config (data, image size, amp).
        split: ``val``, ``test`` or ``train``.
        classes: output classes of the network.
        predictions: write one PNG of class indices per 2D image here, at the original image size, and one
            ``<case>_seg.nii.gz`` per NIfTI case on its original voxel grid.
        progress: show a progress bar.
        items: score these items instead of listing ``split``.
        per_case: also score each NIfTI case as a volume; the rows are returned under ``"cases"``.
        tolerance_mm: surface-Dice tolerance of the per-case scores.
        distances: per-case HD95 and surface Dice too (``False``: Dice, IoU, volumes and counts only).
        postprocess: classes whose largest 3D component alone is kept in the per-case volumes (scores and saved
            NIfTI predictions; the pooled scores are of the network's output).
        on_case: passed to :class:`~decon_med.engine.volume_metrics.VolumeCases`.
    """
    device = next(network.parameters()).device
    names = class_names(cfg, classes)
    matrix = ConfusionMatrix(classes, ignore_index=255, device=device)
    save = _prediction_writer(predictions) if predictions is not None else None
    loader = eval_loader(cfg, split, items)
    cases = None
    if per_case or predictions is not None:
        cases = VolumeCases(
            loader.dataset.data,
            loader.dataset.layout,
            slice_options(cfg.data),
            names,
            per_case,
            predictions,
            tolerance_mm=tolerance_mm,
            distances=distances,
            postprocess=postprocess,
            on_case=on_case,
        )
    was_training = network.training
    network.eval()
    windows = cfg.data.sampling == "patch"  # trained on patches: sliding windows over each whole slice
    try:
        for batch in tqdm(loader, disable=not progress, desc=split, unit="batch", leave=False):
            images = batch["image"].to(device, non_blocking=True)
            logits = None if windows else predict_logits(network, images, cfg.train.amp)
            for index, (sample_id, label) in enumerate(zip(batch["id"], batch["label_full"], strict=True)):
                if windows:
                    full = window_logits(network, batch["image_full"][index][None].to(device), cfg)
                else:
                    full = F.interpolate(
                        logits[index : index + 1],
                        size=tuple(label.shape),
                        mode="bilinear",
                        align_corners=False,
                    )
                prediction = full.argmax(1)
                matrix.update(prediction, label.to(device, non_blocking=True)[None])
                if cases is not None and cases.handles(sample_id):
                    cases.add(sample_id, prediction[0].to(torch.uint8).cpu().numpy())
                elif save is not None:
                    save(sample_id, prediction[0])
    finally:
        network.train(was_training)
    metrics = matrix.compute(class_names=names)
    if cases is not None:
        rows = cases.finish()
        if per_case:
            metrics["cases"] = rows
    return metrics


def evaluate(
    path: str | Path,
    split: str = "test",
    save_predictions: bool = False,
    out: str | Path | None = None,
    progress: bool = True,
    data_root: str | None = None,
    num_workers: int | None = None,
    all_cases: bool = False,
    postprocessing: bool = True,
    surface_tolerance_mm: float = SURFACE_TOLERANCE_MM,
) -> dict[str, Any]:
    """Evaluate a fine-tuning run folder (its ``best.ckpt``, else ``last.ckpt``) or checkpoint on a split.

    Prints a short run summary, a per-class table and, for NIfTI cases, the per-case summary; writes
    ``metrics_<split>.json`` (and ``per_case_<split>.csv`` for NIfTI cases; with ``save_predictions`` the folder
    ``predictions_<split>/`` of ``<id>.png`` class-index masks at the original image sizes and
    ``<case>_seg.nii.gz`` volumes on the original voxel grids) next to the checkpoint, or into ``out``.

    Args:
        path: run folder or ``.ckpt`` file written by ``decon-med finetune``.
        split: ``val`` or ``test`` (``train`` works too).
        save_predictions: also write the predicted masks.
        out: output folder instead of the checkpoint's folder.
        progress: show a progress bar.
        data_root: read the data from here instead of the checkpoint config's ``data.root``.
        num_workers: DataLoader workers instead of the config's ``data.num_workers``.
        all_cases: score every case of the data folder (every split, no slice skipped) as split ``all``
            instead of ``split``: for an external data set.
        postprocessing: apply the post-processing recorded next to the checkpoint (``postprocessing.json``)
            to the per-case volumes; ``False`` scores the network's output as it is.
        surface_tolerance_mm: tolerance of the per-case surface Dice (NSD), in mm.

    Returns:
        The scores (``mIoU``, ``mDice``, ``aAcc``, ``mAcc``, per-class ``IoU`` / ``Dice`` / ``Acc``,
        ``n_pixels``; ``per_case`` for NIfTI cases: ``n_cases``, ``csv``, ``surface_tolerance_mm``,
        ``postprocessing``, ``rules`` and per class ``{"empty": {...}, "dice": {"n", "N", "mean", "sd",
        "median"}, ...}`` under ``classes``).

    Raises:
        DataError: the checkpoint or the data is missing or unreadable.
        DeconError: unknown split.

    Example:
        >>> evaluate("runs/finetune/isic/best.ckpt", split="val", data_root="/data/isic2017")["mDice"]
        0.873
        >>> evaluate("runs/finetune/ct", data_root="/data/other_site", all_cases=True)["per_case"]["n_cases"]
        40
    """
    if split not in SPLITS:
        raise DeconError(f"unknown split '{split}'; expected one of {', '.join(SPLITS)}")
    if not (math.isfinite(surface_tolerance_mm) and surface_tolerance_mm >= 0):
        raise DeconError(f"surface tolerance must be a number of mm >= 0, got {surface_tolerance_mm}")
    checkpoint = resolve_checkpoint(path)
    network, cfg, state = load_segmentation_model(checkpoint)
    check_finite_state(state["network"], checkpoint)
    trained_on = cfg.data.root
    if data_root is not None:
        cfg.data.root = str(data_root)
    if num_workers is not None:
        cfg.data.num_workers = num_workers
    if (
        not all_cases
        and Path(cfg.data.root).expanduser().resolve() != Path(trained_on).expanduser().resolve()
    ):
        print(f"note: scoring the {split} split of {cfg.data.root} only; --all scores every case of it")
    if all_cases:
        split, items = ALL, all_items(cfg)
    else:
        items = get_layout(cfg.data).items(split)
    folder = Path(out).expanduser() if out is not None else checkpoint.parent
    check_not_input(folder, [("data root", cfg.data.root)], "the evaluation folder")
    recorded = recorded_classes(checkpoint) if postprocessing else ((), "none (--no-postprocessing)")
    with folder_lock(folder, "evaluate"):
        return _evaluate_into(
            folder,
            checkpoint,
            network,
            cfg,
            state,
            split,
            items,
            save_predictions,
            progress,
            recorded,
            surface_tolerance_mm,
        )


def _evaluate_into(
    folder: Path,
    checkpoint: Path,
    network: nn.Module,
    cfg: FinetuneConfig,
    state: dict[str, Any],
    split: str,
    items: list,
    save_predictions: bool,
    progress: bool,
    recorded: tuple[tuple[int, ...], str] | None = None,
    tolerance_mm: float = SURFACE_TOLERANCE_MM,
) -> dict[str, Any]:
    """The body of :func:`evaluate` once ``folder`` is locked (``recorded``: the post-processing to apply and its
    description, from :func:`~decon_med.engine.postprocess.recorded_classes`)."""
    from decon_med.summary import print_summary

    print_summary("evaluate", cfg, {split: items}, steps=f"checkpoint iteration {int(state.get('step', 0))}")
    network.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    predictions = folder / f"predictions_{split}" if save_predictions else None
    classes = int(state["network_meta"]["classes"])
    postprocess, applied = recorded if recorded is not None else ((), "none (no postprocessing.json)")
    metrics = evaluate_network(
        network,
        cfg,
        split,
        classes,
        predictions=predictions,
        progress=progress,
        items=items,
        per_case=True,
        tolerance_mm=tolerance_mm,
        postprocess=postprocess,
    )
    rows = metrics.pop("cases")
    if rows:
        write_case_csv(folder / f"per_case_{split}.csv", rows)
        metrics["per_case"] = {
            "n_cases": len(rows),
            "csv": f"per_case_{split}.csv",
            "surface_tolerance_mm": float(tolerance_mm),
            "postprocessing": applied,
            "rules": dict(RULES),
            "classes": summarise(rows, class_names(cfg, classes)[1:]),
        }
    record = {
        "checkpoint": str(checkpoint),
        "split": split,
        "iter": int(state.get("step", 0)),
        "data_root": cfg.data.root,
        **metrics,
    }
    write_json(folder / f"metrics_{split}.json", record)
    print(f"{checkpoint} on {split} (iteration {record['iter']}):")
    if rows:
        print("pooled over every pixel of the split's slices (the network's output, background included):")
    print(format_table(metrics))
    if rows:
        print(format_case_means(metrics["per_case"]))
    return metrics


def all_items(cfg: FinetuneConfig) -> list[dict]:
    """Every labelled item of the data folder, every split together, no slice skipped (``cfg`` is changed).

    The random hold-out and folds are switched off (``val_fraction`` / ``test_fraction`` 0, ``fold`` null), so
    a folder without fixed splits lists every case as training data; fixed splits (``splits.json``, nnU-Net
    ``imagesTs``) are read as they are and joined.

    Raises:
        DataError: the folder holds no labelled image.
    """
    cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.fold = 0.0, 0.0, None
    cfg.data.skip_empty = "pretrain"  # labelled slices are never skipped
    layout = get_layout(cfg.data)
    found: dict[str, dict] = {}
    for split in LAYOUT_SPLITS:
        for item in layout.items(split):
            found.setdefault(item["id"], item)
    if not found:
        raise DataError(layout.root, "no labelled images or volumes found")
    return [found[key] for key in sorted(found)]


def format_case_means(per_case: dict[str, Any]) -> str:
    """The per-case summary as a compact table: per foreground class ``n`` valid / ``N`` cases, then mean ± SD
    [median] of Dice, IoU and NSD (percent) and HD95 (mm); then the empty cases, the post-processing applied and
    the empty-case rules. A score whose ``n`` differs from the Dice's says so in its cell (``n=3``).

    Example:
        >>> print(format_case_means(metrics["per_case"]))
        per case (3D, 4 cases): mean ± SD [median] over n valid of N; Dice, IoU, NSD in %, HD95 in mm
        class    n    Dice                  IoU                   HD95 mm               NSD 2 mm
        liver    4/4  90.00 ± 2.10 [91.00]  82.00 ± 3.40 [83.10]  3.10 ± 0.52 [3.00]    88.10 ± 4.00 [89.00]
        empty cases: none
        post-processing: none (no postprocessing.json)
        rules: a prediction on an empty ground truth scores Dice/IoU/NSD 0; both empty: not scored (lowers n); HD95 with one side empty: the image diagonal
    """
    classes = per_case["classes"]
    tolerance = float(per_case.get("surface_tolerance_mm", SURFACE_TOLERANCE_MM))
    shown = (("dice", "Dice", True), ("iou", "IoU", True), ("hd95", "HD95 mm", False))
    shown += (("nsd", f"NSD {tolerance:g} mm", True),)
    width = max([len("class"), *(len(name) for name in classes)]) + 2
    cell = 22
    lines = [
        f"per case (3D, {per_case['n_cases']} cases): mean ± SD [median] over n valid of N; Dice, IoU, NSD in %, "
        "HD95 in mm",
        (f"{'class':<{width}}{'n':<7}" + "".join(f"{title:<{cell}}" for _, title, _ in shown)).rstrip(),
    ]
    for name, summary in classes.items():
        dice = summary.get("dice", {"n": 0, "N": per_case["n_cases"]})
        row = f"{name:<{width}}{str(dice['n']) + '/' + str(dice['N']):<7}"
        for key, _, percent in shown:
            stats = summary.get(key)
            text = "-" if stats is None else _stats_cell(stats, percent)
            if stats is not None and stats["n"] != dice["n"]:
                text += f" n={stats['n']}"
            row += f"{text:<{cell}}"
        lines.append(row.rstrip())
    empties = [
        f"{name}: {s['empty']['gt']} with an empty ground truth, {s['empty']['pred']} with an empty prediction, "
        f"{s['empty']['both']} empty in both (not scored)"
        for name, s in classes.items()
        if any(s["empty"].values())
    ]
    lines.append("empty cases: " + ("; ".join(empties) if empties else "none"))
    lines.append(f"post-processing: {per_case.get('postprocessing', 'none')}")
    lines.append(
        "rules: a prediction on an empty ground truth scores Dice/IoU/NSD 0; both empty: not scored (lowers n); "
        "HD95 with one side empty: the image diagonal"
    )
    return "\n".join(lines)


def _stats_cell(stats: dict[str, Any], percent: bool) -> str:
    """``mean ± SD [median]`` of one score (``-`` when no case has a value)."""
    if not stats["n"]:
        return "-"
    scale = 100.0 if percent else 1.0

    def number(value: float | None) -> str:
        return "nan" if value is None or not math.isfinite(value) else f"{scale * value:.2f}"

    return f"{number(stats['mean'])} ± {number(stats['sd'])} [{number(stats['median'])}]"


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
    atomic_write(path, json.dumps(record, indent=1) + "\n")


def _percent(value: float) -> str:
    return "nan" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _prediction_writer(folder: Path) -> Callable[[str, torch.Tensor], None]:
    """Writes an original-size arg-max mask as ``<folder>/<id>.png`` (uint8 class indices)."""
    make_folder(folder)

    def save(sample_id: str, mask: torch.Tensor) -> None:
        name = str(sample_id).replace("/", "_").replace("\\", "_")
        array = mask.to(torch.uint8).cpu().numpy()
        atomic_write(
            folder / f"{name}.png", lambda f: Image.fromarray(np.ascontiguousarray(array)).save(f, "PNG")
        )

    return save
