"""CPU-scale validity study: does pre-training on unlabelled images help fine-tuning from few labels?

One command runs the whole study on the texture task (``decon_med.data.synthetic_textures``: structures told
apart by texture and shape, equal intensity statistics, many more unlabelled than labelled images):

1. writes the data (unlabelled images + a labelled folder with train / val / test ids);
2. pre-trains SlotCon, DeCon-SL and DeCon-ML on the unlabelled images (U-Net ResNet-18 at 64 px) with the health
   signals logged, and exports their weights;
3. fine-tunes one U-Net from random, encoder and encoder+decoder initialisations at 5 / 25 / 100 % of the
   labelled training images with several seeds (best checkpoint on val, scored on test), through the same grid
   code as ``decon-med experiment``;
4. optionally (``--dec-grid``) pre-trains DeCon-SL and DeCon-ML again with other ``ssl.dec_grid`` values and
   fine-tunes each at the smallest fraction, with the FLOPs per image of each setting;
5. writes ``benchmarks/results/validity.json`` and prints the tables that ``docs/validity.md`` quotes.

Each stage reuses what an earlier call finished, so an interrupted study continues where it stopped.

Usage:
    python benchmarks/validity.py --out runs/validity                 # the study (under an hour on 2 cores)
    python benchmarks/validity.py --out runs/validity --dec-grid 7 14 28 0 --dec-grid-epochs 5 --finetune-iters 80 \
        --r50-flops --json benchmarks/results/validity_dec_grid.json    # + about 55 min
    python benchmarks/validity.py --out /tmp/v --quick               # a two-minute smoke run of every stage
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import pandas as pd
import torch

from decon_med.config import PretrainConfig, load_config
from decon_med.data.synthetic_textures import CLASS_NAMES, make_textures

REPO = Path(__file__).resolve().parents[1]

#: Study sizes; ``--quick`` shrinks every one of them.
FULL = {
    "n_unlabeled": 640,
    "n_labeled": 96,
    "pretrain_epochs": 20,
    "pretrain_batch": 32,
    "probe_every": 100,
    "probe_images": 48,
    "probe_val_images": 16,
    "finetune_iters": 80,
    "val_every": 20,
    "fractions": [0.05, 0.25, 1.0],
    "seeds": [0, 1, 2],
}
QUICK = {
    "n_unlabeled": 48,
    "n_labeled": 18,
    "pretrain_epochs": 1,
    "pretrain_batch": 16,
    "probe_every": 2,
    "probe_images": 4,
    "probe_val_images": 2,
    "finetune_iters": 4,
    "val_every": 2,
    "fractions": [0.25, 1.0],
    "seeds": [0],
}

#: Pre-training settings shared by every method: the paper's recipe shrunk for a CPU. AdamW's rate is given after
#: the linear batch scaling (lr x batch / 256), so it does not shrink to nothing at a small batch. The teacher
#: temperature 0.04 (the paper's 0.07) was chosen on the validation probe by ``benchmarks/validity_tune.py``: at 0.07
#: the teacher's assignment drifts to uniform within 100 steps at this scale (docs/validity.md).
PRETRAIN_COMMON = [
    "data.name=unlabeled",
    "data.image_size=64",
    "data.num_workers=0",
    "model.arch=unet",
    "model.encoder=resnet18",
    "train.optimizer=adamw",
    "train.weight_decay=0.0001",
    "train.warmup_epochs=1",
    "train.amp=none",
    "train.ckpt_every=1000",
    "train.log_every=5",
    "ssl.dim_hidden=256",
    "ssl.dim_out=64",
    "ssl.num_prototypes=32",
    "ssl.num_prototypes_dec=32",
    "ssl.teacher_momentum=0.99",
    "ssl.teacher_temp=0.04",
]
#: Adam's step after scaling.
PRETRAIN_LR = 1e-3

METHODS = {
    "slotcon": ["ssl.method=slotcon", "ssl.alpha=1.0"],
    "decon_sl": ["ssl.method=decon_sl", "ssl.alpha=0.5", "ssl.levels=[-1]", "ssl.skip_dropout=0.0"],
    "decon_ml": [
        "ssl.method=decon_ml",
        "ssl.alpha=0.0",
        "ssl.levels=[0, 1, 2, 3, 4]",
        "ssl.skip_dropout=0.5",
    ],
}

#: Fine-tuning: one U-Net for every row (the pre-trained architecture), SGD with poly decay.
FINETUNE_COMMON = [
    "data.image_size=64",
    "data.num_workers=0",
    "data.num_classes=3",
    f"data.class_names=[{', '.join(CLASS_NAMES)}]",
    "model.arch=unet",
    "model.encoder=resnet18",
    "train.batch_size=8",
    "train.optimizer=sgd",
    "train.lr=0.01",
    "train.momentum=0.9",
    "train.weight_decay=0.0005",
    "train.log_every=25",
    "train.loss=ce",
    "train.select=best",
]


def probe_settings(out: Path, size: dict) -> dict:
    """The linear probe's ``probe.*`` settings, shared by the online probe during pre-training and the probe of
    the final networks: the labelled train (fit) and val (score) images, never test."""
    return {
        "name": "folder",
        "root": str(out / "data" / "labeled"),
        "num_classes": len(CLASS_NAMES),
        "images": size["probe_images"],
        "val_images": size["probe_val_images"],
        "size": 64,
        "steps": 200,
    }


def pretrain_steps(size: dict) -> int:
    """Optimiser steps of a pre-training run of ``size`` (the last partial batch is dropped)."""
    return size["pretrain_epochs"] * size["n_unlabeled"] // size["pretrain_batch"]


def pretrain_config(out: Path, label: str, method: str, size: dict, extra: list[str]) -> PretrainConfig:
    """The study's pre-training config of ``method`` for run ``label``; ``extra`` overrides come last and win."""
    lr = PRETRAIN_LR * 256 / size["pretrain_batch"]
    overrides = [
        *PRETRAIN_COMMON,
        *METHODS[method],
        f"data.root={out / 'data' / 'unlabeled'}",
        f"train.batch_size={size['pretrain_batch']}",
        f"train.epochs={size['pretrain_epochs']}",
        f"train.lr={lr}",
        f"out_dir={out / 'pretrain' / label}",
        f"probe.every={size['probe_every']}",
        *(f"probe.{key}={value}" for key, value in probe_settings(out, size).items()),
        *extra,
    ]
    return load_config(REPO / "configs" / "pretrain" / f"{method}.yaml", overrides, schema=PretrainConfig)


def pretrain_and_export(cfg: PretrainConfig, progress: bool) -> tuple[Path, float]:
    """Pre-train (or reuse a finished run) and export; returns the export folder and the training seconds."""
    from decon_med.engine.export import export
    from decon_med.engine.pretrain import pretrain

    run = Path(cfg.out_dir)
    seconds = 0.0
    if not (run / "done.json").is_file():
        start = time.perf_counter()
        pretrain(cfg, resume=(run / "last.ckpt").is_file(), progress=progress)
        seconds = time.perf_counter() - start
        (run / "study_seconds.json").write_text(json.dumps({"seconds": seconds}))
    elif (run / "study_seconds.json").is_file():
        seconds = json.loads((run / "study_seconds.json").read_text())["seconds"]
    if not (run / "export" / "export.json").is_file():
        export(run / "last.ckpt", run / "export", overwrite=True)
    return run / "export", seconds


def health_summary(run: Path) -> dict[str, dict[str, float]]:
    """First and last logged value of every column of a pre-training run's ``metrics.csv`` but the bookkeeping."""
    metrics = pd.read_csv(run / "metrics.csv")
    skip = {"step", "epoch", "lr", "img_s", "momentum", "wd"}
    summary = {}
    for column in metrics.columns:
        if column in skip or not pd.api.types.is_numeric_dtype(metrics[column]):
            continue
        values = metrics[column].dropna()
        if len(values):
            summary[column] = {"first": float(values.iloc[0]), "last": float(values.iloc[-1])}
    return summary


def probe_curve(run: Path) -> list[dict[str, float]]:
    """The online probe's rows of a pre-training run (``probe.csv``: step, enc / dec val mIoU in %)."""
    path = run / "probe.csv"
    if not path.is_file():
        return []
    rows = pd.read_csv(path)
    return [
        {"step": int(r.step), "enc_mIoU": 100 * float(r.enc_mIoU), "dec_mIoU": 100 * float(r.dec_mIoU)}
        for r in rows.itertuples()
    ]


def flops_per_image(cfg: PretrainConfig, size: int, encoder: str) -> dict[str, float]:
    """GFLOP of one pre-training step per image (student forward + backward, teacher forward), by part, of
    ``cfg``'s method rebuilt at ``encoder`` / ``size`` (the paper's head widths at ResNet-50); counted by
    :func:`decon_med.cost.count_step` on one image."""
    from decon_med.config import from_dict, to_dict
    from decon_med.cost import count_step, random_batch
    from decon_med.ssl import build_method

    raw = to_dict(cfg)
    raw["model"]["encoder"], raw["data"]["image_size"] = encoder, size
    if encoder == "resnet50":
        raw["ssl"].update(dim_hidden=4096, dim_out=256, num_prototypes=256, num_prototypes_dec=384)
    method = build_method(from_dict(PretrainConfig, raw))
    count = count_step(method, random_batch(1, size))
    flops = {part: value / 1e9 for part, value in count.flops.items()}
    flops["total"] = sum(count.flops.values()) / 1e9
    return flops


def probe_scores(
    out: Path, runs: dict[str, Path], seeds: list[int], size: dict
) -> dict[str, dict[str, float]]:
    """Linear-probe val mIoU (%) of the frozen encoder and decoder features of each pre-trained network and of
    randomly initialised ones (one per seed), with the engine's :class:`~decon_med.engine.probe.OnlineProbe` on
    the labelled training images (fit) and validation images (score); never the test images."""
    from decon_med.config import from_dict
    from decon_med.engine.checkpoint import load_checkpoint
    from decon_med.engine.probe import OnlineProbe
    from decon_med.ssl import build_method

    probe: OnlineProbe | None = None  # built once: every run shares the data settings, so the images too
    scores: dict[str, dict[str, float]] = {}

    def score(label: str, network: torch.nn.Module) -> None:
        result = probe(network)
        scores[label] = {"enc_mIoU": 100 * result["enc_mIoU"], "dec_mIoU": 100 * result["dec_mIoU"]}

    for label, run in runs.items():
        checkpoint = load_checkpoint(run / "last.ckpt")
        cfg = from_dict(PretrainConfig, checkpoint["config"])
        if probe is None:
            raw = dict(checkpoint["config"])
            raw["probe"] = {**raw.get("probe", {}), **probe_settings(out, size)}
            probe = OnlineProbe(from_dict(PretrainConfig, raw))
        method = build_method(cfg)
        method.load_state_dict(checkpoint["method"])
        score(label, getattr(method, method.export_prefix.rstrip(".")))
        if label == "slotcon":  # the same network, randomly initialised, once per seed
            for seed in seeds:
                torch.manual_seed(seed)
                fresh = build_method(cfg)
                score(f"random_s{seed}", getattr(fresh, fresh.export_prefix.rstrip(".")))
    return scores


def finetune_grid(out: Path, name: str, inits: dict, size: dict, fractions: list, progress: bool) -> dict:
    """The fine-tuning grid through ``decon_med.experiment`` (one U-Net for every row); returns its result paths.

    The grid's folder is named after ``name`` and the iteration count, so grids of other lengths sit beside it."""
    from decon_med.experiment import experiment_from_dict, run_experiment

    raw = {
        "name": name,
        "finetune": str(REPO / "configs" / "finetune" / "folder.yaml"),
        "overrides": [
            *FINETUNE_COMMON,
            f"data.root={out / 'data' / 'labeled'}",
            f"train.iters={size['finetune_iters']}",
            f"train.val_every={size['val_every']}",
            f"train.ckpt_every={size['finetune_iters']}",
        ],
        "inits": inits,
        "transfers": ["encoder", "encoder_decoder"],
        "fractions": fractions,
        "seeds": size["seeds"],
        "baseline": "random",
        "out_dir": str(out / "experiment" / f"{name}_it{size['finetune_iters']}"),
    }
    cfg = experiment_from_dict(raw)
    cfg.validate()
    return run_experiment(cfg, progress=progress)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/validity", help="study folder (data, runs, grids)")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run of every stage")
    parser.add_argument(
        "--dec-grid",
        type=int,
        nargs="*",
        default=None,
        help="also compare these ssl.dec_grid values (0: none)",
    )
    parser.add_argument(
        "--json", default=None, help="results JSON (default benchmarks/results/validity.json)"
    )
    parser.add_argument(
        "--r50-flops",
        action="store_true",
        help="also count --dec-grid FLOPs at ResNet-50, 224 px (slow on CPU)",
    )
    parser.add_argument(
        "--dec-grid-probe-only",
        action="store_true",
        help="compare the --dec-grid runs by their linear probe only (no fine-tuning grid)",
    )
    parser.add_argument(
        "--dec-grid-epochs",
        type=int,
        default=None,
        help="pre-training epochs of the --dec-grid runs (default: the main study's); at another length the "
        "default grid is pre-trained again too",
    )
    parser.add_argument(
        "--finetune-iters",
        type=int,
        default=None,
        help="fine-tuning iterations of every run (default 80; validation every quarter)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    size = dict(QUICK if args.quick else FULL)
    if args.finetune_iters:  # validation four times per run, as at the default length
        size.update(finetune_iters=args.finetune_iters, val_every=max(1, args.finetune_iters // 4))
    out = Path(args.out)
    progress = not args.quiet
    start = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    if not (out / "data" / "labeled" / "splits.json").is_file():
        print("writing the texture data ...")
        make_textures(out / "data", size["n_unlabeled"], size["n_labeled"], seed=0, overwrite=True)

    exports, pretrain_seconds, health, curves = {}, {}, {}, {}
    for method in METHODS:
        cfg = pretrain_config(out, method, method, size, [])
        print(f"pre-training {method} ...")
        exports[method], pretrain_seconds[method] = pretrain_and_export(cfg, progress)
        health[method] = health_summary(Path(cfg.out_dir))
        curves[method] = probe_curve(Path(cfg.out_dir))

    inits = {"random": {"path": None, "method": "random"}}
    for method, path in exports.items():
        inits[method] = {"path": str(path), "method": method}
        if method == "slotcon":  # its decoder was never trained: encoder transfer only
            inits[method]["transfers"] = ["encoder"]
    paths = finetune_grid(out, "methods", inits, size, size["fractions"], progress)
    summary = pd.read_csv(paths["summary"])
    paired = pd.read_csv(paths["paired"])

    dec_grid = {}
    grid_inits = {"random": {"path": None, "method": "random"}}
    grid_epochs = args.dec_grid_epochs or size["pretrain_epochs"]
    grid_size = {**size, "pretrain_epochs": grid_epochs}
    # at another length every grid, the default included, is pre-trained again: like is compared with like
    suffix = "" if grid_epochs == size["pretrain_epochs"] else f"_e{grid_epochs}"
    defaults = {method: pretrain_config(out, method, method, size, []) for method in ("decon_sl", "decon_ml")}
    for grid in args.dec_grid or []:
        for method, default in defaults.items():
            if grid == default.ssl.dec_grid and not suffix:  # the main run already has this grid
                label, cfg = method, default
            else:
                label = f"{method}_g{grid}{suffix}"
                cfg = pretrain_config(out, label, method, grid_size, [f"ssl.dec_grid={grid}"])
            print(f"pre-training {label} (dec_grid {grid}) ...")
            export_dir, seconds = pretrain_and_export(cfg, progress)
            grid_inits[label] = {"path": str(export_dir), "method": method}
            dec_grid[label] = {
                "method": method,
                "dec_grid": grid,
                "pretrain_steps": pretrain_steps(grid_size),
                "pretrain_seconds": seconds,
                "gflop_per_img_study": flops_per_image(cfg, 64, "resnet18"),
                # no pooling at 224 px puts 4096-wide heads on every pixel: too large to count on a CPU
                "gflop_per_img_r50_224": flops_per_image(cfg, 224, "resnet50")
                if grid and args.r50_flops
                else None,
                "health": health_summary(Path(cfg.out_dir)),
                "probe_curve": probe_curve(Path(cfg.out_dir)),
            }
    if dec_grid and not args.dec_grid_probe_only:
        grid_paths = finetune_grid(out, "dec_grid", grid_inits, size, size["fractions"][:1], progress)
        dec_grid_summary = pd.read_csv(grid_paths["summary"]).to_dict("records")
        dec_grid_paired = pd.read_csv(grid_paths["paired"]).to_dict("records")
    else:
        dec_grid_summary = dec_grid_paired = []

    probe_runs = {label: out / "pretrain" / label for label in [*METHODS, *dec_grid]}
    probe = probe_scores(out, probe_runs, size["seeds"], size)

    result = {
        "probe": probe,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "sizes": size,
        "quick": args.quick,
        "pretrain_seconds": pretrain_seconds,
        "health": health,
        "probe_curves": curves,
        "summary": summary.to_dict("records"),
        "paired": paired.to_dict("records"),
        "dec_grid": dec_grid,
        "dec_grid_summary": dec_grid_summary,
        "dec_grid_paired": dec_grid_paired,
        "total_seconds": time.perf_counter() - start,
    }
    path = Path(
        args.json
        or REPO / "benchmarks" / "results" / ("validity_quick.json" if args.quick else "validity.json")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(markdown(result))
    print(f"study finished in {result['total_seconds'] / 60:.1f} min; results in {path}")


def _fraction(f: float) -> str:
    return f"{float(f) * 100:g} %"


def _row(init: str, transfer: str) -> str:
    return init if transfer == "random" else f"{init} / {transfer}"


def _grid_table(table: pd.DataFrame, title: str, fractions: list, cell) -> list[str]:
    """Markdown lines of one row per (init, transfer) and one column per fraction, each cell ``cell(row)``."""
    lines = [
        f"| {title} | " + " | ".join(_fraction(f) for f in fractions) + " |",
        "|---" * (len(fractions) + 1) + "|",
    ]
    for (init, transfer), rows in table.groupby(["init", "transfer"], sort=False):
        cells = []
        for f in fractions:
            row = rows[rows["fraction"] == f]
            cells.append("" if row.empty else cell(row.iloc[0]))
        lines.append(f"| {_row(init, transfer)} | " + " | ".join(cells) + " |")
    return lines


def probe_curve_table(curves: dict[str, list[dict]]) -> list[str]:
    """Markdown lines: the online probe's val mIoU (encoder / decoder, %) at each probed step, one column per run."""
    labels = list(curves)
    steps = sorted({row["step"] for rows in curves.values() for row in rows})
    lines = [
        "| step | " + " | ".join(f"{label}: enc / dec" for label in labels) + " |",
        "|---" * (len(labels) + 1) + "|",
    ]
    for step in steps:
        cells = []
        for label in labels:
            row = next((r for r in curves[label] if r["step"] == step), None)
            cells.append("" if row is None else f"{row['enc_mIoU']:.1f} / {row['dec_mIoU']:.1f}")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return lines


def markdown(result: dict) -> str:
    """The study's tables as Markdown (``docs/validity.md`` quotes them): mIoU mean ± std per row and fraction,
    paired differences to random with their CIs, pre-training health first -> last, and the dec_grid comparison."""
    out = []
    summary = pd.DataFrame(result["summary"])
    fractions = sorted(summary["fraction"].unique())
    paired = pd.DataFrame(result["paired"])

    def mean_std(r: pd.Series) -> str:
        return f"{r['mIoU_mean']:.2f} ± {r['mIoU_std']:.2f}"

    def difference(r: pd.Series) -> str:
        return (
            f"{r['mean_diff']:+.2f} [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}] "
            f"({int(r['n_better'])}/{int(r['n_pairs'])} better)"
        )

    out += _grid_table(summary, "init / transfer", fractions, mean_std)
    if not paired.empty:
        out.append("")
        out += _grid_table(paired, "vs random (pp, 95 % CI)", fractions, difference)
    out.append("")
    out.append("| run | signal | first | last |")
    out.append("|---|---|---|---|")
    for method, signals in result["health"].items():
        for name, values in signals.items():
            if name == "loss" or any(
                name.endswith(f"_{s}") for s in ("z_std", "protos", "entropy", "group", "slot")
            ):
                out.append(f"| {method} | {name} | {values['first']:.3f} | {values['last']:.3f} |")
    if result.get("probe"):
        out.append("")
        out.append("| network (frozen) | linear probe val mIoU %: encoder | decoder |")
        out.append("|---|---|---|")
        for label, values in result["probe"].items():
            out.append(f"| {label} | {values['enc_mIoU']:.2f} | {values['dec_mIoU']:.2f} |")
    curves = {label: rows for label, rows in result.get("probe_curves", {}).items() if rows}
    if curves:
        out.append("")
        out += probe_curve_table(curves)
    if result.get("dec_grid"):
        out.append("")
        out.append(
            "| run | dec_grid | steps | GFLOP / img (R18, 64 px): heads / total | GFLOP / img (R50, 224 px) | "
            "pre-training s | probe mIoU enc / dec | 5 % mIoU enc | 5 % mIoU enc+dec |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|")
        grid_summary = pd.DataFrame(result.get("dec_grid_summary", []))
        for label, entry in result["dec_grid"].items():
            small = entry["gflop_per_img_study"]
            large = entry.get("gflop_per_img_r50_224")
            cells = []
            for transfer in ("encoder", "encoder_decoder"):
                if grid_summary.empty:
                    cells.append("not run")
                    continue
                row = grid_summary[(grid_summary["init"] == label) & (grid_summary["transfer"] == transfer)]
                cells.append(
                    "" if row.empty else f"{row['mIoU_mean'].iloc[0]:.2f} ± {row['mIoU_std'].iloc[0]:.2f}"
                )
            large_total = "not counted" if large is None else f"{large['total']:.1f}"
            probed = result.get("probe", {}).get(label)
            probe_cell = "" if probed is None else f"{probed['enc_mIoU']:.1f} / {probed['dec_mIoU']:.1f}"
            out.append(
                f"| {label} | {entry['dec_grid']} | {entry.get('pretrain_steps', '')} | "
                f"{small['heads']:.2f} / {small['total']:.2f} | "
                f"{large_total} | {entry['pretrain_seconds']:.0f} | {probe_cell} | "
                + " | ".join(cells)
                + " |"
            )
        if not grid_summary.empty:
            random = grid_summary[grid_summary["init"] == "random"]
            if not random.empty:
                out.append(
                    f"| random | - | - | - | - | - | - | {random['mIoU_mean'].iloc[0]:.2f} ± "
                    f"{random['mIoU_std'].iloc[0]:.2f} | |"
                )
    return "\n".join(out)


if __name__ == "__main__":
    main()
