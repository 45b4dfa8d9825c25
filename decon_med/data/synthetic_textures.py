"""A synthetic segmentation task that intensity alone cannot solve: structures told apart by texture and shape.

Every image is a grey 96 x 96 field of fine isotropic noise (class 0) holding an irregular blob filled with
oriented stripes (class 1) and a smaller blob filled with a checker pattern (class 2). Inside each image all three
regions have the same mean and the same standard deviation of intensity, so a per-pixel intensity rule scores no
better than chance: a network must read local texture and shape. Each image has its own gain, offset, stripe
orientation and pattern periods, and the blobs' sizes and places vary.

The folder holds many unlabelled images beside a few labelled ones, the setting pre-training is for::

    unlabeled/img_0000.png ...            n_unlabeled images, no masks (data.name=unlabeled)
    labeled/images/case_000.png ...       n_labeled images
    labeled/masks/case_000.png ...        class indices 0 / 1 / 2
    labeled/splits.json                   train / val / test ids (data.name=folder)

Example:
    >>> make_textures("data/textures", n_unlabeled=600, n_labeled=96, seed=0)
    {'unlabeled': 600, 'train': 48, 'val': 16, 'test': 32}
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from decon_med.data.synthetic import _prepare_out, _save_image
from decon_med.folders import atomic_write
from decon_med.folders import make_folder as _mkdir

__all__ = ["CLASS_NAMES", "TEXTURE_SIZE", "make_textures", "texture_image"]

#: Side of every image, in pixels.
TEXTURE_SIZE = 96
#: Class index -> name.
CLASS_NAMES = ("background", "stripes", "checker")


def _standardise(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / max(float(x.std()), 1e-6)


def _blob(rng: np.random.Generator, size: int, radius: float, margin: float) -> np.ndarray:
    """An irregular star-shaped blob: a circle whose radius is modulated by a few random harmonics."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(margin, size - margin, 2)
    angle = np.arctan2(yy - cy, xx - cx)
    r = np.full_like(angle, radius)
    for k in (2, 3, 4):
        r += radius * rng.uniform(0.0, 0.18) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
    return np.hypot(yy - cy, xx - cx) < r


def _stripes(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta, period = rng.uniform(0, np.pi), rng.uniform(5.0, 8.0)
    return np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period + rng.uniform(0, 2 * np.pi))


def _checker(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta, period = rng.uniform(0, np.pi / 2), rng.uniform(6.0, 9.0)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = -xx * np.sin(theta) + yy * np.cos(theta)
    return np.sin(2 * np.pi * u / period) * np.sin(2 * np.pi * v / period)


def texture_image(rng: np.random.Generator, size: int = TEXTURE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """One ``(size, size, 3)`` uint8 RGB image (grey) and its ``(size, size)`` uint8 mask of class indices.

    Each region's texture is standardised to zero mean and unit variance over that region before the image's
    gain and offset are applied, so all classes share one intensity distribution (up to sensor noise).
    """
    stripes_mask = _blob(rng, size, radius=rng.uniform(0.22, 0.32) * size, margin=0.3 * size)
    checker_mask = _blob(rng, size, radius=rng.uniform(0.12, 0.18) * size, margin=0.2 * size)
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[stripes_mask] = 1
    mask[checker_mask] = 2  # may cut into the stripes blob

    noise = gaussian_filter(rng.normal(size=(size, size)), 0.8)
    textures = (noise, _stripes(rng, size), _checker(rng, size))
    field = np.zeros((size, size), dtype=np.float64)
    for cls, texture in enumerate(textures):
        region = mask == cls
        if region.any():
            field[region] = _standardise(texture[region])
    gain, offset = rng.uniform(25.0, 45.0), rng.uniform(100.0, 155.0)
    grey = offset + gain * field + rng.normal(0.0, 4.0, field.shape)
    grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2), mask


def check_task_sizes(n_unlabeled: int, n_labeled: int) -> None:
    """Refuse image counts a task folder cannot be split from (at least 6 labelled images, no negative count)."""
    if n_labeled < 6:
        raise ValueError(f"n_labeled must be at least 6, got {n_labeled}")
    if n_unlabeled < 0:
        raise ValueError(f"n_unlabeled must be >= 0, got {n_unlabeled}")


def task_folder(out: str | Path, overwrite: bool, n_labeled: int) -> tuple[Path, dict[str, int]]:
    """The marked task folder with ``unlabeled/``, ``labeled/images/`` and ``labeled/masks/``, and the labelled
    images per split (train / val / test about 50 / 17 / 33 %), shared by the synthetic task generators.

    Example:
        >>> task_folder("data/textures", False, 96)[1]
        {'train': 48, 'val': 16, 'test': 32}
    """
    root = _prepare_out(out, overwrite)
    _mkdir(root / "unlabeled")
    _mkdir(root / "labeled" / "images")
    _mkdir(root / "labeled" / "masks")
    n_val, n_test = max(1, round(n_labeled / 6)), max(1, round(n_labeled / 3))
    return root, {"train": n_labeled - n_val - n_test, "val": n_val, "test": n_test}


def make_textures(
    out: str | Path,
    n_unlabeled: int = 600,
    n_labeled: int = 96,
    seed: int = 0,
    *,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write the texture dataset: ``unlabeled/`` and a labelled ``labeled/`` folder split 50 / 17 / 33 %.

    Args:
        out: output folder (created if missing).
        n_unlabeled: images without masks, for pre-training.
        n_labeled: labelled images (at least 6), split into train / val / test.
        seed: random seed; the same seed gives byte-identical files.
        overwrite: replace what an earlier call wrote in a non-empty ``out`` instead of raising
            :class:`FileExistsError` (a folder holding other files is refused, as for every generator).

    Returns:
        Number of images per part.
    """
    check_task_sizes(n_unlabeled, n_labeled)
    root, counts = task_folder(out, overwrite, n_labeled)

    rng = np.random.default_rng(seed)
    for i in range(n_unlabeled):
        image, _ = texture_image(rng)
        _save_image(image, "RGB", root / "unlabeled" / f"img_{i:04d}.png")
    ids = [f"case_{i:03d}" for i in range(n_labeled)]
    for case in ids:
        image, mask = texture_image(rng)
        _save_image(image, "RGB", root / "labeled" / "images" / f"{case}.png")
        _save_image(mask, "L", root / "labeled" / "masks" / f"{case}.png")
    n_train, n_val = counts["train"], counts["val"]
    splits = {
        "train": ids[:n_train],
        "val": ids[n_train : n_train + n_val],
        "test": ids[n_train + n_val :],
    }
    atomic_write(root / "labeled" / "splits.json", json.dumps(splits, indent=1) + "\n")
    return {"unlabeled": n_unlabeled, **{split: len(members) for split, members in splits.items()}}
