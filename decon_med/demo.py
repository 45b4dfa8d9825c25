"""``decon-med demo``: the whole pipeline on tiny synthetic data, on CPU, in a few minutes.

1. writes the texture task (:mod:`decon_med.data.synthetic_textures`: structures told apart by texture and shape,
   not by intensity) as unlabelled images plus a small labelled folder, and checks the labelled part;
2. pre-trains SlotCon and DeCon-ML on the unlabelled images (U-Net ResNet-18 at 64 px), exports their weights and
   prints each run's loss and health signals at its first and last log step;
3. fine-tunes one U-Net from random / encoder / encoder+decoder initialisation at 5 / 25 / 100 % of the labels
   with 2 seeds (``configs/experiment/demo.yaml``) and prints the summary, with a note on what a grid this small
   can and cannot show (``docs/validity.md`` holds the CPU-scale study).

Everything lands in one folder (default ``runs/demo``), which the notebooks read. A demo stopped part-way
(Ctrl-C, a time limit) continues where it stopped when run again: complete data is reused, a pre-training run
resumes from its ``last.ckpt`` (written every ``train.ckpt_every`` steps), an export is redone only when missing or
older than its run's checkpoint, finished grid runs are skipped and interrupted ones resumed. ``overwrite=True``
(``--overwrite``) starts again from scratch through each step's own overwrite, which removes only what that step
wrote. A folder written with other settings (another ``--n`` or ``--quick``) is refused with one line.
``quick=True`` (``decon-med demo --quick``) runs the same steps in about a minute: fewer images, one pre-training
epoch and an 8-run grid (25 / 100 % labels, one seed, 4 iterations per run).

Example:
    >>> run_demo(Path("runs/demo"))
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from decon_med.config import PretrainConfig, flatten, load_config, read_yaml, to_dict, upgrade_config
from decon_med.errors import DeconError
from decon_med.shipped import configs_root

#: The package's shipped configs folder (found through importlib.resources: wheel and editable installs alike).
CONFIGS = configs_root()

#: Labelled images of the demo (train / val / test 24 / 8 / 16); ``quick`` uses 12.
N_LABELED = 48
#: Pre-training batch; AdamW's step after the linear batch scaling (lr x batch / 256) is ``PRETRAIN_STEP``.
PRETRAIN_BATCH = 16
PRETRAIN_STEP = 1e-3

#: Tiny pre-training settings shared by both demo methods (the paper's widths shrunk for a CPU). The rate is set
#: so that the scaled rate is ``PRETRAIN_STEP``: the paper's 0.002 at batch 8 would scale to 6e-5 and not move.
#: The teacher temperature is the validity study's 0.04 (docs/validity.md): at the paper's 0.07 the teacher's
#: assignment drifts to uniform at this scale.
PRETRAIN_OVERRIDES = [
    "model.arch=unet",
    "model.encoder=resnet18",
    "data.name=unlabeled",
    "data.image_size=64",
    "data.num_workers=0",
    f"train.batch_size={PRETRAIN_BATCH}",
    "train.epochs=6",
    "train.optimizer=adamw",
    f"train.lr={PRETRAIN_STEP * 256 / PRETRAIN_BATCH:g}",
    "train.weight_decay=0.0001",
    "train.warmup_epochs=1",
    "train.amp=none",
    "train.ckpt_every=16",  # a stopped demo resumes from here; 16 steps are a few seconds on a CPU
    "train.keep_checkpoints=1",
    "train.log_every=4",
    "ssl.dim_hidden=256",
    "ssl.dim_out=64",
    "ssl.slotcon.num_prototypes=32",
    "ssl.slotcon.num_prototypes_dec=32",
    "ssl.teacher_momentum=0.99",
    "ssl.slotcon.teacher_temp=0.04",
]

METHOD_OVERRIDES = {
    "slotcon": ["ssl.method=slotcon", "ssl.decoder.preset=none"],
    "decon_ml": [
        "ssl.method=slotcon",
        "ssl.decoder.preset=ml",
        "ssl.decoder.alpha=0.0",
        "ssl.decoder.levels=[0, 1, 2, 3, 4]",
        "ssl.decoder.skip_dropout=0.5",
    ],
}


#: What ``quick=True`` changes: pre-training overrides and experiment keys.
QUICK_PRETRAIN = [
    "train.epochs=1",
    "train.batch_size=4",
    "train.lr=0.064",
    "train.log_every=1",
    "train.ckpt_every=4",
]
QUICK_GRID = {
    "fractions": [0.25, 1.0],
    "seeds": [0],
    "overrides": ["train.iters=4", "train.val_every=2", "train.log_every=2", "train.ckpt_every=4"],
}

#: Pre-training keys that may differ from a run's saved config when the demo reuses it (storage only).
SETTINGS_FREE = frozenset({"out_dir", "data.num_workers", "train.ckpt_every", "train.keep_checkpoints"})

#: The hint of every "written with other settings" error.
OVERWRITE_HINT = "pass --overwrite to start the demo again there, or choose another --out"

#: Health columns printed after pre-training (when a method logs them), with a short label.
HEALTH_COLUMNS = {"z_std": "std x sqrt(d)", "protos": "prototypes in use", "entropy": "entropy / ln K"}


def demo_pretrain_config(out: Path, method: str, data_root: Path, quick: bool = False) -> PretrainConfig:
    """The tiny pre-training config of one demo method, reading ``data_root/unlabeled``."""
    overrides = [
        *PRETRAIN_OVERRIDES,
        *METHOD_OVERRIDES[method],
        *(QUICK_PRETRAIN if quick else []),
        f"data.root={Path(data_root) / 'unlabeled'}",
        f"out_dir={out / 'pretrain' / method}",
    ]
    return load_config(None, overrides, schema=PretrainConfig)


def prepare_data(
    out: Path, n: int = 128, seed: int = 0, quick: bool = False, overwrite: bool = False
) -> Path:
    """The texture task in ``out/data``: ``n`` unlabelled images and a labelled folder, whose files are checked
    one by one. A complete dataset (``splits.json`` is written last) of the same size is kept; a partial one, or
    any with ``overwrite``, is written again (the generator removes only what it wrote)."""
    from decon_med.config import Config, DataConfig
    from decon_med.data.check import check_dataset, format_summary
    from decon_med.data.synthetic_textures import CLASS_NAMES, make_textures

    root = out / "data"
    n_labeled = 12 if quick else N_LABELED
    if overwrite or not (root / "labeled" / "splits.json").is_file():
        make_textures(root, n_unlabeled=n, n_labeled=n_labeled, seed=seed, overwrite=True)
    else:
        found = (_count(root / "unlabeled"), _count(root / "labeled" / "images"))
        if found != (n, n_labeled):
            raise DeconError(
                f"{root}: holds {found[0]} unlabelled and {found[1]} labelled images, this demo needs {n} and "
                f"{n_labeled} (it was written with another --n or --quick); {OVERWRITE_HINT}"
            )
    data = DataConfig(
        name="folder",
        root=str(root / "labeled"),
        image_size=64,
        num_workers=0,
        num_classes=len(CLASS_NAMES),
        class_names=list(CLASS_NAMES),
    )
    print(format_summary(check_dataset(Config(data=data), progress=False)))
    return root


def pretrain_and_export(
    out: Path, data_root: Path, progress: bool = True, quick: bool = False, overwrite: bool = False
) -> dict[str, Path]:
    """Pre-train each demo method, export its weights and print how its loss and health signals moved.

    A finished run is reused and an unfinished one resumed from its ``last.ckpt`` (from step 0 when it wrote
    none yet); ``overwrite`` starts every run again (``pretrain(..., overwrite=True)``). The export is written
    again only when it is missing or out of date (:func:`export_is_current`).
    """
    from decon_med.engine.export import export
    from decon_med.engine.pretrain import pretrain

    exports = {}
    for method in METHOD_OVERRIDES:
        cfg = demo_pretrain_config(out, method, data_root, quick=quick)
        run = Path(cfg.out_dir)
        export_dir = run / "export"
        if overwrite:
            print(f"pre-training {method} ...")
            pretrain(cfg, overwrite=True, progress=progress)
        else:
            check_same_settings(run, cfg)
            if not _finished(run, cfg):
                started = (run / "config.yaml").is_file() or (run / "last.ckpt").is_file()
                print(f"pre-training {method}{' (continuing the stopped run)' if started else ''} ...")
                pretrain(cfg, resume=started, progress=progress)
        if overwrite or not export_is_current(run, export_dir):
            export(run / "last.ckpt", export_dir, overwrite=True)
        exports[method] = export_dir
        print(health_report(method, run))
    return exports


def check_same_settings(run: Path, cfg: PretrainConfig) -> None:
    """Refuse to reuse a pre-training run that an earlier demo started with other settings (another ``--quick``,
    ``--seed`` ...): its config differs in a key outside :data:`SETTINGS_FREE`."""
    try:
        saved = flatten(upgrade_config(read_yaml(run / "config.yaml")))  # a run of the flat ssl format too
    except DeconError:
        return  # no config yet (or unreadable): the run itself decides
    planned = flatten(to_dict(cfg))
    keys = sorted(
        k for k in saved.keys() & planned.keys() if k not in SETTINGS_FREE and saved[k] != planned[k]
    )
    if keys:
        details = ", ".join(f"{k} {saved[k]!r} -> {planned[k]!r}" for k in keys[:3])
        more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
        raise DeconError(f"{run}: written by a demo with other settings ({details}{more}); {OVERWRITE_HINT}")


def _finished(run: Path, cfg: PretrainConfig) -> bool:
    """``done.json`` records the whole schedule of ``cfg``."""
    try:
        done = json.loads((run / "done.json").read_text())
    except (OSError, ValueError):
        return False
    epochs = done.get("epochs") if isinstance(done, dict) else None
    return not (isinstance(epochs, int) and epochs < cfg.train.epochs)


def export_is_current(run: Path, export_dir: Path) -> bool:
    """True when ``export_dir`` holds every export file, written from the step the run finished at and after
    the run's ``last.ckpt``."""
    from decon_med.engine.export import OUTPUTS

    meta, last = export_dir / OUTPUTS["meta"], run / "last.ckpt"
    if not all((export_dir / name).exists() for name in OUTPUTS.values()) or not last.is_file():
        return False
    try:
        recorded = json.loads(meta.read_text())
        done = json.loads((run / "done.json").read_text())
    except (OSError, ValueError):
        return False
    if (
        not isinstance(recorded, dict)
        or not isinstance(done, dict)
        or recorded.get("step") != done.get("step")
    ):
        return False
    return meta.stat().st_mtime >= last.stat().st_mtime


def health_report(method: str, run: Path) -> str:
    """One line per signal: the loss and the health signals of a pre-training run at its first and last log step
    (the level whose signal moved least is shown, so a level that did not learn is not hidden)."""
    metrics = pd.read_csv(run / "metrics.csv")
    first, last = metrics.iloc[0], metrics.iloc[-1]
    lines = [f"{method}: {len(metrics)} log steps to step {int(last['step'])}; first -> last"]
    lines.append(f"  loss                 {first['loss']:8.3f} -> {last['loss']:8.3f}")
    for suffix, label in HEALTH_COLUMNS.items():
        columns = [c for c in metrics.columns if c.endswith(f"_{suffix}")]
        if not columns:
            continue
        column = min(columns, key=lambda c: abs(float(last[c]) - float(first[c])))
        lines.append(f"  {label:20s} {first[column]:8.3f} -> {last[column]:8.3f}   ({column})")
    return "\n".join(lines)


def demo_experiment(out: Path, data_root: Path, exports: dict[str, Path], quick: bool = False):
    """``configs/experiment/demo.yaml`` with every path pointed into ``out`` (reduced by ``quick``); fine-tunes on
    ``data_root/labeled``."""
    from decon_med.experiment import experiment_from_dict

    path = CONFIGS / "experiment" / "demo.yaml"
    if not path.is_file():
        raise DeconError(f"{path}: demo experiment config not found (reinstall decon-med)")
    raw = read_yaml(path)
    raw["finetune"] = str(CONFIGS / "finetune" / "folder.yaml")
    raw["overrides"] = [o for o in raw["overrides"] if not o.startswith("data.root=")] + [
        f"data.root={Path(data_root) / 'labeled'}"
    ]
    for label, export_dir in exports.items():
        raw["inits"][label]["path"] = str(export_dir)
    raw["out_dir"] = str(out / "experiment")
    if quick:
        raw["fractions"], raw["seeds"] = QUICK_GRID["fractions"], QUICK_GRID["seeds"]
        raw["overrides"] += QUICK_GRID["overrides"]
    cfg = experiment_from_dict(raw)
    if cfg.note:
        iters = [o.split("=", 1)[1] for o in cfg.overrides if o.startswith("train.iters=")][-1:] or ["?"]
        sizes = (
            f"{_count(Path(data_root) / 'unlabeled')} unlabelled images, "
            f"{_count(Path(data_root) / 'labeled' / 'images')} labelled ones split train / val / test, "
            f"{iters[0]} fine-tuning iterations per run, {len(cfg.seeds)} seed(s)"
        )
        cfg.note = cfg.note.replace("at toy scale", f"at toy scale ({sizes})", 1)
    cfg.validate()
    return cfg


def run_demo(
    out: Path,
    n: int = 128,
    seed: int = 0,
    progress: bool = True,
    quick: bool = False,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Data -> SlotCon and DeCon-ML pre-training -> the fine-tuning grid -> summary tables, all under ``out``.

    Run again after a stop, it continues where it stopped; ``overwrite`` starts again from scratch, each step
    removing only what it wrote (see the module docstring).
    """
    from decon_med.experiment import run_experiment

    start = time.time()
    out = Path(out)
    data_root = prepare_data(out, n=min(n, 32) if quick else n, seed=seed, quick=quick, overwrite=overwrite)
    exports = pretrain_and_export(out, data_root, progress=progress, quick=quick, overwrite=overwrite)
    grid = demo_experiment(out, data_root, exports, quick=quick)
    paths = run_experiment(grid, progress=progress, overwrite=overwrite)
    print(f"demo finished in {time.time() - start:.0f} s; results in {out / 'experiment'}")
    return paths


def _count(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.is_file()) if folder.is_dir() else 0
