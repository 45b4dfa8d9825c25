"""MONAI datasets and loaders over the dataset layouts.

Each sample is read by :class:`LoadSample` into ``{"image": (H, W, C) float32 in [0, 1], "label": (H, W) int64,
"id": str}``, then turned into tensors by the transform of the mode:

- ``pretrain``: two overlapping views with their overlap boxes and flip flags (no labels read);
- ``train``: fine-tuning augmentation of image and mask;
- ``eval``: deterministic resize.

Random transforms draw from a per-sample seed derived from ``(seed, epoch, id)``, so a run resumed at an epoch
sees exactly the augmentations an uninterrupted run would, whatever the number of workers.

Example:
    >>> cfg = load_config("configs/finetune/isic.yaml")
    >>> ds = build_dataset(cfg, split="train", mode="train")
    >>> loader = build_loader(ds, batch_size=16, shuffle=True, num_workers=4, seed=cfg.seed)
    >>> batch = next(iter(loader)); batch["image"].shape, batch["label"].shape
    (torch.Size([16, 3, 224, 224]), torch.Size([16, 224, 224]))
"""

from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset
from monai.transforms import Compose, RandomizableTrait, Transform
from torch.utils.data import default_collate

from decon_med.config import Config
from decon_med.data.io import read_image, read_mask
from decon_med.data.layouts import Layout, get_layout, slice_options
from decon_med.data.transforms import (
    SegEvalTransform,
    SegTrainTransform,
    TwoViewTransform,
    augmentation_modality,
)
from decon_med.data.volumes import SliceOptions, load_label_slice, load_slice
from decon_med.errors import DataError

Mode = Literal["pretrain", "train", "eval"]


class LoadSample(Transform):
    """Read an item's image (2D file or NIfTI slice) and, if present, its mask mapped to class indices.

    Only ``image``, ``label`` (when the item has one), ``id`` and ``modality`` (the file's own for a NIfTI slice,
    so CT / MR slices never get RGB colour augmentation; the configured one for 2D files) are kept, so items from
    2D files and from volumes collate together.

    Example:
        >>> load = LoadSample(layout, slice_options(cfg.data))
        >>> sample = load({"image": "a.png", "label": "a_mask.png", "id": "a"})
    """

    def __init__(self, layout: Layout, opts: SliceOptions):
        self.layout = layout
        self.opts = opts
        self._modality = opts.modality if opts.modality in ("rgb", "gray", "mr", "ct") else "rgb"

    def __call__(self, item: dict) -> dict:
        image, raw = read_pair(item, self.opts)
        sample = {"image": image, "id": item["id"], "modality": item.get("modality") or self._modality}
        if raw is not None:
            sample["label"] = self.layout.map_label(raw, item["label"])
        return sample


def read_pair(item: dict, opts: SliceOptions) -> tuple[np.ndarray, np.ndarray | None]:
    """An item's image ``(H, W, C)`` in [0, 1] and its raw mask values ``(H, W)`` (``None`` without a mask).

    Raises:
        DataError: unreadable file, or a mask whose size differs from the image's.
    """
    if "slice" in item:
        image = load_slice(item, opts)
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
    common = {"modality": augmentation_modality(data.modality), "in_channels": data.in_channels}
    if mode == "pretrain":
        return TwoViewTransform(
            data.image_size,
            crop_scale=tuple(aug.crop_scale),
            min_overlap=aug.min_overlap,
            hflip=aug.hflip,
            color=aug.color,
            recipe=aug.photometric,
            blur_sigma=aug.blur_sigma,
            **common,
        )
    if mode == "train":
        return SegTrainTransform(
            data.image_size,
            crop_scale=tuple(aug.finetune_crop_scale),
            hflip=aug.hflip,
            vflip=aug.vflip,
            **common,
        )
    if mode == "eval":
        return SegEvalTransform(data.image_size, full_label=full_labels, **common)
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
    steps = [LoadSample(layout, slice_options(cfg.data))]
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
    """Batch eval samples: tensors stacked as usual, ``label_full`` (sizes differ) kept as a list."""
    full = [s.pop("label_full") for s in samples] if "label_full" in samples[0] else None
    batch = default_collate(samples)
    if full is not None:
        batch["label_full"] = full
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
