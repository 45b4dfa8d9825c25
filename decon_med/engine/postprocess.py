"""Post-processing of predicted label volumes, chosen per class on the validation split (as nnU-Net does).

Keeping only the largest 3D connected component of a class removes scattered false positives, but cuts away
real parts of a structure that is in several pieces (bones, vessels, lesions), where it lowers Dice a lot. So it
is decided per foreground class, on validation data:

* after fine-tuning a volume run, :func:`decide_postprocessing` predicts every val case once with the selected
  checkpoint and computes, per class, the mean per-case Dice with and without keeping the class's largest
  component (the empty-case rules of :mod:`decon_med.engine.volume_metrics`: a false positive on an empty
  ground truth is 0, a class empty in both is not scored);
* a class gets the post-processing only when it **raises** that mean (a tie keeps the prediction as it is);
* the decision, with both Dice values per class, is written to ``postprocessing.json`` in the run folder
  (:data:`POSTPROCESSING`, recorded in the run's manifest), for the checkpoint it was decided on.

``decon-med predict`` applies the recorded decision by default (``--largest-component``: every class;
``--no-postprocessing``: none) and ``decon-med evaluate`` scores the per-case volumes with it and says so.

Example:
    >>> largest_components(np.array([[1, 1, 0, 1, 2, 0, 2, 2]]), classes=3, only=[2])
    array([[1, 1, 0, 1, 0, 0, 2, 2]])
    >>> read_decision(Path("runs/ft/liver/postprocessing.json"))["largest_component"]
    [1]
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from decon_med.errors import DataError, DeconError
from decon_med.folders import atomic_write

#: The decision file in a run folder.
POSTPROCESSING = "postprocessing.json"

#: What the decision means, written into the file.
RULE = (
    "keep only the largest 3D connected component (full connectivity) of a class when that raises the class's "
    "mean per-case validation Dice; ties keep the prediction unchanged"
)

__all__ = [
    "POSTPROCESSING",
    "ComponentTrial",
    "decide_postprocessing",
    "format_decision",
    "largest_components",
    "prediction_postprocessing",
    "read_decision",
    "recorded_classes",
    "write_decision",
]


def largest_components(labels: np.ndarray, classes: int, only: Iterable[int] | None = None) -> np.ndarray:
    """Keep the largest connected component of each class ``1..classes-1`` (or of the classes ``only``), full
    connectivity; the other components of those classes become background (0).

    The same result as MONAI's ``KeepLargestConnectedComponent(applied_labels, is_onehot=False,
    independent=True)``, with ``scipy.ndimage.label`` instead of scikit-image (not a dependency).

    Example:
        >>> largest_components(np.array([[1, 1, 0, 1]]), classes=2)
        array([[1, 1, 0, 0]])
    """
    out = labels.copy()
    structure = ndimage.generate_binary_structure(labels.ndim, labels.ndim)
    for cls in range(1, classes) if only is None else sorted({int(c) for c in only}):
        components, count = ndimage.label(labels == cls, structure=structure)
        if count > 1:
            sizes = np.bincount(components.ravel())[1:]
            out[(components > 0) & (components != int(np.argmax(sizes)) + 1)] = 0
    return out


class ComponentTrial:
    """Per-case Dice of every foreground class with and without keeping its largest component.

    Called as ``trial(case, prediction, truth, spacing)`` for each case (it is the ``on_case`` hook of
    :class:`~decon_med.engine.volume_metrics.VolumeCases`), then :meth:`decide`.

    Args:
        names: class names, background first.

    Example:
        >>> trial = ComponentTrial(["background", "liver", "bone"])
        >>> trial("case_1", prediction, truth, (1.0, 1.0, 2.5))
        >>> trial.decide()["largest_component"]
        [1]
    """

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.raw: dict[int, list[float]] = {c: [] for c in range(1, len(self.names))}
        self.kept: dict[int, list[float]] = {c: [] for c in range(1, len(self.names))}
        self.cases = 0

    def __call__(
        self, case: str, prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float]
    ) -> None:
        from decon_med.engine.volume_metrics import case_scores

        self.cases += 1
        for cls in self.raw:
            pred, true = (prediction == cls).astype(np.uint8), (truth == cls).astype(np.uint8)
            kept = largest_components(pred, 2)
            self.raw[cls].append(case_scores(pred, true, 2, spacing, distances=False)["dice"][0])
            self.kept[cls].append(case_scores(kept, true, 2, spacing, distances=False)["dice"][0])

    def decide(self) -> dict[str, Any]:
        """The decision: per class the mean Dice without and with (``n`` scored cases), and whether to keep it."""
        classes: dict[str, Any] = {}
        chosen = []
        for cls in self.raw:
            raw, kept = _mean(self.raw[cls]), _mean(self.kept[cls])
            better = math.isfinite(raw) and math.isfinite(kept) and kept > raw
            if better:
                chosen.append(cls)
            classes[self.names[cls]] = {
                "index": cls,
                "largest_component": better,
                "n": sum(math.isfinite(v) for v in self.raw[cls]),
                "dice": raw,
                "dice_largest_component": kept,
            }
        return {"rule": RULE, "n_cases": self.cases, "largest_component": chosen, "classes": classes}


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def decide_postprocessing(
    network: Any, cfg: Any, classes: int, folder: Path, checkpoint: str, step: int, progress: bool = False
) -> dict[str, Any] | None:
    """Decide the per-class post-processing on the val split and write ``folder/postprocessing.json``.

    Args:
        network: the selected network (any device).
        cfg: the run's fine-tuning config.
        classes: output classes of the network.
        folder: the run folder.
        checkpoint: file name of the checkpoint the decision is for (``best.ckpt``).
        step: its iteration.
        progress: show a progress bar.

    Returns:
        The decision written, or ``None`` when the val split holds no labelled NIfTI case (nothing is written).

    Example:
        >>> decide_postprocessing(network, cfg, 3, Path("runs/ft/liver"), "best.ckpt", 500)["largest_component"]
        [1]
    """
    from decon_med.engine.evaluate import class_names, evaluate_network

    names = class_names(cfg, classes)
    trial = ComponentTrial(names)
    evaluate_network(
        network, cfg, "val", classes, progress=progress, per_case=True, distances=False, on_case=trial
    )
    if trial.cases == 0:
        return None
    decision = {"split": "val", "checkpoint": checkpoint, "iter": int(step), **trial.decide()}
    write_decision(folder / POSTPROCESSING, decision)
    return decision


def format_decision(decision: dict[str, Any]) -> str:
    """One line: per class whether the largest component is kept, with the mean val Dice without -> with.

    Example:
        >>> print(format_decision(decision))
        post-processing chosen on val (3 cases, postprocessing.json): liver: largest component (Dice 80.10 -> 84.00); bone: none (Dice 95.00 -> 72.30)
    """
    parts = []
    for name, c in decision["classes"].items():
        what = "largest component" if c["largest_component"] else "none"
        parts.append(f"{name}: {what} (Dice {_pct(c['dice'])} -> {_pct(c['dice_largest_component'])})")
    head = f"post-processing chosen on val ({decision['n_cases']} cases, {POSTPROCESSING})"
    return f"{head}: " + "; ".join(parts)


def _pct(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{100 * value:.2f}"


def write_decision(path: Path, decision: dict[str, Any]) -> None:
    """Write a decision as indented JSON, atomically (recorded in the manifest of the run folder).

    Example:
        >>> write_decision(Path("runs/ft/liver") / POSTPROCESSING, {"checkpoint": "best.ckpt", **trial.decide()})
    """
    atomic_write(path, json.dumps(decision, indent=1) + "\n")


def read_decision(path: Path) -> dict[str, Any]:
    """A ``postprocessing.json``, checked: ``largest_component`` is a list of class indices >= 1.

    Raises:
        DataError: the file is unreadable or malformed (naming it).

    Example:
        >>> read_decision(Path("runs/ft/liver/postprocessing.json"))["classes"]["liver"]["dice_largest_component"]
        0.84
    """
    try:
        decision = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(path, f"unreadable post-processing decision ({exc})") from exc
    chosen = decision.get("largest_component") if isinstance(decision, dict) else None
    if not isinstance(chosen, list) or not all(isinstance(c, int) and c >= 1 for c in chosen):
        raise DataError(
            path, "malformed post-processing decision: 'largest_component' must list class indices >= 1"
        )
    return decision


def recorded_classes(checkpoint: Path) -> tuple[tuple[int, ...], str] | None:
    """The classes whose largest component the run folder's decision keeps, with a note saying where it comes
    from; ``None`` when the checkpoint's folder holds no ``postprocessing.json``, or one decided for another
    checkpoint (the note then says so, as the second element of ``((), note)``).

    Example:
        >>> recorded_classes(Path("runs/ft/liver/best.ckpt"))
        ((1,), 'largest component of liver (postprocessing.json, decided on val for best.ckpt)')
    """
    path = Path(checkpoint).parent / POSTPROCESSING
    if not path.is_file():
        return None
    decision = read_decision(path)
    if decision.get("checkpoint") != Path(checkpoint).name:
        return (), (
            f"{path} was decided for {decision.get('checkpoint')}, not {Path(checkpoint).name}: not applied"
        )
    chosen = tuple(sorted(decision["largest_component"]))
    names = decision.get("classes", {})
    by_index = {v.get("index"): k for k, v in names.items() if isinstance(v, dict)}
    source = f"{POSTPROCESSING}, decided on val for {Path(checkpoint).name}"
    if not chosen:
        return chosen, f"none (no class gained on val; {source})"
    what = ", ".join(str(by_index.get(c, c)) for c in chosen)
    return chosen, f"largest component of {what} ({source})"


def prediction_postprocessing(
    checkpoint: Path, largest_component: bool = False, postprocessing: bool = True
) -> tuple[bool | tuple[int, ...], str]:
    """What ``decon-med predict`` keeps of each class, and a line saying so: ``(True, ...)`` for every class
    (``largest_component``, the ``--largest-component`` flag), ``((), ...)`` for none (``postprocessing=False``,
    ``--no-postprocessing``, or no usable decision file), else the recorded classes of :func:`recorded_classes`.

    Raises:
        DeconError: both ``largest_component`` and ``postprocessing=False``.

    Example:
        >>> prediction_postprocessing(Path("runs/ft/liver/best.ckpt"))
        ((1,), 'largest component of liver (postprocessing.json, decided on val for best.ckpt)')
    """
    if largest_component and not postprocessing:
        raise DeconError(
            "--largest-component and --no-postprocessing contradict each other; give one of them"
        )
    if largest_component:
        return True, "largest component of every class (--largest-component)"
    if not postprocessing:
        return (), "none (--no-postprocessing)"
    recorded = recorded_classes(checkpoint)
    if recorded is None:
        return (), f"none (no {POSTPROCESSING} next to the checkpoint)"
    return recorded
