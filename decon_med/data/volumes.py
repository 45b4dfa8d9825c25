"""NIfTI volumes as 2D slices: reading, geometry, intensity per file, slice selection and the way back.

A volume is read with nibabel (intensity scaling applied, float32), reoriented to RAS and cut into 2D slices along
canonical axis ``a`` (default 2, axial); each slice is resampled to square pixels (see
:mod:`decon_med.data.geometry`). Slice ``k`` is ``canonical.take(k, axis=a)`` with rows along the lower remaining
axis and columns along the higher one (axis 2 -> ``(R, A)``, 1 -> ``(R, S)``, 0 -> ``(A, S)``). A volume stored in
another orientation therefore gives the same slices, and :func:`labels_to_volume` puts predicted slices back on the
stored voxel grid, in the stored orientation, to be saved with the original affine.

Shapes handled by :func:`read_volume`:

* 2D NIfTI ``(X, Y)`` -> ``(X, Y, 1)``; a volume with a singleton axis is a single slice along that axis,
  whatever the configured axis.
* 4D NIfTI ``(X, Y, Z, T)`` (time series, multi-contrast stacks): a :class:`DataError` unless ``data.channels``
  selects volumes, which then become input channels.
* Anything else (1D, 5D and more, fewer than two non-singleton axes) is a :class:`DataError`.

Intensities are mapped per file to [0, 1] channels (:mod:`decon_med.data.intensity`): the modality is declared or
decided per file, CT windows give one channel each, MR uses a percentile clip or a foreground z-score. A file whose
intensities contradict its declared modality is a one-line warning (logger ``decon_med.data``).

Labels are checked strictly against their image: same stored shape, affines equal within ``affine_tolerance`` mm,
integer values only (1.6 is an error, never rounded).

Decoded volumes are held per process (:data:`VOLUME_CACHE_SIZE` of them), or, with ``cache_gb > 0``, stored once in
a persistent disk cache and read back memory-mapped, one slice at a time, by every worker and every later run; the
slice index of each volume is then cached too (:mod:`decon_med.data.volume_cache`).

Example:
    >>> opts = SliceOptions(axis=2, modality="mr")
    >>> items = scan_volume("sub-01_T1w.nii.gz", opts)      # one dict per kept slice
    >>> image = load_slice(items[0], opts)                   # (H, W, 1) float32 in [0, 1], square pixels
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from decon_med.data.geometry import ORIENTATIONS, Geometry, plane_size, resample_plane, to_canonical
from decon_med.data.geometry import from_canonical as _from_canonical
from decon_med.data.intensity import (
    CHANNEL_HANDLINGS,
    MR_NORMALISATIONS,
    channel_ranges,
    contradiction,
    resolve_modality,
)
from decon_med.data.volume_cache import VolumeCache, cache_key
from decon_med.errors import DataError
from decon_med.folders import record_written

#: NIfTI suffixes, matched case-insensitively; ``.nii.gz`` first so it wins over ``.nii``.
NIFTI_SUFFIXES = (".nii.gz", ".nii")

#: Modalities with their own intensity handling; ``auto`` decides per file (see :mod:`decon_med.data.intensity`).
MODALITIES = ("mr", "ct", "gray", "rgb", "auto")

#: Whole decoded volumes kept per process by :func:`load_slice` / :func:`load_label_slice` when the disk cache is
#: off (``SliceOptions.cache_gb == 0``).
VOLUME_CACHE_SIZE = 4

#: Memory-mapped cached volumes kept open per process (address space only; the data stays in the page cache).
OPEN_CACHE_SIZE = 256

_AXIS_NAMES = "xyz"

log = logging.getLogger("decon_med.data")

__all__ = [
    "MODALITIES",
    "NIFTI_SUFFIXES",
    "SliceOptions",
    "VolumeSlices",
    "channel_stack",
    "intensity_range",
    "is_nifti",
    "kept_slices",
    "labels_to_volume",
    "load_label_slice",
    "load_slice",
    "nifti_stem",
    "normalise_intensity",
    "read_volume",
    "scan_volume",
    "slice_count",
    "stack_slices",
    "volume_slices",
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
Window = tuple[float, float]


def _windows(ct_window) -> tuple[Window, ...]:
    """A (level, width) pair or a sequence of pairs -> a tuple of pairs."""
    values = list(ct_window)
    if values and all(isinstance(v, (int, float)) for v in values):
        values = [values]
    windows = tuple((float(w[0]), float(w[1])) for w in values)
    if not windows or any(len(w) != 2 for w in values):
        raise ValueError(f"ct_window must be [level, width] or a list of them, got {ct_window}")
    return windows


@dataclass(frozen=True)
class SliceOptions:
    """How NIfTI volumes become normalised 2D slices.

    Attributes:
        axis: canonical voxel axis the volume is sliced along (0, 1 or 2; with RAS, 2 gives axial slices).
        modality: ``ct``, ``mr``, ``gray``, ``auto`` (decided per file), or ``((pattern, modality), ...)``
            matched per file (see :func:`decon_med.data.intensity.match_modality`). ``rgb`` on a volume is ``auto``.
        root: folder the patterns are relative to.
        clip_percentiles: (low, high) percentiles of the nonzero voxels mapped to 0 and 1 (MR / grey).
        ct_window: (level, width) in HU, or several windows (one output channel each).
        mr_normalisation: ``percentile`` (clip_percentiles) or ``zscore`` (foreground mean +- 3 SD).
        foreground_threshold: a normalised intensity above this counts as foreground.
        min_foreground: slices whose foreground fraction is below this are skipped (0 keeps all).
        channels: network input channels; a 1-channel slice is replicated to this many.
        orientation: ``RAS`` (reorient before slicing) or ``none`` (stored voxel order).
        spacing: in-plane pixel side in mm; ``None`` takes each volume's finer in-plane spacing; ``0`` keeps the
            voxel grid as stored (no resampling).
        select: volumes of a 4D image used as channels (``None``: a 4D image is an error).
        affine_tolerance: largest allowed difference (mm) between a label's affine and its image's.
        cache_dir: folder of the persistent volume cache (``None``: ``$XDG_CACHE_HOME/decon-med``).
        cache_gb: bound on the cache's size in GB; decoded volumes are stored there once and read back memory-mapped,
            and slice indexes are reused across runs (see :mod:`decon_med.data.volume_cache`). ``0`` (default)
            disables it: each process keeps :data:`VOLUME_CACHE_SIZE` decoded volumes in memory.
        channel_modalities: intensity handling of each image channel, in order (one of
            :data:`~decon_med.data.intensity.CHANNEL_HANDLINGS`, from the channel names by
            :func:`~decon_med.data.intensity.channel_handling`); ``None``: every channel follows ``modality``.

    Example:
        >>> SliceOptions(axis=0, modality="ct", ct_window=((40.0, 400.0), (-600.0, 1500.0)), channels=2)
    """

    axis: int = 2
    modality: str | tuple[tuple[str, str], ...] = "mr"
    root: str | None = None
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    ct_window: tuple = (40.0, 400.0)
    mr_normalisation: str = "percentile"
    foreground_threshold: float = 0.05
    min_foreground: float = 0.05
    channels: int = 1
    orientation: str = "RAS"
    spacing: float | None = None
    select: tuple[int, ...] | None = None
    affine_tolerance: float = 1e-3
    cache_dir: str | None = None
    cache_gb: float = 0.0
    channel_modalities: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {self.axis}")
        declared = [self.modality] if isinstance(self.modality, str) else [m for _, m in self.modality]
        for modality in declared:
            if modality not in MODALITIES:
                raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        low, high = self.clip_percentiles
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(
                f"clip_percentiles must satisfy 0 <= low < high <= 100, got {self.clip_percentiles}"
            )
        if any(width <= 0 for _, width in _windows(self.ct_window)):
            raise ValueError(f"ct_window width must be positive, got {self.ct_window}")
        if self.mr_normalisation not in MR_NORMALISATIONS:
            raise ValueError(
                f"mr_normalisation must be one of {MR_NORMALISATIONS}, got {self.mr_normalisation!r}"
            )
        if not 0.0 <= self.min_foreground <= 1.0:
            raise ValueError(f"min_foreground must be in [0, 1], got {self.min_foreground}")
        if self.channels < 1:
            raise ValueError(f"channels must be >= 1, got {self.channels}")
        if self.orientation not in ORIENTATIONS:
            raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {self.orientation!r}")
        if self.spacing is not None and self.spacing < 0:
            raise ValueError(f"spacing must be >= 0, got {self.spacing}")
        if self.cache_gb < 0:
            raise ValueError(f"cache_gb must be >= 0, got {self.cache_gb}")
        unknown = [m for m in self.channel_modalities or () if m not in CHANNEL_HANDLINGS]
        if unknown or self.channel_modalities == ():
            raise ValueError(f"channel_modalities must be non-empty, of {CHANNEL_HANDLINGS}, got {unknown}")

    @property
    def windows(self) -> tuple[Window, ...]:
        """The CT windows as ``((level, width), ...)``."""
        return _windows(self.ct_window)

    @property
    def modality_spec(self) -> str | Mapping[str, str]:
        """``modality`` as a string or a ``{pattern: modality}`` dict."""
        return self.modality if isinstance(self.modality, str) else dict(self.modality)


# -- reading ---------------------------------------------------------------------------------------------------
def _problem(exc: BaseException) -> str:
    """First line of an exception message, shortened, for a one-line :class:`DataError`."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _check_header(path: Path) -> nib.spatialimages.SpatialImage:
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
    return image


def _decode(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Voxels (stored order, scaling applied, float32) and affine, read with nibabel.

    nibabel directly rather than MONAI's ``LoadImage`` (which wraps the same reader): a 512 x 512 x 160 CT reads
    in 0.8 s against 2.0 s, and the geometry steps work on the numpy array anyway.
    """
    image = _check_header(path)
    stored = np.dtype(image.get_data_dtype())
    if stored.kind == "c":
        raise DataError(path, f"complex-valued data ({stored}); expected real intensities or labels")
    _check_affine(np.asarray(image.affine, dtype=np.float64), path)
    try:
        data = np.asarray(image.get_fdata(dtype=np.float32), dtype=np.float32)
    except Exception as exc:  # EOFError, zlib.error, OSError, ValueError, ... from the decoder
        raise DataError(path, f"unreadable NIfTI data, truncated or corrupt file ({_problem(exc)})") from exc
    return data, np.asarray(image.affine, dtype=np.float64)


def _check_affine(affine: np.ndarray, path: Path) -> None:
    """A usable voxel-to-world affine: finite, and every voxel axis has a non-zero size."""
    if not np.isfinite(affine).all():
        raise DataError(path, "affine holds NaN or inf; the file has no usable voxel geometry")
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    if not (sizes > 0).all():
        axis = int(np.argmin(sizes))
        what = "is all zero" if not affine[:3, :3].any() else f"gives voxel axis {axis} size 0"
        raise DataError(path, f"affine {what}; the file has no usable voxel geometry")


def _as_image(data: np.ndarray, path: Path, select: Sequence[int] | None) -> np.ndarray:
    """2D -> trailing singleton axis; 4D -> the selected volumes (channels last); else must be 3D."""
    if data.ndim == 2:
        data = data[:, :, np.newaxis]
    elif data.ndim == 4:
        if select is None:
            raise DataError(
                path,
                f"4D image with {data.shape[3]} volumes; set data.channels (e.g. [0]) to choose the volumes to use",
            )
        bad = [c for c in select if not 0 <= c < data.shape[3]]
        if bad:
            raise DataError(
                path, f"data.channels {list(bad)} out of range for a 4D image with {data.shape[3]} volumes"
            )
        data = data[..., list(select)]
    elif data.ndim != 3:
        raise DataError(path, f"expected a 2D, 3D or 4D NIfTI image, got shape {tuple(data.shape)}")
    if sum(size > 1 for size in data.shape[:3]) < 2:
        raise DataError(path, f"not an image: fewer than two axes longer than 1 in shape {tuple(data.shape)}")
    return data


def read_volume(
    path: str | os.PathLike, channels: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file as a float32 array in stored voxel order, with its 4x4 affine.

    No reorientation is applied. 2D images get a trailing singleton axis. A 4D image needs ``channels`` (the
    volumes to keep) and gives ``(X, Y, Z, len(channels))``; a 3D file ignores ``channels``.

    Raises:
        DataError: missing, non-NIfTI, truncated or corrupt file, a 4D image without ``channels``, or a shape
            that is not an image.

    Example:
        >>> volume, affine = read_volume("sub-01_T1w.nii.gz")
    """
    path = Path(path)
    data, affine = _decode(path)
    return _as_image(data, path, channels), affine


def _stat(path: str | os.PathLike) -> tuple[int, int]:
    try:
        stat = Path(path).stat()
    except OSError as exc:
        raise DataError(path, "file not found") from exc
    return stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=VOLUME_CACHE_SIZE)
def _cached_image(
    paths: tuple[str, ...], stats: tuple, select: tuple[int, ...] | None, orientation: str
) -> tuple[np.ndarray, Geometry]:
    """``(X, Y, Z, C)`` canonical array of one image (one file, or one file per channel) and its geometry."""
    arrays, affine = [], None
    for path in paths:
        data, aff = read_volume(path, select)
        if data.ndim == 3:
            data = data[..., np.newaxis]
        if affine is None:
            affine = aff
        elif data.shape[:3] != arrays[0].shape[:3] or not np.allclose(aff, affine, atol=1e-3):
            raise DataError(path, f"channel file does not share the voxel grid of {paths[0]}")
        arrays.append(data)
    volume = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=3)
    canonical, geometry = to_canonical(volume, affine, orientation)
    canonical.flags.writeable = False
    return canonical, geometry


def _image(paths: Sequence[str], opts: SliceOptions, write: bool = True) -> tuple[np.ndarray, Geometry]:
    """Read-only canonical ``(X, Y, Z, C)`` float32 image.

    With the disk cache on (``opts.cache_gb > 0``) the image is decoded once, stored slice-major and returned as a
    canonical-shaped view of a memory map (``write=False`` only reads the cache). Otherwise every process keeps up
    to :data:`VOLUME_CACHE_SIZE` whole float32 volumes in memory (about 4 bytes per voxel each). Either way the key
    includes each file's modification time and size, so a rewritten file is read again.
    """
    paths = tuple(str(p) for p in paths)
    stats = tuple(_stat(p) for p in paths)
    cache = _disk_cache(opts)
    if cache is None:
        return _cached_image(paths, stats, opts.select, opts.orientation)
    key = _key("image", paths, select=opts.select, orientation=opts.orientation, axis=opts.axis)
    if key in _TOO_BIG:
        return _cached_image(paths, stats, opts.select, opts.orientation)
    hit = _open_cached(cache, key)
    if hit is not None:
        return hit
    canonical, geometry = _cached_image.__wrapped__(paths, stats, opts.select, opts.orientation)
    if write and _store(cache, key, canonical, geometry, opts.axis):
        return _open_cached(cache, key) or (canonical, geometry)
    if write:
        _TOO_BIG.add(key)
    return canonical, geometry


# -- disk cache ------------------------------------------------------------------------------------------------
#: Keys of volumes larger than the disk cache's bound (held in memory instead), per process.
_TOO_BIG: set[str] = set()


@functools.lru_cache(maxsize=16)
def _cache_for(folder: str | None, max_gb: float) -> VolumeCache:
    return VolumeCache(folder, max_gb)


def _disk_cache(opts: SliceOptions) -> VolumeCache | None:
    return _cache_for(opts.cache_dir, float(opts.cache_gb)) if opts.cache_gb > 0 else None


def _key(kind: str, paths: Sequence[str], **params) -> str:
    try:
        return cache_key(kind, paths, **params)
    except OSError as exc:
        raise DataError(paths[0], "file not found") from exc


def _store(cache: VolumeCache, key: str, canonical: np.ndarray, geometry: Geometry, axis: int) -> bool:
    """Store a canonical ``(X, Y, Z[, C])`` array slice-major: the sliced axis first, so one slice is contiguous."""
    axis = slice_axis(geometry.canonical_shape, axis)
    meta = {
        "axis": axis,
        "geometry": {
            "shape": list(geometry.shape),
            "affine": np.asarray(geometry.affine, dtype=np.float64).tolist(),
            "ornt": np.asarray(geometry.ornt, dtype=np.float64).tolist(),
            "canonical_shape": list(geometry.canonical_shape),
            "spacing": list(geometry.spacing),
        },
    }
    return cache.store_array(key, np.moveaxis(canonical, axis, 0), meta)


def _open_cached(cache: VolumeCache, key: str) -> tuple[np.ndarray, Geometry] | None:
    """A cached array as a read-only canonical view of its memory map, with its geometry; ``None`` on a miss.

    Opened maps are kept per process (a miss is not remembered, so an entry written later is found).
    """
    try:
        return _opened(cache.folder, cache.max_bytes, key)
    except KeyError:
        return None


@functools.lru_cache(maxsize=OPEN_CACHE_SIZE)
def _opened(folder: Path, max_bytes: int, key: str) -> tuple[np.ndarray, Geometry]:
    found = VolumeCache(folder, max_bytes / 1e9).load_array(key)
    if found is None:
        raise KeyError(key)
    array, meta = found
    g = meta["geometry"]
    geometry = Geometry(
        shape=tuple(int(v) for v in g["shape"]),
        affine=np.asarray(g["affine"], dtype=np.float64),
        ornt=np.asarray(g["ornt"], dtype=np.float64),
        canonical_shape=tuple(int(v) for v in g["canonical_shape"]),
        spacing=tuple(float(v) for v in g["spacing"]),
    )
    return np.moveaxis(array, 0, int(meta["axis"])), geometry


def _item_paths(item: dict) -> list[str]:
    return list(item.get("channels") or [item["image"]])


@functools.lru_cache(maxsize=VOLUME_CACHE_SIZE)
def _cached_label(path: str, stats: tuple, orientation: str) -> tuple[np.ndarray, Geometry]:
    """Canonical int32 label volume; non-integer or non-finite values are a :class:`DataError`."""
    data, affine = _decode(Path(path))
    if data.ndim == 2:
        data = data[:, :, np.newaxis]
    if data.ndim != 3:
        raise DataError(path, f"label must be a 2D or 3D image, got shape {tuple(data.shape)}")
    if not np.isfinite(data).all():
        raise DataError(path, "non-finite label values (NaN or inf)")
    rounded = np.rint(data)
    off = np.abs(data - rounded) > 1e-3
    if off.any():
        raise DataError(
            path,
            f"non-integer label values (e.g. {float(data[off].flat[0]):.4g}); labels must hold class indices",
        )
    canonical, geometry = to_canonical(rounded.astype(np.int32), affine, orientation)
    canonical.flags.writeable = False
    return canonical, geometry


def _label(path: str, opts: SliceOptions) -> tuple[np.ndarray, Geometry]:
    """Canonical label volume (int32 values; from the disk cache, stored in the smallest integer type, when on)."""
    stats = _stat(path)
    cache = _disk_cache(opts)
    if cache is None:
        return _cached_label(path, stats, opts.orientation)
    key = _key("label", [path], orientation=opts.orientation, axis=opts.axis)
    if key in _TOO_BIG:
        return _cached_label(path, stats, opts.orientation)
    hit = _open_cached(cache, key)
    if hit is not None:
        return hit
    labels, geometry = _cached_label.__wrapped__(path, stats, opts.orientation)
    if _store(cache, key, _smallest_int(labels), geometry, opts.axis):
        return _open_cached(cache, key) or (labels, geometry)
    _TOO_BIG.add(key)
    return labels, geometry


def _smallest_int(labels: np.ndarray) -> np.ndarray:
    lo, hi = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    for dtype in (np.uint8, np.int16):
        if np.iinfo(dtype).min <= lo and hi <= np.iinfo(dtype).max:
            return labels.astype(dtype)
    return labels


# -- intensities -----------------------------------------------------------------------------------------------
def intensity_range(volume: np.ndarray, opts: SliceOptions) -> tuple[float, float]:
    """The ``(lo, hi)`` of the first channel that :func:`normalise_intensity` maps to 0 and 1.

    ``opts.modality`` must be declared (not ``auto``): CT uses the first window, every other modality
    ``opts.mr_normalisation`` over the finite nonzero voxels (see :func:`decon_med.data.intensity.channel_ranges`).

    Example:
        >>> lo, hi = intensity_range(volume, SliceOptions(modality="mr"))
    """
    modality = opts.modality if isinstance(opts.modality, str) else "mr"
    return _ranges(volume, modality, opts)[0]


def _ranges(volume: np.ndarray, modality: str, opts: SliceOptions) -> list[tuple[float, float]]:
    return channel_ranges(volume, modality, opts.windows, opts.clip_percentiles, opts.mr_normalisation)


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


def _file_ranges(
    path: str, canonical: np.ndarray, opts: SliceOptions, warnings: list[str] | None = None
) -> tuple[str, list[tuple[float, float]]]:
    """``(modality, ranges)`` of one image: one range per output channel (image channel x CT window)."""
    spec = opts.modality_spec
    if isinstance(spec, str) and spec == "rgb":
        spec = "auto"  # volumes are never photographs
    elif not isinstance(spec, str):
        spec = {k: ("auto" if v == "rgb" else v) for k, v in spec.items()}
    if opts.channel_modalities is not None:
        return _named_channel_ranges(path, canonical, opts, warnings)
    modality, how = resolve_modality(path, spec, opts.root, canonical)
    if not how.startswith("auto"):
        problem = contradiction(canonical, modality)
        if problem is not None:
            log.warning("warning: %s: %s", path, problem)
            if warnings is not None:
                warnings.append(f"{path}: {problem}")
    ranges = []
    for c in range(canonical.shape[3]):
        ranges.extend(_ranges(canonical[..., c], modality, opts))
    return modality, ranges


def _named_channel_ranges(
    path: str, canonical: np.ndarray, opts: SliceOptions, warnings: list[str] | None
) -> tuple[str, list[tuple[float, float]]]:
    """``_file_ranges`` with one handling per image channel (``opts.channel_modalities``); the modality is the
    channels' kinds joined, e.g. ``ct+mr``."""
    handlings = opts.channel_modalities
    if len(handlings) != canonical.shape[3]:
        raise DataError(
            path,
            f"gives {canonical.shape[3]} image channel(s) but {len(handlings)} channel names are set "
            "(dataset.json channel_names or data.channel_names)",
        )
    ranges, kinds = [], []
    for c, handling in enumerate(handlings):
        ranges.extend(_ranges(canonical[..., c], handling, opts))
        kinds.append(handling if handling in ("ct", "rgb") else "mr")
        problem = contradiction(canonical[..., c], kinds[-1]) if handling in ("ct", "mr") else None
        if problem is not None:
            line = f"{path}: channel {c}: {problem}"
            log.warning("warning: %s", line)
            if warnings is not None:
                warnings.append(line)
    return "+".join(dict.fromkeys(kinds)), ranges


def _range_sources(n_channels: int, n_ranges: int, opts: SliceOptions) -> list[int]:
    """The image channel each range (output channel) reads: CT channels give one output per window."""
    if opts.channel_modalities is None or len(opts.channel_modalities) != n_channels:
        per_channel = max(1, n_ranges // n_channels)
        return [j // per_channel for j in range(n_ranges)]
    windows = len(opts.windows)
    return [c for c, h in enumerate(opts.channel_modalities) for _ in range(windows if h == "ct" else 1)]


def channel_stack(
    canonical: np.ndarray, axis: int, index: int, ranges: Sequence, opts: SliceOptions
) -> np.ndarray:
    """The normalised channels of one slice: ``(H, W, len(ranges))`` float32 in [0, 1], before resampling.

    Every image channel (channel file, or selected volume of a 4D image) in order, each giving one output channel
    per CT window for a CT channel and one otherwise, each mapped with its own range (:func:`scan_volume`'s
    ``"range"``). This is the per-slice input of the network; a stack of neighbouring slices repeats it per slice.

    Example:
        >>> canonical, geometry = _image(["case_0000.nii.gz", "case_0001.nii.gz"], opts)
        >>> channel_stack(canonical, 2, 5, item["range"], opts).shape     # CT (one window) + T2
        (48, 48, 2)
    """
    sources = _range_sources(canonical.shape[3], len(ranges), opts)
    return _normalised_slice(canonical, axis, index, ranges, sources)


def _normalised_slice(
    canonical: np.ndarray, axis: int, index: int, ranges: Sequence, sources: Sequence[int] | None = None
) -> np.ndarray:
    """``(H, W, len(ranges))`` float32 in [0, 1] of one canonical slice (channel ``j`` uses ``ranges[j]`` on image
    channel ``sources[j]``; default: the same number of ranges per image channel)."""
    plane = _plane(canonical, axis, index)  # (H, W, C)
    if sources is None:
        per_channel = len(ranges) // plane.shape[2]
        sources = [j // per_channel for j in range(len(ranges))]
    channels = [_rescale(plane[:, :, sources[j]], float(lo), float(hi)) for j, (lo, hi) in enumerate(ranges)]
    return np.stack(channels, axis=2)


def _to_channels(image: np.ndarray, channels: int, path: str) -> np.ndarray:
    if image.shape[2] == channels:
        return np.ascontiguousarray(image)
    if image.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(image, channels, axis=2))
    raise DataError(
        path,
        f"gives {image.shape[2]} channels (image channels x CT windows) but data.in_channels is {channels}",
    )


# -- slicing ---------------------------------------------------------------------------------------------------
def slice_axis(shape: tuple[int, ...], axis: int) -> int:
    """The axis actually sliced: ``axis``, unless the volume is one slice thick along another axis."""
    shape = tuple(shape[:3])
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


def _plane_size(geometry: Geometry, axis: int, opts: SliceOptions) -> tuple[int, int]:
    if opts.spacing == 0:
        return tuple(s for a, s in enumerate(geometry.canonical_shape) if a != axis)
    return plane_size(geometry, axis, opts.spacing)


def scan_volume(
    path: str | os.PathLike | Sequence[str | os.PathLike],
    opts: SliceOptions,
    id_prefix: str | None = None,
    skip_empty: bool = True,
    stats: dict | None = None,
) -> list[dict]:
    """Read a volume once and describe each kept slice as a dataset item.

    Args:
        path: a NIfTI file, or one file per channel (same voxel grid).
        opts: slicing options.
        id_prefix: start of each item id; defaults to :func:`nifti_stem` of the (first) path.
        skip_empty: apply the empty-slice rule (``opts.min_foreground``); ``False`` keeps every slice, as for
            labelled evaluation data.
        stats: if given, updated with ``"skipped"`` (a Counter of slices skipped per rule), ``"modalities"``
            (a Counter of the modality of each file), ``"warnings"`` (one line per contradicting file) and
            ``"label_values"`` (``{file: values}`` of files holding only a few integers: label maps).

    Returns:
        One dict per kept slice: ``{"image": str(path), "slice": k, "axis": a, "id": "<prefix>_<x|y|z><k:03d>",
        "range": [(lo, hi), ...] (one per output channel), "shape": stored (X, Y, Z), "size": (H, W) after
        resampling, "modality": the file's modality}``, plus ``"channels"`` (the files) for a multi-file image.

    Example:
        >>> scan_volume("sub-01_T1w.nii.gz", SliceOptions(axis=2))[0]["id"]
        'sub-01_T1w_z012'
    """
    paths = [str(p) for p in path] if isinstance(path, (list, tuple)) else [str(path)]
    scan = _scan_index(paths, opts, skip_empty)
    modality, axis, keep = scan["modality"], scan["axis"], scan["keep"]
    if stats is not None:
        skipped = scan["n_slices"] - len(keep)
        stats.setdefault("skipped", Counter())[f"empty (foreground < {opts.min_foreground:g})"] += skipped
        stats.setdefault("modalities", Counter())[modality] += 1
        stats.setdefault("warnings", []).extend(scan["warnings"])
        if scan.get("label_values") is not None:  # a few integers: a label map, not a scan
            stats.setdefault("label_values", {})[paths[0]] = scan["label_values"]
    prefix = nifti_stem(paths[0]) if id_prefix is None else id_prefix
    base = {
        "image": paths[0],
        "axis": axis,
        "range": [tuple(r) for r in scan["ranges"]],
        "shape": tuple(scan["shape"]),
        "size": tuple(scan["size"]),
        "modality": modality,
    }
    if len(paths) > 1:
        base["channels"] = paths
    return [{**base, "slice": k, "id": f"{prefix}_{_AXIS_NAMES[axis]}{k:03d}"} for k in keep]


def _scan_index(paths: list[str], opts: SliceOptions, skip_empty: bool) -> dict:
    """What :func:`scan_volume` needs of a volume, from the disk cache's slice index when it holds it.

    Returns ``{"modality", "ranges", "axis", "n_slices", "keep", "shape", "size", "warnings"}``. The index is keyed
    by the files' size and modification time and by every slicing option, so each run of a grid reuses it; a
    reused index logs its file's warnings again.
    """
    cache = _disk_cache(opts)
    key = None
    if cache is not None:
        params = {k: v for k, v in dataclasses.asdict(opts).items() if k not in ("cache_dir", "cache_gb")}
        key = _key("index", paths, skip_empty=skip_empty, **params)
        found = cache.load_json(key)
        if found is not None:
            for line in found["warnings"]:
                log.warning("warning: %s", line)
            return found
    canonical, geometry = _image(paths, opts)
    warnings: list[str] = []
    modality, ranges = _file_ranges(paths[0], canonical, opts, warnings)
    axis = slice_axis(geometry.canonical_shape, opts.axis)
    n_slices = geometry.canonical_shape[axis]
    if skip_empty and opts.min_foreground > 0:
        lo, hi = ranges[0]
        keep = kept_slices(_rescale(canonical[..., 0], lo, hi), SliceOptions(axis=axis, **_rule(opts)))
    else:
        keep = list(range(n_slices))
    scan = {
        "modality": modality,
        "ranges": [[float(lo), float(hi)] for lo, hi in ranges],
        "axis": int(axis),
        "n_slices": int(n_slices),
        "keep": [int(k) for k in keep],
        "shape": [int(v) for v in geometry.shape],
        "size": [int(v) for v in _plane_size(geometry, axis, opts)],
        "warnings": warnings,
        "label_values": _label_values(canonical),
    }
    if cache is not None:
        cache.store_json(key, scan)
    return scan


#: A volume whose sampled voxels hold at most this many distinct integer values looks like a label map.
LABEL_MAP_VALUES = 16


def _label_values(canonical: np.ndarray) -> list[int] | None:
    """The distinct values of the first channel when they are a few integers (a label map, not a scan), else
    ``None``; decided on an evenly strided sample of about 200k voxels."""
    volume = canonical[..., 0]
    step = max(1, int(np.ceil((volume.size / 200_000) ** (1 / 3))))
    sample = np.asarray(volume[::step, ::step, ::step]).reshape(-1)  # a strided view: no copy of the volume
    if sample.size == 0 or not np.isfinite(sample).all() or np.any(sample != np.rint(sample)):
        return None
    values = np.unique(sample)
    return [int(v) for v in values] if values.size <= LABEL_MAP_VALUES else None


def _rule(opts: SliceOptions) -> dict:
    return {"foreground_threshold": opts.foreground_threshold, "min_foreground": opts.min_foreground}


def _take_slice(volume: np.ndarray, axis: int, index: int, path: str | os.PathLike) -> np.ndarray:
    """``volume.take(index, axis)`` with a :class:`DataError` naming ``path`` when the slice does not exist."""
    if volume.ndim not in (3, 4) or not 0 <= axis < 3 or not 0 <= index < volume.shape[axis]:
        raise DataError(
            path, f"no slice {index} along axis {axis} in a volume of shape {tuple(volume.shape[:3])}"
        )
    return _plane(volume, axis, index)


def _plane(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """``volume.take(index, axis)`` as a view: ``take`` copies a non-contiguous (reoriented, memory-mapped) volume
    whole before picking one slice."""
    return volume[(slice(None),) * axis + (index,)]


def _ranges_of(item: dict) -> list[tuple[float, float]]:
    rng = item["range"]
    if len(rng) == 2 and all(isinstance(v, (int, float)) for v in rng):
        return [(float(rng[0]), float(rng[1]))]
    return [(float(lo), float(hi)) for lo, hi in rng]


def load_slice(item: dict, opts: SliceOptions) -> np.ndarray:
    """One normalised slice of an item from :func:`scan_volume`, as float32 HWC in [0, 1] at its square size.

    Uses the item's stored ``"axis"``, ``"slice"``, ``"range"`` and ``"size"`` (no re-scan of the volume);
    ``opts`` gives the geometry options and the number of channels. Volumes come from a small per-process cache
    (see ``VOLUME_CACHE_SIZE``).

    Raises:
        DataError: unreadable file, or a volume whose shape changed since it was scanned.

    Example:
        >>> image = load_slice(items[0], SliceOptions(channels=3))    # (H, W, 3)
    """
    path = item["image"]
    canonical, geometry = _image(_item_paths(item), opts)
    shape = item.get("shape")
    if shape is not None and tuple(shape) != geometry.shape:
        raise DataError(path, f"volume shape {geometry.shape} differs from the scanned {tuple(shape)}")
    if "range" in item:
        ranges = _ranges_of(item)
    else:
        ranges = _file_ranges(path, canonical, opts)[1]
    _take_slice(canonical, item["axis"], item["slice"], path)
    image = channel_stack(canonical, item["axis"], item["slice"], ranges, opts)
    size = item.get("size") or _plane_size(geometry, item["axis"], opts)
    return _to_channels(resample_plane(image, tuple(size)), opts.channels, path)


def slice_count(item: dict, opts: SliceOptions) -> int:
    """Number of slices along the item's axis in its volume (for 2.5D stacks of neighbouring slices).

    Example:
        >>> slice_count(items[0], opts)     # a 48 x 48 x 12 volume cut along axis 2
        12
    """
    _, geometry = _image(_item_paths(item), opts)
    return int(geometry.canonical_shape[item["axis"]])


def load_label_slice(item: dict, opts: SliceOptions, path: str | os.PathLike | None = None) -> np.ndarray:
    """The label slice matching an image item, as int64 ``(H, W)`` class values at the item's square size.

    The label file (``path`` or ``item["label"]``) must share its image's voxel grid: the same stored shape and an
    affine within ``opts.affine_tolerance`` mm; it is reoriented and resampled (nearest neighbour) exactly like the
    image.

    Raises:
        DataError: naming the label file: unreadable, 4D, shape or affine mismatch, non-finite or non-integer
            values, or a missing slice.

    Example:
        >>> mask = load_label_slice(items[12], opts)
    """
    path = str(path or item["label"])
    labels, geometry = _label(path, opts)
    _, image_geometry = _image(_item_paths(item), opts)
    if geometry.shape != image_geometry.shape:
        raise DataError(
            path,
            f"label shape {geometry.shape} differs from image shape {image_geometry.shape} of {item['image']}",
        )
    gap = float(np.abs(geometry.affine - image_geometry.affine).max())
    if gap > opts.affine_tolerance:
        raise DataError(
            path,
            f"label affine differs from the affine of {item['image']} by {gap:.4g} mm "
            f"(tolerance data.affine_tolerance={opts.affine_tolerance:g})",
        )
    plane = np.asarray(_take_slice(labels, item["axis"], item["slice"], path), dtype=np.int32)
    size = item.get("size") or _plane_size(geometry, item["axis"], opts)
    return resample_plane(plane, tuple(size), labels=True).astype(np.int64)


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


# -- whole volumes, for prediction -----------------------------------------------------------------------------
@dataclass(frozen=True)
class VolumeSlices:
    """Every slice of one volume, ready for a 2D network, with what it takes to go back.

    Attributes:
        images: ``(H, W, C)`` float32 slices in [0, 1] at square pixels, slice ``k`` at index ``k``.
        axis: canonical axis sliced.
        geometry: stored <-> canonical mapping.
        modality: the file's modality.
    """

    images: list[np.ndarray]
    axis: int
    geometry: Geometry
    modality: str


def volume_slices(path: str | os.PathLike | Sequence[str], opts: SliceOptions) -> VolumeSlices:
    """All slices of a volume (none skipped) as :func:`load_slice` gives them, with the way back.

    Example:
        >>> vs = volume_slices("sub-01_T1w.nii.gz", opts)
        >>> labels = labels_to_volume([predict(im) for im in vs.images], vs)    # stored grid and orientation
    """
    paths = [str(p) for p in path] if isinstance(path, (list, tuple)) else [str(path)]
    canonical, geometry = _image(paths, opts, write=False)
    modality, ranges = _file_ranges(paths[0], canonical, opts)
    axis = slice_axis(geometry.canonical_shape, opts.axis)
    size = _plane_size(geometry, axis, opts)
    images = [
        _to_channels(
            resample_plane(channel_stack(canonical, axis, k, ranges, opts), size), opts.channels, paths[0]
        )
        for k in range(geometry.canonical_shape[axis])
    ]
    return VolumeSlices(images=images, axis=axis, geometry=geometry, modality=modality)


def labels_to_volume(masks: Sequence[np.ndarray], slices: VolumeSlices) -> np.ndarray:
    """Predicted ``(H, W)`` label slices (square-pixel size, one per slice) -> the stored voxel grid.

    Each mask is resampled back to the canonical in-plane shape (nearest neighbour), the masks are stacked along
    the sliced axis and the stack is reoriented to the stored voxel order: the result has the stored shape and
    lines up with the original affine.
    """
    geometry, axis = slices.geometry, slices.axis
    plane = tuple(s for a, s in enumerate(geometry.canonical_shape) if a != axis)
    if len(masks) != geometry.canonical_shape[axis]:
        raise ValueError(f"expected {geometry.canonical_shape[axis]} slices, got {len(masks)}")
    back = [resample_plane(np.asarray(m), plane, labels=True) for m in masks]
    return _from_canonical(stack_slices(back, axis), geometry)


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
    record_written(path)  # inside a folder decon-med owns: listed in its manifest
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
