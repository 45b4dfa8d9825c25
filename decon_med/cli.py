"""The ``decon-med`` command line.

Each command takes a YAML config plus ``key.sub=value`` overrides where it needs one, e.g.::

    decon-med check-data configs/finetune/isic.yaml data.root=/data/isic2017
    decon-med synth --kind refuge --out data/refuge_synth --n 16

Errors in configs or data print one ``error: ...`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from decon_med import __version__, distributed
from decon_med.cli_cost import add_commands as add_cost_commands
from decon_med.cli_experiment import add_commands as add_experiment_commands
from decon_med.cli_finetune import add_commands as add_finetune_commands
from decon_med.cli_predict import add_commands as add_predict_commands
from decon_med.cli_train import add_commands as add_train_commands
from decon_med.errors import DeconError, error_line


def _cmd_synth(args: argparse.Namespace) -> int:
    from decon_med.data.synthetic import synthesize

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
    print_summary("check-data", cfg, None, method="none (reading every file)")
    summary = check_dataset(cfg, progress=not args.quiet)
    print(format_summary(summary))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=1))
    if args.preview:
        from PIL import Image

        from decon_med.viz import preview_grid

        Path(args.preview).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(preview_grid(cfg)).save(args.preview)
        print(f"wrote a preview of normalised training slices with their labels to {args.preview}")
    print("ok: every file was read and matches its layout")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from decon_med.demo import run_demo

    run_demo(Path(args.out), n=args.n, seed=args.seed, progress=not args.quiet, quick=args.quick)
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
    )
    parser.add_argument("--version", action="version", version=f"decon-med {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a small synthetic dataset in an official layout")
    p.add_argument("--kind", required=True, choices=["isic", "refuge", "folder", "nifti", "textures"])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--n",
        type=int,
        default=16,
        help="isic/refuge: training images (val/test get a quarter each); folder: all images; nifti: volumes",
    )
    p.add_argument("--seed", type=int, default=0)
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
    p.add_argument("--n", type=int, default=128, help="number of synthetic unlabelled images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("config-reference", help="print every config key with its type, default and meaning")
    p.add_argument(
        "--update", metavar="FILE", help="replace the reference between the markers in FILE instead"
    )
    p.set_defaults(func=_cmd_config_reference)

    add_train_commands(sub)
    add_finetune_commands(sub)
    add_predict_commands(sub)
    add_experiment_commands(sub)
    add_cost_commands(sub)
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
        line = error_line(exc)  # a DeconError anywhere in the chain, or an OSError on a user's path
        if line is None:
            raise  # a bug: keep the traceback
        prefix = f"[rank {os.environ.get('RANK', '?')}] " if distributed.launched_by_torchrun() else ""
        print(f"{prefix}error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
