"""``decon-med demo``: the whole pipeline on tiny synthetic data, on CPU, in a few minutes.

1. writes a synthetic ISIC-2017-like dataset in the official layout and checks it;
2. pre-trains SlotCon and DeCon-ML briefly (U-Net ResNet-18 at 64 px) and exports their weights;
3. fine-tunes from random / encoder / encoder+decoder initialisation at 5 / 25 / 100 % of the labels with 2 seeds
   (``configs/experiment/demo.yaml``) and prints the Table-7-style summary.

Everything lands in one folder (default ``runs/demo``), which the notebooks read. Re-running reuses what is
finished. ``quick=True`` (``decon-med demo --quick``) runs the same steps in about a minute: 12 images, one
pre-training epoch and a 10-run grid (25 / 100 % labels, one seed, 4 iterations per run).

Example:
    >>> run_demo(Path("runs/demo"))
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from decon_med.config import PretrainConfig, load_config
from decon_med.errors import DeconError

#: The repository's configs folder (the package is installed from the repository, editable).
CONFIGS = Path(__file__).resolve().parents[1] / "configs"

#: Tiny pre-training settings shared by both demo methods (the paper's widths shrunk for a CPU).
PRETRAIN_OVERRIDES = [
    "model.arch=unet",
    "model.encoder=resnet18",
    "data.name=isic2017",
    "data.image_size=64",
    "data.num_workers=0",
    "train.batch_size=8",
    "train.epochs=15",
    "train.optimizer=adamw",
    "train.lr=0.002",
    "train.weight_decay=0.0001",
    "train.warmup_epochs=1",
    "train.amp=none",
    "train.ckpt_every=1000",
    "train.log_every=3",
    "ssl.dim_hidden=256",
    "ssl.dim_out=64",
    "ssl.num_prototypes=32",
    "ssl.num_prototypes_dec=32",
    "ssl.teacher_momentum=0.99",
]

METHOD_OVERRIDES = {
    "slotcon": ["ssl.method=slotcon", "ssl.alpha=1.0"],
    "decon_ml": [
        "ssl.method=decon_ml",
        "ssl.alpha=0.0",
        "ssl.levels=[0, 1, 2, 3, 4]",
        "ssl.skip_dropout=0.5",
    ],
}


#: What ``quick=True`` changes: pre-training overrides and experiment keys.
QUICK_PRETRAIN = ["train.epochs=1", "train.batch_size=4", "train.log_every=1"]
QUICK_GRID = {
    "fractions": [0.25, 1.0],
    "seeds": [0],
    "overrides": ["train.iters=4", "train.val_every=2", "train.log_every=2", "train.ckpt_every=4"],
}


def demo_pretrain_config(out: Path, method: str, data_root: Path, quick: bool = False) -> PretrainConfig:
    """The tiny pre-training config of one demo method."""
    overrides = [
        *PRETRAIN_OVERRIDES,
        *METHOD_OVERRIDES[method],
        *(QUICK_PRETRAIN if quick else []),
        f"data.root={data_root}",
        f"out_dir={out / 'pretrain' / method}",
    ]
    return load_config(None, overrides, schema=PretrainConfig)


def prepare_data(out: Path, n: int = 24, seed: int = 0) -> Path:
    """Synthetic ISIC-like data in ``out/data/isic2017`` (kept if already there), checked file by file."""
    from decon_med.config import Config, DataConfig
    from decon_med.data.check import check_dataset, format_summary
    from decon_med.data.synthetic import synthesize

    root = out / "data" / "isic2017"
    if not (root.is_dir() and any(root.iterdir())):
        synthesize("isic", root, n=n, seed=seed)
    cfg = Config(data=DataConfig(name="isic2017", root=str(root), image_size=64, num_workers=0))
    print(format_summary(check_dataset(cfg, progress=False)))
    return root


def pretrain_and_export(
    out: Path, data_root: Path, progress: bool = True, quick: bool = False
) -> dict[str, Path]:
    """Pre-train each demo method (resuming or reusing a finished run) and export its weights."""
    from decon_med.engine.export import export
    from decon_med.engine.pretrain import pretrain

    exports = {}
    for method in METHOD_OVERRIDES:
        cfg = demo_pretrain_config(out, method, data_root, quick=quick)
        run = Path(cfg.out_dir)
        if not (run / "done.json").is_file():
            print(f"pre-training {method} ...")
            pretrain(cfg, resume=(run / "last.ckpt").is_file(), progress=progress)
        export_dir = run / "export"
        if not (export_dir / "export.json").is_file():
            export(run / "last.ckpt", export_dir, overwrite=True)
        exports[method] = export_dir
    return exports


def demo_experiment(out: Path, data_root: Path, exports: dict[str, Path], quick: bool = False):
    """``configs/experiment/demo.yaml`` with every path pointed into ``out`` (reduced by ``quick``)."""
    from decon_med.experiment import experiment_from_dict

    path = CONFIGS / "experiment" / "demo.yaml"
    if not path.is_file():
        raise DeconError(f"{path}: demo experiment config not found (install decon-med from its repository)")
    raw = yaml.safe_load(path.read_text())
    raw["finetune"] = str(CONFIGS / "finetune" / "isic.yaml")
    raw["overrides"] = [o for o in raw["overrides"] if not o.startswith("data.root=")] + [
        f"data.root={data_root}"
    ]
    for label, export_dir in exports.items():
        raw["inits"][label]["path"] = str(export_dir)
    raw["out_dir"] = str(out / "experiment")
    if quick:
        raw["fractions"], raw["seeds"] = QUICK_GRID["fractions"], QUICK_GRID["seeds"]
        raw["overrides"] += QUICK_GRID["overrides"]
    cfg = experiment_from_dict(raw)
    cfg.validate()
    return cfg


def run_demo(
    out: Path, n: int = 24, seed: int = 0, progress: bool = True, quick: bool = False
) -> dict[str, Path]:
    """Data -> SlotCon and DeCon-ML pre-training -> the fine-tuning grid -> summary tables, all under ``out``."""
    from decon_med.experiment import run_experiment

    start = time.time()
    out = Path(out)
    data_root = prepare_data(out, n=min(n, 12) if quick else n, seed=seed)
    exports = pretrain_and_export(out, data_root, progress=progress, quick=quick)
    paths = run_experiment(demo_experiment(out, data_root, exports, quick=quick), progress=progress)
    print(f"demo finished in {time.time() - start:.0f} s; results in {out / 'experiment'}")
    return paths
