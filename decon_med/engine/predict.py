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
from scipy import ndimage
from torch import nn
from tqdm.auto import tqdm

from decon_med.config import FinetuneConfig
from decon_med.data.geometry import resample_plane
from decon_med.data.io import file_stem, is_image, is_nifti, read_image
from decon_med.data.layouts import slice_options
from decon_med.data.transforms import SegEvalTransform, augmentation_modality
from decon_med.data.volumes import VolumeSlices, labels_to_volume, scan_volume, volume_slices, write_volume
from decon_med.engine.checkpoint import check_finite_state
from decon_med.engine.model_io import load_segmentation_model, resolve_checkpoint
from decon_med.errors import DataError, DeconError
from decon_med.folders import check_not_input
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

    ``mode="resize"`` (default) resizes each whole input to ``image_size`` and the logits back, exactly as
    fine-tuning sees its inputs and ``evaluate`` scores them. ``mode="sliding"`` predicts at the native resolution of each image or square-pixel slice with
    MONAI's ``sliding_window_inference``: windows of the training ``data.image_size`` (overlap ``overlap``,
    Gaussian blending); an input smaller than a window is padded, so every forward pass sees
    ``image_size x image_size``: right when inputs are at the scale the network was trained at (slices resampled
    by ``data.spacing`` to about ``image_size``), wrong for a network trained on whole slices shrunk to it.

    Args:
        network: the smp network (put in eval mode and moved to ``device``).
        cfg: the fine-tuning config it was trained with.
        device: ``"cuda"`` / ``"cpu"``; default CUDA when available.
        batch_size: windows (sliding) or images / slices (resize) per forward pass.
        mode: ``sliding`` or ``resize``.
        tta: average the softmax over the input and its horizontal and vertical flips.
        largest_component: keep only the largest connected component of each foreground class (in 3D for a
            volume), see :func:`largest_components`.
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
        mode: str = "resize",
        tta: bool = False,
        largest_component: bool = False,
        overlap: float = 0.25,
    ):
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
        self.mode, self.tta, self.largest_component, self.overlap = mode, tta, largest_component, overlap
        self.transform = SegEvalTransform(
            cfg.data.image_size, augmentation_modality(cfg.data.modality), cfg.data.in_channels
        )
        self.slice_opts = slice_options(cfg.data)
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
            logits = sliding_window_inference(
                x, (size, size), self.batch_size, self._forward, overlap=self.overlap, mode="gaussian"
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

    def clean(self, labels: np.ndarray) -> np.ndarray:
        """``labels`` with only the largest connected component of each foreground class when asked for."""
        if not self.largest_component:
            return labels
        return largest_components(labels, self.classes)

    @property
    def classes(self) -> int:
        """Output classes of the network (background included): the channels of its last convolution."""
        head = [m for m in self.network.modules() if isinstance(m, nn.Conv2d)][-1]
        return int(head.out_channels)

    def predict_slices(self, path: str | os.PathLike) -> tuple[VolumeSlices, list[np.ndarray]]:
        """A NIfTI file's slices (see :func:`~decon_med.data.volumes.volume_slices`) and their masks."""
        slices = volume_slices(path, self.slice_opts)
        return slices, self._masks(slices.images)

    def predict_volume(self, path: str | os.PathLike) -> np.ndarray:
        """uint8 labels of a NIfTI file on its stored voxel grid (stored shape and orientation, same affine)."""
        slices, masks = self.predict_slices(path)
        return self.clean(labels_to_volume(masks, slices).astype(np.uint8))


def largest_components(labels: np.ndarray, classes: int) -> np.ndarray:
    """Keep the largest connected component of each class ``1..classes-1`` (full connectivity); the rest -> 0.

    The same result as MONAI's ``KeepLargestConnectedComponent(applied_labels, is_onehot=False,
    independent=True)``, with ``scipy.ndimage.label`` instead of scikit-image (not a dependency).

    Example:
        >>> largest_components(np.array([[1, 1, 0, 1]]), classes=2)
        array([[1, 1, 0, 0]])
    """
    out = labels.copy()
    structure = ndimage.generate_binary_structure(labels.ndim, labels.ndim)
    for cls in range(1, classes):
        components, count = ndimage.label(labels == cls, structure=structure)
        if count > 1:
            sizes = np.bincount(components.ravel())[1:]
            out[(components > 0) & (components != int(np.argmax(sizes)) + 1)] = 0
    return out


#: Inference modes of :class:`Predictor`.
MODES = ("sliding", "resize")


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
    """One input file and the file its labels go to."""

    path: Path
    output: Path

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
    slices, masks = predictor.predict_slices(item.path)
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
        grid = slice_grid([slices.images[k] for k in picked], [masks[k] for k in picked])
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


def modality_warning(path: Path, cfg: FinetuneConfig, opts: Any) -> str | None:
    """A one-line warning when a volume's intensities say another modality than the training data's.

    The file's modality is decided from its intensities (``auto``, :mod:`decon_med.data.intensity`) and compared
    with the run's declared ``data.modality``; ``auto`` and per-file mappings are not compared. A model trained
    on ``rgb`` photographs always warns on a volume.
    """
    trained = cfg.data.modality
    if not isinstance(trained, str) or trained == "auto":
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
    checkpoint: str | os.PathLike,
    inputs: str | os.PathLike,
    out_dir: str | os.PathLike,
    overlay: bool = False,
    batch_size: int = 8,
    progress: bool = True,
    overwrite: bool = False,
    mode: str = "resize",
    tta: bool = False,
    largest_component: bool = False,
    summary: bool | None = None,
) -> dict[str, Any]:
    """Predict masks for one image / volume or for every image and volume below a folder.

    Unreadable inputs are skipped and reported; the others are still predicted.

    Args:
        checkpoint: a fine-tuning run folder or ``.ckpt`` file.
        inputs: an image / NIfTI file, or a folder searched recursively.
        out_dir: output folder; must be empty or new unless ``overwrite`` (which replaces same-named files only).
        overlay: also write ``<stem>_overlay.png`` for 2D images and a grid of overlaid slices
            ``<stem>_seg_overlay.png`` for volumes.
        batch_size: windows (sliding) or images / slices (resize) per forward pass.
        progress: show a progress bar over the inputs.
        overwrite: allow writing into a non-empty ``out_dir``.
        mode: ``sliding`` (native resolution, windows of the training image size) or ``resize`` (see
            :class:`Predictor`).
        tta: average over horizontal and vertical flips.
        largest_component: keep the largest connected component of each foreground class.
        summary: print the run summary (:mod:`decon_med.summary`) first; default: with ``progress``.

    Returns:
        ``{"predicted": [{"path", "output"[, "overlay"]}], "skipped": [{"path", "reason"}], "warnings": [str],
        "out": str}``; ``warnings`` name the volumes whose modality differs from the training data's.

    Raises:
        DeconError: missing input, bad checkpoint, non-empty ``out_dir`` without ``overwrite``, or no input
            could be predicted (the message lists the reasons).

    Example:
        >>> predict("runs/finetune/brain/best.ckpt", "scans/sub-01_T1w.nii.gz", "pred", tta=True)["predicted"]
        [{'path': 'scans/sub-01_T1w.nii.gz', 'output': 'pred/sub-01_T1w_seg.nii.gz'}]
    """
    inputs, out = Path(inputs).expanduser(), Path(out_dir).expanduser()
    files = list_inputs(inputs, exclude=out)
    network, cfg, state = load_segmentation_model(checkpoint)
    check_not_input(
        out,
        [
            ("input", inputs),
            ("checkpoint", resolve_checkpoint(checkpoint)),
            ("data root the network was trained on", cfg.data.root),
        ],
        "--out",
    )
    _prepare_out(out, overwrite)
    check_finite_state(state["network"], resolve_checkpoint(checkpoint))
    predictor = Predictor(
        network, cfg, batch_size=batch_size, mode=mode, tta=tta, largest_component=largest_component
    )
    planned, skipped = _plan(files, inputs, out)
    if progress if summary is None else summary:
        print_summary("predict", cfg, {"input": _input_counts(planned)}, method=_describe(predictor))
    out.mkdir(parents=True, exist_ok=True)

    predicted: list[dict[str, str]] = []
    warnings: list[str] = []
    for item in tqdm(planned, desc="predict", unit="file", disable=not progress, leave=False):
        try:
            if is_nifti(item.path):
                warning = modality_warning(item.path, cfg, predictor.slice_opts)
                if warning is not None:
                    warnings.append(warning)
                predicted.append(_predict_nifti(predictor, item, overlay))
                continue
            image = read_image(item.path, cfg.data.in_channels)
        except DataError as exc:
            skipped.append({"path": str(item.path), "reason": exc.problem})
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
        for name, on in (("flip TTA", predictor.tta), ("largest component", predictor.largest_component))
        if on
    ]
    return how + "".join(f", {e}" for e in extras)
