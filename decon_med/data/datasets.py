"""MONAI datasets and loaders over the dataset layouts.

Each sample is read by :class:`LoadSample` into ``{"image": (H, W, C) float32 in [0, 1], "label": (H, W) int64,
"id": str}``, then turned into tensors by the transform of the mode:

- ``pretrain``: two overlapping views with their overlap boxes and flip flags (no labels read);
- ``train``: fine-tuning augmentation of image and mask;
- ``eval``: deterministic resize.

Random transforms draw from a per-sample seed derived from ``(seed, epoch, id)``, so a run resumed at an epoch
sees exactly the augmentations an uninterrupted run would, whatever the number of workers.

2.5D (``data.context_slices: k``): a NIfTI slice item is read as the stack of its ``2k + 1`` neighbouring slices
(same volume and axis, indices clamped at the volume's ends), each read exactly as a single slice of
``data.in_channels / (2k + 1)`` channels and concatenated along the channel axis (:func:`load_context`); 2D
images are refused. ``data.sampling: patch`` picks the patch transforms (see :mod:`decon_med.data.transforms`).

Example:
    >>> cfg = load_config("configs/finetune/isic.yaml")
    >>> ds = build_dataset(cfg, split="train", mode="train")
    >>> loader = build_loader(ds, batch_size=16, shuffle=True, num_workers=4, seed=cfg.seed)
    >>> batch = next(iter(loader)); batch["image"].shape, batch["label"].shape
    (torch.Size([16, 3, 224, 224]), torch.Size([16, 224, 224]))
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset
from monai.transforms import Compose, RandomizableTrait, Transform
from torch.utils.data import default_collate

from decon_med.config import Config, DataConfig
from decon_med.data.io import read_image, read_mask
from decon_med.data.layouts import Layout, get_layout, slice_options
from decon_med.data.transforms import (
    SegEvalTransform,
    SegPatchTransform,
    SegTrainTransform,
    TwoViewTransform,
    augmentation_modality,
    default_normalisation,
)
from decon_med.data.volumes import SliceOptions, load_label_slice, load_slice, slice_count
from decon_med.errors import DataError

Mode = Literal["pretrain", "train", "eval"]


class LoadSample(Transform):
    """Read an item's image (2D file or NIfTI slice) and, if present, its mask mapped to class indices.

    Only ``image``, ``label`` (when the item has one), ``id`` and ``modality`` (the file's own for a NIfTI slice,
    so CT / MR slices never get RGB colour augmentation; the configured one for 2D files) are kept, so items from
    2D files and from volumes collate together.

    With ``context`` > 0 the image of a NIfTI slice is its 2.5D stack (:func:`load_context`; ``opts.channels``
    are then the channels of one slice).

    Example:
        >>> load = LoadSample(layout, slice_options(cfg.data))
        >>> sample = load({"image": "a.png", "label": "a_mask.png", "id": "a"})
    """

    def __init__(self, layout: Layout, opts: SliceOptions, context: int = 0):
        self.layout = layout
        self.opts = opts
        self.context = context
        self._modality = opts.modality if opts.modality in ("rgb", "gray", "mr", "ct") else "rgb"

    def __call__(self, item: dict) -> dict:
        image, raw = read_pair(item, self.opts, self.context)
        sample = {"image": image, "id": item["id"], "modality": item.get("modality") or self._modality}
        if raw is not None:
            sample["label"] = self.layout.map_label(raw, item["label"])
        return sample


def read_pair(item: dict, opts: SliceOptions, context: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """An item's image ``(H, W, C)`` in [0, 1] and its raw mask values ``(H, W)`` (``None`` without a mask).

    With ``context`` > 0 a NIfTI slice's image is its stack of ``2 * context + 1`` neighbouring slices
    (:func:`load_context`) and the mask is the middle slice's.

    Raises:
        DataError: unreadable file, a mask whose size differs from the image's, or a 2D image with ``context``.
    """
    if "slice" in item:
        image = load_context(item, opts, context) if context else load_slice(item, opts)
    elif context:
        raise _flat_image(item, context)
    else:
        image = read_image(item["image"], channels=opts.channels)
    label_path = item.get("label")
    if not label_path:
        return image, None
    if "slice" in item:
        raw = load_label_slice(item, opts)
    else:
        raw = read_mask(label_path)
    if raw.shape != image.shape[:2]:
        raise DataError(
            label_path,
            f"mask size {tuple(raw.shape)} differs from image size {tuple(image.shape[:2])} of {item['image']}",
        )
    return image, raw


def context_indices(index: int, count: int, context: int) -> list[int]:
    """Slice indices of the 2.5D stack around ``index``: ``index - context .. index + context``, clamped to
    ``0 .. count - 1`` (the end slices repeat).

    Example:
        >>> context_indices(0, 12, 1), context_indices(5, 12, 2), context_indices(11, 12, 1)
        ([0, 0, 1], [3, 4, 5, 6, 7], [10, 11, 11])
    """
    return [min(max(index + offset, 0), count - 1) for offset in range(-context, context + 1)]


def stack_context(slices: Sequence[np.ndarray], index: int, context: int) -> np.ndarray:
    """The 2.5D stack of slice ``index`` from all ``(H, W, C)`` slices of a volume: ``(H, W, (2k + 1) * C)``, the
    neighbours of :func:`context_indices` in order, each with its ``C`` channels.

    Example:
        >>> stack = stack_context(volume_slices(path, opts).images, index=5, context=1)    # slices 4, 5, 6
    """
    return np.concatenate([slices[j] for j in context_indices(index, len(slices), context)], axis=2)


def load_context(item: dict, opts: SliceOptions, context: int) -> np.ndarray:
    """The 2.5D stack of a NIfTI slice item: each neighbouring slice as :func:`load_slice` reads it alone (``opts``
    with the channels of one slice), concatenated along the channel axis, ``(H, W, (2k + 1) * C)``.

    Example:
        >>> load_context(items[0], opts, context=1)[..., 1:2] == load_slice(items[0], opts)     # the middle
    """
    indices = context_indices(int(item["slice"]), slice_count(item, opts), context)
    return np.concatenate([load_slice({**item, "slice": j}, opts) for j in indices], axis=2)


def stacked_slices(data: DataConfig) -> int:
    """Slices in one network input: ``2 * data.context_slices + 1`` (1 without 2.5D context)."""
    return 2 * data.context_slices + 1


def input_slice_options(data: DataConfig) -> SliceOptions:
    """:func:`slice_options` for reading the slices of network inputs: with 2.5D context, ``channels`` are those
    of one slice (``data.in_channels / (2k + 1)``), so that the stack has ``data.in_channels``.

    Example:
        >>> input_slice_options(cfg.data).channels       # context_slices 1, in_channels 3
        1
    """
    return slice_options(data)  # slice_options already reads one slice's channels


def input_fill(data: DataConfig) -> tuple[float, ...]:
    """Per input channel, the normalised value of intensity 0: what patch sampling pads images with."""
    mean, std = default_normalisation(
        data.in_channels, augmentation_modality(data.modality), stacked_slices(data)
    )
    return tuple(-m / s for m, s in zip(mean, std, strict=True))


def _flat_image(item: dict, context: int) -> DataError:
    return DataError(
        item["image"],
        f"a 2D image has no neighbouring slices; data.context_slices={context} needs NIfTI volumes "
        "(set data.context_slices=0 for 2D images)",
    )


class SampleSeeder(RandomizableTrait, Transform):
    """Adds ``data["seed"]`` derived from (base seed, epoch, sample id) for the random transforms after it."""

    def __init__(self, seed: int):
        self.seed = seed
        self.epoch = 0

    def __call__(self, data: dict) -> dict:
        data = dict(data)
        data["seed"] = sample_seed(self.seed, self.epoch, data["id"])
        return data


def sample_seed(seed: int, epoch: int, sample_id: str) -> int:
    """A 32-bit seed that depends only on (seed, epoch, id)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{sample_id}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def build_transform(cfg: Config, mode: Mode, full_labels: bool = False):
    """The tensor transform of a mode, configured from ``cfg.data`` and ``cfg.augment``.

    ``full_labels`` (eval mode) also keeps each mask at its original size as ``label_full``.
    """
    data, aug = cfg.data, cfg.augment
    common = {
        "modality": augmentation_modality(data.modality),
        "in_channels": data.in_channels,
        "slices": stacked_slices(data),
    }
    patch = data.sampling == "patch"
    if mode == "pretrain":
        return TwoViewTransform(
            data.image_size,
            crop_scale=tuple(aug.crop_scale),
            min_overlap=aug.min_overlap,
            hflip=aug.hflip,
            color=aug.color,
            recipe=aug.photometric,
            blur_sigma=aug.blur_sigma,
            patch=patch,
            **common,
        )
    if mode == "train" and patch:
        return SegPatchTransform(data.image_size, hflip=aug.hflip, vflip=aug.vflip, **common)
    if mode == "train":
        return SegTrainTransform(
            data.image_size,
            crop_scale=tuple(aug.finetune_crop_scale),
            hflip=aug.hflip,
            vflip=aug.vflip,
            **common,
        )
    if mode == "eval":
        return SegEvalTransform(data.image_size, full_label=full_labels, patch=patch, **common)
    raise ValueError(f"unknown mode '{mode}'; expected pretrain, train or eval")


def build_dataset(
    cfg: Config,
    split: str = "train",
    mode: Mode = "eval",
    items: list[dict] | None = None,
    progress: bool = False,
    full_labels: bool = False,
) -> Dataset:
    """A MONAI ``Dataset`` (``CacheDataset`` when ``data.cache_rate > 0``) for one split and mode.

    Args:
        cfg: resolved config.
        split: ``train``, ``val`` or ``test``.
        mode: ``pretrain`` (images only, two views), ``train`` or ``eval``.
        items: use these items instead of listing the split (e.g. a label-fraction subset).
        progress: show a progress bar while caching.
        full_labels: eval mode: also keep each mask at its original size as ``label_full`` (batch such samples
            with :func:`collate_eval`).

    Raises:
        DataError: the split has no images, or a file is missing (named in the message).
    """
    layout = get_layout(cfg.data)
    if items is None:
        items = layout.items(split, labeled=mode != "pretrain")
    if not items:
        raise DataError(layout.root, f"split '{split}' has no images")
    context = cfg.data.context_slices
    flat = next((item for item in items if "slice" not in item), None) if context else None
    if flat is not None:
        raise _flat_image(flat, context)
    steps = [LoadSample(layout, input_slice_options(cfg.data), context)]
    seeder = None
    if mode in ("pretrain", "train"):
        seeder = SampleSeeder(cfg.seed)
        steps.append(seeder)
    steps.append(build_transform(cfg, mode, full_labels=full_labels))
    transform = Compose(steps)
    if cfg.data.cache_rate > 0:
        ds = CacheDataset(
            items,
            transform,
            cache_rate=cfg.data.cache_rate,
            num_workers=cfg.data.num_workers or None,
            progress=progress,
        )
    else:
        ds = Dataset(items, transform)
    ds.seeder = seeder
    ds.layout = layout
    return ds


def collate_eval(samples: list[dict]) -> dict:
    """Batch eval samples: tensors stacked as usual, ``label_full`` and ``image_full`` (sizes differ) kept as
    lists."""
    lists = {key: [s.pop(key) for s in samples] for key in ("label_full", "image_full") if key in samples[0]}
    batch = default_collate(samples)
    batch.update(lists)
    return batch


def set_epoch(dataset: Dataset, epoch: int) -> None:
    """Make the random transforms of ``dataset`` draw this epoch's augmentations (call before each epoch)."""
    seeder = getattr(dataset, "seeder", None)
    if seeder is not None:
        seeder.epoch = epoch


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int = 0,
    drop_last: bool = False,
    seed: int = 0,
    epoch: int = 0,
) -> DataLoader:
    """A MONAI ``DataLoader`` whose shuffling order depends only on (seed, epoch).

    Workers are not persistent, so :func:`set_epoch` reaches them at the start of every epoch.
    """
    set_epoch(dataset, epoch)
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=generator,
        pin_memory=torch.cuda.is_available(),
    )
