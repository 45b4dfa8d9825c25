"""Why DeCon-ML's transferred decoder fine-tunes worse than random: one factor at a time.

In the validity study (``docs/validity.md``) DeCon-ML's encoder + decoder transfer fine-tunes worse than a random
init and than encoder-only transfer, at every fraction and seed, although its frozen decoder probes above random.
This study changes one thing at a time in the encoder + decoder fine-tuning (the fine-tuning recipes of
``decon_med.engine.recipes``, all off by default) and compares each row with the unchanged encoder + decoder
transfer and with random init, paired by (fraction, seed):

* one DeCon-ML pre-training run at the validity study's main settings (``benchmarks/validity.py``: the same data,
  teacher temperature 0.04, 400 steps), reused when already finished in ``--out``;
* rows: random init; encoder-only; encoder + decoder with nothing changed (the baseline); ``transfer_bn=reset``;
  ``transfer_bn=recompute``; ``transfer_bn_affine=reset``; ``reinit_decoder_blocks=1``; per-part learning rates
  ``train.lr_mult`` encoder 0.1 / decoder 0.1 / head 1; a frozen warm-up (LP-FT, ``train.freeze`` encoder +
  decoder for the first quarter of the iterations); and, unless ``--no-combined``, ``transfer_bn=recompute`` with
  the factor that scored best on validation;
* with ``--extension``, the rows the first rows left open: ``reinit_decoder_blocks`` = 2, 3 and 5 (5: every U-Net
  decoder block fresh, the bridge to encoder-only transfer), and a second DeCon-ML pre-training with
  ``ssl.skip_dropout=0.25`` (the main run's is 0.5) transferred as encoder + decoder and as encoder only;
* every row is the validity study's fine-tuning (U-Net ResNet-18, 64 px, 80 iterations, fractions 5 / 25 / 100 %,
  seeds 0, 1, 2), run through ``decon_med.experiment`` grids, so finished runs are reused on a second call.

The judgement is on **validation** mIoU (the best validation score of each run, which also selects its
checkpoint); test mIoU of the selected checkpoint is reported beside it and chooses nothing.

Usage:
    python benchmarks/decoder_factors.py --out runs/decoder_factors     # the study (about 30 min on 2 cores)
    python benchmarks/decoder_factors.py --out runs/decoder_factors --no-combined   # the rows docs/validity.md shows
    python benchmarks/decoder_factors.py --out runs/decoder_factors --report-only   # tables from finished runs only
    python benchmarks/decoder_factors.py --out runs/decoder_factors --no-combined --extension   # + the extension rows
    python benchmarks/decoder_factors.py --out runs/decoder_factors --no-combined --extension \
        --run-only reinit_decoder_blocks=2   # run this row only; every other row is read from finished runs
    python benchmarks/decoder_factors.py --out /tmp/f --quick           # a one-minute smoke run of every stage
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from validity import (  # noqa: E402
    FINETUNE_COMMON,
    FULL,
    PRETRAIN_COMMON,
    QUICK,
    REPO,
    finetune_grid,
    pretrain_and_export,
    pretrain_config,
    pretrain_steps,
    probe_curve,
)

from decon_med.config import flatten, to_dict  # noqa: E402
from decon_med.data.synthetic_textures import make_textures  # noqa: E402
from decon_med.experiment import (  # noqa: E402
    GRID_FREE_KEYS,
    GRID_KEYS,
    ExperimentConfig,
    InitSpec,
    expand_grid,
    load_experiment,
    run_experiment,
    run_status,
)
from decon_med.experiment_report import N_BOOTSTRAP, bootstrap_ci  # noqa: E402

METHOD = "decon_ml"

#: The smoke run: the validity study's quick sizes at one fraction.
QUICK_SIZE = {**QUICK, "fractions": [1.0], "seeds": [0]}


def factors(size: dict) -> dict[str, list[str]]:
    """label -> fine-tuning overrides of each encoder + decoder factor row (one changed setting each)."""
    warmup = max(1, size["finetune_iters"] // 4)
    return {
        "transfer_bn=reset": ["transfer_bn=reset"],
        "transfer_bn=recompute": ["transfer_bn=recompute"],
        "transfer_bn_affine=reset": ["transfer_bn_affine=reset"],
        "reinit_decoder_blocks=1": ["reinit_decoder_blocks=1"],
        "lr_mult enc 0.1 / dec 0.1 / head 1": [
            "train.lr_mult.encoder=0.1",
            "train.lr_mult.decoder=0.1",
            "train.lr_mult.head=1.0",
        ],
        f"LP-FT: encoder + decoder frozen {warmup} it": [
            "train.freeze.parts=[encoder, decoder]",
            f"train.freeze.iters={warmup}",
        ],
    }


#: The extension's second pre-training: the main run with this one setting changed (label -> overrides).
SKIP_DROPOUT_RUN = ("decon_ml_skip_dropout_0_25", ["ssl.skip_dropout=0.25"])


def extension(size: dict) -> dict[str, dict]:
    """label -> row of the extension (``--extension``): the fine-tuning ``overrides``, the ``transfer`` and the
    pre-training run it starts from (``pretrain``: ``None`` for the main run, else :data:`SKIP_DROPOUT_RUN`'s
    label), one changed setting each against the row it is compared with."""
    del size  # the same rows at every size
    label = SKIP_DROPOUT_RUN[0]
    rows = {
        f"reinit_decoder_blocks={k}": {
            "overrides": [f"reinit_decoder_blocks={k}"],
            "transfer": "encoder_decoder",
            "pretrain": None,
        }
        for k in (2, 3, 5)
    }
    rows["skip_dropout=0.25 pre-training, enc+dec"] = {
        "overrides": [],
        "transfer": "encoder_decoder",
        "pretrain": label,
    }
    rows["skip_dropout=0.25 pre-training, encoder only"] = {
        "overrides": [],
        "transfer": "encoder",
        "pretrain": label,
    }
    return rows


def grid_name(label: str) -> str:
    """A folder-safe name of a factor row."""
    keep = "".join(c if c.isalnum() else "_" for c in label.lower())
    return "factor_" + "_".join(part for part in keep.split("_") if part)


def factor_grid_config(
    base_cfg: ExperimentConfig,
    label: str,
    export: Path,
    overrides: list[str],
    transfer: str = "encoder_decoder",
):
    """The experiment grid of one factor row: the base grid (``base_cfg``, the validity study's fine-tuning as
    :func:`validity.finetune_grid` wrote it) with DeCon-ML ``transfer`` only (encoder + decoder unless told) and
    ``overrides`` added to every run; no baseline inside the grid (the comparison is made here across grids,
    paired by fraction and seed)."""
    name = grid_name(label)
    iters = Path(base_cfg.out_dir).name.rsplit("_it", 1)[1]
    cfg = dataclasses.replace(
        base_cfg,
        name=name,
        overrides=[*base_cfg.overrides, *overrides],
        inits={METHOD: InitSpec(path=str(export), method=METHOD, transfers=[transfer])},
        transfers=[transfer],
        baseline=None,
        out_dir=str(Path(base_cfg.out_dir).parent / f"{name}_it{iters}"),
    )
    cfg.validate()
    return cfg


def base_inits(export: Path) -> dict:
    """The base grid's inits: random, and DeCon-ML with encoder and encoder + decoder transfer."""
    return {"random": {"path": None, "method": "random"}, METHOD: {"path": str(export), "method": METHOD}}


def check_one_factor(base_cfg, factor_cfg, overrides: list[str], transfer: str = "encoder_decoder") -> None:
    """Refuse a factor grid whose runs differ from the base grid's ``transfer`` runs (encoder + decoder unless
    told) in anything but the keys its overrides set (and the grid's own keys, the init among them): one factor
    at a time, nothing else."""
    allowed = set(GRID_KEYS) | GRID_FREE_KEYS | {item.split("=", 1)[0] for item in overrides}
    base = {
        (s.fraction, s.seed): flatten(to_dict(s.cfg)) for s in expand_grid(base_cfg) if s.transfer == transfer
    }
    for spec in expand_grid(factor_cfg):
        flat, ref = flatten(to_dict(spec.cfg)), base[(spec.fraction, spec.seed)]
        differ = sorted(
            k
            for k in flat.keys() | ref.keys()
            if flat.get(k) != ref.get(k) and not any(k == a or k.startswith(a + ".") for a in allowed)
        )
        if differ:
            raise SystemExit(
                f"{factor_cfg.name}: differs from the baseline in {differ}, not only {overrides}"
            )


def collect(cfg, row_of) -> list[dict]:
    """One record per finished run of grid ``cfg``: row label, fraction, seed, val and test mIoU (fractions),
    selected iteration, seconds, and the recipes the run applied (its ``init_report.json``)."""
    records = []
    for spec in expand_grid(cfg):
        if run_status(spec.run_dir) != "done":
            continue
        res = json.loads((spec.run_dir / "results.json").read_text())
        report = spec.run_dir / "init_report.json"
        recipes = json.loads(report.read_text()).get("recipes") if report.is_file() else None
        records.append(
            {
                "row": row_of(spec),
                "fraction": float(spec.fraction),
                "seed": int(spec.seed),
                "val_mIoU": float(res["val"]["mIoU"]),
                "test_mIoU": float(res["test"]["mIoU"]),
                "val_IoU": res["val"].get("IoU"),
                "test_IoU": res["test"].get("IoU"),
                "selected_iter": res.get("selected_iter"),
                "wall_time_s": res.get("wall_time_s"),
                "recipes": _recipe_summary(recipes),
            }
        )
    return records


def _recipe_summary(recipes: dict | None) -> dict | None:
    """What a run applied, with the layer / tensor lists shortened to their lengths."""
    if not recipes:
        return None
    return {k: (len(v) if isinstance(v, list) else v) for k, v in recipes.items()}


def row_summary(records: list[dict], rows: list[str], fractions: list[float]) -> dict[str, dict]:
    """Per row and fraction: mean and sample std (%) of val and test mIoU over seeds, and the seed count."""
    summary: dict[str, dict] = {}
    for row in rows:
        summary[row] = {}
        for f in fractions:
            at = [r for r in records if r["row"] == row and r["fraction"] == f]
            cell = {"n_seeds": len(at)}
            for split in ("val", "test"):
                values = np.array([100 * r[f"{split}_mIoU"] for r in at])
                cell[f"{split}_mean"] = round(float(values.mean()), 2) if len(values) else None
                cell[f"{split}_std"] = round(float(values.std(ddof=1)), 2) if len(values) > 1 else None
            summary[row][str(f)] = cell
    return summary


def paired(records: list[dict], row: str, reference: str, split: str, fractions: list[float] | None) -> dict:
    """``row`` minus ``reference`` in percentage points of ``split`` mIoU, paired by (fraction, seed), over
    ``fractions`` (``None``: every fraction pooled): mean, the bootstrap 95 % CI of the experiment tables
    (:func:`decon_med.experiment_report.bootstrap_ci`), pairs and how many are better."""
    ref = {(r["fraction"], r["seed"]): r[f"{split}_mIoU"] for r in records if r["row"] == reference}
    diffs = np.array(
        [
            100 * (r[f"{split}_mIoU"] - ref[(r["fraction"], r["seed"])])
            for r in sorted(records, key=lambda r: (r["fraction"], r["seed"]))
            if r["row"] == row
            and (r["fraction"], r["seed"]) in ref
            and (fractions is None or r["fraction"] in fractions)
        ]
    )
    if not len(diffs):
        return {"n_pairs": 0}
    low, high = bootstrap_ci(diffs)
    return {
        "mean_diff": round(float(diffs.mean()), 2),
        "ci_low": None if np.isnan(low) else round(low, 2),
        "ci_high": None if np.isnan(high) else round(high, 2),
        "min": round(float(diffs.min()), 2),
        "max": round(float(diffs.max()), 2),
        "n_pairs": int(len(diffs)),
        "n_better": int((diffs > 0).sum()),
    }


def comparisons(records: list[dict], rows: list[str], fractions: list[float]) -> dict:
    """Every row against the encoder + decoder baseline and against random, for val and test, per fraction and
    pooled over the fractions."""
    table: dict[str, dict] = {}
    for row in rows:
        table[row] = {}
        for reference in (BASELINE, RANDOM):
            if row == reference:
                continue
            for split in ("val", "test"):
                key = f"{split}_vs_{'baseline' if reference == BASELINE else 'random'}"
                table[row][key] = {str(f): paired(records, row, reference, split, [f]) for f in fractions}
                table[row][key]["all"] = paired(records, row, reference, split, None)
    return table


RANDOM = "random"
ENCODER = "encoder only"
BASELINE = "enc+dec (nothing changed)"


def _pct(f: float) -> str:
    return f"{float(f) * 100:g} %"


def _diff(d: dict) -> str:
    if not d.get("n_pairs"):
        return ""
    ci = "" if d.get("ci_low") is None else f" [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]"
    return f"{d['mean_diff']:+.2f}{ci} ({d['n_better']}/{d['n_pairs']})"


def markdown(result: dict) -> str:
    """Three tables: mean val and test mIoU per fraction; val differences to the baseline and to random; test
    differences to the baseline and to random (pp, bootstrap 95 % CI, seeds better)."""
    fractions = result["settings"]["sizes"]["fractions"]
    summary, diffs = result["summary"], result["paired"]
    head = " | ".join(_pct(f) for f in fractions)
    lines = [
        f"| row | val mIoU %: {head} | test mIoU %: {head} |",
        "|---|" + "---|" * (2 * len(fractions)),
    ]
    for row, cells in summary.items():
        val = " | ".join(_mean(cells[str(f)], "val") for f in fractions)
        test = " | ".join(_mean(cells[str(f)], "test") for f in fractions)
        lines.append(f"| {row} | {val} | {test} |")
    for split in ("val", "test"):
        lines += [
            "",
            f"| {split}: Δ pp [95 % CI] (seeds better) | vs enc+dec: {head} | all | vs random: {head} | all |",
            "|---|" + "---|" * (2 * len(fractions) + 2),
        ]
        for row, entry in diffs.items():
            cells = []
            for reference in ("baseline", "random"):
                d = entry.get(f"{split}_vs_{reference}")
                cells += (
                    ["-"] * (len(fractions) + 1)
                    if d is None
                    else [_diff(d[str(f)]) for f in fractions] + [_diff(d["all"])]
                )
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean(cell: dict, split: str) -> str:
    mean, std = cell.get(f"{split}_mean"), cell.get(f"{split}_std")
    if mean is None:
        return "-"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/decoder_factors", help="study folder (data, runs, grids)")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run of every stage")
    parser.add_argument(
        "--json",
        default=None,
        help="results JSON (default benchmarks/results/decoder_factors.json; --quick: <out>/decoder_factors.json)",
    )
    parser.add_argument(
        "--no-combined", action="store_true", help="skip transfer_bn=recompute combined with the best factor"
    )
    parser.add_argument("--only", nargs="*", default=None, help="run only these factor rows (labels)")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: build the tables and the JSON from the runs already finished in --out",
    )
    parser.add_argument(
        "--extension",
        action="store_true",
        help="also the extension rows: reinit_decoder_blocks 2, 3, 5 and the skip_dropout=0.25 pre-training",
    )
    parser.add_argument(
        "--run-only",
        nargs="+",
        default=None,
        metavar="LABEL",
        help="run only these rows (and the pre-training they need); the base rows and every other row are read "
        "from the runs finished in --out, as with --report-only",
    )
    parser.add_argument(
        "--note", default=None, help="a remark stored in the JSON (e.g. on the machine's load)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    size = dict(QUICK_SIZE if args.quick else FULL)
    extra = extension(size) if args.extension else {}
    known = {*factors(size), *extra}
    for label in [*(args.only or []), *(args.run_only or [])]:
        if label not in known:
            parser.error(
                f"unknown row {label!r} (rows: {sorted(known)}; --extension adds the extension rows)"
            )
    if args.run_only is not None and args.report_only:
        parser.error("--run-only and --report-only exclude each other")
    out = Path(args.out)
    progress = not args.quiet
    start = time.perf_counter()
    durations: dict[str, float] = {}

    # --run-only: the base rows and the rows not named are read from finished runs, as with --report-only
    read_base = args.report_only or args.run_only is not None

    def runs(label: str) -> bool:
        return not args.report_only and (args.run_only is None or label in args.run_only)

    if not read_base and not (out / "data" / "labeled" / "splits.json").is_file():
        print("writing the texture data ...")
        make_textures(out / "data", size["n_unlabeled"], size["n_labeled"], seed=0, overwrite=True)

    # one DeCon-ML pre-training run at the validity study's main settings (reused when finished)
    pre_cfg = pretrain_config(out, METHOD, METHOD, size, [])
    if read_base:
        export = Path(pre_cfg.out_dir) / "export"
        seconds_file = Path(pre_cfg.out_dir) / "study_seconds.json"
        pretrain_seconds = json.loads(seconds_file.read_text())["seconds"] if seconds_file.is_file() else 0.0
        base_dir = out / "experiment" / f"factors_base_it{size['finetune_iters']}"
    else:
        print(f"pre-training {METHOD} ...")
        export, pretrain_seconds = pretrain_and_export(pre_cfg, progress)
        # random, encoder, encoder + decoder: the validity study's grid code, one pre-trained init
        print("fine-tuning the base rows (random, encoder, encoder + decoder) ...")
        tick = time.perf_counter()
        paths = finetune_grid(out, "factors_base", base_inits(export), size, size["fractions"], progress)
        durations["base rows"] = time.perf_counter() - tick
        base_dir = paths["runs"].parent
    base_cfg = load_experiment(base_dir / "experiment.yaml")  # the grid finetune_grid ran
    names = {"random": RANDOM, "encoder": ENCODER, "encoder_decoder": BASELINE}
    records = collect(base_cfg, lambda spec: names[spec.transfer])

    rows = {label: items for label, items in factors(size).items() if args.only is None or label in args.only}

    def run_factor(
        label: str, overrides: list[str], init: Path = export, transfer: str = "encoder_decoder"
    ) -> None:
        cfg = factor_grid_config(base_cfg, label, init, overrides, transfer)
        check_one_factor(base_cfg, cfg, overrides, transfer)
        if runs(label):
            print(f"fine-tuning factor '{label}' ({', '.join(overrides) or transfer}) ...")
            tick = time.perf_counter()
            run_experiment(cfg, progress=progress)
            durations[label] = time.perf_counter() - tick
        records.extend(collect(cfg, lambda spec: label))

    for label, overrides in rows.items():
        run_factor(label, overrides)

    # the extension: more decoder blocks re-initialised; a second pre-training with less skip dropout
    extra = {label: row for label, row in extra.items() if args.only is None or label in args.only}
    pre_runs: dict[str, dict] = {}
    for label, row in extra.items():
        init = export
        if row["pretrain"] is not None:
            name, pre_overrides = SKIP_DROPOUT_RUN
            if name not in pre_runs:
                cfg = pretrain_config(out, name, METHOD, size, pre_overrides)
                run_dir = Path(cfg.out_dir)
                seconds_file = run_dir / "study_seconds.json"
                seconds = json.loads(seconds_file.read_text())["seconds"] if seconds_file.is_file() else 0.0
                path = run_dir / "export"
                if any(runs(other) for other, r in extra.items() if r["pretrain"] == name):
                    print(f"pre-training {name} ({', '.join(pre_overrides)}) ...")
                    path, seconds = pretrain_and_export(cfg, progress)
                pre_runs[name] = {"cfg": cfg, "export": path, "seconds": seconds, "overrides": pre_overrides}
            init = pre_runs[name]["export"]
        run_factor(label, row["overrides"], init, row["transfer"])
    # an extension row read (not run) without a finished run is left out of the tables and named in the JSON
    not_run = [label for label in extra if not runs(label) and not any(r["row"] == label for r in records)]
    extra = {label: row for label, row in extra.items() if label not in not_run}

    combined = None
    if not args.no_combined and args.only is None and args.run_only is None:
        # the best factor on validation (pooled over fractions and seeds), combined with the recomputed statistics
        others = [label for label in rows if not label.startswith("transfer_bn=")]
        pooled = {label: paired(records, label, BASELINE, "val", None)["mean_diff"] for label in others}
        best = max(pooled, key=pooled.get)
        label = f"transfer_bn=recompute + {best}"
        combined = {"label": label, "chosen_by": "pooled val Δ vs enc+dec", "pooled_val_diffs": pooled}
        run_factor(label, ["transfer_bn=recompute", *rows[best]])
        rows[label] = ["transfer_bn=recompute", *rows[best]]

    labels = [RANDOM, ENCODER, BASELINE, *rows, *extra]
    result = {
        "question": "why DeCon-ML's transferred decoder fine-tunes worse than random init and encoder-only transfer",
        "judged_on": "val mIoU (best validation score of each run); test mIoU of the selected checkpoint reported",
        "summary": row_summary(records, labels, size["fractions"]),
        "paired": comparisons(records, labels, size["fractions"]),
        "combined": combined,
        "note": args.note,
        "runs": records,
        "settings": {
            "quick": args.quick,
            "combined_row": "skipped (--no-combined)" if args.no_combined else "run",
            "sizes": size,
            "pretrain": {
                "method": METHOD,
                "run": str(pre_cfg.out_dir),
                "steps": pretrain_steps(size),
                "common": PRETRAIN_COMMON,
                "teacher_temp": pre_cfg.ssl.teacher_temp,
                "lr": pre_cfg.train.lr,
                "probe_curve": probe_curve(Path(pre_cfg.out_dir)),
            },
            "finetune_common": FINETUNE_COMMON,
            "factors": rows,
            "extension": extra or None,
            "extension_not_run": not_run or None,
            "extension_pretrain": {
                name: {
                    "run": str(run["cfg"].out_dir),
                    "overrides": run["overrides"],
                    "skip_dropout": run["cfg"].ssl.skip_dropout,
                    "steps": pretrain_steps(size),
                    "probe_curve": probe_curve(Path(run["cfg"].out_dir)),
                }
                for name, run in pre_runs.items()
            }
            or None,
            "bootstrap_resamples": N_BOOTSTRAP,
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "durations_s": {
            # measured when the work was done (a rerun that reuses it keeps these figures)
            "pretrain": round(pretrain_seconds, 1),
            **{f"pretrain {name}": round(run["seconds"], 1) for name, run in pre_runs.items()},
            "finetune_by_row": {
                row: round(sum(r["wall_time_s"] or 0 for r in records if r["row"] == row), 1)
                for row in labels
            },
            "finetune_run_mean": round(float(np.mean([r["wall_time_s"] or 0 for r in records])), 1),
            # this call only (near 0 for work reused from an earlier call)
            "this_call_by_stage": {k: round(v, 1) for k, v in durations.items()},
            "this_call_total": round(time.perf_counter() - start, 1),
        },
    }
    default = (
        out / "decoder_factors.json"
        if args.quick
        else REPO / "benchmarks" / "results" / "decoder_factors.json"
    )
    path = Path(args.json or default)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    print(f"this call took {result['durations_s']['this_call_total'] / 60:.1f} min; results in {path}")


if __name__ == "__main__":
    main()
