"""Reading 2D images and masks, with one clear error per bad file.

Images come back as float32 ``(H, W, C)`` arrays in [0, 1]; masks as the raw integer grey values stored in the
file (the dataset layout maps them to class indices). NIfTI files go through :mod:`decon_med.data.volumes`.

Example:
    >>> image = read_image("ISIC_0000000.jpg", channels=3)   # (H, W, 3) float32 in [0, 1]
    >>> mask = read_mask("ISIC_0000000_segmentation.png")    # (H, W) uint8 holding 0 / 255
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from decon_med.data.volumes import NIFTI_SUFFIXES, is_nifti, nifti_stem
from decon_med.errors import DataError

#: 2D image suffixes understood everywhere (matched case-insensitively).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

__all__ = [
    "IMAGE_SUFFIXES",
    "NIFTI_SUFFIXES",
    "file_stem",
    "image_size",
    "is_image",
    "is_nifti",
    "read_image",
    "read_mask",
]


def is_image(path: str | Path) -> bool:
    """True for a 2D image file by suffix (any capitalisation)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def file_stem(path: str | Path) -> str:
    """File name without its suffix; ``.nii.gz`` counts as one suffix."""
    return nifti_stem(path) if is_nifti(path) else Path(path).stem


def _open(path: str | Path) -> Image.Image:
    """Open and fully decode an image so truncated files fail here, naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(path, f"unreadable or truncated image ({exc})") from exc
    return img


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of a 2D image, decoding it fully to catch truncation."""
    img = _open(path)
    return img.height, img.width


def read_image(path: str | Path, channels: int = 3) -> np.ndarray:
    """Read a 2D image as float32 ``(H, W, channels)`` in [0, 1].

    8-bit images are divided by 255; 16-bit and 32-bit greyscale images are scaled by their own maximum so
    medical PNG/TIFF exports keep their contrast. Colour images read with ``channels=1`` become luminance;
    greyscale images read with ``channels=3`` are replicated.
    """
    img = _open(path)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        arr = arr[..., None]
        return np.repeat(arr, 3, axis=2) if channels == 3 else arr
    img = img.convert("RGB" if channels == 3 else "L")
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr if arr.ndim == 3 else arr[..., None]


def read_mask(path: str | Path) -> np.ndarray:
    """Read a 2D mask as its raw integer values ``(H, W)``; colour masks must be grey (R = G = B)."""
    img = _open(path)
    if img.mode == "P":
        # Palette masks store class indices directly.
        return np.asarray(img, dtype=np.int64)
    arr = np.asarray(img)
    if arr.ndim == 3:
        if arr.shape[2] == 4:
            arr = arr[..., :3]
        if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            raise DataError(path, "mask has colour (R, G, B differ); expected a single-channel label image")
        arr = arr[..., 0]
    if arr.dtype.kind in "fc":  # a float mask (32-bit TIFF): whole values are class values, never truncated
        finite = np.isfinite(arr)
        if not finite.all():
            raise DataError(path, "mask holds non-finite values (NaN or inf); masks must be integer-valued")
        off = arr != np.rint(arr)
        if off.any():
            raise DataError(
                path,
                f"mask holds non-integer values (e.g. {float(arr[off].flat[0]):g}); masks must be integer-valued",
            )
    return arr.astype(np.int64)
