"""The ``finetune`` and ``evaluate`` sub-commands of the ``decon-med`` command line.

Example::

    decon-med finetune configs/finetune/isic.yaml data.root=/data/isic2017 init=weights/ml \\
        transfer=encoder_decoder fraction=0.05 seed=0 out_dir=runs/ft/isic_ml_5pc_s0
    decon-med finetune configs/finetune/isic.yaml ... --resume
    decon-med evaluate runs/ft/isic_ml_5pc_s0 --split test --save-predictions
    decon-med evaluate runs/ft/ct_ml --data-root /data/other_site --all --save-predictions
"""

from __future__ import annotations

import argparse

from decon_med.cli_args import positive_int
from decon_med.errors import ConfigError

#: Default ``--surface-tolerance`` (kept equal to ``decon_med.engine.volume_metrics.SURFACE_TOLERANCE_MM``,
#: which this module does not import so that ``--help`` stays fast).
SURFACE_TOLERANCE_MM = 2.0


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0.

    Example:
        >>> non_negative_float("1.5")
        1.5
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


#: ``key=value`` overrides ``decon-med evaluate`` accepts (everything else comes from the checkpoint's config).
EVALUATE_OVERRIDES = ("data.root", "data.num_workers")


def _cmd_finetune(args: argparse.Namespace) -> int:
    from decon_med.config import FinetuneConfig, load_config, split_config_args
    from decon_med.distributed import is_main_process
    from decon_med.engine.finetune import finetune, read_results
    from decon_med.engine.run_folder import check_config_files

    files, overrides = split_config_args([args.config, *args.overrides])
    cfg = load_config(files, overrides, schema=FinetuneConfig, require=("train",))
    check_config_files(cfg.out_dir, files)  # the run folder never holds an input
    run = finetune(
        cfg,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.quiet,
        max_iters=args.max_iters,
        summary=True,
    )
    if not is_main_process():
        return 0
    if not (run / "done.json").is_file():
        print(f"fine-tuning stopped; continue it with --resume ({run / 'last.ckpt'})")
        return 0
    results = read_results(run)
    print(
        f"fine-tuning finished: run folder {run}; {results['select']} checkpoint (iteration "
        f"{results['selected_iter']}) test mIoU {100 * results['test']['mIoU']:.2f}, "
        f"mDice {100 * results['test']['mDice']:.2f}"
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from decon_med.config import parse_override
    from decon_med.engine.evaluate import evaluate

    options = {}
    for item in args.overrides:
        key, value = parse_override(item)
        if key not in EVALUATE_OVERRIDES:
            raise ConfigError(f"evaluate accepts only {', '.join(EVALUATE_OVERRIDES)} overrides, got '{key}'")
        options[key] = value
    workers = options.get("data.num_workers")
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 0):
        raise ConfigError(f"config key 'data.num_workers': must be an integer >= 0, got {workers!r}")
    root = options.get("data.root")
    if args.data_root is not None:
        if root is not None and str(root) != args.data_root:
            raise ConfigError(f"--data-root {args.data_root} and data.root={root} disagree; give one of them")
        root = args.data_root
    evaluate(
        args.run,
        split=args.split,
        save_predictions=args.save_predictions,
        out=args.out,
        progress=not args.quiet,
        data_root=None if root is None else str(root),
        num_workers=workers,
        all_cases=args.all,
        postprocessing=not args.no_postprocessing,
        surface_tolerance_mm=args.surface_tolerance,
    )
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``finetune`` and ``evaluate`` on the sub-command parsers of ``decon-med``.

    Example:
        >>> parser = argparse.ArgumentParser(); add_commands(parser.add_subparsers(dest="command"))
    """
    p = subparsers.add_parser(
        "finetune", help="fine-tune an smp network on a label fraction, from random or pre-trained weights"
    )
    p.add_argument(
        "config", help="YAML fine-tuning config, e.g. configs/finetune/isic.yaml, or a shipped name (isic)"
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="more YAML configs merged left to right, then key.sub=value overrides, e.g. init=weights/ml "
        "transfer=encoder fraction=0.05",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in out_dir from its last.ckpt")
    p.add_argument("--overwrite", action="store_true", help="delete the run in out_dir and start again")
    p.add_argument(
        "--max-iters", type=positive_int, default=None, help="stop after this many iterations (resumable)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_finetune)

    p = subparsers.add_parser("evaluate", help="score a fine-tuned model on the val or test split")
    p.add_argument(
        "run", metavar="RUN_OR_CKPT", help="fine-tuning run folder (best, else last) or .ckpt file"
    )
    p.add_argument(
        "overrides", nargs="*", help="data.root=... / data.num_workers=... to read the data elsewhere"
    )
    p.add_argument("--split", default="test", choices=["val", "test"], help="split to score (default test)")
    p.add_argument(
        "--save-predictions",
        action="store_true",
        help="write predictions_<split>/<id>.png class-index masks at the original image sizes, and "
        "<case>_seg.nii.gz label volumes on the original voxel grid for NIfTI cases",
    )
    p.add_argument("--data-root", default=None, help="read the data from this folder (same as data.root=...)")
    p.add_argument(
        "--all",
        action="store_true",
        help="score every case of the data folder (all splits, as split 'all'), e.g. an external data set",
    )
    p.add_argument("--out", default=None, help="output folder (default: the checkpoint's folder)")
    p.add_argument(
        "--no-postprocessing",
        action="store_true",
        help="score the per-case volumes as the network predicts them, without the run's postprocessing.json",
    )
    p.add_argument(
        "--surface-tolerance",
        type=non_negative_float,
        default=SURFACE_TOLERANCE_MM,
        metavar="MM",
        help=f"tolerance of the per-case surface Dice (NSD) in mm (default {SURFACE_TOLERANCE_MM:g})",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_evaluate)
