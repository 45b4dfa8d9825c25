"""The ``cv`` sub-command: fine-tune every cross-validation fold of one config, one run folder per fold.

Each fold ``k`` is the ``finetune`` command with ``data.fold=k`` and ``out_dir=OUT_DIR/fold_k``; a finished fold is
skipped, so a stopped ``cv`` continues where it stopped (``--resume`` continues an unfinished fold). The folds'
runs then predict as one ensemble: ``decon-med predict OUT_DIR/fold_0 OUT_DIR/fold_1 ... INPUT --out OUT``.

Example::

    decon-med cv configs/finetune/folder.yaml data.name=nnunet data.root=/data/Dataset001_Liver \\
        data.num_classes=3 data.num_folds=5 init=weights/ml out_dir=runs/cv/liver
    decon-med predict runs/cv/liver/fold_* new_scans/ --out pred/        # the 5 folds averaged
"""

from __future__ import annotations

import argparse
from pathlib import Path

from decon_med.cli_args import positive_int


def fold_overrides(overrides: list[str], out_dir: str, fold: int) -> list[str]:
    """The overrides of fold ``fold``: the user's, then the fold and its run folder under ``out_dir`` (last wins).

    Example:
        >>> fold_overrides(["seed=1"], "runs/cv/liver", 2)
        ['seed=1', 'data.fold=2', 'out_dir=runs/cv/liver/fold_2']
    """
    return [*overrides, f"data.fold={fold}", f"out_dir={Path(out_dir) / f'fold_{fold}'}"]


def _cmd_cv(args: argparse.Namespace) -> int:
    from decon_med.config import FinetuneConfig, load_config, split_config_args
    from decon_med.distributed import is_main_process
    from decon_med.engine.finetune import finetune, read_results
    from decon_med.engine.run_folder import check_config_files
    from decon_med.errors import ConfigError

    files, overrides = split_config_args([args.config, *args.overrides])
    base = load_config(files, overrides, schema=FinetuneConfig, require=("train",))
    if base.data.name not in ("folder", "nnunet", "datalist"):
        raise ConfigError(
            f"config key 'data.name': cross-validation needs a labelled layout with folds (folder, nnunet, "
            f"datalist), got '{base.data.name}'"
        )
    folds = args.folds or base.data.num_folds
    if folds > base.data.num_folds:
        raise ConfigError(f"--folds {folds} is more than data.num_folds ({base.data.num_folds})")
    cfgs = [
        load_config(files, fold_overrides(overrides, base.out_dir, k), schema=FinetuneConfig)
        for k in range(folds)
    ]
    for cfg in cfgs:  # every fold's run folder checked before the first one starts
        check_config_files(cfg.out_dir, files)
    rows = []
    for k, cfg in enumerate(cfgs):
        run = Path(cfg.out_dir)
        if (run / "done.json").is_file() and not args.overwrite:
            print(f"fold {k}: finished earlier, {run}")
        else:
            print(f"fold {k} of {folds}: {run}")
            run = finetune(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
            if not (run / "done.json").is_file():
                print(f"cv stopped in fold {k}; continue with --resume")
                return 0
        if is_main_process():
            results = read_results(run)
            rows.append((k, results.get("val") or {}, results["test"]))
    if not is_main_process():
        return 0
    print(f"\n{'fold':>4}  {'val mIoU %':>10}  {'test mIoU %':>11}")
    for k, val, test in rows:
        val_text = "-" if val.get("mIoU") is None else f"{100 * val['mIoU']:.2f}"
        print(f"{k:>4}  {val_text:>10}  {100 * test['mIoU']:>11.2f}")
    mean = sum(test["mIoU"] for _, _, test in rows) / len(rows)
    print(
        f"mean test mIoU {100 * mean:.2f} over {len(rows)} folds (each fold's test split; folds share no val case)"
    )
    runs = " ".join(str(Path(base.out_dir) / f"fold_{k}") for k in range(folds))
    print(f"ensemble: decon-med predict {runs} INPUT --out OUT")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``cv`` on the sub-command parsers of ``decon-med``.

    Example:
        >>> parser = argparse.ArgumentParser(); add_commands(parser.add_subparsers(dest="command"))
    """
    p = subparsers.add_parser(
        "cv",
        help="fine-tune every cross-validation fold of one config (one run folder per fold under out_dir)",
    )
    p.add_argument("config", help="YAML fine-tuning config or a shipped name (folder)")
    p.add_argument(
        "overrides",
        nargs="*",
        help="more YAML configs, then key=value overrides (data.num_folds=5, init=...)",
    )
    p.add_argument(
        "--folds", type=positive_int, default=None, help="train folds 0..N-1 only (default: data.num_folds)"
    )
    p.add_argument("--resume", action="store_true", help="continue an unfinished fold from its last.ckpt")
    p.add_argument("--overwrite", action="store_true", help="train every fold again from the start")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_cv)
