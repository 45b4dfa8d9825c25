"""Intensity handling per file: which modality a volume is, and the ranges that map it to [0, 1] channels.

``data.modality`` is one of ``ct``, ``mr``, ``gray``, ``rgb``, ``auto``, or a mapping ``{pattern: modality}``
matched against each file's path relative to the data root (a sub-folder name such as ``ct`` or a glob such as
``*_T1w.nii.gz``; the first matching pattern wins, unmatched files are ``auto``). ``auto`` decides from the
intensities: a CT in Hounsfield units holds air near -1000, so a volume whose 0.5th percentile is at or below
-500 is CT, anything else MR. Each decision is logged per file (logger ``decon_med.data``).

Ranges, one ``(lo, hi)`` per output channel, each mapped linearly to [0, 1] with clipping:

* CT: one channel per window ``(level, width)`` -> ``(level - width/2, level + width/2)``, as MONAI's
  ``ScaleIntensityRange(a_min, a_max, 0, 1, clip=True)``.
* MR / grey, ``percentile``: the clip percentiles of the nonzero voxels, as MONAI's
  ``ScaleIntensityRangePercentiles`` computed over the foreground.
* MR / grey, ``zscore``: mean +- 3 standard deviations of the nonzero voxels, i.e. MONAI's
  ``NormalizeIntensity(nonzero=True)`` z-score clipped to [-3, 3] and mapped to [0, 1], so every modality reaches
  the network on the same scale.

Example:
    >>> modality, how = resolve_modality("data/ct/case1.nii.gz", {"ct": "ct", "*": "auto"}, "data", volume)
    >>> channel_ranges(volume, "ct", windows=((40, 400), (-600, 1500)))
    [(-160.0, 240.0), (-1350.0, 150.0)]
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

#: Modalities a file may be declared or decided as.
FILE_MODALITIES = ("ct", "mr", "gray", "rgb")
#: MR / grey normalisations.
MR_NORMALISATIONS = ("percentile", "zscore")
#: A CT in HU has air at about -1000: a 0.5th percentile at or below this is CT.
CT_AIR_HU = -500.0
#: A declared CT whose voxels never go below this holds no air or fat in HU, which contradicts the declaration.
CT_MIN_EXPECTED = -200.0
#: z-score range mapped to [0, 1].
ZSCORE_CLIP = 3.0
#: Voxels sampled (evenly strided) for the modality decision and the contradiction check.
_SAMPLE = 200_000

log = logging.getLogger("decon_med.data")

__all__ = [
    "FILE_MODALITIES",
    "MR_NORMALISATIONS",
    "channel_ranges",
    "contradiction",
    "guess_modality",
    "match_modality",
    "resolve_modality",
]


def _low_high(volume: np.ndarray) -> tuple[float, float, float]:
    """(0.5th percentile, min, max) of the finite voxels of an evenly strided sample."""
    flat = volume.reshape(-1)
    step = max(1, flat.size // _SAMPLE)
    sample = flat[::step]
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 0.0, 0.0
    return float(np.percentile(sample, 0.5)), float(sample.min()), float(sample.max())


def guess_modality(volume: np.ndarray) -> tuple[str, str]:
    """``("ct" | "mr", reason)`` decided from the intensity range.

    Example:
        >>> guess_modality(np.full((4, 4, 4), -1000.0))
        ('ct', '0.5th percentile -1000 <= -500 (air in HU)')
    """
    p_low, lo, hi = _low_high(volume)
    if p_low <= CT_AIR_HU:
        return "ct", f"0.5th percentile {p_low:.0f} <= {CT_AIR_HU:.0f} (air in HU)"
    return "mr", f"0.5th percentile {p_low:.4g} > {CT_AIR_HU:.0f}, range {lo:.4g}..{hi:.4g} (not HU)"


def contradiction(volume: np.ndarray, modality: str) -> str | None:
    """Why the intensities of ``volume`` contradict a declared ``modality``, or ``None`` when they agree.

    A declared CT with no voxel below -200 (no air or fat in HU) looks like MR; a declared MR whose 0.5th
    percentile is at or below -500 looks like CT in HU.

    Example:
        >>> contradiction(np.full((4, 4, 4), 300.0), "ct")
        'declared ct but no intensity below -200 HU (range 300..300): looks like MR or CT without HU scaling'
    """
    p_low, lo, hi = _low_high(volume)
    if modality == "ct" and lo > CT_MIN_EXPECTED:
        return (
            f"declared ct but no intensity below {CT_MIN_EXPECTED:.0f} HU (range {lo:.4g}..{hi:.4g}): "
            "looks like MR or CT without HU scaling"
        )
    if modality in ("mr", "gray") and p_low <= CT_AIR_HU:
        return f"declared {modality} but the 0.5th percentile is {p_low:.0f} (air in HU): looks like CT"
    return None


def _relative(path: str | os.PathLike, root: str | os.PathLike | None) -> str:
    path = Path(path)
    if root is not None:
        try:
            return path.resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            pass
    return path.as_posix()


def match_modality(
    path: str | os.PathLike, spec: str | Mapping[str, str], root: str | os.PathLike | None = None
) -> str:
    """The modality ``spec`` declares for ``path``: ``spec`` itself, or the first matching pattern's value.

    A pattern matches the path relative to ``root`` as a glob (``ct/*``), as a sub-folder (``ct`` matches
    ``ct/a/b.nii.gz`` and ``x/ct/b.nii.gz``) or as a file-name glob (``*_T1w.nii.gz``). No match gives ``auto``.

    Example:
        >>> match_modality("/d/ct/p1.nii.gz", {"ct": "ct", "mr": "mr"}, root="/d")
        'ct'
    """
    if isinstance(spec, str):
        return spec
    rel = _relative(path, root)
    parts = rel.split("/")
    for pattern, modality in spec.items():
        pattern = str(pattern).strip("/")
        if (
            fnmatch.fnmatchcase(rel, pattern)
            or fnmatch.fnmatchcase(parts[-1], pattern)
            or any(fnmatch.fnmatchcase(part, pattern) for part in parts[:-1])
        ):
            return modality
    return "auto"


def resolve_modality(
    path: str | os.PathLike,
    spec: str | Mapping[str, str],
    root: str | os.PathLike | None,
    volume: np.ndarray,
) -> tuple[str, str]:
    """``(modality, how)`` of one file: declared by ``spec`` or, for ``auto``, decided from ``volume``.

    The decision is logged at INFO level, one line per file.
    """
    declared = match_modality(path, spec, root)
    if declared != "auto":
        how = "declared" if isinstance(spec, str) else "declared by data.modality pattern"
        return declared, how
    modality, reason = guess_modality(volume)
    log.info("%s: modality %s (auto: %s)", path, modality, reason)
    return modality, f"auto: {reason}"


def _foreground(volume: np.ndarray) -> np.ndarray:
    finite = volume[np.isfinite(volume)]
    nonzero = finite[finite != 0]
    return nonzero if nonzero.size else finite


def channel_ranges(
    volume: np.ndarray,
    modality: str,
    windows: Sequence[Sequence[float]] = ((40.0, 400.0),),
    percentiles: Sequence[float] = (0.5, 99.5),
    mr_normalisation: str = "percentile",
) -> list[tuple[float, float]]:
    """One ``(lo, hi)`` per output channel of a volume (see the module docstring).

    Non-CT volumes whose foreground range collapses (a binary or constant volume) fall back to the finite min and
    max of the whole volume; a constant volume gives ``lo == hi`` (all zeros after scaling).

    Example:
        >>> channel_ranges(volume, "mr", mr_normalisation="zscore")
        [(12.5, 887.1)]
    """
    if modality == "ct":
        return [(float(level - width / 2), float(level + width / 2)) for level, width in windows]
    if mr_normalisation not in MR_NORMALISATIONS:
        raise ValueError(f"mr_normalisation must be one of {MR_NORMALISATIONS}, got {mr_normalisation!r}")
    finite = volume[np.isfinite(volume)]
    if finite.size == 0:
        return [(0.0, 0.0)]
    values = _foreground(volume)
    if mr_normalisation == "zscore":
        mean, std = float(values.mean()), float(values.std())
        if std > 0:
            return [(mean - ZSCORE_CLIP * std, mean + ZSCORE_CLIP * std)]
    else:
        lo, hi = np.percentile(values, list(percentiles))
        if hi > lo:
            return [(float(lo), float(hi))]
    return [(float(finite.min()), float(finite.max()))]
