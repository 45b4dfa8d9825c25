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
from collections import Counter
from pathlib import Path

from sklearn.model_selection import KFold
from sklearn.utils import check_random_state

from decon_med.errors import DataError
from decon_med.folders import atomic_write


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


def check_split_lists(splits: dict, path: str | Path) -> None:
    """Check the lists of a ``splits.json``: each split a list of id strings, no id listed twice, and no id in two
    splits (train / val / test leakage).

    Raises:
        DataError: naming ``path``, the split(s) and up to five ids.

    Example:
        >>> check_split_lists({"train": ["a", "b"], "test": ["b"]}, "splits.json")
        Traceback (most recent call last):
        decon_med.errors.DataError: splits.json: ids listed in both 'train' and 'test' (leakage): ['b']
    """
    seen: dict[str, str] = {}
    for name, ids in splits.items():
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise DataError(path, f"'{name}' must be a list of id strings")
        repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
        if repeated:
            raise DataError(path, f"'{name}' lists ids more than once: {repeated[:5]}")
        for other in sorted(set(seen.values())):
            shared = sorted(i for i in ids if seen.get(i) == other)
            if shared:
                raise DataError(path, f"ids listed in both '{other}' and '{name}' (leakage): {shared[:5]}")
        seen.update(dict.fromkeys(ids, name))


def write_split(items: list[dict], path: str | Path, **info) -> None:
    """Write the chosen ids (and any ``info`` such as fraction / seed) as JSON, atomically."""
    path = Path(path)
    record = dict(info)
    record["n_images"] = len({_group(it) for it in items})
    record["ids"] = sorted({_group(it) for it in items})
    atomic_write(path, json.dumps(record, indent=1))


def read_split(path: str | Path) -> list[str]:
    """The ids written by :func:`write_split`."""
    return json.loads(Path(path).read_text())["ids"]


def _group(item: dict) -> str:
    return item.get("group") or item["id"]


def kfold_split(ids: list[str], num_folds: int, fold: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``(train, val)`` ids of cross-validation fold ``fold`` of ``num_folds`` (seeded shuffle, deterministic).

    The folds partition ``ids``: every id is in exactly one val fold. Order of ``ids`` does not matter.

    Raises:
        DataError: fewer ids than folds.

    Example:
        >>> train, val = kfold_split([f"case{i}" for i in range(10)], num_folds=5, fold=0)
        >>> len(train), len(val)
        (8, 2)
    """
    ids = sorted(ids)
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold must be in [0, {num_folds - 1}], got {fold}")
    if len(ids) < num_folds:
        raise DataError("splits", f"{len(ids)} cases are too few for {num_folds} folds; lower data.num_folds")
    folds = list(KFold(n_splits=num_folds, shuffle=True, random_state=seed).split(ids))
    train_idx, val_idx = folds[fold]
    return [ids[i] for i in train_idx], [ids[i] for i in val_idx]
