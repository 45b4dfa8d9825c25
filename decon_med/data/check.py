"""Dataset integrity check: read every file once before any training and summarise the dataset.

Every problem is a :class:`~decon_med.errors.DataError` whose message starts with the offending file: missing
root, empty folder, unreadable or truncated image / NIfTI, image without mask (or mask without image), mask
values outside the expected set, image/mask size mismatch, a label fraction that selects no image; for volumes,
a label whose shape or affine differs from its image's, non-integer label values and 4D images without
``data.channels``. The summary also counts, per split, the slices each rule skipped and the modality of each
volume, lists each volume's modality and how it was decided (declared, or ``auto`` with its evidence;
:func:`modality_rows`), and lists files whose intensities contradict their declared modality or whose ``auto``
decision is uncertain (one warning line each; the check goes on). Run folders keep the same per-file list as
``modalities.csv`` (:func:`write_modalities`).

Example:
    >>> summary = check_dataset(load_config("configs/finetune/isic.yaml"))
    >>> print(format_summary(summary))
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from decon_med.config import Config
from decon_med.data.datasets import read_pair
from decon_med.data.intensity import match_modality, recorded_decision
from decon_med.data.layouts import LAYOUTS, SPLITS, Layout, get_layout, num_classes, slice_options
from decon_med.data.splits import split_fraction
from decon_med.data.volumes import SliceOptions
from decon_med.errors import ConfigError, DataError
from decon_med.folders import atomic_write

#: Files listed one per line in the ``check-data`` printout (all are in ``--json``).
MAX_LISTED_FILES = 20


def check_dataset(cfg: Config, progress: bool = True) -> dict:
    """Read every image and mask of every split and return a JSON-ready summary.

    Args:
        cfg: config; ``cfg.data`` names the dataset, and ``cfg.fraction`` (fine-tuning configs) is checked too.
        progress: show a progress bar per split.

    Raises:
        DataError: the first bad file found, in id order.
    """
    layout = get_layout(cfg.data)
    layout.check_root()
    labeled = layout.name != "unlabeled"
    names = cfg.data.class_names
    if labeled and names is not None and len(names) != num_classes(cfg.data):
        raise ConfigError(
            f"config key 'data.class_names': has {len(names)} names but the dataset has "
            f"{num_classes(cfg.data)} classes"
        )
    splits = SPLITS if labeled else ("train",)
    summary: dict = {
        "dataset": layout.name,
        "root": str(layout.root),
        "classes": list(layout.class_names),
        "splits": {},
    }
    train_items: list[dict] = []
    listed: dict[str, list[dict]] = {}
    for split in splits:
        items = layout.items(split, labeled=labeled)
        if not items:
            raise DataError(layout.root, f"split '{split}' has no images")
        if split == "train":
            train_items = items
        listed[split] = items
        summary["splits"][split] = _check_items(layout, items, split, cfg.data.num_workers, progress)
        summary["splits"][split].update(_volume_stats(layout.stats.get(split, {})))
    rows = modality_rows(listed, slice_options(cfg.data))
    summary["files"] = rows
    for row in rows:
        if not row["certain"]:
            line = f"{row['file']}: auto modality {row['modality']} is uncertain ({row['how']}); "
            line += "declare it with data.modality"
            summary["splits"][row["split"]]["warnings"].append(line)
    fraction = getattr(cfg, "fraction", None)
    if fraction is not None:
        subset = split_fraction(train_items, fraction, cfg.seed)
        summary["fraction"] = {
            "fraction": fraction,
            "seed": cfg.seed,
            "n_images": len({it.get("group", it["id"]) for it in subset}),
        }
    return summary


def _check_items(layout: Layout, items: list[dict], split: str, workers: int, progress: bool) -> dict:
    opts = slice_options(layout.cfg)

    def check_one(item: dict) -> tuple[tuple[int, int], Counter | None]:
        image, raw = read_pair(item, opts)
        if raw is None:
            return image.shape[:2], None
        layout.map_label(raw, item["label"])
        values, counts = np.unique(raw, return_counts=True)
        return image.shape[:2], Counter(dict(zip(values.tolist(), counts.tolist(), strict=True)))

    sizes: Counter = Counter()
    hist: Counter = Counter()
    bar = tqdm(total=len(items), desc=f"check {split}", unit="img", disable=not progress, leave=False)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for size, counts in pool.map(check_one, items):
            sizes[size] += 1
            if counts is not None:
                hist.update(counts)
            bar.update()
    bar.close()
    heights = [h for h, _ in sizes]
    widths = [w for _, w in sizes]
    lut = layout.label_lut()
    present = sorted({int(lut[v]) if lut is not None else int(v) for v in hist})
    return {
        "n_items": len(items),
        "n_scans": len({it.get("group", it["id"]) for it in items}),
        "height": [min(heights), max(heights)],
        "width": [min(widths), max(widths)],
        "distinct_sizes": len(sizes),
        "classes_present": [layout.class_names[i] if i < layout.num_classes else str(i) for i in present],
        "mask_histogram": {int(k): int(v) for k, v in sorted(hist.items())},
    }


def _volume_stats(stats: dict) -> dict:
    """Slices skipped per rule, file modalities and intensity warnings of one split's volumes."""
    return {
        "skipped_slices": {rule: int(n) for rule, n in sorted(stats.get("skipped", {}).items())},
        "modalities": {m: int(n) for m, n in sorted(stats.get("modalities", {}).items())},
        "warnings": list(stats.get("warnings", [])),
    }


def modality_rows(splits: Mapping[str, Sequence[dict]], opts: SliceOptions) -> list[dict]:
    """One row per volume of the listed splits: ``split``, ``file``, ``modality``, ``how`` (``declared``, ``declared
    by data.modality pattern``, ``auto: <evidence>``, ``channel names``) and ``certain``; 2D images are left out.

    Example:
        >>> modality_rows({"train": layout.items("train")}, slice_options(cfg.data))[0]
        {'split': 'train', 'file': 'data/ct/case1.nii.gz', 'modality': 'ct', 'how': 'auto: 61 % near -1000 HU, ...', 'certain': True}
    """
    rows = []
    for split, items in splits.items():
        seen: set[str] = set()
        for item in items:
            image = item.get("image")
            if "slice" not in item or image in seen:
                continue
            seen.add(image)
            decision = recorded_decision(image)
            if opts.channel_modalities is not None:
                how, certain = "channel names (data.channel_names or dataset.json)", True
            elif decision is not None and decision[0] == item.get("modality"):
                how, certain = decision[1], decision[2]
            elif match_modality(image, opts.modality_spec, opts.root) != "auto":
                how, certain = "declared", True
            else:
                how, certain = "auto (slice index from the disk cache; evidence not recorded)", True
            modality = item.get("modality", "")
            rows.append({"split": split, "file": image, "modality": modality, "how": how, "certain": certain})
    return rows


def write_modalities(path: Path, splits: Mapping[str, Sequence[dict]], opts: SliceOptions) -> bool:
    """Write :func:`modality_rows` as a CSV (``split,file,modality,how,certain``) atomically, when any split holds a
    volume; returns whether it wrote.

    Example:
        >>> write_modalities(Path("runs/ft/liver/modalities.csv"), {"train": items}, slice_options(cfg.data))
        True
    """
    rows = modality_rows(splits, opts)
    if not rows:
        return False
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=["split", "file", "modality", "how", "certain"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, text.getvalue())
    return True


def _format_modalities(rows: list[dict], root: str) -> list[str]:
    """The per-file modality lines of the printout (the uncertain ones first, at most :data:`MAX_LISTED_FILES`)."""
    if not rows:
        return []
    ordered = sorted(rows, key=lambda r: r["certain"])
    lines = ["modality per volume (how it was decided):"]
    for row in ordered[:MAX_LISTED_FILES]:
        try:
            name = Path(row["file"]).relative_to(root).as_posix()
        except ValueError:
            name = row["file"]
        lines.append(f"  {row['split']:<6} {name}: {row['modality']} ({row['how']})")
    if len(rows) > MAX_LISTED_FILES:
        lines.append(f"  ... and {len(rows) - MAX_LISTED_FILES} more (every file is in --json)")
    return lines


def _format_volume_stats(summary: dict) -> list[str]:
    lines = []
    for split, s in summary["splits"].items():
        if s.get("modalities"):
            files = ", ".join(f"{m} {n}" for m, n in s["modalities"].items())
            skipped = ", ".join(f"{rule}: {n}" for rule, n in s.get("skipped_slices", {}).items()) or "none"
            lines.append(f"{split:<6} volumes by modality: {files}; slices skipped: {skipped}")
    for s in summary["splits"].values():
        lines += [f"warning: {w}" for w in s.get("warnings", [])]
    return lines


def format_summary(summary: dict) -> str:
    """A readable table of :func:`check_dataset`'s summary."""
    lines = [f"dataset {summary['dataset']} at {summary['root']}"]
    if summary["classes"]:
        lines.append("classes: " + ", ".join(f"{i}={n}" for i, n in enumerate(summary["classes"])))
    header = f"{'split':<6} {'images':>7} {'scans':>6} {'height':>11} {'width':>11}  classes present"
    lines += [header, "-" * len(header)]
    for split, s in summary["splits"].items():
        h = f"{s['height'][0]}-{s['height'][1]}"
        w = f"{s['width'][0]}-{s['width'][1]}"
        classes = ", ".join(s["classes_present"]) or "-"
        lines.append(f"{split:<6} {s['n_items']:>7} {s['n_scans']:>6} {h:>11} {w:>11}  {classes}")
    hists = {k: v["mask_histogram"] for k, v in summary["splits"].items() if v["mask_histogram"]}
    if hists:
        lines.append("mask pixel values (value: share of pixels)")
        for split, hist in hists.items():
            total = sum(hist.values())
            lines.append(f"  {split:<6} " + "  ".join(f"{v}: {c / total:.1%}" for v, c in hist.items()))
    official = getattr(LAYOUTS.get(summary["dataset"]), "official_counts", None)
    if official:
        diffs = [
            f"{k} {summary['splits'][k]['n_scans']}/{n}"
            for k, n in official.items()
            if k in summary["splits"] and summary["splits"][k]["n_scans"] != n
        ]
        if diffs:
            lines.append("note: counts differ from the official release (" + ", ".join(diffs) + ")")
    lines += _format_modalities(summary.get("files", []), summary["root"])
    lines += _format_volume_stats(summary)
    if "fraction" in summary:
        f = summary["fraction"]
        lines.append(
            f"label fraction {f['fraction']} (seed {f['seed']}) selects {f['n_images']} training images"
        )
    return "\n".join(lines)
