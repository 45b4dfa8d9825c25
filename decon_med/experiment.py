"""Grids of fine-tuning runs: initialisations x transfer x label fractions x seeds, with Table-7-style summaries.

An experiment config (``configs/experiment/*.yaml``) names a base fine-tuning config and the grid::

    name: table7_isic
    finetune: configs/finetune/isic.yaml      # relative to the current directory, like every path here
    overrides: [data.root=data/isic2017, model.arch=unet]   # fine-tuning overrides applied to every run
    transfer_overrides:                       # optional: fine-tuning overrides for the runs of one transfer
      encoder: [train.log_every=100]
    inits:                                    # label -> where the weights are; path null = random init
      random: {path: null, method: random}
      slotcon: {path: runs/pretrain/slotcon_isic/export, method: slotcon, transfers: [encoder]}
      decon_ml: {path: runs/pretrain/decon_ml_isic/export, method: decon_ml, overrides: [], transfers: null}
    transfers: [encoder, encoder_decoder]     # the random init always runs once, with transfer random
    fractions: [0.05, 0.25, 1.0]
    seeds: [0, 1, 2]
    baseline: random                          # init label that the others are compared with, seed by seed
    out_dir: runs/experiment/table7_isic

Every path (``finetune``, init paths, ``out_dir``, paths inside overrides) is relative to the current directory,
as for every other command; ``finetune`` (like the experiment config itself) may also name a shipped config
(``configs/finetune/isic.yaml`` finds the shipped one where no such file exists, :mod:`decon_med.shipped`). Each
run gets
``<out_dir>/runs/<init>-<transfer>-f<fraction>-s<seed>`` as its fine-tuning run folder; the overrides apply in the
order base file, :data:`GRID_DEFAULTS`, ``overrides``, ``transfer_overrides[transfer]``, the init's ``overrides``,
then the grid values (``init``, ``transfer``, ``fraction``, ``seed``, ``out_dir``), which overrides may not set. An
init set to ``null`` (``inits.decon_ml=null`` on the command line) is left out of the grid.

**One network per table.** Before anything runs (``--dry-run`` included) the grid is refused when its runs differ
in anything but init / transfer / fraction / seed (:func:`check_comparable`: architecture, encoder, image size,
iterations, loss ... — so per-transfer or per-init overrides may only change logging and storage keys,
:data:`GRID_FREE_KEYS`), when an encoder-only method (``slotcon``, ``densecl``) is to be transferred with its
decoder (that decoder was never trained), when an existing init records a network the fine-tuning one
cannot take (another encoder, or another arch for ``encoder_decoder``), when an init path that an unfinished run
needs does not exist, and when ``out_dir`` is the data root, holds it or lies inside it.

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
    overwrite.json      while an ``overwrite`` call is under way: the runs it has still to run again

A second call skips finished runs (``done.json`` + ``results.json``), resumes interrupted ones from their
``last.ckpt`` and restarts those that never wrote one, so a grid survives a crash or Ctrl-C: run the same command
again. ``overwrite`` (``--overwrite``) runs every run again from the start, each removing only what it wrote; stopped
part-way, it is continued by the same command without ``--overwrite`` (the runs it has not redone yet are still
redone, and are left out of the tables until then). The same seed selects the same
training subset for every init, which is what makes the seed-paired comparison meaningful. With three seeds the
bootstrap resamples only three differences, so its 95 % CI is coarse (it is essentially [min, max] of the
differences); treat it as a spread, not as a test.

Example:
    >>> cfg = load_experiment("configs/experiment/table7_isic.yaml", ["seeds=[0]"])
    >>> len(expand_grid(cfg))
    18
    >>> paths = run_experiment(cfg)
    >>> sorted(paths)
    ['paired', 'results', 'runs', 'summary']
"""

from __future__ import annotations

import dataclasses
import json
import re
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import yaml

from decon_med.config import (
    ENCODER_ONLY_METHODS,
    FinetuneConfig,
    InitMethodName,
    Transfer,
    flatten,
    from_dict,
    load_config,
    parse_override,
    read_yaml,
    set_nested,
    to_dict,
)
from decon_med.errors import ConfigError, DataError, DeconError, interrupted
from decon_med.experiment_report import (  # noqa: F401  (re-exported: the public tables API lives here too)
    BOOTSTRAP_SEED,
    N_BOOTSTRAP,
    PAPER_DATASETS,
    PAPER_FRACTIONS,
    PAPER_TABLE7,
    bootstrap_ci,
    format_paired,
    format_paper_reference,
    format_table7,
    paired_differences,
    report,
    summarize,
    write_csv,
)
from decon_med.folders import EXPERIMENT_MARKER, OwnedFolder, atomic_write, overlap, remove_written
from decon_med.locks import folder_lock
from decon_med.shipped import not_found, resolve_config
from decon_med.summary import print_summary

#: ``random`` or a pre-training method name (the method registry's, aliases included), checked when read.
InitMethod = InitMethodName
RunStatus = Literal["done", "interrupted", "pending"]

#: Fine-tuning overrides every grid run starts from (the experiment's own overrides come after them).
GRID_DEFAULTS: tuple[str, ...] = ("train.prune_finished=true",)

#: Fine-tuning keys that the grid sets for every run; overrides may not set them.
GRID_KEYS: tuple[str, ...] = ("init", "transfer", "fraction", "seed", "out_dir")

#: File in the experiment folder listing the runs an ``overwrite`` call has still to run again from the start.
REDO_FILE = "overwrite.json"


#: Saved-config keys ignored when a finished run is compared with the planned config.
_DRIFT_IGNORED = frozenset({"data.num_workers", "train.keep_checkpoints", "train.prune_finished"})

#: Fine-tuning keys that may differ between the runs of one grid besides :data:`GRID_KEYS`: they change how a
#: run is logged and stored, not what it computes.
GRID_FREE_KEYS: frozenset[str] = _DRIFT_IGNORED | {"train.log_every", "train.ckpt_every"}
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
        finetune: base fine-tuning YAML config, relative to the current directory, or a shipped config name
            (``finetune/isic``; see :mod:`decon_med.shipped`).
        overrides: fine-tuning overrides applied to every run.
        transfer_overrides: transfer -> fine-tuning overrides for the runs with that transfer.
        inits: init label -> :class:`InitSpec`; labels are letters, digits and ``_``.
        transfers: transfers of the inits that have a path (``encoder``, ``encoder_decoder``).
        fractions: label fractions in (0, 1].
        seeds: seeds; a seed fixes the labelled subset, so equal seeds pair runs across inits.
        baseline: init label the others are compared with in ``paired.csv`` (``null``: no comparison).
        out_dir: experiment folder.
        note: printed under the result tables: what the grid's scale can and cannot show.
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
    note: str | None = None

    def validate(self) -> None:
        _need(bool(self.name.strip()), "name", "must not be empty")
        _need(bool(self.finetune), "finetune", "must name the base fine-tuning config")
        _need(
            resolve_config(self.finetune).is_file(),
            "finetune",
            f"'{self.finetune}' is not a file nor a shipped config name",
        )
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
            _check_decoder_transfers(self, label)

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
        ConfigError: unreadable file, duplicate or unknown key, wrong type or invalid value (the message names the
            file or the key).

    Example:
        >>> load_experiment("configs/experiment/demo.yaml", ["seeds=[0]"]).seeds
        [0]
    """
    path = resolve_config(path)  # a file that exists, else the shipped config a name names
    if not path.is_file():
        raise ConfigError(not_found(path, "experiment config"))
    raw = read_yaml(path)  # the strict loader of every config: duplicate keys refused, 5e-1 a float
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
    check_comparable(cfg, specs)
    return specs


def check_comparable(cfg: ExperimentConfig, specs: Sequence[RunSpec]) -> None:
    """Refuse a grid whose runs differ in anything but init / transfer / fraction / seed.

    A table compares initialisations: a row fine-tuned with another network, input size, budget or loss would
    confound the comparison (e.g. encoder+decoder rows as U-Net beside FCN random rows). Only the keys of
    :data:`GRID_KEYS` and :data:`GRID_FREE_KEYS` may differ.

    Raises:
        ConfigError: names every differing key, two runs that differ in it and the overrides that set it.
    """
    if len(specs) < 2:
        return
    ignored = set(GRID_KEYS) | GRID_FREE_KEYS
    first = flatten(to_dict(specs[0].cfg))
    for spec in specs[1:]:
        flat = flatten(to_dict(spec.cfg))
        keys = sorted(
            k for k in first.keys() | flat.keys() if k not in ignored and first.get(k) != flat.get(k)
        )
        if not keys:
            continue
        details = "; ".join(
            f"'{k}' is {first.get(k)!r} in {specs[0].name} and {flat.get(k)!r} in {spec.name}"
            f"{_override_sources(cfg, k)}"
            for k in keys
        )
        raise ConfigError(
            f"config key '{keys[0]}': the runs of one grid may differ only in init / transfer / fraction / seed, "
            f"so that every row of the table is fine-tuned alike: {details}; set it for every run in "
            "'overrides' instead"
        )


def _override_sources(cfg: ExperimentConfig, key: str) -> str:
    """`` (set by transfer_overrides.encoder_decoder)``: the per-transfer / per-init lists that set ``key``."""
    sources = [
        f"transfer_overrides.{transfer}"
        for transfer, items in cfg.transfer_overrides.items()
        if any(parse_override(i)[0] == key for i in items)
    ]
    sources += [
        f"inits.{label}.overrides"
        for label, init in cfg.inits.items()
        if any(parse_override(i)[0] == key for i in init.overrides)
    ]
    return f" (set by {', '.join(sources)})" if sources else ""


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
    cfg: ExperimentConfig,
    dry_run: bool = False,
    runner: Runner | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Run every unfinished run of the grid, then write and print the result tables.

    Args:
        cfg: a loaded experiment config.
        dry_run: print the runs and their status (done / interrupted / pending) and run nothing.
        runner: ``runner(cfg, resume=bool, overwrite=bool) -> run folder``; ``None`` uses
            :func:`decon_med.engine.finetune.finetune`.
        progress: show a progress bar over runs.
        overwrite: run every run again from the start, finished ones included (each run removes only what it
            wrote, through the fine-tuning run's own ``overwrite``). The runs still to redo are listed in
            ``<out_dir>/overwrite.json`` until they finish, so a call stopped part-way and repeated without
            ``overwrite`` still redoes them and never mixes their old results into the tables.

    Returns:
        ``{"runs", "results", "summary", "paired"}`` paths (only ``runs`` for a dry run).

    Raises:
        ConfigError: a run's config is invalid, ``out_dir`` is, holds or lies inside a data root, or an init path
            that an unfinished run needs is missing (before anything runs, a dry run included).
        GridError: some runs failed (after the others finished and the tables were written).

    Example:
        >>> run_experiment(load_experiment("configs/experiment/demo.yaml", ["inits.slotcon=null",
        ...     "inits.decon_ml=null"]), dry_run=True)
        {'runs': PosixPath('runs/demo/experiment/runs')}
    """
    specs = expand_grid(cfg)
    out = Path(cfg.out_dir)
    paths = {"runs": out / "runs"}
    _check_out_dir(cfg, specs)
    plan = plan_table(specs)
    redo_file = out / REDO_FILE
    redo = _read_redo(redo_file, specs)
    if overwrite:
        redo = {s.name for s, status in zip(specs, plan["status"], strict=True) if status != "pending"}
    todo = [s for s, status in zip(specs, plan["status"], strict=True) if status != "done" or s.name in redo]
    _check_init_networks(cfg, specs)
    _check_init_paths(cfg, todo)
    owned = OwnedFolder(out, EXPERIMENT_MARKER)
    if out.exists() and (not out.is_dir() or (not owned.is_empty() and not owned.is_marked())):
        raise DeconError(
            f"{out}: out_dir is not empty and holds no experiment ({owned.describe_foreign()}); choose another out_dir"
        )
    if dry_run:
        print(_format_plan(cfg, plan, redo))
        return paths
    owned.create()
    with folder_lock(out, "experiment"):
        return _run_grid(cfg, specs, todo, redo, redo_file, paths, runner, progress, overwrite)


def _run_grid(
    cfg: ExperimentConfig,
    specs: list[RunSpec],
    todo: list[RunSpec],
    redo: set[str],
    redo_file: Path,
    paths: dict[str, Path],
    runner: Runner | None,
    progress: bool,
    overwrite: bool,
) -> dict[str, Path]:
    """The runs and tables of :func:`run_experiment`, once the experiment folder is marked and locked."""
    out = Path(cfg.out_dir)
    pending = {s.name for s in todo}
    _note_drift([s for s in specs if s.name not in pending])
    if overwrite:
        _write_redo(redo_file, redo)  # before any run is touched
        for table in ("results.csv", "summary.csv", "paired.csv"):  # the old runs' tables
            remove_written(out / table)
    _write_text(out / "experiment.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    again = f", {len(redo)} of them again from the start" if redo else ""
    print(
        f"experiment {cfg.name}: {len(specs)} runs, {len(specs) - len(todo)} done, {len(todo)} to run{again}"
    )
    if specs:
        first = specs[0].cfg
        print_summary(
            "experiment",
            first,
            None,
            method=f"supervised from {len({s.init for s in specs})} init(s) x {len({s.transfer for s in specs})} "
            f"transfer(s) x {len({s.fraction for s in specs})} fraction(s) x {len({s.seed for s in specs})} seed(s)",
            steps=f"{first.train.iters} iterations per run",
        )
    paths.update(results=out / "results.csv", summary=out / "summary.csv", paired=out / "paired.csv")
    failed = _run_all(todo, runner or _finetune_runner, specs, paths["results"], progress, redo, redo_file)
    results = write_results([s for s in specs if s.name not in redo], paths["results"])
    report(cfg, results, paths)
    if failed:
        raise GridError(failed, len(specs), paths)
    return paths


def _run_all(
    todo: Sequence[RunSpec],
    runner: Runner,
    specs: Sequence[RunSpec],
    results_csv: Path,
    progress: bool,
    redo: set[str] | None = None,
    redo_file: Path | None = None,
) -> list[str]:
    from tqdm.auto import tqdm

    redo = set() if redo is None else redo
    failed = []
    bar = tqdm(todo, desc="runs", unit="run", disable=not progress, dynamic_ncols=True)
    for spec in bar:
        bar.set_postfix_str(spec.name)
        error = run_one(spec, runner, overwrite=spec.name in redo)
        if error is None:
            if spec.name in redo and redo_file is not None:
                redo.discard(spec.name)
                _write_redo(redo_file, redo)
            write_results([s for s in specs if s.name not in redo], results_csv)
        else:
            failed.append(spec.name)
            tqdm.write(error)
    return failed


def run_one(spec: RunSpec, runner: Runner, overwrite: bool = False) -> str | None:
    """Run (or resume / restart) one grid point; returns ``None`` or a one-line failure message.

    An interrupted run is resumed from its ``last.ckpt``, or restarted (``overwrite=True``) when it has none;
    ``overwrite`` restarts it in any case. The traceback of a failure goes to ``<out_dir>/failed/<run>.txt``.
    """
    run_dir = spec.run_dir
    log = run_dir.parent.parent / "failed" / f"{spec.name}.txt"
    resume = not overwrite and (run_dir / "last.ckpt").is_file()
    overwrite = run_dir.is_dir() and any(run_dir.iterdir()) and not resume
    try:
        runner(spec.cfg, resume=resume, overwrite=overwrite)
        if run_status(run_dir) != "done":
            raise DeconError(f"{run_dir}: the run returned without done.json and results.json")
    except Exception as exc:  # a failed run must not stop the grid
        if interrupted(exc):  # Ctrl-C met inside a write (torch.save turns it into a RuntimeError): stop
            raise KeyboardInterrupt from exc
        _write_text(log, traceback.format_exc())
        return f"run {spec.name} failed: {type(exc).__name__}: {exc} (traceback: {log})"
    remove_written(log)
    return None


def _read_redo(path: Path, specs: Sequence[RunSpec]) -> set[str]:
    """The runs of the grid that an earlier ``overwrite`` call left to run again (none when unreadable)."""
    try:
        names = json.loads(path.read_text())["runs"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    known = {s.name for s in specs}
    return {n for n in names if isinstance(n, str) and n in known} if isinstance(names, list) else set()


def _write_redo(path: Path, redo: set[str]) -> None:
    if redo:
        _write_text(path, json.dumps({"runs": sorted(redo)}, indent=1) + "\n")
    else:
        remove_written(path)


def _check_out_dir(cfg: ExperimentConfig, specs: Sequence[RunSpec]) -> None:
    """Refuse an ``out_dir`` that is, holds or lies inside a data root of the grid's runs: the grid writes and
    (with ``overwrite``) removes files there, and a data loader would list them as images."""
    out = Path(cfg.out_dir).expanduser().resolve()
    for root in sorted({str(s.cfg.data.root) for s in specs if s.cfg.data.root}):
        where = overlap(out, root, "data root")
        if where is None:
            continue
        raise ConfigError(
            f"config key 'out_dir': '{cfg.out_dir}' {where}; choose an out_dir outside the data"
        )


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


def _check_init_networks(cfg: ExperimentConfig, specs: Sequence[RunSpec]) -> None:
    """Compare the network each existing init records (export.json, checkpoint) with the grid's fine-tuning
    network, before anything runs; an init that records nothing readable is left to the run itself."""
    from decon_med.engine.transfer import check_recorded, resolve_source

    checked: set[tuple[str, str]] = set()
    for spec in specs:
        init = cfg.inits[spec.init]
        if init.path is None or (spec.init, spec.transfer) in checked or not Path(init.path).exists():
            continue
        checked.add((spec.init, spec.transfer))
        try:
            _, recorded = resolve_source(init.path, spec.transfer)
        except DataError:
            continue
        model = spec.cfg.model
        try:
            check_recorded(
                recorded, Path(init.path), spec.transfer, model.arch, model.encoder, spec.cfg.data.in_channels
            )
        except DeconError as exc:
            raise ConfigError(f"config key 'inits.{spec.init}.path': {exc}") from exc


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


# ---------------------------------------------------------------------------------------------------- helpers


def _format_plan(cfg: ExperimentConfig, plan: pd.DataFrame, redo: set[str] = frozenset()) -> str:
    counts = plan["status"].value_counts()
    tally = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("done", "interrupted", "pending"))
    lines = [
        f"experiment {cfg.name}: {len(plan)} runs in {cfg.out_dir}/runs ({tally})",
        plan.to_string(index=False),
    ]
    if redo:
        lines.append(f"note: {len(redo)} of them run again from the start (overwrite)")
    return "\n".join(lines)


def _column_name(cls: Any) -> str:
    return re.sub(r"\s+", "_", str(cls).strip())


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, text)


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


def _check_decoder_transfers(cfg: ExperimentConfig, label: str) -> None:
    """An encoder-only method never trained its decoder: transferring it would pass random weights off as
    pre-trained ones."""
    spec = cfg.inits[label]
    if spec.path is None or spec.method not in ENCODER_ONLY_METHODS:
        return
    if "encoder_decoder" in cfg.init_transfers(label):
        key = f"inits.{label}.transfers" if spec.transfers is not None else "transfers"
        raise ConfigError(
            f"config key '{key}': init '{label}' ({spec.method}) pre-trains the encoder only, so its decoder was "
            f"never trained and transfer encoder_decoder would fine-tune a random decoder as if pre-trained; "
            f"set inits.{label}.transfers=[encoder]"
        )
