"""NIfTI volumes as 2D slices: reading, intensity normalisation, slice selection and writing back.

A 3D volume ``(X, Y, Z)`` becomes 2D slices along one voxel axis ``a`` (default 2): slice ``k`` is
``vol.take(k, axis=a)``, with no transpose or flip. Its rows follow the lower of the two remaining voxel axes and
its columns the higher one (axis 2 -> ``(X, Y)``, axis 1 -> ``(X, Z)``, axis 0 -> ``(Y, Z)``), so a predicted label
slice goes back to exactly the same voxels with :func:`stack_slices` (or ``out[(slice(None),) * a + (k,)] = pred``).
Slices therefore look as stored on disk, which may be rotated compared with a radiological viewer.

Shapes handled by :func:`read_volume`:

* 2D NIfTI ``(X, Y)`` -> ``(X, Y, 1)``; a volume with a singleton axis is a single slice along that axis,
  whatever the configured axis.
* 4D NIfTI ``(X, Y, Z, T)`` (time series, multi-contrast stacks) -> the first volume ``[..., 0]``.
* Anything else (1D, 5D and more, fewer than two non-singleton axes) is a :class:`DataError`.

Intensities are normalised per volume to [0, 1]: CT by a (level, width) window in HU, every other modality by a
percentile clip computed over the nonzero voxels (see :func:`intensity_range`).

Example:
    >>> opts = SliceOptions(axis=2, modality="mr")
    >>> items = scan_volume("sub-01_T1w.nii.gz", opts)      # one dict per kept slice
    >>> image = load_slice(items[0], opts)                   # (X, Y, 1) float32 in [0, 1]
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from decon_med.errors import DataError

#: NIfTI suffixes, matched case-insensitively; ``.nii.gz`` first so it wins over ``.nii``.
NIFTI_SUFFIXES = (".nii.gz", ".nii")

#: Modalities with their own intensity handling; any other known modality uses the percentile clip.
MODALITIES = ("mr", "ct", "gray", "rgb")

#: Whole decoded volumes kept per process by :func:`load_slice` / :func:`load_label_slice`.
VOLUME_CACHE_SIZE = 4

_AXIS_NAMES = "xyz"

__all__ = [
    "MODALITIES",
    "NIFTI_SUFFIXES",
    "SliceOptions",
    "intensity_range",
    "is_nifti",
    "kept_slices",
    "load_label_slice",
    "load_slice",
    "nifti_stem",
    "normalise_intensity",
    "read_volume",
    "scan_volume",
    "stack_slices",
    "write_volume",
]


# -- file names ------------------------------------------------------------------------------------------------
def is_nifti(path: str | os.PathLike) -> bool:
    """True for a ``.nii`` or ``.nii.gz`` file name (any capitalisation).

    Example:
        >>> is_nifti("scan.NII.GZ"), is_nifti("scan.png")
        (True, False)
    """
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | os.PathLike) -> str:
    """File name without its NIfTI suffix (``.nii.gz`` counts as one suffix); other files lose their last suffix.

    Example:
        >>> nifti_stem("data/sub-01_T1w.nii.gz")
        'sub-01_T1w'
    """
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


# -- options ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SliceOptions:
    """How NIfTI volumes become normalised 2D slices.

    Attributes:
        axis: voxel axis the volume is sliced along (0, 1 or 2).
        modality: ``"ct"`` uses ``ct_window``; ``"mr"``, ``"gray"`` and ``"rgb"`` use ``clip_percentiles``.
        clip_percentiles: (low, high) percentiles of the nonzero voxels mapped to 0 and 1.
        ct_window: (level, width) in HU; ``level - width/2`` maps to 0 and ``level + width/2`` to 1.
        foreground_threshold: a normalised intensity above this counts as foreground.
        min_foreground: slices whose foreground fraction is below this are skipped (0 keeps all).
        channels: 1, or 3 to replicate the grey slice into three channels.

    Example:
        >>> SliceOptions(axis=0, modality="ct", ct_window=(50.0, 350.0), channels=3)
    """

    axis: int = 2
    modality: str = "mr"
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    ct_window: tuple[float, float] = (40.0, 400.0)
    foreground_threshold: float = 0.05
    min_foreground: float = 0.05
    channels: int = 1

    def __post_init__(self) -> None:
        if self.axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {self.axis}")
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        low, high = self.clip_percentiles
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(
                f"clip_percentiles must satisfy 0 <= low < high <= 100, got {self.clip_percentiles}"
            )
        if self.ct_window[1] <= 0:
            raise ValueError(f"ct_window width must be positive, got {self.ct_window}")
        if not 0.0 <= self.min_foreground <= 1.0:
            raise ValueError(f"min_foreground must be in [0, 1], got {self.min_foreground}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")


# -- reading ---------------------------------------------------------------------------------------------------
def _problem(exc: BaseException) -> str:
    """First line of an exception message, shortened, for a one-line :class:`DataError`."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _check_header(path: Path) -> None:
    """Fail early, with the real cause, on a missing file, a wrong suffix or a header nibabel cannot parse."""
    if not path.is_file():
        raise DataError(path, "file not found")
    if not is_nifti(path):
        raise DataError(path, "not a NIfTI file (expected .nii or .nii.gz)")
    try:
        image = nib.load(path)
    except Exception as exc:  # any parser failure means a corrupt or non-NIfTI file
        raise DataError(path, f"not a valid NIfTI file ({_problem(exc)})") from exc
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(path, f"not a NIfTI-1/2 image ({type(image).__name__})")


def _decode(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Voxels (as stored, float32) and affine through MONAI's nibabel reader."""
    from monai.transforms import LoadImage  # imported here: MONAI is slow to import

    loader = LoadImage(reader="NibabelReader", image_only=True)
    try:
        tensor = loader(str(path))
        data = np.asarray(tensor.detach().cpu().numpy(), dtype=np.float32)
        affine = np.asarray(tensor.affine.detach().cpu().numpy(), dtype=np.float64)
    except Exception as exc:  # EOFError, zlib.error, OSError, RuntimeError, ValueError, ... from the decoder
        raise DataError(path, f"unreadable NIfTI data, truncated or corrupt file ({_problem(exc)})") from exc
    return data, affine


def _as_3d(data: np.ndarray, path: Path) -> np.ndarray:
    """2D -> trailing singleton axis, 4D -> first volume; anything else that is not an image is an error."""
    if data.ndim == 2:
        data = data[:, :, np.newaxis]
    elif data.ndim == 4:
        data = data[..., 0]
    elif data.ndim != 3:
        raise DataError(path, f"expected a 2D, 3D or 4D NIfTI image, got shape {tuple(data.shape)}")
    if sum(size > 1 for size in data.shape) < 2:
        raise DataError(path, f"not an image: fewer than two axes longer than 1 in shape {tuple(data.shape)}")
    return data


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file as a 3D float32 array in stored voxel order, with its 4x4 affine.

    No reorientation is applied. 2D images get a trailing singleton axis and 4D images keep their first volume.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.

    Returns:
        ``(volume, affine)``: float32 ``(X, Y, Z)`` and float64 ``(4, 4)``.

    Raises:
        DataError: missing, non-NIfTI, truncated or corrupt file, or a shape that is not an image.

    Example:
        >>> volume, affine = read_volume("sub-01_T1w.nii.gz")
    """
    path = Path(path)
    _check_header(path)
    data, affine = _decode(path)
    return _as_3d(data, path), affine


@functools.lru_cache(maxsize=VOLUME_CACHE_SIZE)
def _cached_volume(path: str, mtime_ns: int, size: int) -> np.ndarray:
    volume, _ = read_volume(path)
    volume.flags.writeable = False
    return volume


def _volume(path: str | os.PathLike) -> np.ndarray:
    """Read-only decoded volume from the per-process LRU cache.

    Every DataLoader worker keeps up to :data:`VOLUME_CACHE_SIZE` whole float32 volumes (about 4 bytes per voxel
    each, e.g. 4 x 512x512x200 -> 0.8 GB per worker). This makes consecutive slices of the same volume cheap;
    random access over many volumes mostly misses and decodes the whole file each time. The key includes the
    file's modification time and size so a rewritten file is read again.
    """
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as exc:
        raise DataError(path, "file not found") from exc
    return _cached_volume(str(path), stat.st_mtime_ns, stat.st_size)


# -- intensities -----------------------------------------------------------------------------------------------
def intensity_range(volume: np.ndarray, opts: SliceOptions) -> tuple[float, float]:
    """The ``(lo, hi)`` intensities that :func:`normalise_intensity` maps to 0 and 1.

    * CT: ``(level - width/2, level + width/2)`` from ``opts.ct_window``.
    * Other modalities: ``opts.clip_percentiles`` of the finite nonzero voxels, so that zero padding or
      skull-stripped background does not pull the percentiles towards 0. If these coincide (e.g. a binary
      volume) the finite min and max of the whole volume are used; a constant volume gives ``lo == hi``.

    Example:
        >>> lo, hi = intensity_range(volume, SliceOptions(modality="mr"))
    """
    if opts.modality == "ct":
        level, width = opts.ct_window
        return float(level - width / 2), float(level + width / 2)
    finite = volume[np.isfinite(volume)]
    if finite.size == 0:
        return 0.0, 0.0
    nonzero = finite[finite != 0]
    if nonzero.size:
        lo, hi = np.percentile(nonzero, opts.clip_percentiles)
        if hi > lo:
            return float(lo), float(hi)
    return float(finite.min()), float(finite.max())


def _rescale(array: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Clip to ``[lo, hi]`` and map linearly to float32 [0, 1]; ``hi <= lo`` gives zeros; NaN -> 0."""
    if hi <= lo:
        return np.zeros(array.shape, dtype=np.float32)
    scaled = (array.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.nan_to_num(np.clip(scaled, 0.0, 1.0), nan=0.0).astype(np.float32, copy=False)


def normalise_intensity(volume: np.ndarray, opts: SliceOptions) -> np.ndarray:
    """Whole volume mapped to float32 [0, 1] with the range from :func:`intensity_range`.

    Example:
        >>> volume01 = normalise_intensity(volume, SliceOptions(modality="ct", ct_window=(40.0, 400.0)))
    """
    lo, hi = intensity_range(volume, opts)
    return _rescale(volume, lo, hi)


# -- slicing ---------------------------------------------------------------------------------------------------
def slice_axis(shape: tuple[int, ...], axis: int) -> int:
    """The axis actually sliced: ``axis``, unless the volume is one slice thick along another axis."""
    if shape[axis] == 1 or 1 not in shape:
        return axis
    return shape.index(1)


def kept_slices(volume01: np.ndarray, opts: SliceOptions) -> list[int]:
    """Indices of the slices with enough foreground along the slicing axis.

    A voxel is foreground when its normalised value is above ``opts.foreground_threshold``; a slice is kept
    when its foreground fraction is at least ``opts.min_foreground`` (so 0 keeps every slice).

    Args:
        volume01: a 3D volume already normalised to [0, 1].
        opts: slicing options.

    Example:
        >>> kept_slices(normalise_intensity(volume, opts), opts)
        [3, 4, 5, 6]
    """
    axis = slice_axis(volume01.shape, opts.axis)
    other = tuple(a for a in range(volume01.ndim) if a != axis)
    fraction = (volume01 > opts.foreground_threshold).mean(axis=other)
    return [int(k) for k in np.flatnonzero(fraction >= opts.min_foreground)]


def scan_volume(path: str | os.PathLike, opts: SliceOptions, id_prefix: str | None = None) -> list[dict]:
    """Read a volume once and describe each kept slice as a dataset item.

    Args:
        path: a NIfTI file.
        opts: slicing options.
        id_prefix: start of each item id; defaults to :func:`nifti_stem` of ``path``.

    Returns:
        One dict per kept slice: ``{"image": str(path), "slice": k, "axis": a, "id": "<prefix>_<x|y|z><k:03d>",
        "range": (lo, hi), "shape": (X, Y, Z)}``, where ``a`` is the axis actually sliced (a singleton axis wins)
        and ``range`` is the volume's :func:`intensity_range`. Empty when no slice is kept.

    Example:
        >>> scan_volume("sub-01_T1w.nii.gz", SliceOptions(axis=2))[0]["id"]
        'sub-01_T1w_z012'
    """
    volume = _volume(path)
    lo, hi = intensity_range(volume, opts)
    axis = slice_axis(volume.shape, opts.axis)
    keep = kept_slices(_rescale(volume, lo, hi), opts)
    prefix = nifti_stem(path) if id_prefix is None else id_prefix
    shape = tuple(int(s) for s in volume.shape)
    return [
        {
            "image": str(path),
            "slice": k,
            "axis": axis,
            "id": f"{prefix}_{_AXIS_NAMES[axis]}{k:03d}",
            "range": (lo, hi),
            "shape": shape,
        }
        for k in keep
    ]


def _take_slice(volume: np.ndarray, axis: int, index: int, path: str | os.PathLike) -> np.ndarray:
    """``volume.take(index, axis)`` with a :class:`DataError` naming ``path`` when the slice does not exist."""
    if volume.ndim != 3 or not 0 <= axis < 3 or not 0 <= index < volume.shape[axis]:
        raise DataError(
            path, f"no slice {index} along axis {axis} in a volume of shape {tuple(volume.shape)}"
        )
    return volume.take(index, axis=axis)


def load_slice(item: dict, opts: SliceOptions) -> np.ndarray:
    """One normalised slice of an item from :func:`scan_volume`, as float32 HWC in [0, 1].

    Uses the item's stored ``"axis"``, ``"slice"`` and ``"range"`` (no re-scan of the volume); ``opts`` only
    gives the number of channels. Volumes come from a small per-process cache (see ``VOLUME_CACHE_SIZE``).

    Raises:
        DataError: unreadable file, or a volume whose shape changed since it was scanned.

    Example:
        >>> image = load_slice(items[0], SliceOptions(channels=3))    # (H, W, 3)
    """
    path = item["image"]
    volume = _volume(path)
    shape = item.get("shape")
    if shape is not None and tuple(shape) != volume.shape:
        raise DataError(path, f"volume shape {tuple(volume.shape)} differs from the scanned {tuple(shape)}")
    lo, hi = item["range"] if "range" in item else intensity_range(volume, opts)
    image = _rescale(_take_slice(volume, item["axis"], item["slice"], path), lo, hi)
    if opts.channels == 3:
        return np.ascontiguousarray(np.repeat(image[:, :, np.newaxis], 3, axis=2))
    return np.ascontiguousarray(image[:, :, np.newaxis])


def load_label_slice(path: str | os.PathLike, axis: int, index: int) -> np.ndarray:
    """One slice of a label volume as int64 ``(H, W)`` class values (rounded, never normalised).

    Args:
        path: a NIfTI label volume with the same voxel grid as its image.
        axis: the item's ``"axis"`` (the axis actually sliced).
        index: the item's ``"slice"``.

    Raises:
        DataError: unreadable file, missing slice, or non-finite label values.

    Example:
        >>> mask = load_label_slice("sub-01_seg.nii.gz", axis=2, index=12)
    """
    labels = _take_slice(_volume(path), axis, index, path)
    if not np.isfinite(labels).all():
        raise DataError(path, f"non-finite values in label slice {index} along axis {axis}")
    return np.rint(labels).astype(np.int64)


def stack_slices(slices: list[np.ndarray], axis: int) -> np.ndarray:
    """Stack 2D slices back into a 3D volume along ``axis``: the inverse of ``vol.take(k, axis)`` for all ``k``.

    Skipped slices must be filled in by the caller (e.g. with zeros) so that slice ``k`` is ``slices[k]``.

    Example:
        >>> volume = stack_slices([pred_0, pred_1, pred_2], axis=2)   # (H, W, 3)
    """
    if not slices:
        raise ValueError("stack_slices needs at least one slice")
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    return np.stack(slices, axis=axis)


# -- writing ---------------------------------------------------------------------------------------------------
def _storable(volume: np.ndarray) -> np.ndarray:
    """Bool -> uint8 and int64/uint64 -> the smallest NIfTI integer type holding the values; others unchanged."""
    if volume.dtype == np.bool_:
        return volume.astype(np.uint8)
    if volume.dtype.kind in "iu" and volume.dtype.itemsize == 8:
        lo, hi = (int(volume.min()), int(volume.max())) if volume.size else (0, 0)
        for dtype in (np.uint8, np.int16, np.int32):
            info = np.iinfo(dtype)
            if info.min <= lo and hi <= info.max:
                return volume.astype(dtype)
    return volume


def write_volume(
    path: str | os.PathLike,
    volume: np.ndarray,
    affine: np.ndarray | None,
    reference: str | os.PathLike | None = None,
) -> None:
    """Save a volume as NIfTI (``.nii`` or ``.nii.gz`` from the file name), creating missing folders.

    With ``reference``, that file's header is copied (pixdim, units, qform/sform codes, description, ...) so
    predictions line up with the original scan; ``affine=None`` then takes the reference's affine. The data type
    comes from the array; 64-bit integers are stored in the smallest of uint8/int16/int32 that holds them, and
    the reference's intensity scaling (scl_slope/scl_inter) is not carried over.

    Raises:
        DataError: ``path`` is not a NIfTI name, or the reference is unreadable.

    Example:
        >>> write_volume("pred/sub-01_seg.nii.gz", labels.astype(np.uint8), None, reference="sub-01_T1w.nii.gz")
    """
    path = Path(path)
    if not is_nifti(path):
        raise DataError(path, "output must end in .nii or .nii.gz")
    data = _storable(np.asarray(volume))
    header, image_class = None, nib.Nifti1Image
    if reference is not None:
        _check_header(Path(reference))
        ref = nib.load(reference)
        header, image_class = ref.header.copy(), type(ref)
        if affine is None:
            affine = ref.affine
    if affine is None:
        raise ValueError("write_volume needs an affine or a reference")
    image = image_class(data, np.asarray(affine, dtype=np.float64), header=header)
    image.header.set_data_dtype(data.dtype)
    image.header.set_slope_inter(None, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
