"""A synthetic volume task that one slice cannot solve: thin tubes crossing the slice plane among look-alike dots.

Each volume (default 64 x 64 x 20 voxels of 1 mm, sliced along axis 2) holds a few straight tubes of 1.2-2 mm
radius (class 1, "vessel") that cross the axial plane obliquely (20-55 degrees from the slice normal), so that in
one axial slice a tube is a small bright ellipse that moves a little from slice to slice. Every slice also holds
as many distractors (class 0): cross-sections of tubes of the same distribution, each kept in that one slice
only. In a single slice a tube's section and a distractor have the same size, shape and brightness; only the neighbouring slices
tell them apart (a tube continues, a distractor does not). A 2D network can therefore at best guess, and a 2.5D
network (``data.context_slices`` >= 1) can separate them: the task measures what context slices add.

Intensities: background 100 with smooth low-frequency shading, tubes and distractors 300, a light blur and
Gaussian noise (SD 20), stored as float32 MR-like volumes with a 1 mm diagonal affine.

The output is the generic labelled folder layout (``data.name: folder``)::

    images/case_000.nii.gz ...     float32 volumes
    masks/case_000.nii.gz ...      uint8: 0 background (distractors included), 1 vessel
    splits.json                    train / val / test ids

Example:
    >>> make_vessels("data/vessels", n_train=6, n_val=2, n_test=6, seed=0)
    {'train': 6, 'val': 2, 'test': 6}
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from decon_med.data.synthetic import _prepare_out, _save_nifti
from decon_med.folders import atomic_write
from decon_med.folders import make_folder as _mkdir

__all__ = ["CLASS_NAMES", "VESSEL_SHAPE", "make_vessels", "vessel_volume"]

#: Voxels of every volume (x, y, z); slices are taken along z.
VESSEL_SHAPE = (64, 64, 20)
#: Class index -> name.
CLASS_NAMES = ("background", "vessel")


def _tube(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, float]:
    """A random oblique line (a point near the volume's centre, a unit direction) and a radius in voxels."""
    tilt, turn = np.deg2rad(rng.uniform(20.0, 55.0)), rng.uniform(0.0, 2 * np.pi)
    direction = np.array([np.sin(tilt) * np.cos(turn), np.sin(tilt) * np.sin(turn), np.cos(tilt)])
    point = np.array([rng.uniform(10, shape[0] - 10), rng.uniform(10, shape[1] - 10), shape[2] / 2])
    return point, direction, float(rng.uniform(1.2, 2.0))


def _distance(grid: np.ndarray, point: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Distance of every voxel centre of ``grid`` (3, X, Y, Z) to the line."""
    offset = grid - point[:, None, None, None]
    along = np.tensordot(direction, offset, axes=1)
    return np.sqrt(np.maximum((offset**2).sum(0) - along**2, 0.0))


def vessel_volume(
    rng: np.random.Generator, shape: tuple[int, int, int] = VESSEL_SHAPE, tubes: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """One float32 volume and its uint8 vessel mask: ``tubes`` tubes, and ``tubes`` single-slice distractors in
    every slice.

    Example:
        >>> volume, mask = vessel_volume(np.random.default_rng(0))
        >>> volume.shape, sorted(np.unique(mask))
        ((64, 64, 20), [0, 1])
    """
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij"))
    vessel = np.zeros(shape, dtype=bool)
    for _ in range(tubes):
        point, direction, radius = _tube(rng, shape)
        vessel |= _distance(grid, point, direction) < radius
    distractor = np.zeros(shape, dtype=bool)
    for z in range(shape[2]):
        for _ in range(tubes):
            point, direction, radius = _tube(rng, shape)
            point[2] = z  # cut through the random in-plane point, as far inside the field as a tube's
            distractor[:, :, z] |= _distance(grid[:, :, :, z : z + 1], point, direction)[:, :, 0] < radius
    distractor &= ~vessel
    shading = gaussian_filter(rng.standard_normal(shape), sigma=(8, 8, 4)) * 60.0
    image = 100.0 + shading + 200.0 * (vessel | distractor)
    image = gaussian_filter(image, sigma=(0.5, 0.5, 0.0)) + rng.normal(0.0, 20.0, shape)
    return image.astype(np.float32), vessel.astype(np.uint8)


def make_vessels(
    out: str | Path,
    n_train: int = 6,
    n_val: int = 2,
    n_test: int = 6,
    seed: int = 0,
    shape: tuple[int, int, int] = VESSEL_SHAPE,
    *,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write the vessel task as a labelled folder (``images/``, ``masks/``, ``splits.json``), see the module.

    Args:
        out: output folder (created if missing).
        n_train, n_val, n_test: volumes per split (each at least 1).
        seed: random seed; the same seed gives the same volumes.
        shape: voxels of each volume; slices are taken along the last axis.
        overwrite: replace a folder this generator wrote instead of raising :class:`FileExistsError`.

    Returns:
        Number of volumes per split.

    Example:
        >>> make_vessels("data/vessels", n_train=4, n_val=1, n_test=2, shape=(48, 48, 12))
        {'train': 4, 'val': 1, 'test': 2}
    """
    counts = {"train": n_train, "val": n_val, "test": n_test}
    if min(counts.values()) < 1:
        raise ValueError(f"every split needs at least one volume, got {counts}")
    root = _prepare_out(out, overwrite)
    _mkdir(root / "images")
    _mkdir(root / "masks")
    rng = np.random.default_rng(seed)
    affine = np.eye(4)
    splits: dict[str, list[str]] = {}
    index = 0
    for split, count in counts.items():
        splits[split] = []
        for _ in range(count):
            case = f"case_{index:03d}"
            volume, mask = vessel_volume(rng, tuple(shape))
            _save_nifti(volume, affine, root / "images" / f"{case}.nii.gz", np.float32)
            _save_nifti(mask, affine, root / "masks" / f"{case}.nii.gz", np.uint8)
            splits[split].append(case)
            index += 1
    atomic_write(root / "splits.json", json.dumps(splits, indent=1) + "\n")
    return counts
