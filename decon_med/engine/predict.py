"""Prediction with a fine-tuned segmentation model on 2D images and NIfTI volumes.

Inputs are preprocessed exactly as in evaluation: the checkpoint config's ``data.image_size``, ``modality`` and
``in_channels`` with the default normalisation (:class:`~decon_med.data.transforms.SegEvalTransform`). The logits
are upsampled bilinearly to the original size before the arg-max, so every mask has the size of its input.

Outputs mirror the input's path relative to the input folder (a single file keeps only its name)::

    <out>/<rel>/<stem>.png             2D image: uint8 class indices (0 = background) at the original size
    <out>/<rel>/<stem>_overlay.png     2D image with --overlay: the image blended with one colour per class
    <out>/<rel>/<stem>_seg.nii.gz      NIfTI: uint8 label volume, input shape, original affine and header
    <out>/<rel>/<case>.nii.gz          nnU-Net case (channel files <case>_0000.nii.gz, ...): nnU-Net's naming
    <out>/<rel>/<..>_probabilities.*   with probabilities=True: the softmax maps (volumes: 4D NIfTI, classes last)

A volume goes through exactly the training geometry and intensity steps (:func:`~decon_med.data.volumes.volume_slices`):
reoriented to RAS, intensities per file (``data.modality``, CT windows, MR percentile / z-score), cut into 2D
slices along ``data.slice_axis`` (a volume one slice thick along another axis is that one slice) resampled to
square pixels; every slice is predicted, none is skipped. The label slices then go back the same way
(:func:`~decon_med.data.volumes.labels_to_volume`): resampled to the canonical grid, stacked and reoriented to the
file's stored voxel order, so the labels file has the input's shape, orientation, affine and header. A 4D NIfTI
needs ``data.channels`` (the volumes used in training) and gives a 3D labels file. A 2.5D run
(``data.context_slices: k``) sees each slice with its ``2k + 1`` neighbours stacked as in training; it predicts
volumes only (a 2D image is skipped with the reason). A run trained on patches (``data.sampling: patch``) predicts
with sliding windows by default (:func:`default_mode`).

Example:
    >>> summary = predict("runs/finetune/isic", "data/new_images", "pred/isic", overlay=True)
    >>> len(summary["predicted"]), summary["skipped"]
    (12, [{'path': 'data/new_images/broken.png', 'reason': 'unreadable or truncated image (...)'}])
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from nibabel import orientations
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from decon_med.config import FinetuneConfig
from decon_med.data.datasets import input_slice_options, stack_context, stacked_slices
from decon_med.data.geometry import from_canonical, resample_plane
from decon_med.data.io import file_stem, is_image, is_nifti, read_image
from decon_med.data.layout_base import channel_names
from decon_med.data.transforms import SegEvalTransform, augmentation_modality
from decon_med.data.volumes import VolumeSlices, labels_to_volume, scan_volume, volume_slices, write_volume
from decon_med.engine.checkpoint import check_finite_state
from decon_med.engine.model_io import load_segmentation_model, resolve_checkpoint
from decon_med.engine.postprocess import largest_components, prediction_postprocessing
from decon_med.errors import DataError, DeconError
from decon_med.folders import atomic_write, check_not_input, record_written
from decon_med.summary import print_summary

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

    ``mode=None`` takes :func:`default_mode` of the config: ``sliding`` for a run trained on patches
    (``data.sampling: patch``), else ``resize``. ``mode="resize"`` resizes each whole input to ``image_size`` and
    the logits back, exactly as fine-tuning sees its inputs and ``evaluate`` scores them. ``mode="sliding"``
    predicts at the native resolution of each image or square-pixel slice with MONAI's
    ``sliding_window_inference`` (:func:`sliding_logits`): windows of the training ``data.image_size`` (overlap
    ``overlap``, Gaussian blending); an input smaller than a window is padded with intensity 0, so every forward
    pass sees ``image_size x image_size``: right when inputs are at the scale the network was trained at (slices
    resampled by ``data.spacing``), wrong for a network trained on whole slices shrunk to it.

    Args:
        network: the smp network (put in eval mode and moved to ``device``).
        cfg: the fine-tuning config it was trained with.
        device: ``"cuda"`` / ``"cpu"``; default CUDA when available.
        batch_size: windows (sliding) or images / slices (resize) per forward pass.
        mode: ``sliding``, ``resize`` or ``None`` (:func:`default_mode`).
        tta: average the softmax over the input and its horizontal and vertical flips.
        largest_component: keep only the largest connected component (in 3D for a volume) of each foreground
            class (``True``) or of the listed class indices (a run's recorded post-processing), see
            :func:`largest_components`.
        overlap: sliding-window overlap, in [0, 1).

    Example:
        >>> net, cfg, _ = load_segmentation_model("runs/finetune/isic")
        >>> masks = Predictor(net, cfg, tta=True).predict_images([read_image("a.png", 3)])   # [(H, W) uint8]
    """

    def __init__(
        self,
        network: nn.Module,
        cfg: FinetuneConfig,
        device: str | None = None,
        batch_size: int = 8,
        mode: str | None = None,
        tta: bool = False,
        largest_component: bool | Sequence[int] = False,
        overlap: float = 0.25,
    ):
        mode = default_mode(cfg) if mode is None else mode
        if batch_size < 1:
            raise DeconError(f"batch size must be >= 1, got {batch_size}")
        if mode not in MODES:
            raise DeconError(f"inference mode must be one of {', '.join(MODES)}, got '{mode}'")
        if not 0.0 <= overlap < 1.0:
            raise DeconError(f"sliding-window overlap must be in [0, 1), got {overlap}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.network = network.to(self.device).eval()
        self.cfg = cfg
        self.batch_size = batch_size
        self.mode, self.tta, self.overlap = mode, tta, overlap
        #: ``None``: every foreground class; else the classes whose largest component alone is kept.
        self.component_classes = None if largest_component is True else tuple(largest_component or ())
        self.largest_component = largest_component is True or bool(self.component_classes)
        self.transform = SegEvalTransform(
            cfg.data.image_size,
            augmentation_modality(cfg.data.modality),
            cfg.data.in_channels,
            slices=stacked_slices(cfg.data),
        )
        self.context = cfg.data.context_slices
        self.slice_opts = input_slice_options(cfg.data)
        self.amp = self.device.type == "cuda" and cfg.train.amp != "none"

    def preprocess(self, image: np.ndarray) -> dict[str, Any]:
        """``{"image": (C, S, S) tensor, "orig_size": (H, W)}`` for an HWC float image in [0, 1]."""
        return self.transform({"image": image})

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.network(batch).float()

    def _native(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Normalised ``(B, C, H, W)`` tensor of same-size HWC images, at their own resolution."""
        mean = torch.as_tensor(self.transform.mean).view(1, -1, 1, 1)
        std = torch.as_tensor(self.transform.std).view(1, -1, 1, 1)
        batch = torch.stack([torch.from_numpy(_channels(im, self.cfg.data.in_channels)) for im in images])
        return ((batch.permute(0, 3, 1, 2) - mean) / std).to(self.device)

    def _probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Softmax ``(B, K, H, W)`` of a native-resolution batch: sliding windows, flips averaged with TTA."""
        size = self.cfg.data.image_size

        def infer(x: torch.Tensor) -> torch.Tensor:
            logits = sliding_logits(
                self._forward, x, size, self.batch_size, overlap=self.overlap, fill=self.transform.fill
            )
            return torch.softmax(logits, dim=1)

        return _with_flips(infer, batch, self.tta)

    def label_maps(self, samples: Sequence[dict[str, Any]]) -> list[np.ndarray]:
        """Resize mode: one forward pass over preprocessed ``samples``; uint8 ``(H, W)`` masks at ``orig_size``."""
        batch = torch.stack([s["image"] for s in samples]).to(self.device)
        with torch.inference_mode():  # logits without TTA: exactly the arg-max evaluate scores
            probs = (
                _with_flips(lambda x: torch.softmax(self._forward(x), dim=1), batch, True)
                if self.tta
                else self._forward(batch)
            )
        masks = []
        for k, sample in enumerate(samples):
            up = F.interpolate(
                probs[k : k + 1], size=tuple(sample["orig_size"]), mode="bilinear", align_corners=False
            )
            masks.append(up[0].argmax(0).to(torch.uint8).cpu().numpy())
        return masks

    def _masks(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Masks of images, without the connected-component step."""
        if self.mode == "resize":
            masks: list[np.ndarray] = []
            for chunk in _chunks(images, self.batch_size):
                masks.extend(self.label_maps([self.preprocess(image) for image in chunk]))
            return masks
        masks = []
        for group in _same_size_runs(images, self.batch_size):
            with torch.inference_mode():
                probs = self._probabilities(self._native(group))
            masks.extend(probs.argmax(1).to(torch.uint8).cpu().numpy())
        return masks

    def predict_images(self, images: Iterable[np.ndarray]) -> list[np.ndarray]:
        """uint8 ``(H, W)`` masks of HWC float images in [0, 1], each at its input size."""
        masks = self._masks(list(images))
        return [self.clean(mask) for mask in masks]

    def outputs(self, images: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The masks of :meth:`predict_images` before cleaning and, from the same forward passes, float32
        ``(K, H, W)`` softmax maps, each at its input's size (resize mode: the network-size softmax upsampled
        bilinearly, so every pixel still sums to 1).

        Example:
            >>> masks, probs = predictor.outputs([read_image("a.png", 3)])
            >>> probs[0].shape, float(probs[0].sum(0).mean())
            ((2, 480, 640), 1.0)
        """
        masks: list[np.ndarray] = []
        probs: list[np.ndarray] = []
        if self.mode != "resize":
            for group in _same_size_runs(images, self.batch_size):
                with torch.inference_mode():
                    soft = self._probabilities(self._native(group))
                masks.extend(soft.argmax(1).to(torch.uint8).cpu().numpy())
                probs.extend(soft.float().cpu().numpy())
            return masks, probs
        for chunk in _chunks(images, self.batch_size):
            samples = [self.preprocess(image) for image in chunk]
            batch = torch.stack([s["image"] for s in samples]).to(self.device)
            with torch.inference_mode():  # the masks arg-max what label_maps does: logits, or the TTA softmax
                if self.tta:
                    scores = soft = _with_flips(lambda x: torch.softmax(self._forward(x), dim=1), batch, True)
                else:
                    scores = self._forward(batch)
                    soft = torch.softmax(scores, dim=1)
            for k, sample in enumerate(samples):
                size = tuple(sample["orig_size"])
                up = F.interpolate(scores[k : k + 1], size=size, mode="bilinear", align_corners=False)
                masks.append(up[0].argmax(0).to(torch.uint8).cpu().numpy())
                up = F.interpolate(soft[k : k + 1], size=size, mode="bilinear", align_corners=False)
                probs.append(up[0].float().cpu().numpy())
        return masks, probs

    def slice_outputs(
        self, path: str | os.PathLike | Sequence[str | os.PathLike]
    ) -> tuple[VolumeSlices, list[np.ndarray], list[np.ndarray]]:
        """A volume's slices (one file, or one file per channel) with their masks and softmax maps
        (:meth:`outputs`), each slice seen as :meth:`predict_slices` sees it.

        Example:
            >>> slices, masks, probs = predictor.slice_outputs(["case_0000.nii.gz", "case_0001.nii.gz"])
        """
        slices = volume_slices(path, self.slice_opts)
        images = slices.images
        if self.context:
            images = [stack_context(slices.images, k, self.context) for k in range(len(slices.images))]
        masks, probs = self.outputs(images)
        return slices, masks, probs

    def clean(self, labels: np.ndarray) -> np.ndarray:
        """``labels`` with only the largest connected component of each foreground class (or of the classes
        asked for) when asked for."""
        if not self.largest_component:
            return labels
        return largest_components(labels, self.classes, only=self.component_classes)

    @property
    def classes(self) -> int:
        """Output classes of the network (background included): the channels of its last convolution."""
        head = [m for m in self.network.modules() if isinstance(m, nn.Conv2d)][-1]
        return int(head.out_channels)

    def predict_slices(self, path: str | os.PathLike) -> tuple[VolumeSlices, list[np.ndarray]]:
        """A NIfTI file's slices (see :func:`~decon_med.data.volumes.volume_slices`) and their masks; with 2.5D
        context each slice is predicted from its stack of neighbours (``slices.images`` stay single slices)."""
        slices = volume_slices(path, self.slice_opts)
        if not self.context:
            return slices, self._masks(slices.images)
        stacks = [stack_context(slices.images, k, self.context) for k in range(len(slices.images))]
        return slices, self._masks(stacks)

    def predict_volume(self, path: str | os.PathLike) -> np.ndarray:
        """uint8 labels of a NIfTI file on its stored voxel grid (stored shape and orientation, same affine)."""
        slices, masks = self.predict_slices(path)
        return self.clean(labels_to_volume(masks, slices).astype(np.uint8))


#: Inference modes of :class:`Predictor`.
MODES = ("sliding", "resize")


def default_mode(cfg: FinetuneConfig) -> str:
    """The inference mode a run was trained for: ``sliding`` after patch training (``data.sampling: patch``,
    slices at a fixed pixel size), else ``resize`` (whole inputs resized, as fine-tuning saw them).

    Example:
        >>> default_mode(load_config("runs/ft/liver/config.yaml", schema=FinetuneConfig))
        'sliding'
    """
    return "sliding" if cfg.data.sampling == "patch" else "resize"


def sliding_logits(
    forward: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    size: int,
    batch_size: int,
    overlap: float = 0.25,
    fill: Sequence[float] | None = None,
) -> torch.Tensor:
    """Float32 ``(B, K, H, W)`` logits of normalised ``(B, C, H, W)`` images at their own resolution.

    MONAI's ``sliding_window_inference`` with ``size x size`` windows, ``batch_size`` windows per call of
    ``forward``, ``overlap`` and Gaussian weighting of the overlapping windows. An input smaller than a window is
    first padded evenly with ``fill`` (one value per channel, default 0), as patch training pads, and the logits
    are cropped back to the input.

    Example:
        >>> logits = sliding_logits(network, batch, size=64, batch_size=8, fill=transform.fill)
    """
    b, c, h, w = images.shape
    extra_h, extra_w = max(size - h, 0), max(size - w, 0)
    top, left = extra_h // 2, extra_w // 2
    if extra_h or extra_w:
        value = torch.zeros(c) if fill is None else torch.as_tensor(fill, dtype=torch.float32)
        padded = value.to(images).view(1, c, 1, 1).repeat(b, 1, h + extra_h, w + extra_w)
        padded[:, :, top : top + h, left : left + w] = images
        images = padded
    logits = sliding_window_inference(
        images, (size, size), batch_size, forward, overlap=overlap, mode="gaussian"
    )
    return logits[:, :, top : top + h, left : left + w].float()


def _channels(image: np.ndarray, channels: int) -> np.ndarray:
    """HWC float32 with ``channels`` channels (greyscale replicated, colour averaged), as in evaluation."""
    image = np.asarray(image, dtype=np.float32)
    if image.shape[2] == channels:
        return np.ascontiguousarray(image)
    if image.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(image, channels, axis=2))
    return np.ascontiguousarray(image.mean(axis=2, keepdims=True))


def _with_flips(
    infer: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, tta: bool
) -> torch.Tensor:
    """``infer(batch)``, or with ``tta`` its mean with the horizontally and vertically flipped predictions."""
    probs = infer(batch)
    if not tta:
        return probs
    for dims in ((3,), (2,)):
        probs = probs + torch.flip(infer(torch.flip(batch, dims)), dims)
    return probs / 3.0


def _same_size_runs(images: Sequence[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    """Consecutive images of the same height and width, at most ``size`` at a time."""
    run: list[np.ndarray] = []
    for image in images:
        if run and (len(run) == size or image.shape[:2] != run[0].shape[:2]):
            yield run
            run = []
        run.append(image)
    if run:
        yield run


@dataclass(frozen=True)
class _Input:
    """One input file (or the channel files of one nnU-Net case, ``path`` the first) and its labels file."""

    path: Path
    output: Path
    channels: tuple[Path, ...] = ()

    @property
    def source(self) -> Path | list[Path]:
        """What is read: the file, or the channel files in channel order."""
        return list(self.channels) if len(self.channels) > 1 else self.path

    @property
    def probabilities(self) -> Path:
        """``<stem>_probabilities.nii.gz`` (volumes) or ``.npy`` (2D images) beside the labels file."""
        name = self.output.name
        stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem
        suffix = ".nii.gz" if is_nifti(self.path) else ".npy"
        return self.output.with_name(f"{stem}_probabilities{suffix}")

    @property
    def overlay(self) -> Path:
        """``<stem>_overlay.png`` for a 2D image, ``<stem>_seg_overlay.png`` (a grid of slices) for a volume."""
        name = self.output.name
        stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem
        return self.output.with_name(f"{stem}_overlay.png")


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


def _predict_nifti(predictor: Predictor, item: _Input, overlay: bool) -> dict[str, str]:
    slices, masks = predictor.predict_slices(item.source)
    labels = predictor.clean(labels_to_volume(masks, slices).astype(np.uint8))
    shape = nib.load(item.path).shape
    if len(shape) == 2:  # a 2D NIfTI was read as (X, Y, 1)
        labels = labels.reshape(shape)
    write_volume(item.output, labels.astype(np.uint8), None, reference=item.path)
    record = {"path": str(item.path), "output": str(item.output)}
    if overlay:
        from decon_med.viz import slice_grid

        if predictor.largest_component:  # show the cleaned labels, cut the way the slices were
            masks = volume_label_slices(labels.reshape(slices.geometry.shape), slices)
        picked = grid_slices(masks)
        grid = slice_grid(  # drawn as a radiologist views them (display only; the labels file is not changed)
            [slices.images[k] for k in picked],
            [masks[k] for k in picked],
            radiological=predictor.slice_opts.orientation == "RAS",
        )
        item.overlay.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(item.overlay)
        record["overlay"] = str(item.overlay)
    return record


def volume_label_slices(labels: np.ndarray, slices: VolumeSlices) -> list[np.ndarray]:
    """Stored-grid labels cut into the square-pixel slices of ``slices`` (the inverse of ``labels_to_volume``)."""
    canonical = orientations.apply_orientation(labels, slices.geometry.ornt)
    return [
        resample_plane(
            np.ascontiguousarray(canonical.take(k, axis=slices.axis)), image.shape[:2], labels=True
        )
        for k, image in enumerate(slices.images)
    ]


#: Most slices drawn in a volume's overlay grid.
GRID_SLICES = 12


def grid_slices(masks: Sequence[np.ndarray], n: int = GRID_SLICES) -> list[int]:
    """Up to ``n`` evenly spaced slice indices, among the slices with foreground when there are any.

    Example:
        >>> grid_slices([np.zeros((4, 4))] * 30, n=4)
        [0, 10, 19, 29]
    """
    candidates = [k for k, m in enumerate(masks) if np.any(m)] or list(range(len(masks)))
    if len(candidates) <= n:
        return candidates
    picks = np.linspace(0, len(candidates) - 1, n).round().astype(int)
    return [candidates[i] for i in picks]


# -- probabilities, ensembles, nnU-Net cases ------------------------------------------------------------------
def probabilities_to_volume(probs: Sequence[np.ndarray], slices: VolumeSlices) -> np.ndarray:
    """Softmax slices ``(K, H, W)`` (square-pixel size, one per slice) -> float32 ``(X, Y, Z, K)`` on the stored
    voxel grid, classes last: each map resampled linearly to the canonical plane (so every voxel still sums to 1),
    stacked along the sliced axis and reoriented as :func:`~decon_med.data.volumes.labels_to_volume` does.

    Example:
        >>> slices, masks, probs = predictor.slice_outputs("case_0000.nii.gz")
        >>> probabilities_to_volume(probs, slices).shape          # stored (X, Y, Z) + classes
        (48, 48, 12, 3)
    """
    geometry, axis = slices.geometry, slices.axis
    plane = tuple(s for a, s in enumerate(geometry.canonical_shape) if a != axis)
    if len(probs) != geometry.canonical_shape[axis]:
        raise ValueError(f"expected {geometry.canonical_shape[axis]} slices, got {len(probs)}")
    back = [
        resample_plane(np.ascontiguousarray(np.moveaxis(p, 0, -1), dtype=np.float32), plane) for p in probs
    ]
    return from_canonical(np.stack(back, axis=axis), geometry).astype(np.float32, copy=False)


def write_probabilities(path: Path, probs: np.ndarray, reference: Path) -> None:
    """Save ``(X, Y, Z, K)`` probabilities as a 4D NIfTI with the reference's affine and header.

    NIfTI has no 16-bit float type: the maps are stored as uint16 with an intensity scaling (``scl_slope``,
    ``scl_inter``) that every NIfTI reader applies, as small as float16 and within 1e-5 of the float32 values.

    Example:
        >>> write_probabilities(Path("pred/case_probabilities.nii.gz"), mean, Path("imagesTs/case_0000.nii.gz"))
    """
    ref = nib.load(reference)
    data = np.asarray(probs, dtype=np.float32)
    image = type(ref)(data, ref.affine, header=ref.header.copy())
    image.set_data_dtype(np.uint16)
    record_written(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)


def _predict_case(
    predictors: Sequence[Predictor], item: _Input, overlay: bool, probabilities: bool
) -> dict[str, str]:
    """One volume (file or nnU-Net case) with several runs averaged and / or the probabilities written.

    Each run reads the volume with its own preprocessing; the softmax maps are averaged on the stored voxel grid
    and the labels are their arg-max (one run alone keeps the labels it gives without probabilities).
    """
    first = predictors[0]
    total, slices, masks = None, None, None
    for predictor in predictors:
        run_slices, run_masks, probs = predictor.slice_outputs(item.source)
        grid = probabilities_to_volume(probs, run_slices)
        total = grid if total is None else total + grid
        if slices is None:
            slices, masks = run_slices, run_masks
    mean = total / len(predictors)
    labels = labels_to_volume(masks, slices) if len(predictors) == 1 else mean.argmax(axis=-1)
    labels = first.clean(labels.astype(np.uint8))
    shape = nib.load(item.path).shape
    write_volume(item.output, labels.reshape(shape[:3]).astype(np.uint8), None, reference=item.path)
    record = {"path": str(item.path), "output": str(item.output)}
    if probabilities:
        write_probabilities(item.probabilities, mean, item.path)
        record["probabilities"] = str(item.probabilities)
    if overlay:
        from decon_med.viz import slice_grid

        if len(predictors) > 1 or first.largest_component:
            masks = volume_label_slices(labels.reshape(slices.geometry.shape), slices)
        picked = grid_slices(masks)
        grid_image = slice_grid(  # drawn as a radiologist views them (display only)
            [slices.images[k] for k in picked],
            [masks[k] for k in picked],
            radiological=first.slice_opts.orientation == "RAS",
        )
        item.overlay.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid_image).save(item.overlay)
        record["overlay"] = str(item.overlay)
    return record


def _predict_image(
    predictors: Sequence[Predictor], item: _Input, image: np.ndarray, overlay: bool, probabilities: bool
) -> dict[str, str]:
    """A 2D image with several runs averaged and / or its ``(H, W, K)`` float16 probabilities as ``.npy``."""
    outputs = [predictor.outputs([image]) for predictor in predictors]
    mean = sum(probs[0] for _, probs in outputs) / len(outputs)
    mask = outputs[0][0][0] if len(outputs) == 1 else mean.argmax(axis=0).astype(np.uint8)
    record = _write_mask(item, predictors[0].clean(mask), overlay)
    if probabilities:
        values = np.ascontiguousarray(np.moveaxis(mean, 0, -1).astype(np.float16))
        atomic_write(item.probabilities, lambda f: np.save(f, values, allow_pickle=False))
        record["probabilities"] = str(item.probabilities)
    return record


def check_ensemble(runs: Sequence[str | os.PathLike], loaded: Sequence[tuple]) -> None:
    """The runs of an ensemble must agree on classes, input channels (number and names) and image size.

    Args:
        runs: the run folders or checkpoints, in order.
        loaded: what :func:`~decon_med.engine.model_io.load_segmentation_model` gave for each.

    Raises:
        DeconError: one line naming the first run that differs from the first run, and how.

    Example:
        >>> check_ensemble(runs, [load_segmentation_model(run) for run in runs])
    """

    def agreed(cfg: FinetuneConfig, state: dict[str, Any]) -> dict[str, Any]:
        meta = state["network_meta"]
        return {
            "classes": meta["classes"],
            "input channels": meta["in_channels"],
            "channel names": channel_names(cfg.data),
            "data.image_size": cfg.data.image_size,
        }

    expected = agreed(*loaded[0][1:])
    for run, (_, cfg, state) in zip(runs[1:], loaded[1:], strict=True):
        for what, value in agreed(cfg, state).items():
            if value != expected[what]:
                raise DeconError(
                    f"{run}: {what} {value} but {expected[what]} in {runs[0]}; the runs of an ensemble must agree "
                    "on classes, input channels and image size"
                )


def nnunet_inputs(cfg: FinetuneConfig, inputs: Path) -> tuple[str, list[int] | None] | None:
    """``(file ending, channel indices)`` when ``inputs`` hold nnU-Net cases, else ``None``.

    Cases are grouped when the run was trained on an nnU-Net layout, or when ``inputs`` is an ``images*`` folder
    of an nnU-Net dataset (a ``dataset.json`` beside it). The ending is the run's (or that) ``dataset.json``'s
    ``file_ending``; the channels are the run's ``data.channels``, else one per channel name, else every file.

    Example:
        >>> nnunet_inputs(cfg, Path("Dataset001_Organ/imagesTs"))
        ('.nii.gz', [0, 1])
    """
    folder = inputs if inputs.is_dir() else inputs.parent
    beside = folder.parent / "dataset.json"
    trained = Path(cfg.data.root).expanduser() / "dataset.json" if cfg.data.name == "nnunet" else None
    if trained is None and not (folder.name.lower().startswith("images") and beside.is_file()):
        return None
    ending = ".nii.gz"
    for source in (trained, beside):
        try:
            found = json.loads(source.read_text()).get("file_ending") if source is not None else None
        except (OSError, ValueError, AttributeError):
            found = None
        if isinstance(found, str) and found:
            ending = found
            break
    names = cfg.data.channel_names
    indices = list(cfg.data.channels) if cfg.data.channels else list(range(len(names))) if names else None
    return ending, indices


def _case_plan(
    files: list[Path], inputs: Path, out: Path, ending: str, indices: list[int] | None
) -> tuple[list[_Input], list[dict[str, str]]]:
    """:func:`_plan` with the ``<case>_XXXX<ending>`` files grouped into one input per case, written as
    ``<case><ending>`` (nnU-Net's naming); other files stay single inputs (``<name>_seg.nii.gz``)."""
    pattern = re.compile(rf"(.+)_(\d{{4}}){re.escape(ending)}")
    cases: dict[tuple[Path, str], dict[int, Path]] = {}
    plain = []
    for path in files:
        match = pattern.fullmatch(path.name)
        if match is None:
            plain.append(path)
            continue
        parent = path.parent.relative_to(inputs) if inputs.is_dir() else Path()
        cases.setdefault((parent, match.group(1)), {})[int(match.group(2))] = path
    planned, skipped = _plan(plain, inputs, out)
    owners = {item.output: item.path for item in planned}
    for (parent, case), by_index in sorted(cases.items()):
        wanted = sorted(by_index) if indices is None else indices
        first = by_index[min(by_index)]
        missing = [c for c in wanted if c not in by_index]
        if missing:
            reason = f"channel file {case}_{missing[0]:04d}{ending} of case {case} is missing"
            skipped.append({"path": str(first), "reason": reason})
            continue
        channels = tuple(by_index[c] for c in wanted)
        output = out / parent / f"{case}{ending if is_nifti(first) else '.png'}"
        if len(channels) > 1 and not is_nifti(first):
            skipped.append(
                {"path": str(first), "reason": "several channel files are read for NIfTI volumes only"}
            )
        elif output in owners:
            skipped.append({"path": str(first), "reason": f"same output file {output} as {owners[output]}"})
        else:
            owners[output] = channels[0]
            planned.append(_Input(channels[0], output, channels))
    return sorted(planned, key=lambda item: str(item.path)), skipped


def modality_warning(path: Path, cfg: FinetuneConfig, opts: Any) -> str | None:
    """A one-line warning when a volume's intensities say another modality than the training data's.

    The file's modality is decided from its intensities (``auto``, :mod:`decon_med.data.intensity`) and compared
    with the run's declared ``data.modality``; ``auto`` and per-file mappings are not compared. A model trained
    on ``rgb`` photographs always warns on a volume. A run whose channels have names (``data.channel_names``, an
    nnU-Net ``dataset.json``) is not compared: each channel's handling comes from its name, and a channel whose
    intensities contradict it is a warning as the volume is read.
    """
    trained = cfg.data.modality
    if not isinstance(trained, str) or trained == "auto" or opts.channel_modalities is not None:
        return None
    found = scan_volume(path, replace(opts, modality="auto"), skip_empty=False)[0]["modality"]
    if trained == found or (trained == "gray" and found == "mr"):
        return None
    return f"{path}: looks like {found} but the model was trained on {trained} data (data.modality)"


def _nothing_predicted(inputs: Path, skipped: list[dict[str, str]]) -> DeconError:
    reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:MAX_LISTED])
    more = f"; and {len(skipped) - MAX_LISTED} more" if len(skipped) > MAX_LISTED else ""
    return DeconError(f"{inputs}: none of {len(skipped)} input(s) could be predicted ({reasons}{more})")


def predict(
    checkpoint: str | os.PathLike | Sequence[str | os.PathLike],
    inputs: str | os.PathLike,
    out_dir: str | os.PathLike,
    overlay: bool = False,
    batch_size: int = 8,
    progress: bool = True,
    overwrite: bool = False,
    mode: str | None = None,
    tta: bool = False,
    largest_component: bool = False,
    summary: bool | None = None,
    postprocessing: bool = True,
    probabilities: bool = False,
) -> dict[str, Any]:
    """Predict masks for one image / volume or for every image and volume below a folder.

    Unreadable inputs are skipped and reported; the others are still predicted. With a run trained on an nnU-Net
    layout, or an ``images*`` folder of an nnU-Net dataset, the ``<case>_XXXX<ending>`` channel files are one
    input per case, written as ``<case><ending>`` (:func:`nnunet_inputs`).

    Args:
        checkpoint: a fine-tuning run folder or ``.ckpt`` file, or several (an ensemble, e.g. the folds of a
            cross-validation): their softmax maps are averaged, each run preprocessing the inputs its own way,
            and the labels are the arg-max of the mean. The runs must agree on classes, input channels and image
            size (:func:`check_ensemble`); the post-processing is the first run's.
        inputs: an image / NIfTI file, or a folder searched recursively.
        out_dir: output folder; must be empty or new unless ``overwrite`` (which replaces same-named files only).
        overlay: also write ``<stem>_overlay.png`` for 2D images and a grid of overlaid slices
            ``<stem>_seg_overlay.png`` for volumes.
        batch_size: windows (sliding) or images / slices (resize) per forward pass.
        progress: show a progress bar over the inputs.
        overwrite: allow writing into a non-empty ``out_dir``.
        mode: ``sliding`` (native resolution, windows of the training image size), ``resize``, or ``None``: the
            run's :func:`default_mode` (sliding after patch training) (see :class:`Predictor`).
        tta: average over horizontal and vertical flips.
        largest_component: keep the largest connected component of every foreground class (instead of the
            recorded post-processing).
        summary: print the run summary (:mod:`decon_med.summary`) first; default: with ``progress``.
        postprocessing: apply the post-processing recorded next to the checkpoint (``postprocessing.json``:
            the largest component of the classes where it raised the val Dice); ``False``: none at all.
        probabilities: also write the softmax maps (the ensemble's mean) beside each labels file: a volume's as
            ``<stem>_probabilities.nii.gz``, 4D ``(X, Y, Z, K)`` on the input's voxel grid with its affine
            (:func:`write_probabilities`), a 2D image's as ``<stem>_probabilities.npy``, float16 ``(H, W, K)``.

    Returns:
        ``{"predicted": [{"path", "output"[, "overlay"]}], "skipped": [{"path", "reason"}], "warnings": [str],
        "out": str, "postprocessing": str}``; ``warnings`` name the volumes whose modality differs from the
        training data's, ``postprocessing`` says what was applied and why.

    Raises:
        DeconError: missing input, bad checkpoint, non-empty ``out_dir`` without ``overwrite``, or no input
            could be predicted (the message lists the reasons).

    Example:
        >>> predict("runs/finetune/brain/best.ckpt", "scans/sub-01_T1w.nii.gz", "pred", tta=True)["predicted"]
        [{'path': 'scans/sub-01_T1w.nii.gz', 'output': 'pred/sub-01_T1w_seg.nii.gz'}]
    """
    runs = [checkpoint] if isinstance(checkpoint, (str, os.PathLike)) else list(checkpoint)
    if not runs:
        raise DeconError("predict: no run folder or checkpoint given")
    checkpoint = runs[0]
    inputs, out = Path(inputs).expanduser(), Path(out_dir).expanduser()
    files = list_inputs(inputs, exclude=out)
    loaded = [load_segmentation_model(run) for run in runs]
    check_ensemble(runs, loaded)
    network, cfg, state = loaded[0]
    check_not_input(
        out,
        [
            ("input", inputs),
            *(("checkpoint", resolve_checkpoint(run)) for run in runs),
            *(("data root the network was trained on", run_cfg.data.root) for _, run_cfg, _ in loaded),
        ],
        "--out",
    )
    _prepare_out(out, overwrite)
    for run, (_, _, run_state) in zip(runs, loaded, strict=True):
        check_finite_state(run_state["network"], resolve_checkpoint(run))
    components, applied = prediction_postprocessing(
        resolve_checkpoint(checkpoint), largest_component, postprocessing
    )
    predictors = [
        Predictor(net, run_cfg, batch_size=batch_size, mode=mode, tta=tta, largest_component=components)
        for net, run_cfg, _ in loaded
    ]
    predictor = predictors[0]
    simple = len(predictors) == 1 and not probabilities  # the plain path: labels only
    cases = nnunet_inputs(cfg, inputs)
    planned, skipped = _plan(files, inputs, out) if cases is None else _case_plan(files, inputs, out, *cases)
    if progress if summary is None else summary:
        method = _describe(predictor) + (f", mean of {len(runs)} runs" if len(runs) > 1 else "")
        print_summary("predict", cfg, {"input": _input_counts(planned)}, method=method)
    out.mkdir(parents=True, exist_ok=True)

    predicted: list[dict[str, str]] = []
    warnings: list[str] = []
    for item in tqdm(planned, desc="predict", unit="file", disable=not progress, leave=False):
        try:
            if is_nifti(item.path):
                warning = modality_warning(item.path, cfg, predictor.slice_opts)
                if warning is not None:
                    warnings.append(warning)
                if simple:
                    predicted.append(_predict_nifti(predictor, item, overlay))
                else:
                    predicted.append(_predict_case(predictors, item, overlay, probabilities))
                continue
            if predictor.context:
                raise DataError(
                    item.path,
                    f"a 2D image has no neighbouring slices; the model takes {2 * predictor.context + 1} "
                    "stacked slices of a volume (data.context_slices)",
                )
            image = read_image(item.path, cfg.data.in_channels)
        except DataError as exc:
            skipped.append({"path": str(item.path), "reason": exc.problem})
            continue
        if not simple:
            predicted.append(_predict_image(predictors, item, image, overlay, probabilities))
            continue
        mask = predictor.predict_images([image])[0]
        predicted.append(_write_mask(item, mask, overlay))

    if not predicted:
        raise _nothing_predicted(inputs, skipped)
    return {
        "predicted": sorted(predicted, key=lambda r: r["path"]),
        "skipped": sorted(skipped, key=lambda r: r["path"]),
        "warnings": warnings,
        "out": str(out),
        "postprocessing": applied,
    }


def _input_counts(planned: Sequence[_Input]) -> dict[str, int | None]:
    volumes = sum(is_nifti(item.path) for item in planned)
    return {"files": len(planned) - volumes, "volumes": volumes, "slices": None}


def _describe(predictor: Predictor) -> str:
    size = predictor.cfg.data.image_size
    how = (
        f"sliding windows of {size} px at native resolution (overlap {predictor.overlap:g})"
        if predictor.mode == "sliding"
        else f"whole inputs resized to {size} px"
    )
    extras = [
        name
        for name, on in (
            ("flip TTA", predictor.tta),
            (
                "largest component"
                + (
                    ""
                    if predictor.component_classes is None
                    else " of class " + ", ".join(map(str, predictor.component_classes))
                ),
                predictor.largest_component,
            ),
        )
        if on
    ]
    return how + "".join(f", {e}" for e in extras)
