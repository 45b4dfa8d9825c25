"""The ``decon-med`` command line.

Each command takes a YAML config plus ``key.sub=value`` overrides where it needs one, e.g.::

    decon-med check-data configs/finetune/isic.yaml data.root=/data/isic2017
    decon-med synth --kind refuge --out data/refuge_synth --n 16

Options and ``key=value`` words may come in any order. Errors in configs or data print one ``error: ...`` line
and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from decon_med import __version__, distributed
from decon_med.cli_args import ANY_ORDER, SubcommandParser, positive_int, seed_int
from decon_med.cli_configs import add_commands as add_configs_commands
from decon_med.cli_cost import add_commands as add_cost_commands
from decon_med.cli_cv import add_commands as add_cv_commands
from decon_med.cli_experiment import add_commands as add_experiment_commands
from decon_med.cli_finetune import add_commands as add_finetune_commands
from decon_med.cli_import import add_commands as add_import_commands
from decon_med.cli_predict import add_commands as add_predict_commands
from decon_med.cli_train import add_commands as add_train_commands
from decon_med.errors import DeconError, error_line, interrupted
from decon_med.folders import atomic_write, check_not_input


def _cmd_synth(args: argparse.Namespace) -> int:
    from decon_med.data.synthetic import synthesize

    if args.kind == "folder" and args.n < 3:  # one image each for train, val and test
        raise DeconError(f"--n: the folder kind needs at least 3 images (train, val, test), got {args.n}")
    try:
        counts = synthesize(args.kind, args.out, n=args.n, seed=args.seed, overwrite=args.overwrite)
    except FileExistsError as exc:
        raise DeconError(f"{args.out}: folder is not empty; pass --overwrite to replace it") from exc
    print(
        f"wrote synthetic {args.kind} data to {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
    )
    return 0


def _cmd_check_data(args: argparse.Namespace) -> int:
    from decon_med.config import load_config, split_config_args
    from decon_med.data.check import check_dataset, format_summary
    from decon_med.summary import print_summary

    files, overrides = split_config_args([args.config, *args.overrides])
    cfg = load_config(files, overrides, require=("data",))
    inputs = [("data root", cfg.data.root), *(("config file", f) for f in files)]
    for option, destination in (("--json", args.json), ("--preview", args.preview)):
        if destination:
            check_not_input(destination, inputs, option)
    print_summary("check-data", cfg, None, method="none (reading every file)")
    summary = check_dataset(cfg, progress=not args.quiet)
    print(format_summary(summary))
    if args.json:
        atomic_write(Path(args.json).expanduser(), json.dumps(summary, indent=1))
    if args.preview:
        from PIL import Image

        from decon_med.viz import preview_grid

        grid = preview_grid(cfg)
        preview = Path(args.preview).expanduser()
        fmt = Image.registered_extensions().get(preview.suffix.lower(), "PNG")
        atomic_write(preview, lambda f: Image.fromarray(grid).save(f, fmt))
        print(f"wrote a preview of normalised training slices with their labels to {args.preview}")
    print("ok: every file was read and matches its layout")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from decon_med.demo import PRETRAIN_BATCH, QUICK_PRETRAIN, run_demo

    quick_batch = int(dict(o.split("=", 1) for o in QUICK_PRETRAIN).get("train.batch_size", PRETRAIN_BATCH))
    batch = quick_batch if args.quick else PRETRAIN_BATCH
    if args.n < batch:  # pre-training drops incomplete batches: fewer images than a batch train nothing
        raise DeconError(
            f"--n: the demo pre-trains on batches of {batch} images, so it needs at least {batch}, got {args.n}"
        )
    run_demo(
        Path(args.out),
        n=args.n,
        seed=args.seed,
        progress=not args.quiet,
        quick=args.quick,
        overwrite=args.overwrite,
    )
    return 0


def _cmd_config_reference(args: argparse.Namespace) -> int:
    from decon_med.config_reference import reference_markdown, replace_between_markers

    text = reference_markdown()
    if args.update is None:
        print(text, end="")
        return 0
    path = Path(args.update)
    try:
        updated = replace_between_markers(path.read_text(), text)
    except (OSError, ValueError) as exc:
        raise DeconError(f"{path}: cannot update the config reference ({exc})") from exc
    path.write_text(updated)
    print(f"updated the config reference in {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="decon-med",
        description="Encoder-decoder contrastive pre-training and low-label fine-tuning for medical segmentation.",
        epilog=ANY_ORDER,
    )
    parser.add_argument("--version", action="version", version=f"decon-med {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=SubcommandParser
    )

    p = sub.add_parser("synth", help="write a small synthetic dataset in an official layout")
    p.add_argument(
        "--kind", required=True, choices=["isic", "refuge", "folder", "nifti", "textures", "anatomy"]
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--n",
        type=positive_int,
        default=16,
        help="isic/refuge: training images (val/test get a quarter each); folder: all images; nifti: volumes; "
        "textures/anatomy: unlabelled images (beside 48 labelled ones)",
    )
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("check-data", help="read every file of a dataset and print a summary")
    p.add_argument("config", help="YAML config")
    p.add_argument(
        "overrides", nargs="*", help="more YAML configs (merged left to right) and key.sub=value overrides"
    )
    p.add_argument("--json", help="also write the summary to this JSON file (only on success)")
    p.add_argument(
        "--preview",
        metavar="PNG",
        help="also write a grid of normalised training slices with their label overlays to this PNG file",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_check_data)

    p = sub.add_parser(
        "demo",
        help="synthetic data -> SlotCon / DeCon-ML pre-training -> low-label fine-tuning grid -> mIoU table",
    )
    p.add_argument("--out", default="runs/demo", help="demo folder")
    p.add_argument(
        "--quick", action="store_true", help="a one-minute version: 32 + 12 images, 1 epoch, 8 runs"
    )
    p.add_argument("--n", type=positive_int, default=128, help="number of synthetic unlabelled images")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start again from scratch (each step removes only what it wrote); without it, a stopped demo "
        "continues where it stopped",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("config-reference", help="print every config key with its type, default and meaning")
    p.add_argument(
        "--update", metavar="FILE", help="replace the reference between the markers in FILE instead"
    )
    p.set_defaults(func=_cmd_config_reference)

    add_train_commands(sub)
    add_import_commands(sub)
    add_finetune_commands(sub)
    add_cv_commands(sub)
    add_predict_commands(sub)
    add_experiment_commands(sub)
    add_cost_commands(sub)
    add_configs_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``decon-med`` script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        with distributed.process_group():  # only under torchrun
            return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if interrupted(exc):  # a Ctrl-C inside torch.save arrives wrapped in a RuntimeError
            print("interrupted", file=sys.stderr)
            return 130
        line = error_line(exc)  # a DeconError anywhere in the chain, or an OSError on a user's path
        if line is None:
            raise  # a bug: keep the traceback
        prefix = f"[rank {os.environ.get('RANK', '?')}] " if distributed.launched_by_torchrun() else ""
        print(f"{prefix}error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
