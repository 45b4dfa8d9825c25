"""The ``predict`` sub-command of the ``decon-med`` command line.

Example::

    decon-med predict runs/finetune/isic data/new_images --out pred/isic --overlay
    decon-med predict runs/finetune/brain/best.ckpt scans/sub-01_T1w.nii.gz --out pred/brain --tta --overlay
"""

from __future__ import annotations

import argparse
import sys

from decon_med.cli_args import positive_int

#: Exit status of ``predict`` when some inputs were skipped (the others were predicted).
SKIPPED_STATUS = 3


def _cmd_predict(args: argparse.Namespace) -> int:
    from decon_med.engine.predict import predict

    summary = predict(
        args.checkpoint,
        args.input,
        args.out,
        overlay=args.overlay,
        batch_size=args.batch_size,
        progress=not args.quiet,
        overwrite=args.overwrite,
        mode="sliding" if args.sliding else "resize",
        tta=args.tta,
        largest_component=args.largest_component,
        summary=True,
    )
    for warning in summary["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    for skipped in summary["skipped"]:
        print(f"warning: skipped {skipped['path']}: {skipped['reason']}", file=sys.stderr)
    total = len(summary["predicted"]) + len(summary["skipped"])
    print(f"predicted {len(summary['predicted'])} of {total} inputs into {summary['out']}")
    if summary["skipped"]:
        print(f"error: skipped {len(summary['skipped'])} of {total} inputs (listed above)", file=sys.stderr)
        return SKIPPED_STATUS
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``predict`` on the sub-command parsers of ``decon-med``.

    Example:
        >>> parser = argparse.ArgumentParser(); add_commands(parser.add_subparsers(dest="command"))
    """
    p = subparsers.add_parser(
        "predict",
        help="segment images or NIfTI volumes with a fine-tuned model",
        description="Exits with status 3 when some inputs were skipped (each is named on stderr), 2 on an error.",
    )
    p.add_argument("checkpoint", help="fine-tuning run folder or .ckpt file")
    p.add_argument("input", help="image, NIfTI volume, or folder searched recursively")
    p.add_argument("--out", required=True, help="output folder (mirrors the input's sub-folders)")
    p.add_argument(
        "--overlay",
        action="store_true",
        help="also write <name>_overlay.png for 2D images and <name>_seg_overlay.png (a grid of slices) for volumes",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=8,
        help="images or slices (with --sliding: windows) per pass",
    )
    p.add_argument(
        "--sliding",
        action="store_true",
        help="sliding windows of the training image size at each input's native resolution (MONAI "
        "sliding_window_inference) instead of resizing each whole image or slice to it as fine-tuning and "
        "evaluate do; right when inputs are at the scale the network was trained at (e.g. data.spacing chosen "
        "so that slices are about data.image_size)",
    )
    p.add_argument("--tta", action="store_true", help="average over horizontal and vertical flips")
    p.add_argument(
        "--largest-component",
        action="store_true",
        help="keep only the largest connected component of each class (3D for volumes)",
    )
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_predict)
