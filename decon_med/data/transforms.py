"""Tensor transforms: two overlapping views for dense self-supervised pre-training, and fine-tuning / evaluation.

Inputs are sample dicts ``{"image": (H, W, C) float32 in [0, 1], "label": (H, W) int64 (optional), "id": str}``;
other keys pass through. Outputs hold CHW float32 tensors normalised by ``(x - mean) / std``.

Randomness: when ``data["seed"]`` is set, every random draw of that call derives from it (same seed, same
tensors), which makes resumed runs bit-exact. Without it a transform draws from its own generator, seeded by the
constructor's ``seed``; inside a ``DataLoader`` worker that generator is re-seeded from the worker's torch seed so
that workers do not repeat each other's augmentations.

Intensity images: a sample may carry ``"modality"`` (set per file for NIfTI slices); a ``ct``, ``mr`` or ``gray``
sample always gets the intensity augmentations, never RGB colour jitter, hue or solarisation, whatever the
configured modality. The key is consumed (not passed on).

2.5D stacks: with ``slices`` > 1 an image holds that many neighbouring slices of ``in_channels / slices`` channels
each, stacked along the channel axis. Each slice is normalised with the statistics of a single slice, and all of
them get the same geometric and photometric augmentation (the same random draws, applied slice by slice).

Patch sampling (``patch=True``, ``data.sampling: patch``): images arrive at physical scale and are never resized
as a whole; training takes random ``size x size`` patches (:class:`SegPatchTransform`, pre-training views are cut
from such a patch), an image smaller than a patch is padded evenly with intensity 0 and label 0.

Geometry is done here with numpy / OpenCV so that crop boxes are exact. Pixel convention: pixel ``j`` covers
``[j, j + 1)``; a crop ``(x0, y0, w, h)`` covers ``[x0, x0 + w) x [y0, y0 + h)`` and is resized with OpenCV's
half-pixel-centre sampling, so crop coordinate ``x`` lands at ``(x - x0) / w`` of the output side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
import torch

MODALITIES = ("rgb", "gray", "mr", "ct")
#: Per-sample modalities that are intensity images (never RGB photometric augmentation).
INTENSITY_MODALITIES = ("gray", "mr", "ct")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Channel averages of the ImageNet statistics: a 1-channel input is scaled like a replicated 3-channel one.
GRAY_MEAN = (0.449,)
GRAY_STD = (0.226,)

# A crop in source pixels: (x0, y0, w, h), covering [x0, x0 + w) x [y0, y0 + h).
Crop = tuple[int, int, int, int]


def default_normalisation(
    in_channels: int, modality: str, slices: int = 1
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std used to normalise network inputs.

    Three channels (RGB, or greyscale replicated) use the ImageNet statistics, as ImageNet-style encoders
    expect. One channel uses the channel average of those statistics, ``(0.449,)`` / ``(0.226,)``, so that an
    encoder whose first convolution was summed over RGB sees inputs on the same scale; any other number of
    channels (nnU-Net channel files: CT + T2, T1 / T1ce / T2 / FLAIR) uses that average per channel. The
    modality does not change the statistics (images arrive already scaled to [0, 1]); it is only validated. A 2.5D
    stack of ``slices`` slices repeats the statistics of one slice (``in_channels / slices`` channels) for each
    slice.

    Example:
        >>> default_normalisation(1, "ct")
        ((0.449,), (0.226,))
        >>> default_normalisation(3, "mr", slices=3)      # 3 neighbouring 1-channel slices
        ((0.449, 0.449, 0.449), (0.226, 0.226, 0.226))
    """
    per_slice = _slice_channels(in_channels, slices)
    _check_modality(modality, per_slice)
    if per_slice == 3:
        return IMAGENET_MEAN * slices, IMAGENET_STD * slices
    return GRAY_MEAN * slices * per_slice, GRAY_STD * slices * per_slice


def _slice_channels(in_channels: int, slices: int) -> int:
    """Channels of one slice of a stack of ``slices`` slices."""
    if slices < 1 or in_channels % slices:
        raise ValueError(f"in_channels {in_channels} is not a multiple of the {slices} stacked slices")
    return in_channels // slices


def augmentation_modality(modality) -> str:
    """The transform modality of a ``data.modality`` setting: ``auto`` and per-file mappings are ``gray``.

    Example:
        >>> augmentation_modality({"ct": "ct"}), augmentation_modality("rgb")
        ('gray', 'rgb')
    """
    if isinstance(modality, str) and modality in MODALITIES:
        return modality
    return "gray"


def _is_colour(modality: str, in_channels: int, sample_modality: str | None) -> bool:
    """RGB photometric augmentation only for 3-channel rgb data whose sample is an rgb image (a volume's sample
    says ``ct``, ``mr``, ``gray`` or, for channels handled differently, e.g. ``ct+mr``: never colour)."""
    return modality == "rgb" and in_channels == 3 and sample_modality in (None, "rgb")


def _check_modality(modality: str, in_channels: int) -> None:
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality '{modality}'; expected one of {', '.join(MODALITIES)}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")


def _check_crop_scale(crop_scale: Sequence[float]) -> None:
    if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {tuple(crop_scale)}")


def _resolve_normalisation(
    in_channels: int,
    modality: str,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    slices: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    default_mean, default_std = default_normalisation(in_channels, modality, slices)
    mean = default_mean if mean is None else tuple(mean)
    std = default_std if std is None else tuple(std)
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean and std need {in_channels} values, got {len(mean)} and {len(std)}")
    if min(std) <= 0:
        raise ValueError(f"std must be positive, got {std}")
    return np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)


# --------------------------------------------------------------------------------------------------------------
# Crop geometry
# --------------------------------------------------------------------------------------------------------------


def _sample_crop(
    rng: np.random.Generator, height: int, width: int, scale: Sequence[float], ratio: Sequence[float]
) -> Crop:
    """A random-resized-crop rectangle with torchvision ``RandomResizedCrop.get_params`` semantics.

    The area fraction is uniform in ``scale``, the aspect ratio ``w / h`` log-uniform in ``ratio``; after 10
    rejected tries it falls back to the largest centred crop whose aspect ratio lies in ``ratio``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x0 = int(rng.integers(0, width - w + 1))
            y0 = int(rng.integers(0, height - h + 1))
            return x0, y0, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _intersection(a: Crop, b: Crop) -> tuple[int, int, int, int] | None:
    """The intersection ``(ix0, iy0, ix1, iy1)`` of two crops, or None when it has no area."""
    ix0, iy0 = max(a[0], b[0]), max(a[1], b[1])
    ix1, iy1 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    if ix1 <= ix0 or iy1 <= iy0:
        return None
    return ix0, iy0, ix1, iy1


def _sample_two_crops(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    min_overlap: float,
    max_tries: int,
) -> tuple[Crop, Crop]:
    """Two random-resized crops whose intersection covers at least ``min_overlap`` of the image area.

    Crop 2 is re-sampled up to ``max_tries`` times until its intersection with crop 1 is non-empty and at least
    ``min_overlap * height * width`` pixels; then crop 1 is used again. (SlotCon instead compares the
    intersection with the second crop's area; the image area gives a threshold independent of crop size.)
    """
    crop1 = _sample_crop(rng, height, width, scale, ratio)
    min_area = min_overlap * height * width
    for _ in range(max_tries):
        crop2 = _sample_crop(rng, height, width, scale, ratio)
        inter = _intersection(crop1, crop2)
        if inter is not None and (inter[2] - inter[0]) * (inter[3] - inter[1]) >= min_area:
            return crop1, crop2
    return crop1, crop1


def _overlap_box(crop: Crop, inter: tuple[int, int, int, int]) -> torch.Tensor:
    """The intersection in the crop's own normalised coordinates, ``[x0, y0, x1, y1]`` in [0, 1]."""
    x0, y0, w, h = crop
    ix0, iy0, ix1, iy1 = inter
    box = ((ix0 - x0) / w, (iy0 - y0) / h, (ix1 - x0) / w, (iy1 - y0) / h)
    return torch.tensor(box, dtype=torch.float32)


def _resized_crop(array: np.ndarray, crop: Crop, size: int, interpolation: int) -> np.ndarray:
    """Crop ``array`` (HW or HWC) to ``crop`` and resize it to ``size x size``, keeping its dimensions."""
    x0, y0, w, h = crop
    patch = np.ascontiguousarray(array[y0 : y0 + h, x0 : x0 + w])
    out = cv2.resize(patch, (size, size), interpolation=interpolation)
    if array.ndim == 3 and out.ndim == 2:  # OpenCV drops a single channel
        out = out[:, :, None]
    return out


def _resize_image(image: np.ndarray, crop: Crop, size: int) -> np.ndarray:
    """Resized crop of an image: area averaging when the crop shrinks on both axes (no aliasing when a 2000 px
    photograph becomes a 224 px view, like PIL's anti-aliased resize), bilinear otherwise."""
    shrinks = crop[2] >= size and crop[3] >= size
    return _resized_crop(image, crop, size, cv2.INTER_AREA if shrinks else cv2.INTER_LINEAR)


def _resize_label(label: np.ndarray, crop: Crop, size: int) -> np.ndarray:
    """Nearest-neighbour resized crop of a class-index mask.

    ``INTER_NEAREST_EXACT`` samples at pixel centres like the image resize (bilinear or area), so image and mask
    stay aligned (plain ``INTER_NEAREST`` is biased by up to half a pixel).
    """
    out = _resized_crop(label.astype(np.int32), crop, size, cv2.INTER_NEAREST_EXACT)
    return out.astype(np.int64)


# --------------------------------------------------------------------------------------------------------------
# Patches at physical scale
# --------------------------------------------------------------------------------------------------------------

#: Fine-tuning patches centred on a foreground pixel (nnU-Net's oversampling: a third of the patches).
FOREGROUND_FRACTION = 1 / 3


def pad_to(array: np.ndarray, size: int, value: float = 0) -> np.ndarray:
    """``array`` (HW or HWC) padded evenly on both sides with ``value`` to at least ``size x size``.

    Example:
        >>> pad_to(np.ones((40, 70)), 64).shape
        (64, 70)
    """
    height, width = array.shape[:2]
    extra_h, extra_w = max(size - height, 0), max(size - width, 0)
    if not extra_h and not extra_w:
        return array
    pad = [(extra_h // 2, extra_h - extra_h // 2), (extra_w // 2, extra_w - extra_w // 2)]
    pad += [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad, mode="constant", constant_values=value)


def _patch_origin(
    rng: np.random.Generator, height: int, width: int, size: int, label: np.ndarray | None, foreground: float
) -> tuple[int, int]:
    """Top-left ``(y0, x0)`` of a ``size x size`` patch inside ``height x width`` (both >= ``size``).

    With probability ``foreground`` and a label holding foreground, the patch is centred (as far as the borders
    allow) on a random pixel of a random foreground class present; otherwise its position is uniform.
    """
    if label is not None and foreground > 0 and rng.random() < foreground:
        classes = np.unique(label)
        classes = classes[classes > 0]
        if classes.size:
            ys, xs = np.nonzero(label == classes[int(rng.integers(classes.size))])
            pick = int(rng.integers(ys.size))
            y0 = min(max(int(ys[pick]) - size // 2, 0), height - size)
            x0 = min(max(int(xs[pick]) - size // 2, 0), width - size)
            return y0, x0
    return int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))


def _centre_patch(array: np.ndarray, size: int, value: float = 0) -> np.ndarray:
    """The centred ``size x size`` patch of ``array``, padded with ``value`` where it is smaller."""
    array = pad_to(array, size, value)
    y0, x0 = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return np.ascontiguousarray(array[y0 : y0 + size, x0 : x0 + size])


# --------------------------------------------------------------------------------------------------------------
# Arrays and tensors
# --------------------------------------------------------------------------------------------------------------


def _to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """``image`` as float32 HWC with ``channels`` channels (greyscale replicated, or averaged to one)."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim == 3 and image.shape[2] == channels:  # also a 2.5D stack of any number of channels
        return image
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"expected an (H, W, C) image with C in (1, 3), got shape {image.shape}")
    if image.shape[2] == channels:
        return image
    if channels == 3:
        return np.repeat(image, 3, axis=2)
    return image.mean(axis=2, keepdims=True)


def _to_tensor(image: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """HWC float array -> normalised CHW float32 tensor."""
    normalised = (image.astype(np.float32) - mean) / std
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))


def _label(data: dict) -> np.ndarray | None:
    label = data.get("label")
    return None if label is None else np.asarray(label)


def _run_seeded(
    pipeline: A.Compose, image: np.ndarray, rng: np.random.Generator, slices: int = 1
) -> np.ndarray:
    """Apply an albumentations pipeline with every transform seeded from ``rng``.

    Each transform gets its own seed: seeding only the ``Compose`` would give all of them the same stream, so
    their apply-or-not draws would be correlated. A stack of ``slices`` slices is augmented slice by slice with
    the same seeds, so every slice gets the same random parameters; an image (or slice) of other than 1 or 3
    channels likewise channel by channel.
    """
    seeds = rng.integers(0, 2**32, size=len(pipeline.transforms) + 1)

    def run(part: np.ndarray) -> np.ndarray:
        if part.shape[2] not in (1, 3):  # the jitter takes 1 or 3 channels: one at a time, same seeds
            channels = [run(np.ascontiguousarray(part[:, :, c : c + 1])) for c in range(part.shape[2])]
            return np.concatenate(channels, axis=2)
        pipeline.set_random_seed(int(seeds[0]))
        for transform, seed in zip(pipeline.transforms, seeds[1:], strict=True):
            transform.set_random_seed(int(seed))
        out = pipeline(image=part)["image"]
        return out[:, :, None] if out.ndim == 2 else out

    if slices > 1:
        step = image.shape[2] // slices
        parts = [run(np.ascontiguousarray(image[:, :, i : i + step])) for i in range(0, image.shape[2], step)]
        out = np.concatenate(parts, axis=2)
    else:
        out = run(image)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


class _RandomTransform:
    """Base of the random transforms: picks the generator of one call."""

    def __init__(self, seed: int | None):
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self._rng_worker: int | None = None  # DataLoader worker the generator was re-seeded for

    def _rng_for(self, data: dict) -> np.random.Generator:
        if data.get("seed") is not None:
            return np.random.default_rng(int(data["seed"]))
        worker = torch.utils.data.get_worker_info()
        if worker is not None and worker.id != self._rng_worker:
            entropy = [worker.seed] if self.seed is None else [self.seed, worker.seed]
            self._rng = np.random.default_rng(entropy)
            self._rng_worker = worker.id
        return self._rng


# --------------------------------------------------------------------------------------------------------------
# Photometric pipelines
# --------------------------------------------------------------------------------------------------------------


#: SlotCon / BYOL / MoCo v2 blur: sigma in pixels of a 224-px view.
BLUR_SIGMA_224 = (0.1, 2.0)


def blur_sigma_for(size: int) -> tuple[float, float]:
    """The reference blur range (0.1, 2.0) px at 224 px, scaled to a ``size``-px view: the same blur relative to
    the image content, so a 64-px view is not blurred 3.5 times harder than the recipe's."""
    return tuple(s * size / 224 for s in BLUR_SIGMA_224)


def _blur(p: float, sigma: Sequence[float] = BLUR_SIGMA_224) -> A.GaussianBlur:
    return A.GaussianBlur(blur_limit=0, sigma_limit=tuple(sigma), p=p)


def _pretrain_photometric(
    colour: bool, view: int, recipe: str = "byol", sigma: Sequence[float] = BLUR_SIGMA_224
) -> A.Compose:
    """The photometric augmentation of one pre-training view (1 or 2) under ``recipe`` (``byol`` or ``mocov2``),
    blurring with sigma in ``sigma`` (pixels)."""
    saturation = 0.4 if recipe == "mocov2" else 0.2
    if colour:
        ops = [
            A.ColorJitter(brightness=0.4, contrast=0.4, saturation=saturation, hue=0.1, p=0.8),
            A.ToGray(p=0.2),
        ]
    else:
        ops = [
            A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.0, hue=0.0, p=0.8),
            A.RandomGamma(gamma_limit=(70, 150), p=0.5),
        ]
    if recipe == "mocov2":
        ops.append(_blur(0.5, sigma))  # the same for both views
    elif view == 1:
        ops.append(_blur(1.0, sigma))
    else:
        ops.append(_blur(0.1, sigma))
        if colour:
            ops.append(A.Solarize(threshold_range=(0.5, 0.5), p=0.2))
        else:
            ops.append(A.GaussNoise(std_range=(0.01, 0.04), per_channel=False, p=0.5))
    return A.Compose(ops)


def _finetune_photometric(colour: bool) -> A.Compose:
    if colour:
        return A.Compose([A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.1, hue=0.02, p=0.5)])
    return A.Compose([A.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.0, hue=0.0, p=0.5)])


# --------------------------------------------------------------------------------------------------------------
# Public transforms
# --------------------------------------------------------------------------------------------------------------


class TwoViewTransform(_RandomTransform):
    """Two overlapping random-resized crops of one image for dense SSL (SlotCon).

    Steps: sample crop 1, re-sample crop 2 until the crops overlap on at least ``min_overlap`` of the image
    area (see :func:`_sample_two_crops`), resize both to ``size x size`` (area averaging when shrinking, else
    bilinear), flip each horizontally with probability ``hflip``, apply the photometric augmentation of the
    view, normalise.

    Photometric augmentation (``color=True``), ``recipe="byol"`` following SlotCon / BYOL:

    - ``rgb`` with 3 channels: ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8, ToGray p 0.2, Gaussian blur sigma
      ``blur_sigma`` (the recipe's 0.1-2.0 px at 224 px, scaled to ``size``) always on view 1 and p 0.1 on
      view 2, Solarize(0.5) p 0.2 on view 2.
    - ``gray`` / ``mr`` / ``ct`` (and 1-channel ``rgb``): no hue, saturation or ToGray, which are meaningless
      for intensity images; brightness/contrast jitter (0.4, 0.4) p 0.8, random gamma in [0.7, 1.5] p 0.5, the
      same blur rule, and light Gaussian noise (std 0.01-0.04, identical on all channels) p 0.5 on view 2 in
      place of solarisation, which inverts tissue contrast.

    ``recipe="mocov2"`` (DenseCL / MoCo v2) treats both views alike: ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8,
    ToGray p 0.2 and blur p 0.5, no solarisation or noise (intensity images: the same jitter and gamma).

    Output keys: ``view1``, ``view2`` (C, size, size) float32; ``box1``, ``box2`` (4,) float32, the overlap of
    the two crops as ``[x0, y0, x1, y1]`` in [0, 1] of each view's own *unflipped* crop (x along width);
    ``flip1``, ``flip2`` 0-dim bool tensors, True when the view was flipped horizontally after resizing. To
    compare the views, flip a flagged view's feature map back (``feat.flip(-1)``), then pool the box
    (e.g. ``roi_align(..., aligned=True)`` with the box times the map size). ``image`` and ``label`` are
    dropped; other keys pass through.

    Args:
        size: output side in pixels.
        crop_scale: range of the crop area as a fraction of the image area.
        ratio: range of the crop aspect ratio ``w / h`` (sampled log-uniformly).
        min_overlap: minimum intersection area of the two crops, as a fraction of the image area.
        max_tries: re-samplings of crop 2 before falling back to crop 1.
        hflip: probability of flipping each view horizontally.
        modality: ``rgb``, ``gray``, ``mr`` or ``ct``; selects the photometric augmentation.
        in_channels: channels of the output (those of the image, or 3 with greyscale replicated).
        color: enable the photometric augmentation.
        recipe: ``byol`` (asymmetric views, SlotCon) or ``mocov2`` (symmetric views, DenseCL).
        blur_sigma: Gaussian blur sigma range in pixels of the output view; ``None`` = :func:`blur_sigma_for`
            ``(size)``, the recipes' (0.1, 2.0) px at 224 px scaled to ``size``.
        mean, std: normalisation; default :func:`default_normalisation`.
        seed: seed of the internal generator, used when a sample has no ``"seed"``.
        slices: slices stacked in the image (2.5D: ``2 * data.context_slices + 1``), augmented alike.
        patch: physical scale (``data.sampling: patch``): a random ``size x size`` patch of the image (padded
            with 0 where smaller) is taken first, and both views are cropped from that patch.

    Example:
        >>> t = TwoViewTransform(224, modality="rgb", in_channels=3)
        >>> out = t({"image": image, "id": "a", "seed": 7})
        >>> out["view1"].shape, out["box1"], out["flip1"]
        (torch.Size([3, 224, 224]), tensor([0.12, 0.00, 1.00, 0.83]), tensor(False))
    """

    def __init__(
        self,
        size: int,
        crop_scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        min_overlap: float = 0.01,
        max_tries: int = 100,
        hflip: float = 0.5,
        modality: str = "rgb",
        in_channels: int = 3,
        color: bool = True,
        recipe: str = "byol",
        blur_sigma: Sequence[float] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        seed: int | None = None,
        slices: int = 1,
        patch: bool = False,
    ):
        super().__init__(seed)
        self.mean, self.std = _resolve_normalisation(in_channels, modality, mean, std, slices)
        _check_crop_scale(crop_scale)
        self.slices, self.patch = slices, patch
        self.blur_sigma = blur_sigma_for(size) if blur_sigma is None else tuple(blur_sigma)
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < low <= high, got {self.blur_sigma}")
        if recipe not in ("byol", "mocov2"):
            raise ValueError(f"recipe must be 'byol' or 'mocov2', got {recipe!r}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {tuple(ratio)}")
        self.size = size
        self.crop_scale = tuple(crop_scale)
        self.ratio = tuple(ratio)
        self.min_overlap = min_overlap
        self.max_tries = max_tries
        self.hflip = hflip
        self.modality = modality
        self.in_channels = in_channels
        self.color = color
        self.recipe = recipe
        self._pipelines = (
            {
                colour: tuple(_pretrain_photometric(colour, view, recipe, self.blur_sigma) for view in (1, 2))
                for colour in (False, True)
            }
            if color
            else None
        )

    def __call__(self, data: dict) -> dict:
        rng = self._rng_for(data)
        image = _to_channels(data["image"], self.in_channels)
        if self.patch:
            image = pad_to(image, self.size)
            y0, x0 = _patch_origin(rng, image.shape[0], image.shape[1], self.size, None, 0.0)
            image = image[y0 : y0 + self.size, x0 : x0 + self.size]
        height, width = image.shape[:2]
        crops = _sample_two_crops(
            rng, height, width, self.crop_scale, self.ratio, self.min_overlap, self.max_tries
        )
        flips = rng.random(2) < self.hflip
        inter = _intersection(*crops)

        colour = _is_colour(self.modality, self.in_channels // self.slices, data.get("modality"))
        photometric = None if self._pipelines is None else self._pipelines[colour]
        out = {key: value for key, value in data.items() if key not in ("image", "label", "modality")}
        for k, (crop, flip) in enumerate(zip(crops, flips, strict=True), start=1):
            view = _resize_image(image, crop, self.size)
            if flip:
                view = view[:, ::-1]
            if photometric is not None:
                view = _run_seeded(photometric[k - 1], np.ascontiguousarray(view), rng, self.slices)
            out[f"view{k}"] = _to_tensor(view, self.mean, self.std)
            out[f"box{k}"] = _overlap_box(crop, inter)
            out[f"flip{k}"] = torch.tensor(bool(flip))
        return out


class SegTrainTransform(_RandomTransform):
    """Fine-tuning augmentation of an image and its mask.

    Random resized crop (area fraction in ``crop_scale``, aspect ratio in [3/4, 4/3]) resized to ``size x size``
    (area-averaged or bilinear image, nearest mask), horizontal / vertical flips, then mild intensity jitter:
    ColorJitter(0.2, 0.2, 0.1, 0.02) p 0.5 for 3-channel ``rgb``, brightness/contrast (0.1, 0.1) p 0.5 for the
    greyscale modalities. A missing or None ``label`` is left out of the output.

    Args:
        size: output side in pixels.
        crop_scale: range of the crop area as a fraction of the image area.
        hflip, vflip: flip probabilities.
        modality: ``rgb``, ``gray``, ``mr`` or ``ct``.
        in_channels: channels of the output (those of the image, or 3 with greyscale replicated).
        mean, std: normalisation; default :func:`default_normalisation`.
        seed: seed of the internal generator, used when a sample has no ``"seed"``.
        slices: slices stacked in the image (2.5D: ``2 * data.context_slices + 1``), augmented alike.

    Example:
        >>> t = SegTrainTransform(224, modality="rgb")
        >>> out = t({"image": image, "label": mask, "id": "a", "seed": 3})
        >>> out["image"].shape, out["label"].shape, out["label"].dtype
        (torch.Size([3, 224, 224]), torch.Size([224, 224]), torch.int64)
    """

    ratio = (3 / 4, 4 / 3)

    def __init__(
        self,
        size: int,
        crop_scale: Sequence[float] = (0.5, 1.0),
        hflip: float = 0.5,
        vflip: float = 0.0,
        modality: str = "rgb",
        in_channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        seed: int | None = None,
        slices: int = 1,
    ):
        super().__init__(seed)
        self.mean, self.std = _resolve_normalisation(in_channels, modality, mean, std, slices)
        _check_crop_scale(crop_scale)
        self.slices = slices
        self.size = size
        self.crop_scale = tuple(crop_scale)
        self.hflip = hflip
        self.vflip = vflip
        self.modality = modality
        self.in_channels = in_channels
        self._pipelines = {colour: _finetune_photometric(colour) for colour in (False, True)}

    def __call__(self, data: dict) -> dict:
        rng = self._rng_for(data)
        image = _to_channels(data["image"], self.in_channels)
        label = _label(data)
        crop = _sample_crop(rng, image.shape[0], image.shape[1], self.crop_scale, self.ratio)
        do_hflip, do_vflip = rng.random() < self.hflip, rng.random() < self.vflip

        image = _resize_image(image, crop, self.size)
        if label is not None:
            label = _resize_label(label, crop, self.size)
        if do_hflip:
            image = image[:, ::-1]
            label = None if label is None else label[:, ::-1]
        if do_vflip:
            image = image[::-1]
            label = None if label is None else label[::-1]
        return self._finish(data, image, label, rng)

    def _finish(
        self, data: dict, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator
    ) -> dict:
        """Photometric jitter, normalisation and the output dict of an augmented image and label."""
        colour = _is_colour(self.modality, self.in_channels // self.slices, data.get("modality"))
        image = _run_seeded(self._pipelines[colour], np.ascontiguousarray(image), rng, self.slices)

        out = {key: value for key, value in data.items() if key not in ("label", "modality")}
        out["image"] = _to_tensor(image, self.mean, self.std)
        if label is not None:
            out["label"] = torch.from_numpy(np.ascontiguousarray(label))
        return out


class SegPatchTransform(SegTrainTransform):
    """Fine-tuning on random patches at the image's own scale (``data.sampling: patch``): nothing is resized.

    The image and its mask are padded evenly (intensity 0, label 0) to at least ``size x size``; a
    ``size x size`` patch is taken, centred on a random pixel of a random foreground class present with
    probability ``foreground`` (:data:`FOREGROUND_FRACTION`, as nnU-Net oversamples foreground), elsewhere at a
    uniform position; then the flips and the intensity jitter of :class:`SegTrainTransform`.

    Args:
        size: patch side in pixels.
        foreground: probability of a patch centred on foreground (when the mask has any).
        hflip, vflip, modality, in_channels, mean, std, seed, slices: as :class:`SegTrainTransform`.
        color: intensity jitter on (off gives the patch's pixels unchanged but for normalisation and flips).

    Example:
        >>> t = SegPatchTransform(64, modality="mr", in_channels=1)
        >>> out = t({"image": slice_hw1, "label": mask, "id": "a", "seed": 3})     # any slice size
        >>> out["image"].shape, out["label"].shape
        (torch.Size([1, 64, 64]), torch.Size([64, 64]))
    """

    def __init__(
        self,
        size: int,
        foreground: float = FOREGROUND_FRACTION,
        hflip: float = 0.5,
        vflip: float = 0.0,
        modality: str = "rgb",
        in_channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        seed: int | None = None,
        slices: int = 1,
        color: bool = True,
    ):
        super().__init__(
            size,
            hflip=hflip,
            vflip=vflip,
            modality=modality,
            in_channels=in_channels,
            mean=mean,
            std=std,
            seed=seed,
            slices=slices,
        )
        if not 0.0 <= foreground <= 1.0:
            raise ValueError(f"foreground must be a probability in [0, 1], got {foreground}")
        self.foreground = foreground
        if not color:
            self._pipelines = {colour: A.Compose([]) for colour in (False, True)}

    def __call__(self, data: dict) -> dict:
        rng = self._rng_for(data)
        image = pad_to(_to_channels(data["image"], self.in_channels), self.size)
        label = _label(data)
        if label is not None:
            label = pad_to(label, self.size)
        y0, x0 = _patch_origin(rng, image.shape[0], image.shape[1], self.size, label, self.foreground)
        do_hflip, do_vflip = rng.random() < self.hflip, rng.random() < self.vflip

        image = image[y0 : y0 + self.size, x0 : x0 + self.size]
        if label is not None:
            label = label[y0 : y0 + self.size, x0 : x0 + self.size].astype(np.int64)
        if do_hflip:
            image = image[:, ::-1]
            label = None if label is None else label[:, ::-1]
        if do_vflip:
            image = image[::-1]
            label = None if label is None else label[::-1]
        return self._finish(data, image, label, rng)


class SegEvalTransform:
    """Deterministic resize to ``size x size`` for evaluation.

    The image is resized (area averaging when shrinking, else bilinear), the mask (if any) with nearest neighbour;
    ``data["orig_size"]`` records the input ``(H, W)`` so predictions can be resized back. A missing or None
    ``label`` is left out. With ``full_label`` the mask is also kept at its original size as ``label_full``, for
    scoring predictions at the original resolution (as mmseg does).

    With ``patch`` (``data.sampling: patch``) nothing is resized: ``image`` and ``label`` are the centred
    ``size x size`` patch (padded with 0 where the image is smaller), for anything that batches fixed-size inputs,
    and with ``full_label`` the whole normalised image is also kept as ``image_full``, for sliding-window
    inference at native resolution.

    Args:
        size: output side in pixels.
        modality: ``rgb``, ``gray``, ``mr`` or ``ct``.
        in_channels: channels of the output (those of the image, or 3 with greyscale replicated).
        mean, std: normalisation; default :func:`default_normalisation`.
        full_label: also return the mask at its original size as ``label_full``.
        slices: slices stacked in the image (2.5D: ``2 * data.context_slices + 1``).
        patch: physical-scale mode (see above).

    Example:
        >>> out = SegEvalTransform(224)({"image": image, "label": mask, "id": "a"})
        >>> out["image"].shape, out["orig_size"]
        (torch.Size([3, 224, 224]), (480, 640))
    """

    def __init__(
        self,
        size: int,
        modality: str = "rgb",
        in_channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        full_label: bool = False,
        slices: int = 1,
        patch: bool = False,
    ):
        self.mean, self.std = _resolve_normalisation(in_channels, modality, mean, std, slices)
        self.slices, self.patch = slices, patch
        self.size = size
        self.modality = modality
        self.in_channels = in_channels
        self.full_label = full_label

    def __call__(self, data: dict) -> dict:
        image = _to_channels(data["image"], self.in_channels)
        height, width = image.shape[:2]
        whole: Crop = (0, 0, width, height)
        label = _label(data)

        out = {key: value for key, value in data.items() if key not in ("label", "modality")}
        if self.patch:
            out["image"] = _to_tensor(_centre_patch(image, self.size), self.mean, self.std)
            if self.full_label:
                out["image_full"] = _to_tensor(image, self.mean, self.std)
        else:
            out["image"] = _to_tensor(_resize_image(image, whole, self.size), self.mean, self.std)
        if label is not None:
            if self.patch:
                out["label"] = torch.from_numpy(_centre_patch(label.astype(np.int64), self.size))
            else:
                out["label"] = torch.from_numpy(_resize_label(label, whole, self.size))
            if self.full_label:
                out["label_full"] = torch.from_numpy(label.astype(np.int64))
        out["orig_size"] = (int(height), int(width))
        return out

    @property
    def fill(self) -> tuple[float, ...]:
        """Per channel, the normalised value of intensity 0: what patch training pads with."""
        return tuple(float(v) for v in -self.mean / self.std)
