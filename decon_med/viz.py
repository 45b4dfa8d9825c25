"""Tables and figures of run folders, for the notebooks: results, loss curves, features and predictions.

Loading functions return pandas tables or numpy arrays; plotting functions draw on a matplotlib ``ax`` they are
given and return it, so a notebook cell stays one line per figure.

Example:
    >>> import matplotlib.pyplot as plt
    >>> results = read_csv_table("runs/demo/experiment/results.csv")
    >>> fig, ax = plt.subplots(); plot_fraction_curves(results, ax)
    >>> metrics = read_csv_table("runs/demo/pretrain/decon_ml/metrics.csv")
    >>> fig, ax = plt.subplots(); plot_losses(metrics, ax)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from decon_med.errors import DataError

#: Colours of classes 1, 2, ... in overlays (class 0, the background, is left uncoloured).
CLASS_COLOURS = (
    np.array(
        [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180]],
        dtype=np.float64,
    )
    / 255.0
)

_LEVEL_RE = re.compile(r"^(enc|dec\d*)$")


# -- tables --------------------------------------------------------------------------------------------------------
def read_csv_table(path: str | Path) -> pd.DataFrame:
    """A CSV written by a run (``metrics.csv``, ``results.csv``, ...); a clear error names a missing file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "not found (run the experiment / pre-training first, or fix the path)")
    return pd.read_csv(path)


def read_results(experiment: str | Path) -> pd.DataFrame:
    """``results.csv`` of an experiment folder, with ``run_dir`` pointing at the run folders wherever the
    folder was moved or the notebook is started (relative paths resolved against the experiment's ``runs/``)."""
    experiment = Path(experiment)
    results = read_csv_table(experiment / "results.csv")
    results["run_dir"] = [
        str(p if Path(p).is_absolute() and Path(p).is_dir() else experiment / "runs" / Path(p).name)
        for p in results["run_dir"]
    ]
    return results


def results_table(results: pd.DataFrame, fractions: Sequence[float] | None = None) -> pd.DataFrame:
    """Table-7 style: one row per (init, transfer), one column per label fraction, ``mean ± std`` mIoU in %.

    Example:
        >>> results_table(read_csv_table("runs/demo/experiment/results.csv"))
    """
    fractions = sorted(results["fraction"].unique()) if fractions is None else list(fractions)
    stats = results.groupby(["init", "transfer", "fraction"], sort=False)["mIoU"].agg(
        ["mean", "std", "count"]
    )
    rows: dict[str, dict[str, str]] = {}
    for (init, transfer, fraction), rec in stats.iterrows():
        label = init if transfer == "random" else f"{init} / {transfer}"
        std = "" if rec["count"] < 2 else f" ± {100 * rec['std']:.2f}"
        rows.setdefault(label, {})[f"{fraction * 100:g} %"] = f"{100 * rec['mean']:.2f}{std}"
    columns = [f"{f * 100:g} %" for f in fractions]
    return pd.DataFrame.from_dict(rows, orient="index").reindex(columns=columns).fillna("-")


def per_class_iou(results: pd.DataFrame) -> pd.DataFrame:
    """Mean IoU (%) of each class per (init, transfer, fraction), from the ``IoU_<class>`` columns."""
    columns = [c for c in results.columns if c.startswith("IoU_")]
    table = results.groupby(["init", "transfer", "fraction"], sort=False)[columns].mean() * 100
    return table.rename(columns=lambda c: c[len("IoU_") :]).round(2)


def loss_columns(metrics: pd.DataFrame) -> list[str]:
    """The per-level loss columns of a ``metrics.csv`` (``enc``, ``dec``, ``dec0``, ...) in file order."""
    return [c for c in metrics.columns if _LEVEL_RE.match(c)]


# -- plots ---------------------------------------------------------------------------------------------------------
def plot_fraction_curves(
    results: pd.DataFrame, ax: Any, reference: dict[str, list[float]] | None = None
) -> Any:
    """mIoU (%) against the label fraction, one line per (init, transfer), error bars = std over seeds.

    ``reference`` (e.g. ``PAPER_TABLE7["isic"]``) adds the paper's numbers as dashed lines at 5 / 25 / 100 %.
    """
    for (init, transfer), group in results.groupby(["init", "transfer"], sort=False):
        stats = group.groupby("fraction")["mIoU"].agg(["mean", "std"]).sort_index()
        label = init if transfer == "random" else f"{init} / {transfer}"
        ax.errorbar(
            stats.index * 100,
            stats["mean"] * 100,
            yerr=stats["std"].fillna(0) * 100,
            marker="o",
            capsize=3,
            label=label,
        )
    for name, values in (reference or {}).items():
        ax.plot([5, 25, 100], values, linestyle="--", alpha=0.5, label=f"paper: {name}")
    ax.set_xscale("log")
    ax.set_xticks([5, 25, 100], labels=["5", "25", "100"])
    ax.set_xlabel("labelled training images (%)")
    ax.set_ylabel("test mIoU (%)")
    ax.legend(fontsize="small")
    return ax


def plot_paired(paired: pd.DataFrame, ax: Any) -> Any:
    """Paired mIoU difference to the baseline (points) with its bootstrap 95 % CI (bars), per fraction."""
    labels = [f"{r.init} / {r.transfer} @ {r.fraction * 100:g} %" for r in paired.itertuples()]
    y = np.arange(len(paired))
    mean = paired["mean_diff"].to_numpy(float)
    err = np.vstack([mean - paired["ci_low"].to_numpy(float), paired["ci_high"].to_numpy(float) - mean])
    ax.errorbar(mean, y, xerr=err, fmt="o", capsize=3)
    ax.axvline(0.0, color="grey", linewidth=1)
    ax.set_yticks(y, labels=labels)
    ax.set_xlabel(f"mIoU difference to '{paired['baseline'].iloc[0]}' (points)" if len(paired) else "")
    return ax


def plot_losses(metrics: pd.DataFrame, ax: Any) -> Any:
    """Total loss and each level's loss (encoder, decoder levels) against the step."""
    for column in ["loss", *loss_columns(metrics)]:
        ax.plot(metrics["step"], metrics[column], label=column, linewidth=2 if column == "loss" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize="small")
    return ax


def plot_schedules(metrics: pd.DataFrame, ax: Any) -> Any:
    """Learning rate (left axis) and teacher momentum (right axis, when logged) against the step."""
    ax.plot(metrics["step"], metrics["lr"], color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate", color="tab:blue")
    if "momentum" in metrics:
        right = ax.twinx()
        right.plot(metrics["step"], metrics["momentum"], color="tab:orange")
        right.set_ylabel("teacher momentum", color="tab:orange")
    return ax


# -- images --------------------------------------------------------------------------------------------------------
def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``image`` (H, W, 3 or 1, in [0, 1]) with classes 1, 2, ... of ``mask`` (H, W) tinted by :data:`CLASS_COLOURS`."""
    rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[..., :3]
    out = rgb.astype(np.float64).copy()
    for cls in np.unique(mask):
        if cls == 0:
            continue
        where = mask == cls
        colour = CLASS_COLOURS[(int(cls) - 1) % len(CLASS_COLOURS)]
        out[where] = (1 - alpha) * out[where] + alpha * colour
    return out


def feature_pca(maps: torch.Tensor) -> np.ndarray:
    """(B, C, h, w) feature maps -> (B, h, w, 3) in [0, 1]: the first three principal components as RGB.

    The components are fitted on all pixels of all maps together, so colours are comparable between images.
    """
    b, c, h, w = maps.shape
    pixels = maps.detach().float().permute(0, 2, 3, 1).reshape(-1, c)
    pixels = pixels - pixels.mean(dim=0)
    _, _, v = torch.linalg.svd(pixels, full_matrices=False)
    proj = pixels @ v[: min(3, c)].t()
    if proj.shape[1] < 3:
        proj = F.pad(proj, (0, 3 - proj.shape[1]))
    lo, hi = proj.min(dim=0).values, proj.max(dim=0).values
    proj = (proj - lo) / (hi - lo).clamp_min(1e-8)
    return proj.reshape(b, h, w, 3).numpy()


def best_and_worst(
    scores: pd.DataFrame, k: int = 3, column: str = "IoU"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``k`` highest and ``k`` lowest rows of ``scores`` by ``column`` (NaN rows left out)."""
    valid = scores.dropna(subset=[column]).sort_values(column, ascending=False, kind="stable")
    return valid.head(k), valid.tail(k).iloc[::-1]


# -- models --------------------------------------------------------------------------------------------------------
def find_data_root(root: str | Path, run: str | Path) -> Path:
    """A run's ``data.root`` seen from here: as saved, else relative to a folder above the run folder.

    Run configs keep ``data.root`` as given on the command line, often relative to the folder the command ran in
    (``runs/demo/data/isic2017``), while a notebook runs in ``notebooks/``.
    """
    root = Path(root)
    if root.exists() or root.is_absolute():
        return root
    for base in Path(run).resolve().parents:
        if (base / root).exists():
            return base / root
    return root


def load_pretraining(run: str | Path) -> tuple[Any, Any]:
    """The method of a pre-training run folder (from ``last.ckpt``), in eval mode on the CPU, and its config."""
    from decon_med.config import PretrainConfig, from_dict
    from decon_med.engine.checkpoint import load_checkpoint
    from decon_med.ssl import build_method

    state = load_checkpoint(Path(run) / "last.ckpt")
    cfg = from_dict(PretrainConfig, state["config"])
    cfg.data.root = str(find_data_root(cfg.data.root, run))
    method = build_method(cfg)
    method.load_state_dict(state["method"])
    return method.eval(), cfg


def sample_images(cfg: Any, n: int = 4, split: str = "train") -> tuple[torch.Tensor, np.ndarray]:
    """``n`` images of a split resized to the network input: (n, C, S, S) tensor and (n, S, S, C) arrays."""
    from decon_med.data.datasets import read_pair
    from decon_med.data.layouts import get_layout, slice_options

    items = get_layout(cfg.data).items(split, labeled=False)[:n]
    size = cfg.data.image_size
    arrays = []
    for item in items:
        image, _ = read_pair({k: v for k, v in item.items() if k != "label"}, slice_options(cfg.data))
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
        arrays.append(F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)[0])
    batch = torch.stack(arrays)
    return batch, batch.permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def level_features(method: Any, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The student network's encoder output (``enc``) and decoder levels (``dec0`` .. ``decN``) for ``images``."""
    from decon_med.models.network import features

    enc, dec = features(method.network, images, None, decoder=True)
    return {"enc": enc[-1], **{f"dec{i}": f for i, f in enumerate(dec)}}


@torch.no_grad()
def prototype_maps(method: Any, images: torch.Tensor) -> dict[str, np.ndarray]:
    """Teacher prototype assignment (arg-max prototype per pixel, (B, h, w)) of each level that has prototypes.

    Levels: ``enc`` and ``dec<level>`` of SlotCon-style heads; methods without prototypes give ``{}``.
    """
    heads = {"enc": getattr(method, "enc_head", None)}
    heads.update(
        {
            f"dec{lv}": h
            for lv, h in zip(getattr(method, "levels", []), getattr(method, "dec_heads", []), strict=True)
        }
    )
    heads = {name: h for name, h in heads.items() if h is not None and hasattr(h, "grouping_t")}
    if not heads:
        return {}
    maps = level_features(method, images)
    out = {}
    for name, head in heads.items():
        feats = maps[name]
        if name != "enc":
            feats = method._pool(feats)
        _, scores = head.grouping_t(head.projector_t(feats))
        out[name] = scores.argmax(dim=1).numpy()
    return out


@torch.no_grad()
def predict_split(run: str | Path, split: str = "test", limit: int | None = None) -> list[dict[str, Any]]:
    """Predictions of a fine-tuned run on a split, at each image's original size, with each image's IoU.

    Returns one dict per image: ``id``, ``image`` (H, W, C in [0, 1]), ``label`` and ``pred`` (H, W class
    indices) and ``IoU`` (mean over the classes present, :func:`decon_med.metrics.per_image_iou`).
    """
    from decon_med.data.datasets import read_pair
    from decon_med.data.layouts import get_layout, slice_options
    from decon_med.engine.evaluate import eval_loader, predict_logits
    from decon_med.engine.model_io import load_segmentation_model
    from decon_med.metrics import per_image_iou

    network, cfg, state = load_segmentation_model(run)
    cfg.data.root = str(find_data_root(cfg.data.root, run))
    network.eval()
    classes = int(state["network_meta"]["classes"])
    items = {item["id"]: item for item in get_layout(cfg.data).items(split)}
    cases = []
    for batch in eval_loader(cfg, split):
        logits = predict_logits(network, batch["image"], cfg.train.amp)
        for index, (sample_id, label) in enumerate(zip(batch["id"], batch["label_full"], strict=True)):
            full = F.interpolate(
                logits[index : index + 1], size=tuple(label.shape), mode="bilinear", align_corners=False
            )
            pred = full.argmax(1)[0]
            image, _ = read_pair(items[sample_id], slice_options(cfg.data))
            iou = float(per_image_iou(pred[None], label[None].long(), classes)[0])
            cases.append(
                {"id": sample_id, "image": image, "label": label.numpy(), "pred": pred.numpy(), "IoU": iou}
            )
            if limit is not None and len(cases) >= limit:
                return cases
    return cases


# -- slice grids -----------------------------------------------------------------------------------------------
def radiological_view(array: np.ndarray) -> np.ndarray:
    """A slice of a RAS-reoriented volume as a radiologist views it, for display only (the data stay as they are).

    The network's slices keep the canonical voxel order: rows run along the first remaining RAS axis (towards the
    patient's right, R), columns along the second (A or S), so an axial slice shows the patient's left at the top
    and anterior on the right. The radiological convention puts anterior (or superior) up and the patient's right
    on the image's left; that is the transposed slice turned by 180 degrees, the same for axial (x, y), coronal
    (x, z) and sagittal (y, z; anterior on the left) slices. Works on ``(H, W)`` masks and ``(H, W, C)`` images.

    Example:
        >>> radiological_view(np.array([[1, 2], [3, 4]]))     # [x, y]: x = 0 left, y = 1 anterior
        array([[4, 2],
               [3, 1]])
    """
    return np.ascontiguousarray(np.swapaxes(np.asarray(array), 0, 1)[::-1, ::-1])


def slice_grid(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray | None] | None = None,
    columns: int = 4,
    tile: int = 128,
    alpha: float = 0.5,
    radiological: bool = False,
) -> np.ndarray:
    """uint8 RGB grid of 2D slices (HWC in [0, 1]; the first channel of a multi-channel slice that is not RGB),
    each tinted with its mask (:func:`overlay`) and fitted into a ``tile x tile`` cell, aspect kept.

    ``radiological``: the slices are of RAS-reoriented volumes and are drawn in the radiological convention
    (:func:`radiological_view`); the arrays given are not changed.

    Example:
        >>> slice_grid([np.zeros((40, 60, 1))] * 5, [np.ones((40, 60), int)] * 5, columns=4).shape
        (256, 512, 3)
    """
    import cv2

    if not images:
        raise ValueError("slice_grid needs at least one slice")
    masks = list(masks) if masks is not None else [None] * len(images)
    if len(masks) != len(images):
        raise ValueError(f"{len(images)} slices but {len(masks)} masks")
    if radiological:
        images = [radiological_view(image) for image in images]
        masks = [None if mask is None else radiological_view(mask) for mask in masks]
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    grid = np.zeros((rows * tile, columns * tile, 3), dtype=np.uint8)
    for index, (image, mask) in enumerate(zip(images, masks, strict=True)):
        image = np.asarray(image, dtype=np.float64)
        if image.ndim == 2:
            image = image[:, :, None]
        if image.shape[2] not in (1, 3):
            image = image[:, :, :1]
        rgb = overlay(image, np.zeros(image.shape[:2], int) if mask is None else np.asarray(mask), alpha)
        height, width = rgb.shape[:2]
        scale = tile / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        cell = cv2.resize((np.clip(rgb, 0, 1) * 255).astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        top, left = (index // columns) * tile, (index % columns) * tile
        y0, x0 = (tile - cell.shape[0]) // 2, (tile - cell.shape[1]) // 2
        grid[top + y0 : top + y0 + cell.shape[0], left + x0 : left + x0 + cell.shape[1]] = cell
    return grid


def _spread(n_items: int, n: int) -> list[int]:
    """Up to ``n`` evenly spaced indices of ``n_items``."""
    if n_items <= n:
        return list(range(n_items))
    return [int(i) for i in np.linspace(0, n_items - 1, n).round()]


def preview_grid(
    cfg: Any, n: int = 12, split: str = "train", columns: int = 4, tile: int = 128
) -> np.ndarray:
    """A grid of ``n`` normalised slices / images of a split, evenly spread, with their label overlays.

    Slices are what the network is given (square pixels, intensity per file), drawn in the radiological
    convention when the volumes are reoriented to RAS (:func:`radiological_view`: anterior up, the patient's right
    on the left; display only); 2D images are drawn as stored. Labelled layouts show the masks as class colours
    (:data:`CLASS_COLOURS`), unlabelled ones the images only.

    Example:
        >>> Image.fromarray(preview_grid(load_config("configs/finetune/folder.yaml"))).save("preview.png")
    """
    from decon_med.data.datasets import read_pair
    from decon_med.data.layouts import get_layout, slice_options

    layout = get_layout(cfg.data)
    labelled = not layout.images_only
    items = layout.items(split, labeled=labelled)
    if not items:
        raise DataError(layout.root, f"split '{split}' has no images")
    opts = slice_options(cfg.data)
    images, masks = [], []
    for index in _spread(len(items), n):
        item = items[index]
        image, raw = read_pair(item, opts)
        mask = None if raw is None else layout.map_label(raw, item["label"])
        if "slice" in item and opts.orientation == "RAS":  # a volume's slice: shown as a radiologist views it
            image, mask = radiological_view(image), None if mask is None else radiological_view(mask)
        images.append(image)
        masks.append(mask)
    return slice_grid(images, masks, columns=columns, tile=tile)


def nifti_grid(
    image: str | Path,
    labels: str | Path | None,
    cfg: Any,
    n: int = 12,
    columns: int = 4,
    tile: int = 128,
) -> np.ndarray:
    """A grid of slices of a NIfTI volume as the network sees them, with a label volume (e.g. a prediction)
    on the same voxel grid overlaid; up to ``n`` slices, evenly spread over those with labels, drawn in the
    radiological convention when reoriented to RAS (:func:`radiological_view`).

    Example:
        >>> grid = nifti_grid("scans/case1.nii.gz", "pred/case1_seg.nii.gz", cfg)
    """
    from decon_med.data.layouts import slice_options
    from decon_med.data.volumes import read_volume, volume_slices
    from decon_med.engine.predict import grid_slices, volume_label_slices

    opts = slice_options(cfg.data)
    slices = volume_slices(image, opts)
    if labels is None:
        masks = [np.zeros(im.shape[:2], dtype=np.uint8) for im in slices.images]
    else:
        volume, _ = read_volume(labels)
        volume = np.rint(volume).astype(np.int64).reshape(slices.geometry.shape)
        masks = volume_label_slices(volume, slices)
    picked = grid_slices(masks, n)
    return slice_grid(
        [slices.images[k] for k in picked],
        [masks[k] for k in picked],
        columns,
        tile,
        radiological=opts.orientation == "RAS",
    )
