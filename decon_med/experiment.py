"""Grids of fine-tuning runs: initialisations x transfer x label fractions x seeds, with Table-7-style summaries.

An experiment config (``configs/experiment/*.yaml``) names a base fine-tuning config and the grid::

    name: table7_isic
    finetune: configs/finetune/isic.yaml      # relative to the current directory, like every path here
    overrides: [data.root=data/isic2017]      # fine-tuning overrides applied to every run
    transfer_overrides:                       # optional: fine-tuning overrides for the runs of one transfer
      encoder_decoder: [model.arch=unet]
    inits:                                    # label -> where the weights are; path null = random init
      random: {path: null, method: random}
      decon_ml: {path: runs/pretrain/decon_ml_isic/export, method: decon_ml, overrides: [], transfers: null}
    transfers: [encoder, encoder_decoder]     # the random init always runs once, with transfer random
    fractions: [0.05, 0.25, 1.0]
    seeds: [0, 1, 2]
    baseline: random                          # init label that the others are compared with, seed by seed
    out_dir: runs/experiment/table7_isic

Every path (``finetune``, init paths, ``out_dir``, paths inside overrides) is relative to the current directory,
as for every other command, so run ``decon-med experiment`` from the repository root. Each run gets
``<out_dir>/runs/<init>-<transfer>-f<fraction>-s<seed>`` as its fine-tuning run folder; the overrides apply in the
order base file, :data:`GRID_DEFAULTS`, ``overrides``, ``transfer_overrides[transfer]``, the init's ``overrides``,
then the grid values (``init``, ``transfer``, ``fraction``, ``seed``, ``out_dir``), which overrides may not set. An
init set to ``null`` (``inits.decon_ml=null`` on the command line) is left out of the grid.

A finished grid run keeps only its selected weights (``train.prune_finished=true``, a grid default): a grid of
hundreds of runs would otherwise hold each run's optimiser state and numbered checkpoints. Add
``train.prune_finished=false`` to ``overrides`` to keep them.

The experiment folder ends up with::

    runs/<run>/         one fine-tuning run folder per grid point (config, metrics, selected weights, results.json)
    results.csv         one row per finished run (metrics as fractions in [0, 1]), rebuilt after every run
    summary.csv         mIoU / mDice in %: mean and sample std (ddof 1) over seeds per (init, transfer, fraction)
    paired.csv          mIoU difference to the baseline in percentage points, paired by (fraction, seed), with a
                        bootstrap 95 % CI over the seed differences
    failed/<run>.txt    the traceback of a run that failed (removed when it later succeeds)
    experiment.yaml     the resolved experiment config

A second call skips finished runs (``done.json`` + ``results.json``), resumes interrupted ones from their
``last.ckpt`` and restarts those that never wrote one, so a grid survives a crash. The same seed selects the same
training subset for every init, which is what makes the seed-paired comparison meaningful. With three seeds the
bootstrap resamples only three differences, so its 95 % CI is coarse (it is essentially [min, max] of the
differences); treat it as a spread, not as a test.

Example:
    >>> cfg = load_experiment("configs/experiment/table7_isic.yaml", ["seeds=[0]"])
    >>> len(expand_grid(cfg))
    21
    >>> paths = run_experiment(cfg)
    >>> sorted(paths)
    ['paired', 'results', 'runs', 'summary']
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import yaml

from decon_med.config import (
    FinetuneConfig,
    Transfer,
    flatten,
    from_dict,
    load_config,
    parse_override,
    set_nested,
    to_dict,
)
from decon_med.errors import ConfigError, DataError, DeconError

InitMethod = Literal[
    "random", "slotcon", "decon_sl", "decon_ml", "densecl", "decon_sl_densecl", "decon_ml_densecl", "mim"
]
RunStatus = Literal["done", "interrupted", "pending"]

#: Fine-tuning overrides every grid run starts from (the experiment's own overrides come after them).
GRID_DEFAULTS: tuple[str, ...] = ("train.prune_finished=true",)

#: Fine-tuning keys that the grid sets for every run; overrides may not set them.
GRID_KEYS: tuple[str, ...] = ("init", "transfer", "fraction", "seed", "out_dir")

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

#: Saved-config keys ignored when a finished run is compared with the planned config.
_DRIFT_IGNORED = frozenset({"data.num_workers", "train.keep_checkpoints", "train.prune_finished"})
_LABEL_RE = re.compile(r"^[A-Za-z0-9_]+$")

Runner = Callable[..., Path]


@dataclass
class InitSpec:
    """One initialisation of the grid.

    Attributes:
        path: export folder / weights file / pre-training checkpoint, or ``null`` for a random init.
        method: ``random`` (with ``path: null``) or the pre-training method (``ssl.method``); recorded in the tables.
        overrides: fine-tuning ``key=value`` overrides for this init's runs only.
        transfers: transfers for this init; ``null`` takes the experiment's ``transfers``.
    """

    path: str | None = None
    method: InitMethod = "random"
    overrides: list[str] = field(default_factory=list)
    transfers: list[Transfer] | None = None


@dataclass
class ExperimentConfig:
    """A grid of fine-tuning runs (see the module docstring for the YAML layout).

    Attributes:
        name: experiment name, printed above the tables.
        finetune: base fine-tuning YAML config, relative to the current directory.
        overrides: fine-tuning overrides applied to every run.
        transfer_overrides: transfer -> fine-tuning overrides for the runs with that transfer.
        inits: init label -> :class:`InitSpec`; labels are letters, digits and ``_``.
        transfers: transfers of the inits that have a path (``encoder``, ``encoder_decoder``).
        fractions: label fractions in (0, 1].
        seeds: seeds; a seed fixes the labelled subset, so equal seeds pair runs across inits.
        baseline: init label the others are compared with in ``paired.csv`` (``null``: no comparison).
        out_dir: experiment folder.
    """

    name: str = "experiment"
    finetune: str = ""
    overrides: list[str] = field(default_factory=list)
    transfer_overrides: dict[str, list[str]] = field(default_factory=dict)
    inits: dict[str, InitSpec] = field(default_factory=dict)
    transfers: list[Transfer] = field(default_factory=lambda: ["encoder", "encoder_decoder"])
    fractions: list[float] = field(default_factory=lambda: [0.05, 0.25, 1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    baseline: str | None = "random"
    out_dir: str = "runs/experiment"

    def validate(self) -> None:
        _need(bool(self.name.strip()), "name", "must not be empty")
        _need(bool(self.finetune), "finetune", "must name the base fine-tuning config")
        _need(Path(self.finetune).is_file(), "finetune", f"'{self.finetune}' is not a file")
        _need(bool(self.inits), "inits", "needs at least one init")
        _check_transfers(self.transfers, "transfers")
        _need(bool(self.fractions), "fractions", "needs at least one fraction")
        _need(all(0.0 < f <= 1.0 for f in self.fractions), "fractions", "must all be in (0, 1]")
        _need(len(set(self.fractions)) == len(self.fractions), "fractions", "has repeated values")
        _need(bool(self.seeds), "seeds", "needs at least one seed")
        _need(all(s >= 0 for s in self.seeds), "seeds", "must all be >= 0")
        _need(len(set(self.seeds)) == len(self.seeds), "seeds", "has repeated values")
        _need(
            self.baseline is None or self.baseline in self.inits,
            "baseline",
            f"'{self.baseline}' is not one of the inits ({', '.join(self.inits)})",
        )
        _check_overrides(self.overrides, "overrides")
        for transfer, items in self.transfer_overrides.items():
            _need(
                transfer in ("random", "encoder", "encoder_decoder"),
                f"transfer_overrides.{transfer}",
                "is not a transfer (random, encoder, encoder_decoder)",
            )
            _check_overrides(items, f"transfer_overrides.{transfer}")
        for label, spec in self.inits.items():
            _check_init(label, spec)

    def init_transfers(self, label: str) -> list[str]:
        """The transfers run for init ``label``: ``["random"]`` for a random init."""
        spec = self.inits[label]
        if spec.path is None:
            return ["random"]
        return list(spec.transfers if spec.transfers is not None else self.transfers)


@dataclass(frozen=True)
class RunSpec:
    """One grid point and its resolved fine-tuning config."""

    name: str
    init: str
    method: str
    transfer: str
    fraction: float
    seed: int
    cfg: FinetuneConfig

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.out_dir)


class GridError(DeconError):
    """Some runs of a grid failed; the others finished and the tables were written.

    Attributes:
        failed: names of the failed runs.
        paths: the tables written (as returned by :func:`run_experiment`).
    """

    def __init__(self, failed: list[str], total: int, paths: dict[str, Path]):
        self.failed = failed
        self.paths = paths
        super().__init__(
            f"{len(failed)} of {total} runs failed ({', '.join(failed)}); tracebacks in "
            f"{paths['runs'].parent / 'failed'}; run the same command again to retry them (finished runs are kept)"
        )


# ---------------------------------------------------------------------------------------------------- loading


def load_experiment(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read an experiment YAML, apply ``key=value`` overrides, type-check and validate it.

    Args:
        path: experiment YAML file.
        overrides: dotlist overrides of experiment keys, e.g. ``seeds=[0]``, ``inits.slotcon.path=w/s``,
            ``inits.decon_ml=null`` (drops that init), ``"overrides=[data.root=/data/isic2017]"``.

    Raises:
        ConfigError: unreadable file, unknown key, wrong type or invalid value (the message names the key).

    Example:
        >>> load_experiment("configs/experiment/demo.yaml", ["seeds=[0]"]).seeds
        [0]
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: experiment config not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides:
        key, value = parse_override(item)
        set_nested(raw, key, value)
    cfg = experiment_from_dict(raw)
    cfg.validate()
    return cfg


def experiment_from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    """Build an :class:`ExperimentConfig` from plain data (no validation); errors name the key."""
    raw = dict(raw)
    finetune_keys = {f.name for f in dataclasses.fields(FinetuneConfig)}
    known = {f.name for f in dataclasses.fields(ExperimentConfig)}
    for key in raw:
        if key not in known and key in finetune_keys:
            dotted, value = next(iter(flatten({key: raw[key]}).items()), (key, "..."))
            raise ConfigError(
                f"unknown experiment key '{key}': fine-tuning settings go in the 'overrides' list, which a "
                f'command-line override replaces: "overrides=[{dotted}={value}, ...]"'
            )
    inits = _mapping(raw.pop("inits", {}), "inits")
    transfer_overrides = _mapping(raw.pop("transfer_overrides", {}), "transfer_overrides")
    cfg = from_dict(ExperimentConfig, raw)
    cfg.inits = {
        str(label): from_dict(InitSpec, spec, prefix=f"inits.{label}.")
        for label, spec in inits.items()
        if spec is not None
    }
    for transfer, items in transfer_overrides.items():
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ConfigError(
                f"config key 'transfer_overrides.{transfer}': expected a list of key=value strings, got {items!r}"
            )
    cfg.transfer_overrides = {str(t): list(items) for t, items in transfer_overrides.items()}
    return cfg


# ---------------------------------------------------------------------------------------------------- the grid


def run_name(init: str, transfer: str, fraction: float, seed: int) -> str:
    """Folder name of a grid point.

    Example:
        >>> run_name("decon_ml", "encoder", 0.05, 2)
        'decon_ml-encoder-f0.05-s2'
    """
    return f"{init}-{transfer}-f{float(fraction)}-s{seed}"


def expand_grid(cfg: ExperimentConfig) -> list[RunSpec]:
    """Every run of the grid, with its fine-tuning config loaded and validated.

    Order: init, transfer, fraction, seed (as listed in the config).

    Raises:
        ConfigError: a run's config is invalid; the message names the run and the key.

    Example:
        >>> [s.name for s in expand_grid(load_experiment("configs/experiment/demo.yaml"))][:2]
        ['random-random-f0.05-s0', 'random-random-f0.05-s1']
    """
    specs = []
    for label, init in cfg.inits.items():
        for transfer in cfg.init_transfers(label):
            for fraction in cfg.fractions:
                for seed in cfg.seeds:
                    specs.append(_build_run(cfg, label, init, transfer, float(fraction), seed))
    return specs


def _build_run(
    cfg: ExperimentConfig, label: str, init: InitSpec, transfer: str, fraction: float, seed: int
) -> RunSpec:
    name = run_name(label, transfer, fraction, seed)
    overrides = [*GRID_DEFAULTS, *cfg.overrides, *cfg.transfer_overrides.get(transfer, []), *init.overrides]
    try:
        ft = load_config(cfg.finetune, overrides, schema=FinetuneConfig)
        ft = dataclasses.replace(
            ft,
            init=init.path,
            transfer=transfer,
            fraction=fraction,
            seed=seed,
            out_dir=str(Path(cfg.out_dir) / "runs" / name),
        )
        ft.validate()
    except ConfigError as exc:
        raise ConfigError(f"run {name}: {exc}") from exc
    return RunSpec(name, label, init.method, transfer, fraction, seed, ft)


def run_status(run_dir: str | Path) -> RunStatus:
    """``done`` (done.json + results.json), ``interrupted`` (a non-empty folder) or ``pending``."""
    run_dir = Path(run_dir)
    if (run_dir / "done.json").is_file() and (run_dir / "results.json").is_file():
        return "done"
    if run_dir.is_dir() and any(run_dir.iterdir()):
        return "interrupted"
    return "pending"


def plan_table(specs: Sequence[RunSpec]) -> pd.DataFrame:
    """One row per run: run, init, transfer, fraction, seed, status."""
    rows = [
        {
            "run": s.name,
            "init": s.init,
            "transfer": s.transfer,
            "fraction": s.fraction,
            "seed": s.seed,
            "status": run_status(s.run_dir),
        }
        for s in specs
    ]
    return pd.DataFrame(rows, columns=["run", "init", "transfer", "fraction", "seed", "status"])


# ---------------------------------------------------------------------------------------------------- running


def run_experiment(
    cfg: ExperimentConfig, dry_run: bool = False, runner: Runner | None = None, progress: bool = True
) -> dict[str, Path]:
    """Run every unfinished run of the grid, then write and print the result tables.

    Args:
        cfg: a loaded experiment config.
        dry_run: print the runs and their status (done / interrupted / pending) and run nothing.
        runner: ``runner(cfg, resume=bool, overwrite=bool) -> run folder``; ``None`` uses
            :func:`decon_med.engine.finetune.finetune`.
        progress: show a progress bar over runs.

    Returns:
        ``{"runs", "results", "summary", "paired"}`` paths (only ``runs`` for a dry run).

    Raises:
        ConfigError: a run's config is invalid or a needed init path is missing (before anything runs).
        GridError: some runs failed (after the others finished and the tables were written).

    Example:
        >>> run_experiment(load_experiment("configs/experiment/demo.yaml"), dry_run=True)
        {'runs': PosixPath('runs/demo/experiment/runs')}
    """
    specs = expand_grid(cfg)
    out = Path(cfg.out_dir)
    paths = {"runs": out / "runs"}
    plan = plan_table(specs)
    if dry_run:
        print(_format_plan(cfg, plan))
        return paths
    todo = [s for s, status in zip(specs, plan["status"], strict=True) if status != "done"]
    _check_init_paths(cfg, todo)
    pending = {s.name for s in todo}
    _note_drift([s for s in specs if s.name not in pending])
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / "experiment.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    print(f"experiment {cfg.name}: {len(specs)} runs, {len(specs) - len(todo)} done, {len(todo)} to run")
    paths.update(results=out / "results.csv", summary=out / "summary.csv", paired=out / "paired.csv")
    failed = _run_all(todo, runner or _finetune_runner, specs, paths["results"], progress)
    results = write_results(specs, paths["results"])
    report(cfg, results, paths)
    if failed:
        raise GridError(failed, len(specs), paths)
    return paths


def _run_all(
    todo: Sequence[RunSpec], runner: Runner, specs: Sequence[RunSpec], results_csv: Path, progress: bool
) -> list[str]:
    from tqdm.auto import tqdm

    failed = []
    bar = tqdm(todo, desc="runs", unit="run", disable=not progress, dynamic_ncols=True)
    for spec in bar:
        bar.set_postfix_str(spec.name)
        error = run_one(spec, runner)
        if error is None:
            write_results(specs, results_csv)
        else:
            failed.append(spec.name)
            tqdm.write(error)
    return failed


def run_one(spec: RunSpec, runner: Runner) -> str | None:
    """Run (or resume / restart) one grid point; returns ``None`` or a one-line failure message.

    An interrupted run is resumed from its ``last.ckpt``, or restarted (``overwrite=True``) when it has none. The
    traceback of a failure goes to ``<out_dir>/failed/<run>.txt``.
    """
    run_dir = spec.run_dir
    log = run_dir.parent.parent / "failed" / f"{spec.name}.txt"
    resume = (run_dir / "last.ckpt").is_file()
    overwrite = run_dir.is_dir() and any(run_dir.iterdir()) and not resume
    try:
        runner(spec.cfg, resume=resume, overwrite=overwrite)
        if run_status(run_dir) != "done":
            raise DeconError(f"{run_dir}: the run returned without done.json and results.json")
    except Exception as exc:  # a failed run must not stop the grid
        log.parent.mkdir(parents=True, exist_ok=True)
        _write_text(log, traceback.format_exc())
        return f"run {spec.name} failed: {type(exc).__name__}: {exc} (traceback: {log})"
    log.unlink(missing_ok=True)
    return None


def _finetune_runner(cfg: FinetuneConfig, resume: bool = False, overwrite: bool = False) -> Path:
    from decon_med.engine.finetune import finetune

    return finetune(cfg, resume=resume, overwrite=overwrite, progress=False)


def _check_init_paths(cfg: ExperimentConfig, todo: Sequence[RunSpec]) -> None:
    for label, init in cfg.inits.items():
        needed = sum(s.init == label for s in todo)
        if init.path is not None and needed and not Path(init.path).exists():
            raise ConfigError(
                f"config key 'inits.{label}.path': '{init.path}' does not exist ({needed} runs need it); "
                f"pre-train and export it first, or leave the init out with inits.{label}=null"
            )


def _note_drift(done: Sequence[RunSpec]) -> None:
    """Print a note for each finished run whose saved config differs from the planned one."""
    for spec in done:
        saved_file = spec.run_dir / "config.yaml"
        if not saved_file.is_file():
            continue
        saved = flatten(yaml.safe_load(saved_file.read_text()) or {})
        planned = flatten(to_dict(spec.cfg))
        keys = sorted(
            k
            for k in saved.keys() | planned.keys()
            if k not in _DRIFT_IGNORED and saved.get(k) != planned.get(k)
        )
        if keys:
            print(
                f"note: run {spec.name} finished with a different config ({', '.join(keys)}); "
                f"its results are kept; delete {spec.run_dir} to re-run it"
            )


# ---------------------------------------------------------------------------------------------------- tables


def read_result(spec: RunSpec) -> dict[str, Any]:
    """One ``results.csv`` row from a finished run folder (metrics as fractions in [0, 1]).

    Raises:
        DataError: results.json is unreadable or has no test metrics.
    """
    path = spec.run_dir / "results.json"
    try:
        res = json.loads(path.read_text())
        test = res["test"]
        row: dict[str, Any] = {
            "dataset": res.get("dataset", spec.cfg.data.name),
            "init": spec.init,
            "method": spec.method,
            "transfer": spec.transfer,
            "fraction": spec.fraction,
            "seed": spec.seed,
            "n_train": res.get("n_train"),
            "mIoU": float(test["mIoU"]),
            "mDice": float(test["mDice"]),
            "aAcc": float(test["aAcc"]),
        }
        names = res.get("class_names") or list(test.get("IoU", {}))
        for metric in ("IoU", "Dice"):
            for cls in names:
                row[f"{metric}_{_column_name(cls)}"] = float(test[metric][cls])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(
            path, f"not a complete fine-tuning results file ({type(exc).__name__}: {exc})"
        ) from exc
    row.update(
        selected_iter=res.get("selected_iter"), wall_time_s=res.get("wall_time_s"), run_dir=str(spec.run_dir)
    )
    return row


def collect_results(specs: Sequence[RunSpec]) -> pd.DataFrame:
    """``results.csv`` as a table: one row per finished run, in grid order."""
    rows = [read_result(s) for s in specs if run_status(s.run_dir) == "done"]
    fixed = ["dataset", "init", "method", "transfer", "fraction", "seed", "n_train", "mIoU", "mDice", "aAcc"]
    tail = ["selected_iter", "wall_time_s", "run_dir"]
    per_class: list[str] = []
    for row in rows:
        per_class += [k for k in row if k not in fixed and k not in tail and k not in per_class]
    per_class.sort(key=lambda k: not k.startswith("IoU_"))
    return pd.DataFrame(rows, columns=fixed + per_class + tail)


def write_results(specs: Sequence[RunSpec], path: Path) -> pd.DataFrame:
    """Rebuild ``results.csv`` from the run folders and write it atomically."""
    results = collect_results(specs)
    write_csv(results, path)
    return results


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
    if not paired.empty:
        print(
            f"\nmIoU difference to '{cfg.baseline}' in percentage points, paired by fraction and seed\n"
            f"[bootstrap 95 % CI over the seed differences, {N_BOOTSTRAP} resamples; coarse with few seeds]"
        )
        print(format_paired(paired, cfg.fractions))
    print(f"\ntables: {paths['results']}, {paths['summary']}, {paths['paired']}")


def write_csv(table: pd.DataFrame, path: Path) -> None:
    """Write ``table`` to ``path`` atomically (a temporary file renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    table.to_csv(tmp, index=False)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------- helpers


def _format_plan(cfg: ExperimentConfig, plan: pd.DataFrame) -> str:
    counts = plan["status"].value_counts()
    tally = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("done", "interrupted", "pending"))
    missing = [
        f"inits.{label}.path '{init.path}' does not exist yet"
        for label, init in cfg.inits.items()
        if init.path is not None and not Path(init.path).exists()
    ]
    lines = [
        f"experiment {cfg.name}: {len(plan)} runs in {cfg.out_dir}/runs ({tally})",
        plan.to_string(index=False),
    ]
    return "\n".join(lines + [f"note: {m}" for m in missing])


def _row_label(init: str, transfer: str) -> str:
    return init if transfer == "random" else f"{init} / {transfer}"


def _fraction_label(fraction: float) -> str:
    return f"{float(fraction) * 100:g} %"


def _column_name(cls: Any) -> str:
    return re.sub(r"\s+", "_", str(cls).strip())


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _mapping(value: Any, key: str) -> dict[Any, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
    return value


def _need(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


def _check_transfers(transfers: Sequence[str], key: str) -> None:
    _need(bool(transfers), key, "needs at least one transfer")
    _need("random" not in transfers, key, "may not list 'random' (an init with path null runs with it)")
    _need(len(set(transfers)) == len(transfers), key, "has repeated values")


def _check_overrides(items: Sequence[str], key: str) -> None:
    for item in items:
        try:
            name, _ = parse_override(item)
        except ConfigError as exc:
            raise ConfigError(f"config key '{key}': {exc}") from exc
        top = name.split(".")[0]
        _need(top not in GRID_KEYS, key, f"'{item}' sets '{top}', which the grid sets for every run")


def _check_init(label: str, spec: InitSpec) -> None:
    key = f"inits.{label}"
    _need(bool(_LABEL_RE.match(label)), key, "init labels may hold only letters, digits and '_'")
    if spec.path is None:
        _need(spec.method == "random", f"{key}.method", "must be 'random' when path is null")
    else:
        _need(spec.method != "random", f"{key}.method", "must name the pre-training method when path is set")
    if spec.transfers is not None:
        _check_transfers(spec.transfers, f"{key}.transfers")
    _check_overrides(spec.overrides, f"{key}.overrides")
