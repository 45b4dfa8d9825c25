"""The short run summary every command prints at start: data per split, model, method, steps.

Example:
    >>> print(run_summary("finetune", cfg, {"train": train_items, "val": val_items}, steps="2000 iterations"))
    finetune: data folder at /data/ct (modality ct, 64 px, 1 channel)
      data: train 8 volumes / 256 slices; val 2 volumes / 64 slices
      model: unet resnet18, 3 classes; method: supervised; steps: 2000 iterations
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["count_items", "format_counts", "print_summary", "run_summary"]


def count_items(items: Sequence[dict]) -> dict[str, int]:
    """``{"files": 2D images, "volumes": NIfTI cases, "slices": their slices}`` of dataset items.

    Example:
        >>> count_items([{"image": "a.png"}, {"image": "v.nii.gz", "slice": 0}, {"image": "v.nii.gz", "slice": 1}])
        {'files': 1, 'volumes': 1, 'slices': 2}
    """
    slices = [item for item in items if "slice" in item]
    volumes = {str(item.get("group") or item["image"]) for item in slices}
    return {"files": len(items) - len(slices), "volumes": len(volumes), "slices": len(slices)}


def format_counts(counts: Mapping[str, int | None]) -> str:
    """``"12 files"``, ``"3 volumes / 96 slices"`` or both, joined with ``" + "`` (``slices`` may be ``None``).

    Example:
        >>> format_counts({"files": 0, "volumes": 3, "slices": 96})
        '3 volumes / 96 slices'
    """
    parts = []
    if counts["files"] or not counts["volumes"]:
        parts.append(f"{counts['files']} files")
    if counts["volumes"]:
        slices = "" if counts.get("slices") is None else f" / {counts['slices']} slices"
        parts.append(f"{counts['volumes']} volumes{slices}")
    return " + ".join(parts)


def _model(cfg: Any) -> str:
    model = getattr(cfg, "model", None)
    if model is None:
        return "?"
    return f"{model.arch} {model.encoder}"


def _method(cfg: Any) -> str:
    if hasattr(cfg, "fraction"):  # fine-tuning
        init = getattr(cfg, "init", None)
        origin = "random init" if init is None else f"init {init} ({getattr(cfg, 'transfer', '')})"
        return f"supervised from {origin}, label fraction {cfg.fraction:g}"
    ssl = getattr(cfg, "ssl", None)
    if ssl is not None and hasattr(ssl, "label"):  # decon_ml for slotcon + ssl.decoder.preset ml
        return str(ssl.label)
    return str(ssl.method) if ssl is not None and getattr(ssl, "method", None) else "?"


def run_summary(
    command: str,
    cfg: Any,
    splits: Mapping[str, Sequence[dict] | Mapping[str, int | None]] | None,
    method: str | None = None,
    steps: str | None = None,
    extra: str | None = None,
) -> str:
    """At most three lines: the data folder, the counts per split, and model / method / steps.

    Args:
        command: the command name, first word of the summary.
        cfg: the resolved config (its ``data``, ``model``, ``ssl`` / ``init`` sections are read if present).
        splits: the items of each split used, or their :func:`count_items`; ``None`` leaves the data line out.
        method: the method; default from ``cfg.ssl.method`` or the fine-tuning initialisation.
        steps: e.g. ``"1000 steps (10 epochs x 100)"``.
        extra: appended to the last line.
    """
    data = cfg.data
    modality = data.modality if isinstance(data.modality, str) else "per file"
    from decon_med.data.layout_base import channel_names  # the names decide each channel's intensity handling

    names = channel_names(data)
    kind = f"modality {modality}" if names is None else f"channels {' + '.join(names)}"
    channels = f"{data.in_channels} channel" + ("s" if data.in_channels != 1 else "")
    lines = [f"{command}: {data.name} data at {data.root} ({kind}, {data.image_size} px, {channels})"]
    if splits is not None:
        counts = "; ".join(
            f"{split} {format_counts(items if isinstance(items, Mapping) else count_items(items))}"
            for split, items in splits.items()
        )
        lines.append(f"  data: {counts}")
    last = f"  model: {_model(cfg)}; method: {method or _method(cfg)}"
    if steps:
        last += f"; steps: {steps}"
    if extra:
        last += f"; {extra}"
    lines.append(last)
    return "\n".join(lines)


def print_summary(command: str, cfg: Any, splits: Mapping[str, Any] | None, **kwargs: Any) -> None:
    """Print :func:`run_summary` (keyword arguments as there)."""
    print(run_summary(command, cfg, splits, **kwargs), flush=True)
