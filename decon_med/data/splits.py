"""Seeded, nested label-fraction subsets of a training split.

The subset for a fraction is a prefix of one seeded permutation of the training scans, so for the same seed
the 5 % subset lies inside the 25 % subset, which lies inside 100 %; and every initialisation fine-tuned with
the same seed sees the same images (paired comparisons). Slices of one NIfTI volume share a ``group`` and are
kept or dropped together.

Example:
    >>> subset = split_fraction(train_items, 0.05, seed=0)
    >>> write_split(subset, "runs/finetune/x/train_ids.json", fraction=0.05, seed=0, n_total=len(train_items))
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from sklearn.utils import check_random_state

from decon_med.errors import DataError


def fraction_size(n_groups: int, fraction: float) -> int:
    """Number of scans a fraction selects: ``ceil(fraction * n)``, so any positive fraction keeps one."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    return min(n_groups, math.ceil(fraction * n_groups - 1e-9))


def split_fraction(train_items: list[dict], fraction: float, seed: int) -> list[dict]:
    """The items of a seeded random ``fraction`` of the training scans (never empty).

    Args:
        train_items: items of the training split (``group`` = scan id when present, else ``id``).
        fraction: fraction of scans in (0, 1].
        seed: permutation seed; the same seed gives nested subsets across fractions.

    Raises:
        DataError: the training split is empty, so the fraction selects no image.
    """
    groups = sorted({_group(item) for item in train_items})
    k = fraction_size(len(groups), fraction)
    if k == 0:
        raise DataError("train split", f"label fraction {fraction} selects 0 images (the split is empty)")
    order = check_random_state(seed).permutation(len(groups))
    chosen = {groups[i] for i in order[:k]}
    return [item for item in train_items if _group(item) in chosen]


def write_split(items: list[dict], path: str | Path, **info) -> None:
    """Write the chosen ids (and any ``info`` such as fraction / seed) as JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = dict(info)
    record["n_images"] = len({_group(it) for it in items})
    record["ids"] = sorted({_group(it) for it in items})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)


def read_split(path: str | Path) -> list[str]:
    """The ids written by :func:`write_split`."""
    return json.loads(Path(path).read_text())["ids"]


def _group(item: dict) -> str:
    return item.get("group") or item["id"]
