"""A synthetic segmentation task built like a CT/MR cross-section: organs told apart by shape, size and context.

Every image is one slice of a synthetic volume (``size x size x depth``, depth 16-24, cut along the last axis,
so structures grow and shrink from slice to slice). A volume holds an elliptical body of soft tissue (class 0)
with a brighter thin rim on a dark background (class 0), and in it:

* class 1, ``organ``: a large deformed ellipsoid (liver-like) filling a good part of one side of the body;
* class 2, ``small_organ``: a smaller ellipsoid (kidney/spleen-like) pressed into the large organ, so the two share
  a boundary in many slices. Its intensity differs from the large organ's and from the tissue's by about one
  noise standard deviation, so a per-pixel intensity rule separates it poorly;
* class 3, ``lesion``: a darker cyst-like blob inside the small organ (absent from some volumes and slices).

Class-0 distractors of organ-like intensity (a spine, an aorta, bowel-like blobs on the other side) make position
and context matter. Each volume has its own body, organ sizes, places and orientations, a smooth multiplicative
bias field, partial-volume blur at edges (Gaussian, sigma 0.7 px in-plane), Gaussian noise and a gain and offset.

The folder holds unlabelled slices beside labelled slices of other volumes, the layout of
:mod:`decon_med.data.synthetic_textures`::

    unlabeled/img_0000.png ...            n_unlabeled grey slices, no masks (data.name=unlabeled)
    labeled/images/case_v000_s07.png ...  n_labeled grey slices (volume 0, slice 7), each with foreground
    labeled/masks/case_v000_s07.png ...   class indices 0 / 1 / 2 / 3
    labeled/splits.json                   train / val / test ids, split by volume (data.name=folder)

Example:
    >>> make_anatomy("data/anatomy", n_unlabeled=640, n_labeled=96, seed=0)
    {'unlabeled': 640, 'train': 48, 'val': 16, 'test': 32}
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy.ndimage import binary_erosion, gaussian_filter

from decon_med.data.synthetic import _save_image
from decon_med.data.synthetic_textures import check_task_sizes, task_folder
from decon_med.folders import atomic_write

__all__ = ["ANATOMY_SIZE", "CLASS_NAMES", "NOISE_SD", "AnatomyVolume", "anatomy_volume", "make_anatomy"]

#: Default side of every slice, in pixels.
ANATOMY_SIZE = 96
#: Class index -> name.
CLASS_NAMES = ("background", "organ", "small_organ", "lesion")
#: Standard deviation of the Gaussian noise before the volume's gain, in grey levels.
NOISE_SD = 7.0
#: Smallest supported ``size``.
_MIN_SIZE = 32
#: Labelled slices taken from one volume (evenly spaced among its slices with foreground).
_SLICES_PER_VOLUME = 8
#: Smallest foreground (fraction of a slice) for a labelled slice.
_MIN_FOREGROUND = 0.005

# Grey levels before the volume's gain and offset: air and soft tissue.
_AIR, _TISSUE = 15.0, 100.0


class AnatomyVolume(NamedTuple):
    """One synthetic volume: ``image`` and ``mask`` are ``(size, size, depth)`` uint8 arrays; ``noise_sd`` is the
    standard deviation of its noise in grey levels (``NOISE_SD`` times the volume's gain)."""

    image: np.ndarray
    mask: np.ndarray
    noise_sd: float


class _Grid(NamedTuple):
    """Broadcastable coordinates: rows ``(S, 1, 1)``, columns ``(1, S, 1)``, ``t`` in -1..1 ``(1, 1, D)``."""

    yy: np.ndarray
    xx: np.ndarray
    t: np.ndarray


def _shape(
    rng: np.random.Generator,
    grid: _Grid,
    center: tuple[float, float, float],
    axes: tuple[float, float, float],
    angle: float,
    roughness: float,
    drift: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Boolean deformed ellipsoid: in-plane semi-axes ``axes[:2]`` (px) rotated by ``angle``, half-length
    ``axes[2]`` along ``t``; its radius is modulated by a few harmonics of the polar angle whose phases turn with
    ``t``, and its centre moves by ``drift`` (px) per unit of ``t``. Only its bounding box is computed."""
    harmonics = [
        (k, rng.uniform(0.0, roughness) / math.sqrt(k - 1), rng.uniform(0, 2 * np.pi), rng.uniform(-1.5, 1.5))
        for k in (2, 3, 4)
    ]
    cy, cx, cz = center
    out = np.zeros((grid.yy.shape[0], grid.xx.shape[1], grid.t.shape[2]), dtype=bool)
    reach = max(axes[:2]) * (1.0 + sum(a for _, a, _, _ in harmonics)) + 1.0
    rows = slice(
        max(0, math.floor(cy - reach - abs(drift[0]))), max(0, math.ceil(cy + reach + abs(drift[0])) + 1)
    )
    cols = slice(
        max(0, math.floor(cx - reach - abs(drift[1]))), max(0, math.ceil(cx + reach + abs(drift[1])) + 1)
    )
    zs = np.flatnonzero(np.abs(grid.t[0, 0] - cz) < axes[2])
    if not zs.size:
        return out
    depth = slice(int(zs[0]), int(zs[-1]) + 1)
    yy, xx, t = grid.yy[rows], grid.xx[:, cols], grid.t[..., depth]
    dy = yy - (cy + drift[0] * t)
    dx = xx - (cx + drift[1] * t)
    cos, sin = math.cos(angle), math.sin(angle)
    u = (dy * cos - dx * sin) / axes[0]
    v = (dy * sin + dx * cos) / axes[1]
    w = (t - cz) / axes[2]
    theta = np.arctan2(u, v)
    scale = np.ones_like(theta)
    for k, amplitude, phase, turn in harmonics:
        scale += amplitude * np.cos(k * theta + phase + turn * t)
    out[rows, cols, depth] = (u**2 + v**2 < scale**2 * (1.0 - w**2)) & (np.abs(w) < 1.0)
    return out


def _extent(axes: tuple[float, float], angle: float, dy: float, dx: float) -> float:
    """Distance from an ellipse's centre to its boundary along the unit direction ``(dy, dx)``."""
    cos, sin = math.cos(angle), math.sin(angle)
    u, v = dy * cos - dx * sin, dy * sin + dx * cos
    return 1.0 / math.hypot(u / axes[0], v / axes[1])


def _smooth_field(
    rng: np.random.Generator, shape: tuple[int, int, int], sigma: tuple[float, ...]
) -> np.ndarray:
    """Low-frequency Gaussian noise with unit standard deviation."""
    field = gaussian_filter(rng.standard_normal(shape), sigma)
    return field / max(float(field.std()), 1e-6)


def anatomy_volume(rng: np.random.Generator, size: int = ANATOMY_SIZE) -> AnatomyVolume:
    """One synthetic volume of ``size x size x depth`` voxels (depth 16-24) and its mask of class indices.

    Example:
        >>> vol = anatomy_volume(np.random.default_rng(0), size=64)
        >>> vol.image.shape[:2], vol.image.dtype, int(vol.mask.max())
        ((64, 64), dtype('uint8'), 3)
    """
    if size < _MIN_SIZE:
        raise ValueError(f"size must be at least {_MIN_SIZE}, got {size}")
    depth = int(rng.integers(16, 25))
    shape = (size, size, depth)
    grid = _Grid(
        np.arange(size, dtype=np.float64).reshape(-1, 1, 1),
        np.arange(size, dtype=np.float64).reshape(1, -1, 1),
        np.linspace(-1.0, 1.0, depth).reshape(1, 1, -1),
    )
    sd = NOISE_SD

    # Body: an elliptical trunk, wider than deep, that changes a little along t; a thin bright rim.
    body_c = (size / 2 + rng.uniform(-0.03, 0.03) * size, size / 2 + rng.uniform(-0.03, 0.03) * size)
    ay, ax = rng.uniform(0.28, 0.35) * size, rng.uniform(0.38, 0.45) * size
    body_angle = rng.uniform(-0.15, 0.15)
    grow = 1.0 + rng.uniform(-0.08, 0.08) * grid.t
    cos, sin = math.cos(body_angle), math.sin(body_angle)
    dy, dx = grid.yy - body_c[0], grid.xx - body_c[1]
    rho = np.hypot((dy * cos - dx * sin) / (ay * grow), (dy * sin + dx * cos) / (ax * grow))
    rim = rng.uniform(1.6, 2.6) / ay
    body = rho < 1.0
    inner = rho < 1.0 - rim
    interior = rho < 1.0 - rim - 1.5 / ay  # organs keep a pixel and a half off the rim

    # Class 1: a large organ on one side.
    side = 1.0 if rng.random() < 0.5 else -1.0
    big_c = (body_c[0] + rng.uniform(-0.25, 0.05) * ay, body_c[1] + side * rng.uniform(0.25, 0.4) * ax)
    big_axes = (rng.uniform(0.6, 0.8) * ay, rng.uniform(0.5, 0.65) * ax)
    big_angle = rng.uniform(-0.4, 0.4)
    big_z = rng.uniform(-0.2, 0.2)
    big = _shape(
        rng,
        grid,
        (*big_c, big_z),
        (*big_axes, rng.uniform(0.75, 1.05)),
        big_angle,
        0.12,
        drift=tuple(rng.uniform(-0.05, 0.05, 2) * size),
    )
    big &= interior

    # Class 2: a smaller organ pressed into the large one, posterior-medially, so they share a boundary.
    alpha = rng.uniform(0.3, 1.4)  # 0: straight posterior, pi/2: straight medial
    ddy, ddx = math.cos(alpha), -side * math.sin(alpha)
    small_axes = (rng.uniform(0.09, 0.13) * size, rng.uniform(0.09, 0.13) * size)
    reach = _extent(big_axes, big_angle, ddy, ddx) + 0.35 * (small_axes[0] + small_axes[1]) / 2
    small_c = (big_c[0] + reach * ddy, big_c[1] + reach * ddx, big_z + rng.uniform(-0.2, 0.2))
    small_t = rng.uniform(0.5, 0.75)
    small = _shape(rng, grid, small_c, (*small_axes, small_t), rng.uniform(0, np.pi), 0.08) & interior

    # Class 3: a darker lesion strictly inside the small organ (its 4-neighbours in-plane are small organ).
    lesion = np.zeros(shape, dtype=bool)
    if rng.random() < 0.9:
        spot = (
            small_c[0] + rng.uniform(-0.3, 0.3) * small_axes[0],
            small_c[1] + rng.uniform(-0.3, 0.3) * small_axes[1],
            small_c[2] + rng.uniform(-0.2, 0.2) * small_t,
        )
        radii = (*(rng.uniform(0.3, 0.55, 2) * small_axes), rng.uniform(0.45, 0.8) * small_t)
        cross = np.zeros((3, 3, 1), dtype=bool)
        cross[1, :, 0] = cross[:, 1, 0] = True
        lesion = _shape(rng, grid, spot, radii, rng.uniform(0, np.pi), 0.1) & binary_erosion(small, cross)

    mask = np.zeros(shape, dtype=np.uint8)
    mask[big] = 1
    mask[small] = 2
    mask[lesion] = 3

    # Class-0 distractors in the tissue: spine (bright cortex, marrow), aorta and bowel-like blobs.
    clean = np.where(body, _TISSUE + rng.uniform(3.0, 5.0) * sd, _AIR)
    clean = np.where(inner, _TISSUE, clean)
    free = inner & (mask == 0)
    spine_r = rng.uniform(0.055, 0.075) * size
    spine_c = (body_c[0] + 0.72 * ay, body_c[1] + rng.uniform(-0.03, 0.03) * ax)
    spine_d = np.hypot(grid.yy - spine_c[0], grid.xx - spine_c[1]) + 0 * grid.t
    clean = np.where(free & (spine_d < spine_r), _TISSUE + 6.0 * sd, clean)
    clean = np.where(free & (spine_d < 0.6 * spine_r), _TISSUE + 3.0 * sd, clean)
    aorta_r = rng.uniform(0.03, 0.045) * size
    aorta_c = (spine_c[0] - spine_r - aorta_r - 1.0, spine_c[1] + rng.uniform(-0.1, 0.1) * ax)
    aorta = free & (np.hypot(grid.yy - aorta_c[0], grid.xx - aorta_c[1]) + 0 * grid.t < aorta_r)
    clean = np.where(aorta, _TISSUE + rng.uniform(1.0, 2.5) * sd, clean)
    for _ in range(int(rng.integers(2, 5))):
        center = (
            body_c[0] + rng.uniform(-0.5, 0.3) * ay,
            body_c[1] - side * rng.uniform(0.1, 0.6) * ax,
            rng.uniform(-0.6, 0.6),
        )
        axes = (*(rng.uniform(0.05, 0.09, 2) * size), rng.uniform(0.2, 0.5))
        blob = free & _shape(rng, grid, center, axes, rng.uniform(0, np.pi), 0.15)
        clean = np.where(blob, _TISSUE + rng.uniform(0.3, 2.0) * sd, clean)

    # Organ intensities: the small organ sits between the tissue and the large organ, or above both, about one
    # noise SD from each; the lesion is darker than the small organ.
    if rng.random() < 0.5:
        big_gain = rng.uniform(2.0, 2.6) * sd
        small_gain = big_gain - rng.uniform(0.9, 1.3) * sd
    else:
        big_gain = rng.uniform(0.8, 1.3) * sd
        small_gain = big_gain + rng.uniform(0.9, 1.3) * sd
    clean = np.where(mask == 1, _TISSUE + big_gain, clean)
    clean = np.where(mask == 2, _TISSUE + small_gain, clean)
    clean = np.where(mask == 3, _TISSUE + small_gain - rng.uniform(1.5, 2.5) * sd, clean)
    heterogeneity = _smooth_field(rng, shape, (4.0, 4.0, 2.0))
    clean += heterogeneity * np.where(mask > 0, 0.2 * sd, np.where(inner, 0.5 * sd, 0.0))

    # Acquisition: partial-volume blur, a smooth multiplicative bias field, noise, then gain and offset.
    clean = gaussian_filter(clean, (0.7, 0.7, 0.4))
    ny, nx = (grid.yy - size / 2) / (size / 2), (grid.xx - size / 2) / (size / 2)
    g = rng.uniform(-0.04, 0.04, 4)
    bias = 1.0 + g[0] * ny + g[1] * nx + g[2] * grid.t + g[3] * (ny**2 + nx**2)
    gain, offset = rng.uniform(0.85, 1.15), rng.uniform(-8.0, 12.0)
    grey = offset + gain * (clean * bias + rng.normal(0.0, sd, shape))
    image = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return AnatomyVolume(image, mask, float(sd * gain))


def _spread(k: int, n: int) -> list[int]:
    """``k`` indices evenly spread over ``range(n)`` (``k <= n``)."""
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, k)}) if k > 1 else [n // 2]


def _labeled_volume(rng: np.random.Generator, size: int, k: int) -> tuple[AnatomyVolume, list[int]]:
    """A volume and ``k`` of its slices, evenly spread among those holding foreground."""
    while True:  # a draw with too few foreground slices is replaced by the next one (deterministic)
        vol = anatomy_volume(rng, size)
        area = (vol.mask > 0).sum(axis=(0, 1)) / (size * size)
        slices = np.flatnonzero(area >= _MIN_FOREGROUND)
        picks = _spread(k, len(slices))
        if len(slices) >= k and len(picks) == k:
            return vol, [int(slices[i]) for i in picks]


def _split_volumes(count: int) -> list[int]:
    """Slices per volume for ``count`` labelled images: as few volumes as possible, as even as possible."""
    n_volumes = -(-count // _SLICES_PER_VOLUME)
    return [count // n_volumes + (1 if i < count % n_volumes else 0) for i in range(n_volumes)]


def make_anatomy(
    out: str | Path,
    n_unlabeled: int = 640,
    n_labeled: int = 96,
    seed: int = 0,
    *,
    size: int = ANATOMY_SIZE,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write the anatomy dataset: ``unlabeled/`` slices and a labelled ``labeled/`` folder split 50 / 17 / 33 %.

    Unlabelled slices come from their own volumes (every slice, in order); labelled slices from other volumes,
    up to 8 evenly spread slices with foreground per volume, and the splits never share a volume. Ids name the
    volume and the slice: ``case_v003_s07``.

    Args:
        out: output folder (created if missing).
        n_unlabeled: slices without masks, for pre-training.
        n_labeled: labelled slices (at least 6), split into train / val / test.
        seed: random seed; the same seed gives byte-identical files.
        size: side of every slice in pixels (at least 32).
        overwrite: replace what an earlier call wrote in a non-empty ``out`` instead of raising
            :class:`FileExistsError` (a folder holding other files is refused, as for every generator).

    Returns:
        Number of images per part.

    Example:
        >>> make_anatomy("data/anatomy_small", n_unlabeled=40, n_labeled=24, size=64)
        {'unlabeled': 40, 'train': 12, 'val': 4, 'test': 8}
    """
    check_task_sizes(n_unlabeled, n_labeled)
    if size < _MIN_SIZE:
        raise ValueError(f"size must be at least {_MIN_SIZE}, got {size}")
    root, counts = task_folder(out, overwrite, n_labeled)

    rng = np.random.default_rng(seed)
    written = 0
    while written < n_unlabeled:
        vol = anatomy_volume(rng, size)
        depth = vol.image.shape[2]
        left = n_unlabeled - written
        for z in range(depth) if left >= depth else _spread(left, depth):
            _save_image(vol.image[:, :, z], "L", root / "unlabeled" / f"img_{written:04d}.png")
            written += 1

    splits: dict[str, list[str]] = {}
    v = 0
    for split, count in counts.items():
        splits[split] = []
        for k in _split_volumes(count):
            vol, picks = _labeled_volume(rng, size, k)
            for z in picks:
                case = f"case_v{v:03d}_s{z:02d}"
                _save_image(vol.image[:, :, z], "L", root / "labeled" / "images" / f"{case}.png")
                _save_image(vol.mask[:, :, z], "L", root / "labeled" / "masks" / f"{case}.png")
                splits[split].append(case)
            v += 1
    atomic_write(root / "labeled" / "splits.json", json.dumps(splits, indent=1) + "\n")
    return {"unlabeled": n_unlabeled, **{split: len(members) for split, members in splits.items()}}
