"""2D against 2.5D on thin structures: per-case vessel Dice with ``data.context_slices`` 0, 1 (and 2).

The task (:mod:`decon_med.data.synthetic_vessels`): 1 mm volumes holding oblique tubes (class 1) and, in every
slice, as many look-alike single-slice dots (background); one slice cannot tell them apart, its neighbours can.
For each ``k`` in ``--contexts`` and each seed, a ResNet-18 U-Net at 64 px is fine-tuned from random init
(``data.in_channels = 2k + 1``, Dice + CE, AdamW, the best validation checkpoint), then every test volume is scored
as a volume (3D Dice of the vessel class, MONAI, as ``decon-med evaluate`` does). Rows pair each (case, seed) of
``k`` with the same (case, seed) of ``k = 0``: mean difference in Dice points, bootstrap 95 % CI, pairs better.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/context_slices.py       # the study; writes benchmarks/results/context_slices.json
    python benchmarks/context_slices.py --quick --json /tmp/cs.json   # a smoke run of every step (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from decon_med.config import FinetuneConfig, load_config
from decon_med.data.synthetic_vessels import CLASS_NAMES, make_vessels
from decon_med.engine.evaluate import evaluate_network
from decon_med.engine.finetune import finetune
from decon_med.engine.model_io import load_segmentation_model
from decon_med.experiment_report import bootstrap_ci

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "context_slices.json"

#: Fine-tuning shared by every row: one small U-Net, whole 64 x 64 slices (no resize), random init.
FINETUNE = [
    "data.name=folder",
    "data.image_size=64",
    "data.num_workers=0",
    "data.modality=mr",
    "data.num_classes=2",
    f"data.class_names=[{', '.join(CLASS_NAMES)}]",
    "data.spacing=1.0",
    "model.arch=unet",
    "model.encoder=resnet18",
    "train.batch_size=8",
    "train.optimizer=adamw",
    "train.lr=0.001",
    "train.weight_decay=0.0001",
    "train.min_lr=0.0",
    "train.amp=none",
    "train.loss=dice_ce",
    "train.select=best",
    "train.log_every=50",
    "transfer=random",
    "fraction=1.0",
]

FULL = {"iters": 50, "val_every": 25, "seeds": [0, 1, 2], "contexts": [0, 1, 2], "volumes": (6, 2, 6)}
QUICK = {"iters": 2, "val_every": 2, "seeds": [0], "contexts": [0, 1], "volumes": (2, 1, 1)}


def run_config(data: Path, out: Path, k: int, seed: int, size: dict) -> FinetuneConfig:
    """The fine-tuning config of one (k, seed) run."""
    overrides = [
        *FINETUNE,
        f"data.root={data}",
        f"data.context_slices={k}",
        f"data.in_channels={2 * k + 1}",
        f"train.iters={size['iters']}",
        f"train.val_every={size['val_every']}",
        f"train.ckpt_every={size['iters']}",
        f"seed={seed}",
        f"out_dir={out / f'k{k}_s{seed}'}",
    ]
    return load_config(REPO / "configs" / "finetune" / "folder.yaml", overrides, schema=FinetuneConfig)


def case_dice(cfg: FinetuneConfig) -> tuple[list[dict], float]:
    """Fine-tune, then the vessel Dice of every test volume; and the seconds it all took."""
    start = time.perf_counter()
    run = finetune(cfg, overwrite=True, progress=False, summary=False)
    network, run_cfg, _ = load_segmentation_model(run)
    metrics = evaluate_network(network.eval(), run_cfg, "test", len(CLASS_NAMES), per_case=True)
    rows = [
        {"case": Path(row["image"]).name, "dice": float(row[f"dice_{CLASS_NAMES[1]}"])}
        for row in metrics["cases"]
    ]
    return rows, time.perf_counter() - start


def paired(records: list[dict], k: int) -> dict:
    """``k`` minus ``k = 0`` in Dice points, paired by (case, seed)."""
    ref = {(r["case"], r["seed"]): r["dice"] for r in records if r["k"] == 0}
    diffs = np.array(
        [
            100 * (r["dice"] - ref[(r["case"], r["seed"])])
            for r in records
            if r["k"] == k and (r["case"], r["seed"]) in ref
        ]
    )
    low, high = bootstrap_ci(diffs)
    return {
        "mean_diff": round(float(diffs.mean()), 2),
        "ci_low": None if np.isnan(low) else round(low, 2),
        "ci_high": None if np.isnan(high) else round(high, 2),
        "n_pairs": int(len(diffs)),
        "n_better": int((diffs > 0).sum()),
    }


def summary(records: list[dict], contexts: list[int], seconds: dict[int, float]) -> list[dict]:
    """One row per k: mean per-case Dice, its spread over seeds, the pairing against k = 0 and the time."""
    rows = []
    for k in contexts:
        mine = [r for r in records if r["k"] == k]
        per_seed = [
            np.mean([r["dice"] for r in mine if r["seed"] == s]) for s in sorted({r["seed"] for r in mine})
        ]
        row = {
            "k": k,
            "in_channels": 2 * k + 1,
            "mean_dice": round(100 * float(np.mean([r["dice"] for r in mine])), 2),
            "seed_means": [round(100 * float(m), 2) for m in per_seed],
            "seconds_per_run": round(seconds[k], 1),
        }
        if k != 0 and 0 in contexts:
            row["vs_k0"] = paired(records, k)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| k | in_channels | per-case vessel Dice (mean) | seed means | vs k = 0 (Dice points, 95 % CI) | pairs better | s / run |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        vs = r.get("vs_k0")
        diff = "—" if vs is None else f"{vs['mean_diff']:+.2f}"
        if vs is not None and vs["ci_low"] is not None:
            diff += f" [{vs['ci_low']:+.2f}, {vs['ci_high']:+.2f}]"
        better = "—" if vs is None else f"{vs['n_better']} / {vs['n_pairs']}"
        seeds = ", ".join(f"{m:.1f}" for m in r["seed_means"])
        lines.append(
            f"| {r['k']} | {r['in_channels']} | {r['mean_dice']:.2f} | {seeds} | {diff} | {better} | "
            f"{r['seconds_per_run']:.0f} |"
        )
    return "\n".join(lines)


def machine() -> str:
    """CPU model, core count and the threads torch uses."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--out", type=Path, default=None, help="data and run folders (default: a temporary folder)"
    )
    p.add_argument("--json", type=Path, default=RESULT, help="write the result here")
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 iterations, one seed, k 0 and 1")
    p.add_argument("--iters", type=int, default=None, help="fine-tuning iterations per run")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--contexts", type=int, nargs="+", default=None, help="values of data.context_slices")
    args = p.parse_args(argv)
    size = dict(QUICK if args.quick else FULL)
    for key in ("iters", "seeds", "contexts"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    size["val_every"] = min(size["val_every"], size["iters"])

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="context_slices_") as tmp:
        out = args.out or Path(tmp)
        data = out / "vessels"
        n_train, n_val, n_test = size["volumes"]
        make_vessels(data, n_train=n_train, n_val=n_val, n_test=n_test, seed=0, overwrite=True)
        records, seconds = [], {k: 0.0 for k in size["contexts"]}
        for seed in size["seeds"]:
            for k in size["contexts"]:
                rows, took = case_dice(run_config(data, out / "runs", k, seed, size))
                seconds[k] += took / len(size["seeds"])
                records += [{"k": k, "seed": seed, **row} for row in rows]
                print(
                    f"k={k} seed={seed}: mean vessel Dice {100 * np.mean([r['dice'] for r in rows]):.2f} ({took:.0f} s)"
                )
    rows = summary(records, size["contexts"], seconds)
    result = {
        "machine": machine(),
        "settings": {k: v for k, v in size.items()},
        "total_seconds": round(time.perf_counter() - start, 1),
        "rows": rows,
        "records": records,
    }
    print(table(rows))
    print(f"total {result['total_seconds']:.0f} s on {result['machine']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
