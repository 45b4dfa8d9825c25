"""The ``import`` sub-command of the ``decon-med`` command line: a published checkpoint as an export folder.

Example::

    decon-med import downloads/slotcon_checkpoint.pth --out weights/slotcon_coco
    decon-med finetune configs/finetune/isic.yaml init=weights/slotcon_coco transfer=encoder model.encoder=resnet50
"""

from __future__ import annotations

import argparse

#: ``--format`` choices (those of :data:`decon_med.engine.importer.FORMATS`; kept here so that building the parser
#: imports no torch).
FORMATS = ("auto", "slotcon", "densecl", "torchvision", "timm", "decon")


def _cmd_import(args: argparse.Namespace) -> int:
    import json

    from decon_med.engine.importer import import_weights

    files = import_weights(args.source, args.out, fmt=args.format, overwrite=args.overwrite)
    record = json.loads(files["meta"].read_text())
    what = ", ".join(
        f"{k}={record.get(k)}" for k in ("format", "encoder", "in_channels", "branch") if k in record
    )
    print(f"imported {args.source} to {args.out} ({what}):")
    for name, path in files.items():
        print(f"  {name:16s} {path}")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``import`` on the sub-command parsers of ``decon-med``.

    Example:
        >>> parser = argparse.ArgumentParser(); add_commands(parser.add_subparsers(dest="command"))
    """
    p = subparsers.add_parser(
        "import",
        help="convert a published ResNet checkpoint (SlotCon, DenseCL, torchvision, timm) into an export folder",
    )
    p.add_argument("source", help="checkpoint or weights file (.pth, .pt, .safetensors) or an export folder")
    p.add_argument("--out", required=True, help="output folder (the init= of a fine-tuning run)")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="auto",
        help="layout of the source (auto: recognised from its keys)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in the output folder")
    p.set_defaults(func=_cmd_import)
