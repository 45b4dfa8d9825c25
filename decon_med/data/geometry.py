"""Volume geometry: canonical (RAS) orientation, square in-plane pixels, and the exact way back.

A stored volume ``(X, Y, Z)`` with its affine is reoriented so that voxel axes 0, 1, 2 run towards Right, Anterior
and Superior (RAS+, the orientation MONAI's ``Orientation(axcodes="RAS")`` produces). A volume stored in any other
orientation (flipped, permuted) therefore gives the same slices. Slicing along an axis then leaves two in-plane
axes whose voxel spacings may differ (e.g. 0.8 mm x 2.5 mm); each slice is resampled to square pixels of side
``spacing`` (default: the finer of the two in-plane spacings), so it keeps its true aspect.

The way back inverts exactly these steps: a predicted label slice is resampled (nearest neighbour) to the canonical
in-plane shape, the slices are stacked, and the stack is reoriented to the stored voxel order, where it lines up
voxel for voxel with the original file (same shape, same affine).

Why nibabel's orientation utilities and not MONAI's ``Orientation`` transform: both give the same array (the tests
check it), but MONAI's works on channel-first ``MetaTensor`` objects and copies the data into a tensor, while
nibabel's ``apply_orientation`` is a flip / transpose view of the decoded numpy array, with an explicit, exactly
invertible orientation record. Volumes are read with nibabel directly for the same reason (MONAI's ``LoadImage``
read a 512 x 512 x 160 CT in 2.0 s against 0.8 s for nibabel).

Example:
    >>> canonical, geometry = to_canonical(volume, affine)            # RAS voxel order
    >>> size = plane_size(geometry, axis=2)                            # square-pixel (H, W) of axial slices
    >>> back = from_canonical(canonical, geometry)                     # == volume, in stored order
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from nibabel import orientations

#: Orientations understood by :func:`to_canonical`: ``RAS`` reorients, ``none`` keeps the stored voxel order.
ORIENTATIONS = ("RAS", "none")

__all__ = [
    "ORIENTATIONS",
    "Geometry",
    "canonical_affine",
    "from_canonical",
    "plane_size",
    "resample_plane",
    "to_canonical",
    "voxel_spacing",
]


@dataclass(frozen=True)
class Geometry:
    """How a stored volume maps to its canonical array.

    Attributes:
        shape: stored spatial shape ``(X, Y, Z)``.
        affine: stored 4x4 affine.
        ornt: nibabel orientation transform from stored to canonical voxel axes (``(3, 2)``: target axis, flip).
        canonical_shape: spatial shape after reorientation.
        spacing: voxel spacing in mm along the canonical axes.

    Example:
        >>> _, geometry = to_canonical(np.zeros((4, 5, 6)), np.diag([-1.0, 1.0, 2.0, 1.0]))
        >>> geometry.canonical_shape, geometry.spacing
        ((4, 5, 6), (1.0, 1.0, 2.0))
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    ornt: np.ndarray
    canonical_shape: tuple[int, int, int]
    spacing: tuple[float, float, float]


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size along each voxel axis: the lengths of the affine's first three columns.

    Example:
        >>> voxel_spacing(np.diag([0.8, -0.8, 2.5, 1.0]))
        (0.8, 0.8, 2.5)
    """
    zooms = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    return tuple(float(z) if z > 0 else 1.0 for z in zooms)


def to_canonical(
    volume: np.ndarray, affine: np.ndarray, orientation: str = "RAS"
) -> tuple[np.ndarray, Geometry]:
    """Reorient the three spatial axes of ``volume`` (extra trailing axes are carried along) to ``orientation``.

    Args:
        volume: ``(X, Y, Z)`` or ``(X, Y, Z, C)`` array in stored voxel order.
        affine: its 4x4 voxel-to-world affine.
        orientation: ``"RAS"`` or ``"none"`` (keep the stored order; only the spacing is recorded).

    Returns:
        ``(canonical, geometry)``; ``canonical`` is a view of ``volume`` where possible.
    """
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    affine = np.asarray(affine, dtype=np.float64)
    if orientation == "none":
        ornt = np.array([[0, 1], [1, 1], [2, 1]], dtype=np.float64)
    else:
        ornt = orientations.ornt_transform(
            orientations.io_orientation(affine), orientations.axcodes2ornt("RAS")
        )
    canonical = orientations.apply_orientation(volume, ornt)
    spacing = voxel_spacing(affine)
    order = np.argsort(ornt[:, 0].astype(int))  # stored axis that lands on canonical axis 0, 1, 2
    geometry = Geometry(
        shape=tuple(int(s) for s in volume.shape[:3]),
        affine=affine,
        ornt=ornt,
        canonical_shape=tuple(int(s) for s in canonical.shape[:3]),
        spacing=tuple(spacing[i] for i in order),
    )
    return canonical, geometry


def from_canonical(canonical: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Inverse of :func:`to_canonical`: back to the stored voxel order (an exact permutation / flip).

    Example:
        >>> np.array_equal(from_canonical(*to_canonical(volume, affine)), volume)
        True
    """
    if tuple(canonical.shape[:3]) != geometry.canonical_shape:
        raise ValueError(f"shape {canonical.shape[:3]} is not the canonical {geometry.canonical_shape}")
    inverse = np.empty_like(geometry.ornt)
    for stored_axis, (target, flip) in enumerate(geometry.ornt):
        inverse[int(target)] = (stored_axis, flip)
    return np.ascontiguousarray(orientations.apply_orientation(canonical, inverse))


def canonical_affine(geometry: Geometry) -> np.ndarray:
    """The affine of the canonical array (world coordinates unchanged)."""
    return geometry.affine @ orientations.inv_ornt_aff(geometry.ornt, geometry.shape)


def plane_size(geometry: Geometry, axis: int, spacing: float | None = None) -> tuple[int, int]:
    """``(H, W)`` of a slice along canonical ``axis`` resampled to square pixels of side ``spacing`` mm.

    Rows follow the lower remaining axis and columns the higher one. ``spacing=None`` takes the finer in-plane
    spacing, so no direction loses resolution.

    Example:
        >>> plane_size(geometry, axis=0)    # (64, 20) voxels of 0.8 x 2.5 mm -> (64, 63) at 0.8 mm
        (64, 62)
    """
    rows, cols = (a for a in range(3) if a != axis)
    n_r, n_c = geometry.canonical_shape[rows], geometry.canonical_shape[cols]
    s_r, s_c = geometry.spacing[rows], geometry.spacing[cols]
    target = min(s_r, s_c) if spacing is None else float(spacing)
    if target <= 0:
        raise ValueError(f"spacing must be positive, got {spacing}")
    return max(1, int(round(n_r * s_r / target))), max(1, int(round(n_c * s_c / target)))


def resample_plane(image: np.ndarray, size: tuple[int, int], labels: bool = False) -> np.ndarray:
    """Resize a 2D ``(H, W)`` or ``(H, W, C)`` slice to ``size`` = ``(H', W')``.

    Images use linear interpolation (half-pixel centres); labels use exact nearest neighbour, so class values are
    never mixed. The same size is returned unchanged (no copy).
    """
    if tuple(image.shape[:2]) == tuple(size):
        return image
    interp = cv2.INTER_NEAREST_EXACT if labels else cv2.INTER_LINEAR
    source = image.astype(np.int32) if labels and image.dtype.itemsize == 8 else image
    out = cv2.resize(source, (int(size[1]), int(size[0])), interpolation=interp)
    if image.ndim == 3 and out.ndim == 2:
        out = out[:, :, np.newaxis]
    return out.astype(image.dtype, copy=False)
