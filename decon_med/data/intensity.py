"""Intensity handling per file: which modality a volume is, and the ranges that map it to [0, 1] channels.

``data.modality`` is one of ``ct``, ``mr``, ``gray``, ``rgb``, ``auto``, or a mapping ``{pattern: modality}``
matched against each file's path relative to the data root (a sub-folder name such as ``ct`` or a glob such as
``*_T1w.nii.gz``; the first matching pattern wins, unmatched files are ``auto``). ``auto`` decides from the
intensities (:func:`detect_modality`): a CT in Hounsfield units holds some air near -1000 HU (or the scanner's
padding below it), most of its other voxels lie in the fat / water / soft-tissue band (-150..200 HU) and its
values stay within the HU scale; a volume with all three is CT, anything else MR. Evidence that points both ways
(values near -1000 but little soft tissue in HU: an MR offset by -1000, or a lung-only CT; no air but fat and soft
tissue in HU: a tightly cropped CT) gives the likelier modality and one warning line for that file, never an
error. Each decision is logged per file (logger ``decon_med.data``) and kept for the run's ``modalities.csv``
and ``check-data`` (:func:`recorded_decision`).

Ranges, one ``(lo, hi)`` per output channel, each mapped linearly to [0, 1] with clipping:

* CT: one channel per window ``(level, width)`` -> ``(level - width/2, level + width/2)``, as MONAI's
  ``ScaleIntensityRange(a_min, a_max, 0, 1, clip=True)``.
* MR / grey, ``percentile``: the clip percentiles of the nonzero voxels, as MONAI's
  ``ScaleIntensityRangePercentiles`` computed over the foreground.
* MR / grey, ``zscore``: mean +- 3 standard deviations of the nonzero voxels, i.e. MONAI's
  ``NormalizeIntensity(nonzero=True)`` z-score clipped to [-3, 3] and mapped to [0, 1], so every modality reaches
  the network on the same scale.
* Channels with names (nnU-Net's ``channel_names``): :func:`channel_handling` gives each channel ``ct``, ``mr``,
  ``zscore`` (always the z-score above), ``rescale`` (the volume's min..max), ``none`` (0..1 as stored) or
  ``rgb`` (0..255).

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Modalities a file may be declared or decided as.
FILE_MODALITIES = ("ct", "mr", "gray", "rgb")
#: MR / grey normalisations.
MR_NORMALISATIONS = ("percentile", "zscore")
#: HU band counted as air (-1000, and the -1024 floor of most scanners).
AIR_HU = (-1100.0, -900.0)
#: Values from here up to the air band are CT padding outside the field of view (-2048, -3024), counted as air.
PADDING_HU = -3100.0
#: Share of the voxels in the air band (or padding) that is evidence of air in HU: 0.02 %.
AIR_MIN_FRACTION = 2e-4
#: HU band of fat (-120..-80), water (0), soft tissue and blood (20..80) and contrast-enhanced tissue (to ~200).
TISSUE_HU = (-150.0, 200.0)
#: HU band of fat, which an MR (values >= 0, or z-scores near 0) essentially never fills.
FAT_HU = (-150.0, -50.0)
#: CT: at least this share of the voxels above the air band lies in the soft-tissue band.
TISSUE_MIN_FRACTION = 0.2
#: CT in HU: the 99.5th percentile stays below this (dense bone ~2000, the 12-bit scale ends at 3071).
HU_MAX = 4000.0
#: A declared CT whose voxels never go below this holds no air or fat in HU, which contradicts the declaration.
CT_MIN_EXPECTED = -200.0
#: z-score range mapped to [0, 1].
ZSCORE_CLIP = 3.0
#: Voxels sampled (evenly strided) for the modality decision and the contradiction check.
_SAMPLE = 200_000
#: Intensity handling of one image channel named in ``channel_names`` (nnU-Net's ``dataset.json``, or
#: ``data.channel_names``): ``ct`` (CT windows), ``mr`` (``data.mr_normalisation``), ``zscore`` (always the
#: foreground z-score), ``rescale`` (the volume's min..max), ``none`` (values taken as they are, clipped to [0, 1])
#: and ``rgb`` (0..255).
CHANNEL_HANDLINGS = ("ct", "mr", "zscore", "rescale", "none", "rgb")
#: nnU-Net's normalisation names (matched case-insensitively); any other channel name is an MR-like scan.
_NNUNET_SCHEMES = {
    "ct": "ct",
    "zscore": "zscore",
    "rescale_to_0_1": "rescale",
    "nonorm": "none",
    "rgb_to_0_1": "rgb",
}

log = logging.getLogger("decon_med.data")

__all__ = [
    "CHANNEL_HANDLINGS",
    "FILE_MODALITIES",
    "MR_NORMALISATIONS",
    "ModalityDecision",
    "channel_handling",
    "channel_ranges",
    "contradiction",
    "detect_modality",
    "guess_modality",
    "match_modality",
    "recorded_decision",
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


@dataclass(frozen=True)
class ModalityDecision:
    """What :func:`detect_modality` decided, why, and whether the evidence agreed.

    Attributes:
        modality: ``ct`` or ``mr``.
        reason: the evidence, one line.
        certain: ``False`` when the evidence points both ways (a warning for that file).

    Example:
        >>> detect_modality(volume)
        ModalityDecision(modality='ct', reason='0.1 % near -1000 HU, ... (air and tissue in HU)', certain=True)
    """

    modality: str
    reason: str
    certain: bool


def _sample(volume: np.ndarray) -> np.ndarray:
    """The finite voxels of an evenly strided sample of about :data:`_SAMPLE` voxels, as float64."""
    flat = np.asarray(volume).reshape(-1)
    sample = flat[:: max(1, flat.size // _SAMPLE)].astype(np.float64)
    return sample[np.isfinite(sample)]


def detect_modality(volume: np.ndarray) -> ModalityDecision:
    """CT or MR from robust evidence on an evenly strided sample of the finite voxels:

    * ``air``: the share of voxels near -1000 HU (:data:`AIR_HU`) or in the CT padding below it;
    * ``tissue``: among the voxels above the air band, the share in the soft-tissue band (:data:`TISSUE_HU`);
    * ``fat``: the share in the fat band (:data:`FAT_HU`);
    * HU plausibility: the 99.5th percentile at most :data:`HU_MAX` and at most 1 % of voxels below the padding.

    CT: air >= 0.02 % (:data:`AIR_MIN_FRACTION`; a single percentile misses a CT with 0.1 % air), tissue >= 20 %
    and HU-plausible. Air without the rest (an MR offset by -1000, whose tissue lies far from -150..200, or a CT
    of lung only) is MR, uncertain; no air but fat >= 1 % and tissue >= 50 % (a CT cropped inside the body) is CT,
    uncertain; anything else is MR. Whether values are integers is not used: resampled CT is often stored as float.

    Example:
        >>> detect_modality(np.full((4, 4, 4), -1000.0)).modality
        'ct'
    """
    sample = _sample(volume)
    if sample.size == 0:
        return ModalityDecision("mr", "no finite voxel", True)
    n = sample.size
    air_band = (sample >= AIR_HU[0]) & (sample <= AIR_HU[1])
    padding = (sample >= PADDING_HU) & (sample < AIR_HU[0])
    air = float((air_band | padding).sum()) / n
    above = sample[sample > AIR_HU[1]]
    tissue = float(((above >= TISSUE_HU[0]) & (above <= TISSUE_HU[1])).sum()) / max(1, above.size)
    fat = float(((sample >= FAT_HU[0]) & (sample <= FAT_HU[1])).sum()) / n
    p_high = float(np.percentile(sample, 99.5))
    hu_plausible = p_high <= HU_MAX and float((sample < PADDING_HU).sum()) / n <= 0.01
    evidence = (
        f"{100 * air:.2g} % near -1000 HU, {100 * tissue:.3g} % of the rest in soft-tissue HU "
        f"{TISSUE_HU[0]:.0f}..{TISSUE_HU[1]:.0f}, 99.5th percentile {p_high:.4g}"
    )
    if air >= AIR_MIN_FRACTION:
        if hu_plausible and tissue >= TISSUE_MIN_FRACTION:
            return ModalityDecision("ct", f"{evidence} (air and tissue in HU)", True)
        why = "values beyond the HU scale" if not hu_plausible else "little soft tissue in HU"
        return ModalityDecision(
            "mr",
            f"{evidence}: air-like values but {why} (an MR offset by about -1000, or CT of lung only?)",
            False,
        )
    if fat >= 0.01 and tissue >= 0.5 and hu_plausible:
        return ModalityDecision(
            "ct",
            f"{evidence}, {100 * fat:.2g} % in fat HU: no air, but fat and soft tissue in HU (cropped CT?)",
            False,
        )
    return ModalityDecision("mr", f"{evidence} (no air in HU)", True)


def guess_modality(volume: np.ndarray) -> tuple[str, str]:
    """``("ct" | "mr", reason)`` of :func:`detect_modality`; an uncertain decision's reason starts ``uncertain:``.

    Example:
        >>> guess_modality(np.full((4, 4, 4), -1000.0))[0]
        'ct'
    """
    decision = detect_modality(volume)
    return decision.modality, ("" if decision.certain else "uncertain: ") + decision.reason


def contradiction(volume: np.ndarray, modality: str) -> str | None:
    """Why the intensities of ``volume`` contradict a declared ``modality``, or ``None`` when they agree.

    A declared CT with no voxel below -200 (no air or fat in HU) looks like MR; a declared MR (or grey) volume
    that :func:`detect_modality` calls CT without doubt looks like CT in HU.

    Example:
        >>> contradiction(np.full((4, 4, 4), 300.0), "ct")
        'declared ct but no intensity below -200 HU (range 300..300): looks like MR or CT without HU scaling'
    """
    _, lo, hi = _low_high(volume)
    if modality == "ct" and lo > CT_MIN_EXPECTED:
        return (
            f"declared ct but no intensity below {CT_MIN_EXPECTED:.0f} HU (range {lo:.4g}..{hi:.4g}): "
            "looks like MR or CT without HU scaling"
        )
    if modality in ("mr", "gray"):
        decision = detect_modality(volume)
        if decision.modality == "ct" and decision.certain:
            return f"declared {modality} but {decision.reason}: looks like CT"
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

    The decision is logged at INFO level, one line per file, and kept for :func:`recorded_decision`; an uncertain
    ``auto`` decision (:func:`detect_modality`) is also one warning line, once per file and process.
    """
    declared = match_modality(path, spec, root)
    if declared != "auto":
        how = "declared" if isinstance(spec, str) else "declared by data.modality pattern"
        _DECISIONS[str(path)] = (declared, how, True)
        return declared, how
    decision = detect_modality(volume)
    how = f"auto: {'' if decision.certain else 'uncertain: '}{decision.reason}"
    log.info("%s: modality %s (%s)", path, decision.modality, how)
    seen = _DECISIONS.get(str(path))
    _DECISIONS[str(path)] = (decision.modality, how, decision.certain)
    if not decision.certain and seen != _DECISIONS[str(path)]:
        log.warning(
            "warning: %s: auto modality %s is uncertain: %s; declare it with data.modality (a pattern for this file)",
            path,
            decision.modality,
            decision.reason,
        )
    return decision.modality, how


#: ``str(path) -> (modality, how, certain)`` of every file decided in this process (declared or ``auto``).
_DECISIONS: dict[str, tuple[str, str, bool]] = {}


def recorded_decision(path: str | os.PathLike) -> tuple[str, str, bool] | None:
    """``(modality, how, certain)`` of the last :func:`resolve_modality` of ``path`` in this process, or ``None``
    (e.g. when the slice index came from the disk cache and the volume was not read).

    Example:
        >>> resolve_modality("scan.nii.gz", "auto", None, np.full((4, 4, 4), -1000.0))[0]
        'ct'
        >>> recorded_decision("scan.nii.gz")[0]
        'ct'
    """
    return _DECISIONS.get(str(path))


def channel_handling(name: str) -> str:
    """The intensity handling (:data:`CHANNEL_HANDLINGS`) of a channel named ``name``, by nnU-Net's rule.

    ``CT`` is CT (windows in HU); nnU-Net's scheme names ``zscore``, ``rescale_to_0_1``, ``noNorm`` and
    ``rgb_to_0_1`` keep their meaning; every other name (``MRI``, ``T2``, ``ADC``, ``FLAIR``, ...) is an MR-like scan,
    normalised per ``data.mr_normalisation`` (``zscore`` is nnU-Net's). Matched case-insensitively.

    Example:
        >>> [channel_handling(n) for n in ("CT", "T2", "ADC", "noNorm")]
        ['ct', 'mr', 'mr', 'none']
    """
    return _NNUNET_SCHEMES.get(str(name).strip().lower(), "mr")


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
    if modality in ("none", "rgb"):  # channel handlings with a fixed range
        return [(0.0, 1.0) if modality == "none" else (0.0, 255.0)]
    if modality == "zscore":
        mr_normalisation = "zscore"
    if mr_normalisation not in MR_NORMALISATIONS:
        raise ValueError(f"mr_normalisation must be one of {MR_NORMALISATIONS}, got {mr_normalisation!r}")
    finite = volume[np.isfinite(volume)]
    if finite.size == 0:
        return [(0.0, 0.0)]
    if modality == "rescale":
        return [(float(finite.min()), float(finite.max()))]
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
