"""The ``experiment`` sub-command of the ``decon-med`` command line: a grid of fine-tuning runs.

Example::

    decon-med experiment configs/experiment/table7_isic.yaml --dry-run
    decon-med experiment configs/experiment/table7_isic.yaml "overrides=[data.root=/data/isic2017]" seeds=[0]
"""

from __future__ import annotations

import argparse


def _cmd_experiment(args: argparse.Namespace) -> int:
    from decon_med.experiment import load_experiment, run_experiment

    cfg = load_experiment(args.config, args.overrides)
    run_experiment(cfg, dry_run=args.dry_run, progress=not args.quiet, overwrite=args.overwrite)
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``experiment`` on the sub-command parsers of ``decon-med``.

    Example:
        >>> parser = argparse.ArgumentParser(); add_commands(parser.add_subparsers(dest="command"))
    """
    p = subparsers.add_parser(
        "experiment",
        help="fine-tune a grid of inits x transfers x label fractions x seeds and summarise it (Table 7)",
        description=(
            "Run every unfinished run of an experiment grid (finished runs are skipped, interrupted ones "
            "resumed: after a crash or Ctrl-C run the same command again), then write results.csv, summary.csv "
            "and paired.csv in its out_dir and print the tables. Exits with status 2 when a run failed (the other "
            "runs still finish)."
        ),
    )
    p.add_argument(
        "config",
        help="YAML experiment config, e.g. configs/experiment/table7_isic.yaml, or a shipped name (table7_isic)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="experiment key=value overrides, e.g. seeds=[0] inits.slotcon.path=w/s inits.decon_ml=null "
        '"overrides=[data.root=/data/isic2017]"',
    )
    p.add_argument("--dry-run", action="store_true", help="list the runs and their status; run nothing")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="run every run again from the start, finished ones included (each removes only what it wrote); "
        "if stopped, the same command without --overwrite continues it",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_experiment)
