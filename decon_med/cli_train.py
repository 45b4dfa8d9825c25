"""The ``pretrain`` and ``export`` sub-commands of the ``decon-med`` command line.

Example::

    decon-med pretrain configs/pretrain/decon_ml.yaml data.root=/data/scans out_dir=runs/ml
    decon-med pretrain configs/pretrain/decon_ml.yaml data.root=/data/scans out_dir=runs/ml --resume
    decon-med export runs/ml/last.ckpt --out weights/ml
"""

from __future__ import annotations

import argparse

from decon_med.cli_args import positive_int


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from decon_med.config import PretrainConfig, load_config, split_config_args
    from decon_med.distributed import is_main_process
    from decon_med.engine.pretrain import pretrain
    from decon_med.engine.run_folder import check_config_files

    files, overrides = split_config_args([args.config, *args.overrides])
    cfg = load_config(files, overrides, schema=PretrainConfig, require=("ssl",))
    check_config_files(cfg.out_dir, files)  # the run folder never holds an input
    run = pretrain(
        cfg,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.quiet,
        max_steps=args.max_steps,
        summary=True,
    )
    done = run / "done.json"
    state = "finished" if done.is_file() else f"stopped; continue it with --resume ({run / 'last.ckpt'})"
    if is_main_process():
        print(f"pre-training {state}: run folder {run}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from decon_med.engine.export import export

    files = export(args.checkpoint, args.out, overwrite=args.overwrite)
    print(f"exported {args.checkpoint} to {args.out}:")
    for name, path in files.items():
        print(f"  {name:16s} {path}")
    return 0


class _MethodsHelp:
    """The registered pre-training methods (:mod:`decon_med.ssl.registry`), listed only when the help is printed:
    importing them takes seconds."""

    def __str__(self) -> str:
        from decon_med.ssl.registry import help_text

        return help_text()


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``pretrain`` and ``export`` on the sub-command parsers of ``decon-med``.

    Example:
        >>> parser = argparse.ArgumentParser(); add_commands(parser.add_subparsers(dest="command"))
    """
    p = subparsers.add_parser(
        "pretrain", help="self-supervised pre-training (SlotCon, DeCon, DenseCL, MIM) of an smp network"
    )
    config = p.add_argument(
        "config",
        help="YAML pre-training config or a shipped name (decon_ml); it or a later one must set the ssl section. "
        "ssl.method is one of %(methods)s",
    )
    config.methods = _MethodsHelp()  # type: ignore[attr-defined]  (read by %(methods)s when help is printed)
    p.add_argument(
        "overrides",
        nargs="*",
        help="more YAML configs merged left to right (e.g. configs/data/inhouse_ct.yaml), then key.sub=value "
        "overrides",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in out_dir from its last.ckpt")
    p.add_argument("--overwrite", action="store_true", help="delete the run in out_dir and start again")
    p.add_argument(
        "--max-steps",
        type=positive_int,
        default=None,
        help="stop after this many optimiser steps (resumable)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_pretrain)

    p = subparsers.add_parser(
        "export", help="write a checkpoint's network as encoder / encoder-decoder weights"
    )
    p.add_argument("checkpoint", help="pre-training checkpoint, e.g. runs/ml/last.ckpt")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in the output folder")
    p.set_defaults(func=_cmd_export)
