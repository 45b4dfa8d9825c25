"""Small, deterministic synthetic datasets written in the official folder layouts of real datasets.

They stand in for the real data in the demo and the tests: the same seed gives byte-identical files, and every
generator finishes in well under a second for ``n=16``.

* ``isic``: ISIC 2017 dermoscopy (RGB JPEG + 0/255 lesion PNG, with ``*_superpixels.png`` and metadata CSVs).
* ``refuge``: REFUGE fundus photos (JPEG + BMP masks 255 background / 128 disc rim / 0 cup).
* ``folder``: a generic ``images/`` + ``masks/`` folder (class indices 0/1/2) with ``splits.json``, as PNG or
  as small NIfTI volumes.
* ``nifti``: an unlabelled tree of 3D MR or CT scans whose first and last 3 slices are background.

Example:
    >>> synthesize("isic", "data/isic2017", n=16, seed=0)
    {'train': 16, 'val': 4, 'test': 4}
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

from decon_med.errors import DeconError
from decon_med.folders import SYNTH_MARKER, OwnedFolder, atomic_write, record_written
from decon_med.folders import make_folder as _mkdir

SYNTH_KINDS: tuple[str, ...] = ("isic", "refuge", "folder", "nifti", "textures", "anatomy")

__all__ = ["SYNTH_KINDS", "make_folder", "make_isic", "make_nifti", "make_refuge", "synthesize"]

_ISIC_SPLITS = {
    "train": ("ISIC-2017_Training_Data", "ISIC-2017_Training_Part1_GroundTruth"),
    "val": ("ISIC-2017_Validation_Data", "ISIC-2017_Validation_Part1_GroundTruth"),
    "test": ("ISIC-2017_Test_v2_Data", "ISIC-2017_Test_v2_Part1_GroundTruth"),
}

# REFUGE mask grey values.
_REFUGE_BACKGROUND, _REFUGE_DISC, _REFUGE_CUP = 255, 128, 0


# -- shared helpers -------------------------------------------------------------------------------------------
def _prepare_out(out: str | Path, overwrite: bool) -> Path:
    """Create ``out`` and mark it; a non-empty folder is an error unless ``overwrite``.

    ``overwrite`` removes only what a generator writes, and refuses (with a :class:`DeconError` listing them) a
    folder holding anything else, the current folder or a parent of it, the home folder and ``/``.
    """
    out = Path(out)
    owned = OwnedFolder(out, SYNTH_MARKER)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if not owned.is_empty():
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass overwrite=True to replace it")
        if not owned.is_marked():
            raise DeconError(
                f"{out}: folder is not empty and holds no synthetic dataset ({owned.describe_foreign()}); "
                "choose another folder"
            )
        owned.check_no_collisions()
        owned.clear()
    owned.create()
    return out


def _save_image(array: np.ndarray, mode: str, path: Path, **params: Any) -> None:
    """Write an image (format from the file suffix) atomically, recorded in the folder's manifest."""
    fmt = Image.registered_extensions()[path.suffix.lower()]
    atomic_write(path, lambda f: Image.fromarray(array, mode).save(f, fmt, **params))


def _held_out_size(n: int) -> int:
    """Size of the val and test splits of the ISIC and REFUGE generators."""
    return max(2, n // 4)


def _check_n(n: int, minimum: int = 1) -> None:
    if n < minimum:
        raise ValueError(f"n must be at least {minimum}, got {n}")


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates of an ``(h, w)`` image, as float32."""
    yy, xx = np.mgrid[0:h, 0:w]
    return yy.astype(np.float32), xx.astype(np.float32)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise of roughly unit amplitude: a ``cells``-wide random grid resized bicubically."""
    h, w = shape
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)


def _ellipse(
    yy: np.ndarray, xx: np.ndarray, center: tuple[float, float], axes: tuple[float, float], angle: float = 0.0
) -> np.ndarray:
    """Squared normalised radius of a rotated ellipse (``< 1`` inside); ``axes`` = (rows, columns) semi-axes."""
    dy, dx = yy - center[0], xx - center[1]
    cos, sin = np.cos(angle), np.sin(angle)
    u = dy * cos - dx * sin
    v = dy * sin + dx * cos
    return (u / axes[0]) ** 2 + (v / axes[1]) ** 2


def _irregular_blob(
    rng: np.random.Generator,
    yy: np.ndarray,
    xx: np.ndarray,
    center: tuple[float, float],
    radius: float,
    roughness: float = 0.15,
    harmonics: int = 4,
) -> np.ndarray:
    """Boolean blob whose radius is modulated by a few random Fourier harmonics of the polar angle."""
    dy, dx = yy - center[0], xx - center[1]
    aspect = rng.uniform(0.75, 1.0)
    angle = rng.uniform(0, np.pi)
    cos, sin = np.cos(angle), np.sin(angle)
    u = (dy * cos - dx * sin) / aspect
    v = dy * sin + dx * cos
    theta = np.arctan2(u, v)
    scale = np.ones_like(theta)
    for k in range(2, 2 + harmonics):
        amplitude = rng.uniform(0, roughness) / np.sqrt(k - 1)
        scale += amplitude * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(u, v) <= radius * scale


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _blend(base: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``base * (1 - alpha) + colour * alpha`` with a per-pixel ``alpha`` of shape (H, W)."""
    a = alpha[..., None]
    return base * (1.0 - a) + colour * a


def _save_nifti(data: np.ndarray, affine: np.ndarray, path: Path, dtype: type) -> None:
    """Write a volume with ``affine`` stored in both the sform and the qform (code 1, scanner)."""
    image = nib.Nifti1Image(data.astype(dtype), affine)
    image.set_data_dtype(dtype)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    _mkdir(path.parent)
    record_written(path)
    nib.save(image, str(path))


def _affine(spacing: tuple[float, float, float], shape: tuple[int, int, int]) -> np.ndarray:
    """Diagonal affine with ``spacing`` (mm) and the volume centred on the scanner origin."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-(s * (n - 1)) / 2 for s, n in zip(spacing, shape, strict=True)]
    return affine


# -- ISIC 2017 -------------------------------------------------------------------------------------------------
def _skin(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Textured skin: per-image tone, low-frequency shading, pores, fine noise and a mild vignette."""
    tone = rng.uniform(0, 1)
    light, dark = np.array([236, 198, 176]), np.array([188, 136, 106])
    base = (light * (1 - tone) + dark * tone + rng.uniform(-8, 8, 3)).astype(np.float32)
    shading = 1.0 + 0.06 * _smooth_noise(rng, (h, w), 4)
    yy, xx = _grid(h, w)
    r = np.hypot((yy - h / 2) / (h / 2), (xx - w / 2) / (w / 2)) / np.sqrt(2)
    vignette = 1.0 - 0.25 * np.clip((r - 0.75) / 0.25, 0, 1)
    pores = gaussian_filter((rng.random((h, w)) < 0.01).astype(np.float32), 0.7)
    skin = base * (shading * vignette * (1.0 - 0.6 * pores))[..., None]
    return skin + rng.normal(0, 4, (h, w, 3)).astype(np.float32)


def _lesion(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """An irregular brown lesion: (its RGB colour field, its boolean mask)."""
    yy, xx = _grid(h, w)
    center = (h / 2 + rng.uniform(-0.12, 0.12) * h, w / 2 + rng.uniform(-0.12, 0.12) * w)
    radius = rng.uniform(0.16, 0.28) * min(h, w)
    mask = _irregular_blob(rng, yy, xx, center, radius)
    brown = np.array([128, 82, 58]) * rng.uniform(0.7, 1.05) + rng.uniform(-6, 6, 3)
    core = np.exp(-((yy - center[0]) ** 2 + (xx - center[1]) ** 2) / (2 * (0.6 * radius) ** 2))
    blotches = _smooth_noise(rng, (h, w), 7)
    shade = (1.0 - 0.35 * core) * (1.0 + 0.12 * blotches)
    return brown.astype(np.float32) * shade[..., None], mask


def _draw_hairs(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Alpha map (H, W) of 0-3 thin dark hairs drawn as quadratic Bezier curves."""
    layer = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(layer)
    t = np.linspace(0, 1, 24)[:, None]
    for _ in range(rng.integers(0, 4)):
        p0, p1, p2 = (rng.uniform(0, 1, 2) * [w, h] for _ in range(3))
        points = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        draw.line([tuple(p) for p in points.tolist()], fill=220, width=int(rng.integers(1, 3)))
    return np.asarray(layer, dtype=np.float32) / 255.0


def _isic_image(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One dermoscopy-like RGB uint8 image and its 0/255 lesion mask."""
    h, w = int(rng.integers(96, 129)), int(rng.integers(120, 161))
    skin = _skin(rng, h, w)
    lesion, mask = _lesion(rng, h, w)
    image = _blend(skin, lesion, gaussian_filter(mask.astype(np.float32), 1.0))
    image = _blend(image, np.array([45, 32, 26], dtype=np.float32), _draw_hairs(rng, h, w))
    return _to_uint8(image), np.where(mask, 255, 0).astype(np.uint8)


def _superpixels(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """RGB superpixel index map (index = R + 256 * G), as in the ISIC ``*_superpixels.png`` files."""
    cell = 12
    rows = (np.arange(h)[:, None] + rng.integers(0, cell)) // cell
    cols = (np.arange(w)[None, :] + rng.integers(0, cell)) // cell
    index = rows * (w // cell + 2) + cols
    return np.stack([index % 256, index // 256, np.zeros_like(index)], axis=-1).astype(np.uint8)


def _write_isic_metadata(rng: np.random.Generator, path: Path, ids: list[str]) -> None:
    record_written(path)
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image_id", "age_approximate", "sex"])
        for image_id in ids:
            age = "unknown" if rng.random() < 0.1 else str(5 * int(rng.integers(3, 18)))
            sex = str(rng.choice(["female", "male", "unknown"], p=[0.45, 0.45, 0.1]))
            writer.writerow([image_id, age, sex])


def make_isic(out: str | Path, n: int = 16, seed: int = 0, *, overwrite: bool = False) -> dict[str, int]:
    """Write a synthetic ISIC 2017 lesion-segmentation dataset in the official layout.

    Training has ``n`` images, validation and test ``max(2, n // 4)`` each; ids ``ISIC_%07d`` run on across
    the splits. Every 4th image also gets an ``ISIC_*_superpixels.png`` and each data folder a metadata CSV,
    as in the real archives. Masks are 8-bit PNGs holding 0 and 255.

    Args:
        out: output folder (created if missing).
        n: number of training images.
        seed: random seed; the same seed gives byte-identical files.
        overwrite: replace a non-empty ``out`` instead of raising :class:`FileExistsError`.

    Returns:
        Number of images per split.

    Example:
        >>> make_isic("data/isic2017", n=8)
        {'train': 8, 'val': 2, 'test': 2}
    """
    _check_n(n)
    root = _prepare_out(out, overwrite)
    rng = np.random.default_rng(seed)
    counts = {"train": n, "val": _held_out_size(n), "test": _held_out_size(n)}
    next_id = 0
    for split, (data_name, gt_name) in _ISIC_SPLITS.items():
        data_dir, gt_dir = root / data_name, root / gt_name
        _mkdir(data_dir)
        _mkdir(gt_dir)
        ids = [f"ISIC_{next_id + i:07d}" for i in range(counts[split])]
        next_id += counts[split]
        for index, image_id in enumerate(ids):
            image, mask = _isic_image(rng)
            _save_image(image, "RGB", data_dir / f"{image_id}.jpg", quality=92)
            _save_image(mask, "L", gt_dir / f"{image_id}_segmentation.png")
            if index % 4 == 0:
                superpixels = _superpixels(rng, *mask.shape)
                _save_image(superpixels, "RGB", data_dir / f"{image_id}_superpixels.png")
        _write_isic_metadata(rng, data_dir / f"{data_name}_metadata.csv", ids)
    return counts


# -- REFUGE ----------------------------------------------------------------------------------------------------
def _vessel_alpha(
    rng: np.random.Generator, size: int, origin: tuple[float, float], field: float
) -> np.ndarray:
    """Alpha map of a few branching vessels leaving the optic disc, drawn as random-walk polylines."""
    layer = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(layer)
    step = size / 22
    # (start x, start y, heading, width, steps)
    pending = [
        (origin[1], origin[0], heading + rng.normal(0, 0.2), 3, 11)
        for heading in (-2.4, -0.8, 0.8, 2.4, rng.uniform(-np.pi, np.pi))
    ]
    while pending:
        x, y, heading, width, steps = pending.pop()
        for k in range(steps):
            heading += rng.normal(0, 0.25)
            nx, ny = x + step * np.cos(heading), y + step * np.sin(heading)
            draw.line([(x, y), (nx, ny)], fill=255, width=width)
            if width > 1 and k > 1 and rng.random() < 0.18:
                pending.append((nx, ny, heading + rng.choice([-0.7, 0.7]), width - 1, steps - k - 1))
            x, y = nx, ny
            if np.hypot(x - size / 2, y - size / 2) > field:
                break
    return gaussian_filter(np.asarray(layer, dtype=np.float32) / 255.0, 0.6)


def _fundus(rng: np.random.Generator, size: int, glaucoma: bool) -> tuple[np.ndarray, np.ndarray]:
    """One fundus-like RGB uint8 image and its REFUGE mask (255 background, 128 disc rim, 0 cup)."""
    yy, xx = _grid(size, size)
    c = (size - 1) / 2
    field = 0.47 * size
    r = np.hypot(yy - c, xx - c) / field
    side = rng.choice([-1.0, 1.0])

    retina = np.array([196, 84, 38]) * rng.uniform(0.85, 1.1) + rng.uniform(-10, 10, 3)
    shade = (1.0 - 0.45 * r**2) * (1.0 + 0.05 * _smooth_noise(rng, (size, size), 5))
    macula = (c + rng.uniform(-0.04, 0.04) * size, c - side * 0.08 * size)
    shade *= 1.0 - 0.3 * np.exp(-((yy - macula[0]) ** 2 + (xx - macula[1]) ** 2) / (2 * (0.07 * size) ** 2))
    image = retina.astype(np.float32) * shade[..., None]

    disc_center = (c + rng.uniform(-0.05, 0.05) * size, c + side * rng.uniform(0.16, 0.22) * size)
    disc_axes = (rng.uniform(0.10, 0.12) * size, rng.uniform(0.09, 0.11) * size)
    ratio = rng.uniform(0.6, 0.8) if glaucoma else rng.uniform(0.3, 0.5)
    shift = (1 - ratio) * 0.4 * min(disc_axes)
    cup_center = (disc_center[0] + rng.uniform(-0.5, 0.5) * shift, disc_center[1] - side * shift)
    disc = _ellipse(yy, xx, disc_center, disc_axes, rng.uniform(-0.3, 0.3)) < 1
    cup = (_ellipse(yy, xx, cup_center, (ratio * disc_axes[0], ratio * disc_axes[1])) < 1) & disc

    image = _blend(image, np.array([246, 196, 118], dtype=np.float32), gaussian_filter(disc * 0.9, 1.2))
    image = _blend(image, np.array([255, 238, 190], dtype=np.float32), gaussian_filter(cup * 0.85, 1.0))
    vessels = _vessel_alpha(rng, size, disc_center, field)
    image = _blend(image, np.array([122, 26, 18], dtype=np.float32), 0.75 * vessels)
    image += rng.normal(0, 3, image.shape).astype(np.float32)
    image *= gaussian_filter((r <= 1).astype(np.float32), 0.8)[..., None]

    mask = np.full((size, size), _REFUGE_BACKGROUND, dtype=np.uint8)
    mask[disc] = _REFUGE_DISC
    mask[cup] = _REFUGE_CUP
    return _to_uint8(image), mask


def _save_refuge(image: np.ndarray, mask: np.ndarray, image_path: Path, mask_path: Path) -> None:
    _mkdir(image_path.parent)
    _mkdir(mask_path.parent)
    _save_image(image, "RGB", image_path, quality=92)
    _save_image(mask, "L", mask_path)


def make_refuge(out: str | Path, n: int = 16, seed: int = 0, *, overwrite: bool = False) -> dict[str, int]:
    """Write a synthetic REFUGE optic disc / cup dataset in the official layout.

    Training has ``n`` images of 128x128 (``max(1, round(n / 10))`` glaucoma cases ``gNNNN``, the others
    ``nNNNN``), validation ``VNNNN`` and test ``TNNNN`` have ``max(2, n // 4)`` images of 112x112 each; test
    masks sit in ``G/`` or ``N/`` by diagnosis. Masks are 8-bit BMPs: 255 background, 128 disc rim, 0 cup.

    Args:
        out: output folder (created if missing).
        n: number of training images.
        seed: random seed; the same seed gives byte-identical files.
        overwrite: replace a non-empty ``out`` instead of raising :class:`FileExistsError`.

    Returns:
        Number of images per split.

    Example:
        >>> make_refuge("data/refuge", n=8)
        {'train': 8, 'val': 2, 'test': 2}
    """
    _check_n(n)
    root = _prepare_out(out, overwrite)
    rng = np.random.default_rng(seed)
    held_out = _held_out_size(n)

    n_glaucoma = min(n, max(1, round(n / 10)))
    train = [("Glaucoma", f"g{i + 1:04d}", True) for i in range(n_glaucoma)]
    train += [("Non-Glaucoma", f"n{i + 1:04d}", False) for i in range(n - n_glaucoma)]
    for group, name, glaucoma in train:
        image, mask = _fundus(rng, 128, glaucoma)
        _save_refuge(
            image,
            mask,
            root / "Training400" / group / f"{name}.jpg",
            root / "Annotation-Training400" / "Disc_Cup_Masks" / group / f"{name}.bmp",
        )

    for i in range(held_out):
        image, mask = _fundus(rng, 112, glaucoma=bool(rng.random() < 0.1))
        _save_refuge(
            image,
            mask,
            root / "REFUGE-Validation400" / f"V{i + 1:04d}.jpg",
            root / "REFUGE-Validation400-GT" / "Disc_Cup_Masks" / f"V{i + 1:04d}.bmp",
        )

    test_glaucoma = set(rng.choice(held_out, size=max(1, round(held_out / 10)), replace=False).tolist())
    for i in range(held_out):
        glaucoma = i in test_glaucoma
        image, mask = _fundus(rng, 112, glaucoma)
        _save_refuge(
            image,
            mask,
            root / "Test400" / f"T{i + 1:04d}.jpg",
            root / "REFUGE-Test-GT" / "Disc_Cup_Masks" / ("G" if glaucoma else "N") / f"T{i + 1:04d}.bmp",
        )
    return {"train": n, "val": held_out, "test": held_out}


# -- generic labelled folder -----------------------------------------------------------------------------------
def _organ_slice(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A grey textured RGB uint8 image with an organ ellipse (class 1) holding a darker lesion (class 2)."""
    h, w = int(rng.integers(96, 129)), int(rng.integers(96, 129))
    yy, xx = _grid(h, w)
    center = (h / 2 + rng.uniform(-0.08, 0.08) * h, w / 2 + rng.uniform(-0.08, 0.08) * w)
    axes = (rng.uniform(0.25, 0.35) * h, rng.uniform(0.25, 0.35) * w)
    organ = _ellipse(yy, xx, center, axes, rng.uniform(0, np.pi)) < 1
    spot = (center[0] + rng.uniform(-0.35, 0.35) * axes[0], center[1] + rng.uniform(-0.35, 0.35) * axes[1])
    lesion = _irregular_blob(rng, yy, xx, spot, rng.uniform(0.2, 0.3) * min(axes)) & organ

    grey = 80 + 12 * _smooth_noise(rng, (h, w), 5)
    grey = np.where(organ, 165 + 8 * _smooth_noise(rng, (h, w), 8), grey)
    grey = np.where(lesion, 105.0, grey)
    grey = gaussian_filter(grey, 0.8) + rng.normal(0, 5, (h, w))
    tint = np.array([1.0, 0.97, 0.94], dtype=np.float32) * rng.uniform(0.97, 1.03, 3)
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[organ] = 1
    mask[lesion] = 2
    return _to_uint8(grey[..., None] * tint), mask


def _organ_volume(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A 48x48x12 float32 volume with an organ ellipsoid (class 1) holding a darker lesion (class 2)."""
    shape = (48, 48, 12)
    xx, yy, zz = np.mgrid[0 : shape[0], 0 : shape[1], 0 : shape[2]].astype(np.float32)
    center = np.array([23.5, 23.5, 5.5]) + rng.uniform(-2, 2, 3) * [1, 1, 0.25]
    axes = rng.uniform([13, 11, 4.5], [17, 15, 5.5])
    organ = ((xx - center[0]) / axes[0]) ** 2 + ((yy - center[1]) / axes[1]) ** 2 + (
        (zz - center[2]) / axes[2]
    ) ** 2 < 1
    spot = center + rng.uniform(-0.35, 0.35, 3) * axes
    radii = rng.uniform([3, 3, 1.5], [5, 5, 2.5])
    lesion = ((xx - spot[0]) / radii[0]) ** 2 + ((yy - spot[1]) / radii[1]) ** 2 + (
        (zz - spot[2]) / radii[2]
    ) ** 2 < 1
    lesion &= organ

    image = np.full(shape, 100.0, dtype=np.float32)
    image[organ] = 400.0
    image[lesion] = 250.0
    image = gaussian_filter(image, 0.7) + rng.normal(0, 12, shape)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[organ] = 1
    mask[lesion] = 2
    return image.astype(np.float32), mask


def _split_ids(rng: np.random.Generator, ids: list[str]) -> dict[str, list[str]]:
    """Random ~60/20/20 split with at least one id per split, each list sorted."""
    n_held = max(1, round(0.2 * len(ids)))
    order = [ids[i] for i in rng.permutation(len(ids))]
    return {
        "train": sorted(order[2 * n_held :]),
        "val": sorted(order[:n_held]),
        "test": sorted(order[n_held : 2 * n_held]),
    }


def make_folder(
    out: str | Path, n: int = 16, seed: int = 0, fmt: str = "png", *, overwrite: bool = False
) -> dict[str, int]:
    """Write a generic labelled folder: ``images/``, ``masks/`` (class indices) and ``splits.json``.

    Masks hold 0 background, 1 organ and 2 lesion. ``fmt="png"`` writes RGB PNG images (96-128 px a side) and
    8-bit PNG masks; ``fmt="nifti"`` writes 48x48x12 float32 volumes and uint8 masks (``.nii.gz``) with a
    0.9x0.9x2.5 mm affine. ``splits.json`` splits the ``case_NNN`` ids about 60/20/20.

    Args:
        out: output folder (created if missing).
        n: total number of images (at least 3).
        seed: random seed; the same seed gives byte-identical files.
        fmt: ``"png"`` or ``"nifti"``.
        overwrite: replace a non-empty ``out`` instead of raising :class:`FileExistsError`.

    Returns:
        Number of images per split.

    Example:
        >>> make_folder("data/organs", n=10, fmt="nifti")
        {'train': 6, 'val': 2, 'test': 2}
    """
    if fmt not in ("png", "nifti"):
        raise ValueError(f"fmt must be 'png' or 'nifti', got {fmt!r}")
    _check_n(n, minimum=3)
    root = _prepare_out(out, overwrite)
    _mkdir(root / "images")
    _mkdir(root / "masks")
    rng = np.random.default_rng(seed)
    ids = [f"case_{i:03d}" for i in range(n)]
    affine = _affine((0.9, 0.9, 2.5), (48, 48, 12))
    affine[:3, 3] += [10.0, -5.0, 20.0]
    for case in ids:
        if fmt == "png":
            image, mask = _organ_slice(rng)
            _save_image(image, "RGB", root / "images" / f"{case}.png")
            _save_image(mask, "L", root / "masks" / f"{case}.png")
        else:
            volume, mask = _organ_volume(rng)
            _save_nifti(volume, affine, root / "images" / f"{case}.nii.gz", np.float32)
            _save_nifti(mask, affine, root / "masks" / f"{case}.nii.gz", np.uint8)
    splits = _split_ids(rng, ids)
    atomic_write(root / "splits.json", json.dumps(splits, indent=1) + "\n")
    return {split: len(members) for split, members in splits.items()}


# -- unlabelled NIfTI scans ------------------------------------------------------------------------------------
_SCAN_SHAPE = (64, 64, 20)
_EMPTY_SLICES = 3


def _body_radius(rng: np.random.Generator, axes: tuple[float, float]) -> tuple[np.ndarray, ...]:
    """Normalised radius of a body that fills slices 3 .. Z-4 (``< 1`` inside), plus in-plane coordinates.

    The axial profile is a fourth power so the cross-sections stay large until close to the ends.
    """
    nx, ny, nz = _SCAN_SHAPE
    xx, yy, zz = np.mgrid[0:nx, 0:ny, 0:nz].astype(np.float32)
    cx, cy = (nx - 1) / 2 + rng.uniform(-2, 2), (ny - 1) / 2 + rng.uniform(-2, 2)
    cz, half = (nz - 1) / 2, (nz - 1) / 2 - _EMPTY_SLICES + 0.5
    u, v = (xx - cx) / axes[0], (yy - cy) / axes[1]
    rho = np.sqrt(u**2 + v**2 + ((zz - cz) / half) ** 4)
    return rho, u, v, zz


def _in_plane(
    u: np.ndarray, v: np.ndarray, center: tuple[float, float], radius: tuple[float, float]
) -> np.ndarray:
    """In-plane ellipse (all slices) in body-normalised coordinates."""
    return ((u - center[0]) / radius[0]) ** 2 + ((v - center[1]) / radius[1]) ** 2 < 1


def _mr_head(rng: np.random.Generator) -> np.ndarray:
    """T1-like head, 0..~1000 with a bias field, a few bright outliers and ~0 background."""
    rho, u, v, zz = _body_radius(rng, (rng.uniform(26, 29), rng.uniform(22, 26)))
    folds = 1.0 + 0.05 * np.sin(7 * np.arctan2(v, u) + rng.uniform(0, 2 * np.pi))
    head = rho < 1
    volume = np.zeros(_SCAN_SHAPE, dtype=np.float32)
    volume[head] = 700.0  # scalp fat
    volume[head & (rho < 0.92)] = 80.0  # skull
    volume[head & (rho < 0.85)] = 430.0  # grey matter
    volume[head & (rho * folds < 0.62)] = 640.0  # white matter
    for side in (-1, 1):
        ventricle = _in_plane(u, v, (side * 0.12, rng.uniform(-0.05, 0.05)), (0.08, 0.3)) & (rho < 0.5)
        volume[ventricle] = 140.0  # CSF

    nx, ny, nz = _SCAN_SHAPE
    gx, gy, gz = rng.uniform(-0.15, 0.15, 3)
    bias = 1.0 + gx * u + gy * v + gz * (zz - nz / 2) / nz
    volume = gaussian_filter(volume * bias, 0.6) + rng.normal(0, 12, _SCAN_SHAPE) * head
    inside = np.flatnonzero(head & (rho < 0.85))
    outliers = rng.choice(inside, size=12, replace=False)
    volume.flat[outliers] = rng.uniform(2500, 4000, outliers.size)
    volume = np.where(head, np.maximum(volume, 0), np.abs(rng.normal(0, 2, _SCAN_SHAPE)))
    return _blank_ends(volume, lambda shape: np.abs(rng.normal(0, 2, shape)))


def _ct_thorax(rng: np.random.Generator) -> np.ndarray:
    """Thorax-like CT in HU: air -1000, fat -100, soft tissue ~40, lungs ~-850, bone ~700."""
    rho, u, v, _ = _body_radius(rng, (rng.uniform(27, 30), rng.uniform(19, 23)))
    body = rho < 1
    volume = np.full(_SCAN_SHAPE, -1000.0, dtype=np.float32)
    volume[body] = -100.0  # subcutaneous fat
    volume[body & (rho < 0.9)] = 40.0  # soft tissue
    for side in (-1, 1):
        lung = _in_plane(u, v, (side * 0.42, -0.05), (0.3, 0.55)) & (rho < 0.85)
        volume[lung] = -850.0
    spine = _in_plane(u, v, (0.0, 0.62), (0.12, 0.17)) & body
    volume[spine] = 700.0
    volume[_in_plane(u, v, (0.0, 0.62), (0.06, 0.09)) & body] = 250.0  # marrow
    for angle in np.linspace(0, 2 * np.pi, 12, endpoint=False):
        if abs(angle - np.pi / 2) > 0.5:  # no rib where the spine is
            rib = _in_plane(u, v, (0.84 * np.cos(angle), 0.84 * np.sin(angle)), (0.05, 0.06)) & body
            volume[rib] = 700.0
    volume = gaussian_filter(volume, 0.5) + rng.normal(0, 10, _SCAN_SHAPE)
    volume = _blank_ends(volume, lambda shape: -1000.0 + rng.normal(0, 10, shape))
    return np.clip(np.round(volume), -1024, 3071)


def _blank_ends(volume: np.ndarray, background: Callable[[tuple[int, ...]], np.ndarray]) -> np.ndarray:
    """Replace the first and last ``_EMPTY_SLICES`` slices along axis 2 with pure background."""
    shape = (*volume.shape[:2], _EMPTY_SLICES)
    volume[:, :, :_EMPTY_SLICES] = background(shape)
    volume[:, :, -_EMPTY_SLICES:] = background(shape)
    return volume


def make_nifti(
    out: str | Path, n: int = 4, seed: int = 0, modality: str = "mr", *, overwrite: bool = False
) -> dict[str, int]:
    """Write an unlabelled tree of 64x64x20 NIfTI scans, for pre-training.

    ``modality="mr"`` writes ``sub-NNN/anat/sub-NNN_T1w.nii.gz`` (float32 head, ~0..1000 with a few bright
    outliers, 0.8x0.8x3.0 mm); ``"ct"`` writes ``patient_NNN/ct.nii.gz`` (int16 HU thorax, 0.7x0.7x2.5 mm).
    The affine sits in both sform and qform. The first and last 3 slices along axis 2 are pure background.

    Args:
        out: output folder (created if missing).
        n: number of volumes.
        seed: random seed; the same seed gives byte-identical files.
        modality: ``"mr"`` or ``"ct"``.
        overwrite: replace a non-empty ``out`` instead of raising :class:`FileExistsError`.

    Returns:
        ``{"volumes": n}``.

    Example:
        >>> make_nifti("data/scans", n=2, modality="ct")
        {'volumes': 2}
    """
    if modality not in ("mr", "ct"):
        raise ValueError(f"modality must be 'mr' or 'ct', got {modality!r}")
    _check_n(n)
    root = _prepare_out(out, overwrite)
    rng = np.random.default_rng(seed)
    for i in range(1, n + 1):
        if modality == "mr":
            affine = _affine((0.8, 0.8, 3.0), _SCAN_SHAPE)
            affine[:3, 3] += rng.uniform(-5, 5, 3).round(2)
            _save_nifti(
                _mr_head(rng), affine, root / f"sub-{i:03d}" / "anat" / f"sub-{i:03d}_T1w.nii.gz", np.float32
            )
        else:
            affine = _affine((0.7, 0.7, 2.5), _SCAN_SHAPE)
            affine[:3, 3] += rng.uniform(-5, 5, 3).round(2)
            _save_nifti(_ct_thorax(rng), affine, root / f"patient_{i:03d}" / "ct.nii.gz", np.int16)
    return {"volumes": n}


# -- nnU-Net raw layout ----------------------------------------------------------------------------------------
def make_nnunet(
    out: str | Path,
    n: int = 6,
    seed: int = 0,
    channels: int = 1,
    n_test: int = 2,
    *,
    overwrite: bool = False,
    channel_names: Sequence[str] | None = None,
    test_labels: bool = True,
) -> dict[str, int]:
    """Write a small labelled nnU-Net raw dataset of MR-like volumes (with a datalist JSON beside it).

    ``imagesTr/case_NNN_XXXX.nii.gz`` (one file per channel; channel ``c`` is the organ volume times ``1 + c``),
    ``labelsTr/case_NNN.nii.gz`` (0 background, 1 organ, 2 lesion), ``imagesTs/`` + ``labelsTs/`` with ``n_test``
    labelled test cases, ``dataset.json`` in nnU-Net's format and ``datalist.json`` listing the same files as an
    MSD / MONAI datalist (``training`` and ``test`` with labels). Volumes are stored in LPS voxel order
    (0.9 x 0.9 x 2.0 mm) so readers must reorient them.

    Args:
        out: the ``DatasetXXX_Name`` folder (created if missing).
        n: training cases.
        seed: random seed; the same seed gives byte-identical files.
        channels: channel files per case (named ``MR0``, ``MR1``, ... in ``channel_names``).
        n_test: test cases.
        overwrite: replace a non-empty ``out`` instead of raising :class:`FileExistsError`.
        channel_names: the ``channel_names`` of ``dataset.json`` instead (their number of channels); a ``CT``
            channel holds the volume in HU (air -1000 around a body of 20..95 HU), other channels as above.
        test_labels: write ``labelsTs/`` (``False``: ``imagesTs/`` unlabelled).

    Returns:
        ``{"train": n, "test": n_test}``.

    Example:
        >>> make_nnunet("nnUNet_raw/Dataset001_Organ", n=4, channel_names=["CT", "T2"])
        {'train': 4, 'test': 2}
    """
    _check_n(n)
    names = [f"MR{c}" for c in range(channels)] if channel_names is None else [str(c) for c in channel_names]
    root = _prepare_out(out, overwrite)
    rng = np.random.default_rng(seed)
    affine = np.diag([-0.9, -0.9, 2.0, 1.0])
    affine[:3, 3] = (20.0, 20.0, -10.0)
    datalist: dict[str, list] = {"training": [], "test": []}
    for split, count, folder in (("training", n, "Tr"), ("test", n_test, "Ts")):
        for i in range(count):
            case = f"case_{i:03d}" if folder == "Tr" else f"test_{i:03d}"
            volume, mask = _organ_volume(rng)
            images = []
            for c, name in enumerate(names):
                rel = f"images{folder}/{case}_{c:04d}.nii.gz"
                values = _ct_in_hu(volume) if name.upper() == "CT" else volume * (1 + c)
                _save_nifti(values, affine, root / rel, np.float32)
                images.append(rel)
            entry: dict[str, Any] = {"image": images if len(names) > 1 else images[0]}
            if folder == "Tr" or test_labels:
                entry["label"] = f"labels{folder}/{case}.nii.gz"
                _save_nifti(mask, affine, root / entry["label"], np.uint8)
            datalist[split].append(entry)
    meta = {
        "channel_names": {str(c): name for c, name in enumerate(names)},
        "labels": {"background": 0, "organ": 1, "lesion": 2},
        "numTraining": n,
        "file_ending": ".nii.gz",
    }
    atomic_write(root / "dataset.json", json.dumps(meta, indent=1) + "\n")
    msd = {"labels": {"0": "background", "1": "organ", "2": "lesion"}, **datalist}
    atomic_write(root / "datalist.json", json.dumps(msd, indent=1) + "\n")
    return {"train": n, "test": n_test}


def _ct_in_hu(volume: np.ndarray) -> np.ndarray:
    """An organ volume (background 100, organ 400, lesion 250) as CT in HU: body 20..95 HU inside an elliptic
    cylinder, air (-1000) outside it."""
    x, y = np.mgrid[0 : volume.shape[0], 0 : volume.shape[1]].astype(np.float32)
    body = ((x - 23.5) / 22.0) ** 2 + ((y - 23.5) / 21.0) ** 2 < 1
    return np.where(body[..., None], (volume - 100.0) * 0.25 + 20.0, -1000.0).astype(np.float32)


# -- dispatch --------------------------------------------------------------------------------------------------
def synthesize(
    kind: str, out: str | Path, n: int, seed: int = 0, *, overwrite: bool = False
) -> dict[str, int]:
    """Write one synthetic dataset of ``kind`` (see :data:`SYNTH_KINDS`) with the generator's defaults.

    ``folder`` writes PNGs and ``nifti`` MR scans; call :func:`make_folder` / :func:`make_nifti` directly for
    the other formats.

    Args:
        kind: ``"isic"``, ``"refuge"``, ``"folder"``, ``"nifti"``, ``"textures"`` or ``"anatomy"``.
        out: output folder (created if missing).
        n: training images (isic, refuge), total images (folder), volumes (nifti) or unlabelled images
            (textures, beside 48 labelled ones; see :mod:`decon_med.data.synthetic_textures`) or unlabelled
            slices (anatomy, beside 48 labelled slices of other volumes; see
            :mod:`decon_med.data.synthetic_anatomy`).
        seed: random seed.
        overwrite: replace a non-empty ``out`` instead of raising :class:`FileExistsError`.

    Returns:
        The generator's counts, e.g. images per split.

    Raises:
        ValueError: unknown ``kind``.

    Example:
        >>> synthesize("refuge", "data/refuge", n=8)
        {'train': 8, 'val': 2, 'test': 2}
    """
    from decon_med.data.synthetic_anatomy import make_anatomy  # both use this module's folder helpers
    from decon_med.data.synthetic_textures import make_textures

    def textures(out: str | Path, n: int, seed: int, overwrite: bool) -> dict[str, int]:
        return make_textures(out, n_unlabeled=n, n_labeled=48, seed=seed, overwrite=overwrite)

    def anatomy(out: str | Path, n: int, seed: int, overwrite: bool) -> dict[str, int]:
        return make_anatomy(out, n_unlabeled=n, n_labeled=48, seed=seed, overwrite=overwrite)

    makers: dict[str, Callable[..., dict[str, int]]] = {
        "isic": make_isic,
        "refuge": make_refuge,
        "folder": make_folder,
        "nifti": make_nifti,
        "textures": textures,
        "anatomy": anatomy,
    }
    if kind not in makers:
        raise ValueError(f"unknown synthetic dataset kind {kind!r}; choose one of {', '.join(SYNTH_KINDS)}")
    return makers[kind](out, n=n, seed=seed, overwrite=overwrite)
