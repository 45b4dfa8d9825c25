"""Prediction with a fine-tuned segmentation model on 2D images and NIfTI volumes.

Inputs are preprocessed exactly as in evaluation: the checkpoint config's ``data.image_size``, ``modality`` and
``in_channels`` with the default normalisation (:class:`~decon_med.data.transforms.SegEvalTransform`). The logits
are upsampled bilinearly to the original size before the arg-max, so every mask has the size of its input.

Outputs mirror the input's path relative to the input folder (a single file keeps only its name)::

    <out>/<rel>/<stem>.png             2D image: uint8 class indices (0 = background) at the original size
    <out>/<rel>/<stem>_overlay.png     2D image with --overlay: the image blended with one colour per class
    <out>/<rel>/<stem>_seg.nii.gz      NIfTI: uint8 label volume, input shape, original affine and header

A volume goes through exactly the training geometry and intensity steps (:func:`~decon_med.data.volumes.volume_slices`):
reoriented to RAS, intensities per file (``data.modality``, CT windows, MR percentile / z-score), cut into 2D
slices along ``data.slice_axis`` (a volume one slice thick along another axis is that one slice) resampled to
square pixels; every slice is predicted, none is skipped. The label slices then go back the same way
(:func:`~decon_med.data.volumes.labels_to_volume`): resampled to the canonical grid, stacked and reoriented to the
file's stored voxel order, so the labels file has the input's shape, orientation, affine and header. A 4D NIfTI
needs ``data.channels`` (the volumes used in training) and gives a 3D labels file.

Example:
    >>> summary = predict("runs/finetune/isic", "data/new_images", "pred/isic", overlay=True)
    >>> len(summary["predicted"]), summary["skipped"]
    (12, [{'path': 'data/new_images/broken.png', 'reason': 'unreadable or truncated image (...)'}])
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from decon_med.config import FinetuneConfig
from decon_med.data.io import file_stem, is_image, is_nifti, read_image
from decon_med.data.layouts import slice_options
from decon_med.data.transforms import SegEvalTransform
from decon_med.data.volumes import labels_to_volume, volume_slices, write_volume
from decon_med.engine.checkpoint import check_finite_state
from decon_med.engine.model_io import load_segmentation_model, resolve_checkpoint
from decon_med.errors import DataError, DeconError

#: Overlay colour of each class index (RGB); index 0 (background) is left transparent. Cycled past the end.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
)

#: Weight of the class colour in an overlay pixel.
OVERLAY_ALPHA = 0.5

#: Most skipped files listed in the error raised when nothing could be predicted.
MAX_LISTED = 3


class Predictor:
    """A fine-tuned network with its evaluation preprocessing, predicting class-index masks.

    Args:
        network: the smp network (put in eval mode and moved to ``device``).
        cfg: the fine-tuning config it was trained with.
        device: ``"cuda"`` / ``"cpu"``; default CUDA when available.
        batch_size: slices per forward pass in :meth:`predict_volume` and images in :meth:`predict_images`.

    Example:
        >>> net, cfg, _ = load_segmentation_model("runs/finetune/isic")
        >>> masks = Predictor(net, cfg).predict_images([read_image("a.png", 3)])   # [(H, W) uint8]
    """

    def __init__(
        self, network: nn.Module, cfg: FinetuneConfig, device: str | None = None, batch_size: int = 8
    ):
        if batch_size < 1:
            raise DeconError(f"batch size must be >= 1, got {batch_size}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.network = network.to(self.device).eval()
        self.cfg = cfg
        self.batch_size = batch_size
        self.transform = SegEvalTransform(cfg.data.image_size, cfg.data.modality, cfg.data.in_channels)
        self.slice_opts = slice_options(cfg.data)
        self.amp = self.device.type == "cuda" and cfg.train.amp != "none"

    def preprocess(self, image: np.ndarray) -> dict[str, Any]:
        """``{"image": (C, S, S) tensor, "orig_size": (H, W)}`` for an HWC float image in [0, 1]."""
        return self.transform({"image": image})

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def label_maps(self, samples: Sequence[dict[str, Any]]) -> list[np.ndarray]:
        """One forward pass over preprocessed ``samples``; each mask is uint8 ``(H, W)`` at its ``orig_size``."""
        batch = torch.stack([s["image"] for s in samples]).to(self.device)
        with torch.inference_mode(), self._autocast():
            logits = self.network(batch)
        masks = []
        for k, sample in enumerate(samples):
            up = F.interpolate(
                logits[k : k + 1].float(),
                size=tuple(sample["orig_size"]),
                mode="bilinear",
                align_corners=False,
            )
            masks.append(up[0].argmax(0).to(torch.uint8).cpu().numpy())
        return masks

    def predict_images(self, images: Iterable[np.ndarray]) -> list[np.ndarray]:
        """Masks of HWC float images in [0, 1], in ``batch_size`` chunks (images are preprocessed lazily)."""
        masks: list[np.ndarray] = []
        for chunk in _chunks(images, self.batch_size):
            masks.extend(self.label_maps([self.preprocess(image) for image in chunk]))
        return masks

    def predict_volume(self, path: str | os.PathLike) -> np.ndarray:
        """uint8 labels of a NIfTI file on its stored voxel grid (stored shape and orientation, same affine)."""
        slices = volume_slices(path, self.slice_opts)
        return labels_to_volume(self.predict_images(slices.images), slices).astype(np.uint8)


@dataclass(frozen=True)
class _Input:
    """One input file and the file its labels go to."""

    path: Path
    output: Path

    @property
    def overlay(self) -> Path:
        return self.output.with_name(self.output.stem + "_overlay.png")


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _output_name(relative: Path) -> Path:
    name = f"{file_stem(relative)}_seg.nii.gz" if is_nifti(relative) else f"{file_stem(relative)}.png"
    return relative.parent / name


def _is_input(path: Path) -> bool:
    return path.is_file() and (is_image(path) or is_nifti(path))


def list_inputs(inputs: str | os.PathLike, exclude: str | os.PathLike | None = None) -> list[Path]:
    """The images and NIfTI volumes of a file or folder (recursive, sorted; hidden files and ``exclude`` skipped).

    Raises:
        DataError: the path does not exist, is a file of another type, or the folder holds no input.

    Example:
        >>> list_inputs("data/new_images")
        [PosixPath('data/new_images/a.png'), PosixPath('data/new_images/sub/b.nii.gz')]
    """
    root = Path(inputs)
    if not root.exists():
        raise DataError(root, "input not found")
    if root.is_file():
        if not _is_input(root):
            raise DataError(root, "not an image (png/jpg/jpeg/bmp/tif/tiff) or NIfTI (.nii/.nii.gz) file")
        return [root]
    skip = Path(exclude).resolve() if exclude is not None else None
    found = [
        path
        for path in sorted(root.rglob("*"))
        if _is_input(path)
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
        and not (skip is not None and path.resolve().is_relative_to(skip))
    ]
    if not found:
        raise DataError(root, "no images or NIfTI volumes found")
    return found


def _plan(files: list[Path], inputs: Path, out: Path) -> tuple[list[_Input], list[dict[str, str]]]:
    """Output file of each input; a second input mapping to an already used output name is skipped."""
    planned: list[_Input] = []
    skipped: list[dict[str, str]] = []
    owners: dict[Path, Path] = {}
    for path in files:
        relative = path.relative_to(inputs) if inputs.is_dir() else Path(path.name)
        output = out / _output_name(relative)
        if output in owners:
            skipped.append({"path": str(path), "reason": f"same output file {output} as {owners[output]}"})
            continue
        owners[output] = path
        planned.append(_Input(path, output))
    return planned, skipped


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DeconError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DeconError(f"{out}: output folder is not empty; pass --overwrite to write into it")


def overlay_image(image: np.ndarray, mask: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """uint8 RGB blend of an HWC [0, 1] image with :data:`PALETTE` colours where ``mask`` is not background.

    Example:
        >>> overlay_image(read_image("a.png", 3), mask).shape
        (480, 640, 3)
    """
    rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[:, :, :3]
    rgb = rgb.astype(np.float32) * 255.0
    colours = np.asarray(PALETTE, dtype=np.float32)
    index = np.where(mask > 0, (mask.astype(np.int64) - 1) % (len(PALETTE) - 1) + 1, 0)
    blended = np.where((mask > 0)[..., None], (1 - alpha) * rgb + alpha * colours[index], rgb)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def _write_mask(item: _Input, mask: np.ndarray, overlay: bool) -> dict[str, str]:
    item.output.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(item.output)
    record = {"path": str(item.path), "output": str(item.output)}
    if overlay:
        Image.fromarray(overlay_image(read_image(item.path, 3), mask)).save(item.overlay)
        record["overlay"] = str(item.overlay)
    return record


def _predict_nifti(predictor: Predictor, item: _Input) -> dict[str, str]:
    labels = predictor.predict_volume(item.path)
    shape = nib.load(item.path).shape
    if len(shape) == 2:  # a 2D NIfTI was read as (X, Y, 1)
        labels = labels.reshape(shape)
    write_volume(item.output, labels.astype(np.uint8), None, reference=item.path)
    return {"path": str(item.path), "output": str(item.output)}


def _nothing_predicted(inputs: Path, skipped: list[dict[str, str]]) -> DeconError:
    reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:MAX_LISTED])
    more = f"; and {len(skipped) - MAX_LISTED} more" if len(skipped) > MAX_LISTED else ""
    return DeconError(f"{inputs}: none of {len(skipped)} input(s) could be predicted ({reasons}{more})")


def predict(
    checkpoint: str | os.PathLike,
    inputs: str | os.PathLike,
    out_dir: str | os.PathLike,
    overlay: bool = False,
    batch_size: int = 8,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Predict masks for one image / volume or for every image and volume below a folder.

    Unreadable inputs are skipped and reported; the others are still predicted. 2D images are batched together
    (``batch_size`` per forward pass), volumes are predicted in ``batch_size`` slices at a time.

    Args:
        checkpoint: a fine-tuning run folder or ``.ckpt`` file.
        inputs: an image / NIfTI file, or a folder searched recursively.
        out_dir: output folder; must be empty or new unless ``overwrite`` (which replaces same-named files only).
        overlay: also write ``<stem>_overlay.png`` for 2D images.
        batch_size: images or slices per forward pass.
        progress: show a progress bar over the inputs.
        overwrite: allow writing into a non-empty ``out_dir``.

    Returns:
        ``{"predicted": [{"path", "output"[, "overlay"]}], "skipped": [{"path", "reason"}], "out": str}``.

    Raises:
        DeconError: missing input, bad checkpoint, non-empty ``out_dir`` without ``overwrite``, or no input
            could be predicted (the message lists the reasons).

    Example:
        >>> predict("runs/finetune/brain/best.ckpt", "scans/sub-01_T1w.nii.gz", "pred")["predicted"]
        [{'path': 'scans/sub-01_T1w.nii.gz', 'output': 'pred/sub-01_T1w_seg.nii.gz'}]
    """
    inputs, out = Path(inputs), Path(out_dir)
    files = list_inputs(inputs, exclude=out)
    _prepare_out(out, overwrite)
    network, cfg, state = load_segmentation_model(checkpoint)
    check_finite_state(state["network"], resolve_checkpoint(checkpoint))
    predictor = Predictor(network, cfg, batch_size=batch_size)
    planned, skipped = _plan(files, inputs, out)
    out.mkdir(parents=True, exist_ok=True)

    predicted: list[dict[str, str]] = []
    pending: list[tuple[_Input, dict[str, Any]]] = []

    def flush() -> None:
        masks = predictor.label_maps([sample for _, sample in pending])
        predicted.extend(
            _write_mask(item, mask, overlay) for (item, _), mask in zip(pending, masks, strict=True)
        )
        pending.clear()

    for item in tqdm(planned, desc="predict", unit="file", disable=not progress, leave=False):
        try:
            if is_nifti(item.path):
                predicted.append(_predict_nifti(predictor, item))
                continue
            image = read_image(item.path, cfg.data.in_channels)
        except DataError as exc:
            skipped.append({"path": str(item.path), "reason": exc.problem})
            continue
        pending.append((item, predictor.preprocess(image)))
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()

    if not predicted:
        raise _nothing_predicted(inputs, skipped)
    return {
        "predicted": sorted(predicted, key=lambda r: r["path"]),
        "skipped": sorted(skipped, key=lambda r: r["path"]),
        "out": str(out),
    }
