"""Few labels on two tasks built differently, at 96 px: does DeCon-ML's transferred decoder pay off?

The validity study (``benchmarks/validity.py``) and the decoder factor study (``benchmarks/decoder_factors.py``)
ran on one task (textures) at 64 px, where ResNet-18's last stage is a 2 x 2 map. This study runs the same recipe
at 96 px (3 x 3 at the encoder) on two tasks:

* ``textures`` (``decon_med.data.synthetic_textures``): classes told apart by texture only, equal intensity
  statistics;
* ``anatomy`` (``decon_med.data.synthetic_anatomy``): nested, touching organs told apart by small smooth intensity
  differences, size, shape and position, in slices cut from volumes.

Per task: 640 unlabelled images, 96 labelled (train / val / test as the generator splits them); one DeCon-ML
pre-training (the validity study's settings: teacher temperature 0.04, the scaled blur, 400 steps; batch 16
instead of 32 so a step at 96 px costs about what a step at 64 px did); then fine-tuning of one U-Net ResNet-18 at
96 px (80 iterations, 5 / 25 / 100 % of the labelled train images, seeds 0, 1, 2) from four starting points:

* ``random``; ``encoder`` (DeCon-ML encoder, fresh decoder); ``encoder_decoder`` (both transferred);
* ``encoder_decoder, reinit 2`` (both transferred, the two finest U-Net blocks fresh: the factor study's lead that
  the harm sits in the fine blocks).

The recipe is **chosen on the textures task's validation mIoU** (pooled over fractions and seeds) among the three
DeCon rows, then reported on **both tasks' test sets with the choice fixed**: the anatomy task chooses nothing.

Usage:
    python benchmarks/few_labels.py --task textures --out runs/few_labels    # about 30 min on the idle 2 cores
    python benchmarks/few_labels.py --task anatomy --out runs/few_labels
    python benchmarks/few_labels.py --report                                 # both tasks' tables, the choice
    python benchmarks/few_labels.py --task textures --out /tmp/fl --quick    # a two-minute smoke run

Each stage reuses what an earlier call finished. Results: ``benchmarks/results/few_labels_<task>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decoder_factors import _diff, _pct, collect, factor_grid_config, paired, row_summary  # noqa: E402
from validity import (  # noqa: E402
    FINETUNE_COMMON,
    QUICK,
    REPO,
    health_summary,
    pretrain_and_export,
    pretrain_config,
    pretrain_steps,
    probe_curve,
)

from decon_med.experiment import experiment_from_dict, load_experiment, run_experiment  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
METHOD = "decon_ml"
SIZE = 96

#: Study sizes; ``--quick`` shrinks every one of them.
FULL = {
    "n_unlabeled": 640,
    "n_labeled": 96,
    "pretrain_epochs": 10,
    "pretrain_batch": 16,
    "probe_every": 100,
    "probe_images": 48,
    "probe_val_images": 16,
    "finetune_iters": 80,
    "val_every": 20,
    "fractions": [0.05, 0.25, 1.0],
    "seeds": [0, 1, 2],
}
QUICK_SIZE = {**QUICK, "pretrain_batch": 8, "fractions": [0.25, 1.0], "seeds": [0, 1]}

RANDOM, ENCODER, ENC_DEC, REINIT = "random", "encoder", "encoder_decoder", "encoder_decoder, reinit 2"
ROWS = [RANDOM, ENCODER, ENC_DEC, REINIT]
#: The candidates the choice is made among (random is the reference, not a recipe).
CANDIDATES = [ENCODER, ENC_DEC, REINIT]


def task_data(task: str, out: Path, size: dict) -> tuple[str, ...]:
    """Write the task's data under ``out/data`` (once) and return its class names."""
    if task == "textures":
        from decon_med.data.synthetic_textures import CLASS_NAMES
        from decon_med.data.synthetic_textures import make_textures as make
    else:
        from decon_med.data.synthetic_anatomy import CLASS_NAMES
        from decon_med.data.synthetic_anatomy import make_anatomy as make
    if not (out / "data" / "labeled" / "splits.json").is_file():
        print(f"writing the {task} data ...")
        counts = make(out / "data", size["n_unlabeled"], size["n_labeled"], seed=0, overwrite=True)
        print(f"  {counts}")
    return tuple(CLASS_NAMES)


#: Per network: the pre-training method and what it changes in the validity study's settings. ``fcn`` is the
#: paper's Table 7 pairing: DeCon-SL on a ResNet dilated to stride 16 with an FCN head (no skip connections), its
#: 6 x 6 map at 96 px unpooled (the shipped ``decon_sl_fcn.yaml`` sets ``dec_grid`` 0 too).
ARCHS = {
    "unet": {"method": "decon_ml", "pretrain": [], "rows": ROWS},
    "fcn": {"method": "decon_sl", "pretrain": ["model.arch=fcn", "ssl.dec_grid=0"], "rows": ROWS[:3]},
}


def pretrain_overrides(out: Path, classes: tuple[str, ...]) -> list[str]:
    """What this study changes in the validity study's pre-training: the view size and the probe's task."""
    return [f"data.image_size={SIZE}", f"probe.size={SIZE}", f"probe.num_classes={len(classes)}"]


def finetune_recipe(classes: tuple[str, ...], arch: str) -> list[str]:
    """The validity study's fine-tuning overrides (:data:`validity.FINETUNE_COMMON`, in its order) with this
    study's view size, the task's classes and the network ``arch`` in place of the texture task's 64-px U-Net."""
    task = {
        "data.image_size": SIZE,
        "data.num_classes": len(classes),
        "data.class_names": f"[{', '.join(classes)}]",
        "model.arch": arch,
    }
    recipe = [item.split("=", 1) for item in FINETUNE_COMMON]
    return [f"{key}={task[key]}" if key in task else f"{key}={value}" for key, value in recipe]


def grid_config(out: Path, export: Path, classes: tuple[str, ...], size: dict, arch: str = "unet"):
    """The base grid: random, DeCon encoder and encoder + decoder, one network (``arch``) at 96 px for every
    row."""
    method = ARCHS[arch]["method"]
    raw = {
        "name": "base",
        "finetune": str(REPO / "configs" / "finetune" / "folder.yaml"),
        "overrides": [
            *finetune_recipe(classes, arch),
            f"data.root={out / 'data' / 'labeled'}",
            f"train.iters={size['finetune_iters']}",
            f"train.val_every={size['val_every']}",
            f"train.ckpt_every={size['finetune_iters']}",
        ],
        "inits": {
            "random": {"path": None, "method": "random"},
            method: {"path": str(export), "method": method},
        },
        "transfers": ["encoder", "encoder_decoder"],
        "fractions": size["fractions"],
        "seeds": size["seeds"],
        "baseline": "random",
        "out_dir": str(out / "experiment" / f"base_it{size['finetune_iters']}"),
    }
    cfg = experiment_from_dict(raw)
    cfg.validate()
    return cfg


def entropy_max(run: Path) -> dict[str, float]:
    """The largest logged teacher entropy (fraction of ln K) of each level over the whole pre-training run."""
    metrics = pd.read_csv(run / "metrics.csv")
    return {
        column: float(metrics[column].max())
        for column in metrics.columns
        if column.endswith("_entropy") and metrics[column].notna().any()
    }


def run_task(
    task: str, out: Path, size: dict, progress: bool, arch: str = "unet", collect_only: bool = False
) -> dict:
    """Data, pre-training, the rows' fine-tuning; returns the task's result record. ``collect_only``: run
    nothing, read the finished pre-training and whatever fine-tuning runs have finished."""
    out = out / (task if arch == "unet" else f"{task}_{arch}")
    start = time.perf_counter()
    classes = task_data(task, out, size)
    method = ARCHS[arch]["method"]
    pre_cfg = pretrain_config(
        out, method, method, size, [*pretrain_overrides(out, classes), *ARCHS[arch]["pretrain"]]
    )
    if collect_only:
        export = Path(pre_cfg.out_dir) / "export"
        seconds_file = Path(pre_cfg.out_dir) / "study_seconds.json"
        if not (export / "export.json").is_file():
            raise SystemExit(f"{pre_cfg.out_dir}: the pre-training has not finished")
        pretrain_seconds = json.loads(seconds_file.read_text())["seconds"]
    else:
        print(f"pre-training {method} ({arch}) on {task} at {SIZE} px ...")
        export, pretrain_seconds = pretrain_and_export(pre_cfg, progress)

    base = grid_config(out, export, classes, size, arch)
    tick = time.perf_counter()
    if not collect_only:
        print("fine-tuning random / encoder / encoder + decoder ...")
        run_experiment(base, progress=progress)
    base_seconds = time.perf_counter() - tick
    base = load_experiment(Path(base.out_dir) / "experiment.yaml")
    names = {"random": RANDOM, "encoder": ENCODER, "encoder_decoder": ENC_DEC}
    records = collect(base, lambda spec: names[spec.transfer])

    finetune_seconds = {"base": base_seconds}
    if REINIT in ARCHS[arch]["rows"]:
        print(f"fine-tuning {REINIT} ...")
        tick = time.perf_counter()
        reinit = factor_grid_config(base, REINIT, export, ["reinit_decoder_blocks=2"])
        if not collect_only:
            run_experiment(reinit, progress=progress)
        elif not (Path(reinit.out_dir) / "experiment.yaml").is_file():
            reinit = None
        finetune_seconds[REINIT] = time.perf_counter() - tick
        if reinit is not None:
            records += collect(reinit, lambda spec: REINIT)

    run = Path(pre_cfg.out_dir)
    return {
        "task": task,
        "arch": arch,
        "method": method,
        "classes": list(classes),
        "image_size": SIZE,
        "sizes": size,
        "pretrain_steps": pretrain_steps(size),
        "pretrain_seconds": pretrain_seconds,
        "finetune_seconds": finetune_seconds,
        "health": health_summary(run),
        "entropy_max": entropy_max(run),
        "probe_curve": probe_curve(run),
        "records": records,
        "summary": row_summary(records, ARCHS[arch]["rows"], size["fractions"]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "total_seconds": time.perf_counter() - start,
    }


def compare(records: list[dict], fractions: list[float], split: str, rows: list[str] = ROWS) -> dict:
    """Every row against random and every DeCon row against encoder-only, per fraction and pooled."""
    table: dict[str, dict] = {}
    for row in rows:
        for reference in (RANDOM, ENCODER):
            if row == reference or (reference == ENCODER and row == RANDOM):
                continue
            key = f"vs {reference}"
            cells = {str(f): paired(records, row, reference, split, [f]) for f in fractions}
            cells["all"] = paired(records, row, reference, split, None)
            table.setdefault(row, {})[key] = cells
    return table


def choose(textures: dict) -> dict:
    """The recipe chosen on the textures task's validation mIoU: the DeCon row with the highest pooled paired
    difference to random (over fractions and seeds)."""
    pooled = {row: paired(textures["records"], row, RANDOM, "val", None) for row in CANDIDATES}
    best = max(CANDIDATES, key=lambda row: pooled[row]["mean_diff"])
    return {
        "row": best,
        "rule": "highest pooled val mIoU difference to random on textures",
        "val_vs_random": pooled,
    }


def markdown(result: dict, chosen: str | None) -> str:
    """One task's tables: mIoU per row and fraction (val and test), paired differences on test, health."""
    fractions = result["sizes"]["fractions"]
    arch = result.get("arch", "unet")
    lines = [
        f"### {result['task']}: {arch}, {result.get('method', METHOD)} (96 px, {result['pretrain_steps']} "
        "pre-training steps)",
        "",
    ]
    lines.append(
        "| row | "
        + " | ".join(f"val {_pct(f)}" for f in fractions)
        + " | "
        + " | ".join(f"test {_pct(f)}" for f in fractions)
        + " |"
    )
    lines.append("|---" * (2 * len(fractions) + 1) + "|")
    for row, cells in result["summary"].items():
        mark = " (chosen)" if row == chosen else ""
        vals = []
        for split in ("val", "test"):
            for f in fractions:
                c = cells[str(f)]
                mean, std = c[f"{split}_mean"], c[f"{split}_std"]
                vals.append(
                    "" if mean is None else f"{mean:.2f} ± {std if std is not None else math.nan:.2f}"
                )
        lines.append(f"| {row}{mark} | " + " | ".join(vals) + " |")
    for split in ("val", "test"):
        table = compare(result["records"], fractions, split, ARCHS[arch]["rows"])
        lines += [
            "",
            f"| {split}: Δ pp (95 % CI, pairs better) | "
            + " | ".join(_pct(f) for f in fractions)
            + " | all |",
        ]
        lines.append("|---" * (len(fractions) + 2) + "|")
        for row, refs in table.items():
            for ref, cells in refs.items():
                lines.append(
                    f"| {row} {ref} | "
                    + " | ".join(_diff(cells[str(f)]) for f in fractions)
                    + f" | {_diff(cells['all'])} |"
                )
    lines += ["", "| health | first | last | max |", "|---|---|---|---|"]
    for name, values in result["health"].items():
        if name.endswith("_entropy"):
            lines.append(
                f"| {name} | {values['first']:.3f} | {values['last']:.3f} | "
                f"{result['entropy_max'].get(name, math.nan):.3f} |"
            )
    if result["probe_curve"]:
        lines += ["", "| step | probe val mIoU %: enc / dec |", "|---|---|"]
        lines += [
            f"| {r['step']} | {r['enc_mIoU']:.1f} / {r['dec_mIoU']:.1f} |" for r in result["probe_curve"]
        ]
    lines.append("")
    lines.append(
        f"pre-training {result['pretrain_seconds']:.0f} s; fine-tuning "
        + ", ".join(f"{k} {v:.0f} s" for k, v in result["finetune_seconds"].items())
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", choices=["textures", "anatomy"], help="the task to run")
    parser.add_argument("--arch", choices=list(ARCHS), default="unet", help="the network of every row")
    parser.add_argument("--out", default="runs/few_labels", help="study folder (one sub-folder per task)")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run of every stage")
    parser.add_argument(
        "--report", action="store_true", help="run nothing: both tasks' tables and the choice"
    )
    parser.add_argument(
        "--collect-only",
        action="store_true",
        help="run nothing: write the task's JSON from its finished pre-training and fine-tuning runs",
    )
    parser.add_argument(
        "--note", default=None, help="a remark stored in the JSON (e.g. on the machine's load)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    if not args.report and not args.task:
        parser.error("give --task (or --report)")
    if args.report:
        names = [f"{t}{'' if a == 'unet' else '_' + a}" for a in ARCHS for t in ("textures", "anatomy")]
        results = {
            n: json.loads((RESULTS / f"few_labels_{n}.json").read_text())
            for n in names
            if (RESULTS / f"few_labels_{n}.json").is_file()
        }
        if "textures" not in results:
            raise SystemExit("no textures results yet: the choice is made on them")
        choice = choose(results["textures"])
        print(
            f"chosen on textures val (U-Net): {choice['row']} "
            f"({', '.join(f'{r} {_diff(d)}' for r, d in choice['val_vs_random'].items())})\n"
        )
        for result in results.values():
            print(markdown(result, choice["row"] if result.get("arch", "unet") == "unet" else None) + "\n")
        (RESULTS / "few_labels_choice.json").write_text(json.dumps(choice, indent=1) + "\n")
        return
    size = dict(QUICK_SIZE if args.quick else FULL)
    result = run_task(args.task, Path(args.out), size, not args.quiet, args.arch, args.collect_only)
    result["note"] = args.note
    result["collected_only"] = args.collect_only
    result["quick"] = args.quick
    name = args.task if args.arch == "unet" else f"{args.task}_{args.arch}"
    path = (Path(args.out) / f"few_labels_{name}.json") if args.quick else RESULTS / f"few_labels_{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(markdown(result, None))
    print(f"{args.task} finished in {result['total_seconds'] / 60:.1f} min; results in {path}")


if __name__ == "__main__":
    main()
