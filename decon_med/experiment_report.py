"""The tables of an experiment grid: summaries over seeds, seed-paired differences with bootstrap CIs, and their
Table-7-shaped text (pure functions of ``results.csv``; the grid itself is :mod:`decon_med.experiment`).

Example:
    >>> results = pd.read_csv("runs/experiment/table7_isic/results.csv")
    >>> print(format_table7(summarize(results), [0.05, 0.25, 1.0]))
    >>> paired_differences(results, "random")[["init", "fraction", "mean_diff", "ci_low", "ci_high"]]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from decon_med.folders import atomic_write

if TYPE_CHECKING:
    from decon_med.experiment import ExperimentConfig

#: The paper's Table 7 (mIoU %, ResNet-50 FCN, COCO-pretrained) at label fractions :data:`PAPER_FRACTIONS`.
PAPER_TABLE7: dict[str, dict[str, list[float]]] = {
    "refuge": {
        "random": [49.53, 41.41, 62.82],
        "slotcon": [69.60, 77.80, 82.83],
        "decon_sl/encoder": [71.75, 78.92, 83.57],
        "decon_sl/encoder_decoder": [72.09, 77.27, 83.25],
    },
    "isic": {
        "random": [75.66, 78.38, 80.65],
        "slotcon": [74.95, 79.05, 82.52],
        "decon_sl/encoder": [75.62, 79.56, 82.84],
        "decon_sl/encoder_decoder": [76.00, 79.97, 82.94],
    },
}
PAPER_FRACTIONS: tuple[float, ...] = (0.05, 0.25, 1.0)

#: ``data.name`` -> key of :data:`PAPER_TABLE7`.
PAPER_DATASETS: dict[str, str] = {"isic2017": "isic", "refuge": "refuge"}

N_BOOTSTRAP = 10_000
BOOTSTRAP_SEED = 0


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """mIoU / mDice in % per (init, transfer, fraction): mean, sample std (ddof 1, NaN for one seed), n_seeds.

    Example:
        >>> summarize(pd.DataFrame({"init": ["r"] * 2, "method": ["random"] * 2, "transfer": ["random"] * 2,
        ...     "fraction": [1.0] * 2, "seed": [0, 1], "mIoU": [0.70, 0.72], "mDice": [0.8, 0.8]}))[["mIoU_mean", "mIoU_std"]]
           mIoU_mean  mIoU_std
        0       71.0      1.41
    """
    keys = ["init", "method", "transfer", "fraction"]
    columns = [*keys, "n_seeds", "mIoU_mean", "mIoU_std", "mDice_mean", "mDice_std"]
    if results.empty:
        return pd.DataFrame(columns=columns)
    grouped = results.groupby(keys, sort=False)
    table = grouped.size().rename("n_seeds").to_frame()
    for metric in ("mIoU", "mDice"):
        pct = grouped[metric]
        table[f"{metric}_mean"] = (pct.mean() * 100).round(2)
        table[f"{metric}_std"] = (pct.std(ddof=1) * 100).round(2)
    return table.reset_index()[columns]


def format_table7(summary: pd.DataFrame, fractions: Sequence[float]) -> str:
    """The summary shaped like the paper's Table 7: rows init / transfer, columns label fractions.

    Cells read ``"75.66 ± 0.42"`` (mean ± sample std of mIoU % over seeds), ``"75.66 (n=1)"`` for one seed and
    ``"-"`` where no run finished.
    """
    columns = [_fraction_label(f) for f in fractions]
    rows: dict[str, dict[str, str]] = {}
    for rec in summary.itertuples(index=False):
        cell = (
            f"{rec.mIoU_mean:.2f} ± {rec.mIoU_std:.2f}" if rec.n_seeds > 1 else f"{rec.mIoU_mean:.2f} (n=1)"
        )
        rows.setdefault(_row_label(rec.init, rec.transfer), {})[_fraction_label(rec.fraction)] = cell
    table = pd.DataFrame.from_dict(rows, orient="index").reindex(columns=columns).fillna("-")
    return table.to_string()


def format_paper_reference(dataset: str) -> str | None:
    """The paper's Table 7 rows for ``dataset`` (``isic2017`` / ``refuge``), or ``None`` when it has none."""
    key = PAPER_DATASETS.get(dataset)
    if key is None:
        return None
    columns = [_fraction_label(f) for f in PAPER_FRACTIONS]
    table = pd.DataFrame.from_dict(PAPER_TABLE7[key], orient="index", columns=columns)
    table = table.apply(lambda col: col.map(lambda v: f"{v:.2f}"))
    title = (
        "paper's Table 7 reference, mIoU % (ResNet-50 FCN, COCO-pretrained; not the same pre-training data):"
    )
    return f"{title}\n{table.to_string()}"


def bootstrap_ci(
    diffs: Sequence[float], n_resamples: int = N_BOOTSTRAP, seed: int = BOOTSTRAP_SEED, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of paired differences (NaN, NaN with fewer than two).

    Example:
        >>> bootstrap_ci([1.0, 2.0, 3.0])
        (1.0, 3.0)
    """
    values = np.asarray(diffs, dtype=float)
    if len(values) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_resamples, len(values)))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def paired_differences(results: pd.DataFrame, baseline: str | None) -> pd.DataFrame:
    """mIoU difference (percentage points) of each (init, transfer) to ``baseline``, paired by fraction + seed.

    A baseline with a path is paired transfer by transfer. Columns: fraction, init, transfer, baseline,
    n_pairs, seeds, mean_diff, ci_low, ci_high (bootstrap 95 % over the seed differences), n_better.
    """
    columns = [
        "fraction",
        "init",
        "transfer",
        "baseline",
        "n_pairs",
        "seeds",
        "mean_diff",
        "ci_low",
        "ci_high",
    ]
    columns.append("n_better")
    if baseline is None or results.empty or baseline not in set(results["init"]):
        return pd.DataFrame(columns=columns)
    base = results[results["init"] == baseline]
    on = ["fraction", "seed"] + (["transfer"] if (base["transfer"] != "random").any() else [])
    base = base[[*on, "mIoU"]].rename(columns={"mIoU": "base"})
    rows = []
    for (init, transfer), group in results[results["init"] != baseline].groupby(
        ["init", "transfer"], sort=False
    ):
        pairs = group.merge(base, on=on).sort_values(["fraction", "seed"])
        for fraction, at in pairs.groupby("fraction", sort=True):
            diffs = ((at["mIoU"] - at["base"]) * 100).to_numpy()
            low, high = bootstrap_ci(diffs)
            rows.append(
                {
                    "fraction": fraction,
                    "init": init,
                    "transfer": transfer,
                    "baseline": baseline,
                    "n_pairs": len(diffs),
                    "seeds": ",".join(str(s) for s in at["seed"]),
                    "mean_diff": round(float(diffs.mean()), 2),
                    "ci_low": round(low, 2),
                    "ci_high": round(high, 2),
                    "n_better": int((diffs > 0).sum()),
                }
            )
    return pd.DataFrame(rows, columns=columns).sort_values("fraction", kind="stable").reset_index(drop=True)


def format_paired(paired: pd.DataFrame, fractions: Sequence[float]) -> str:
    """Paired differences as a Table-7-shaped grid: cells ``"+0.71 [-0.20, +1.50] (n=3)"``."""
    columns = [_fraction_label(f) for f in fractions]
    rows: dict[str, dict[str, str]] = {}
    for rec in paired.itertuples(index=False):
        ci = "[no CI]" if math.isnan(rec.ci_low) else f"[{rec.ci_low:+.2f}, {rec.ci_high:+.2f}]"
        cell = f"{rec.mean_diff:+.2f} {ci} (n={rec.n_pairs})"
        rows.setdefault(_row_label(rec.init, rec.transfer), {})[_fraction_label(rec.fraction)] = cell
    table = pd.DataFrame.from_dict(rows, orient="index").reindex(columns=columns).fillna("-")
    return table.to_string()


def report(cfg: ExperimentConfig, results: pd.DataFrame, paths: dict[str, Path]) -> None:
    """Write ``summary.csv`` and ``paired.csv`` from ``results`` and print the tables."""
    summary = summarize(results)
    paired = paired_differences(results, cfg.baseline)
    write_csv(summary, paths["summary"])
    write_csv(paired, paths["paired"])
    if results.empty:
        print("no finished runs yet")
        return
    dataset = str(results["dataset"].iloc[0])
    print(f"\n{cfg.name} ({dataset}): test mIoU %, mean ± sample std over seeds")
    print(format_table7(summary, cfg.fractions))
    reference = format_paper_reference(dataset)
    if reference is not None:
        print(f"\n{reference}")
        print(
            "(the paper's setting: COCO pre-training, ResNet-50 FCN at 512 px, 24k / 80k iterations; a grid at "
            "another scale or network is not comparable with these numbers)"
        )
    if not paired.empty:
        print(
            f"\nmIoU difference to '{cfg.baseline}' in percentage points, paired by fraction and seed\n"
            f"[bootstrap 95 % CI over the seed differences, {N_BOOTSTRAP} resamples; coarse with few seeds]"
        )
        print(format_paired(paired, cfg.fractions))
    if cfg.note:
        print(f"\nnote: {cfg.note.strip()}")
    print(f"\ntables: {paths['results']}, {paths['summary']}, {paths['paired']}")


def write_csv(table: pd.DataFrame, path: Path) -> None:
    """Write ``table`` to ``path`` atomically (a temporary file renamed over it)."""
    atomic_write(path, table.to_csv(index=False))


def _row_label(init: str, transfer: str) -> str:
    return init if transfer == "random" else f"{init} / {transfer}"


def _fraction_label(fraction: float) -> str:
    return f"{float(fraction) * 100:g} %"
