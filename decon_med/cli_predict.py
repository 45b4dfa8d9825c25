"""The ``predict`` sub-command of the ``decon-med`` command line.

Example::

    decon-med predict runs/finetune/isic data/new_images --out pred/isic --overlay
    decon-med predict runs/finetune/brain/best.ckpt scans/sub-01_T1w.nii.gz --out pred/brain --tta --overlay
    decon-med predict runs/cv/fold0 runs/cv/fold1 runs/cv/fold2 Dataset001_Organ/imagesTs --out pred/organ \
        --probabilities                        # an ensemble of three folds, softmax maps written too
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
        args.checkpoint if len(args.checkpoint) > 1 else args.checkpoint[0],
        args.input,
        args.out,
        overlay=args.overlay,
        batch_size=args.batch_size,
        progress=not args.quiet,
        overwrite=args.overwrite,
        mode="sliding" if args.sliding else None,  # None: the run's default (sliding after patch training)
        tta=args.tta,
        largest_component=args.largest_component,
        summary=True,
        probabilities=args.probabilities,
        postprocessing=not args.no_postprocessing,
    )
    for warning in summary["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    for skipped in summary["skipped"]:
        print(f"warning: skipped {skipped['path']}: {skipped['reason']}", file=sys.stderr)
    total = len(summary["predicted"]) + len(summary["skipped"])
    print(f"post-processing: {summary['postprocessing']}")
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
    p.add_argument(
        "checkpoint",
        nargs="+",
        metavar="run",
        help="fine-tuning run folder or .ckpt file; several (e.g. the folds of a cross-validation) are an "
        "ensemble: their softmax maps are averaged (they must agree on classes, input channels and image size)",
    )
    p.add_argument(
        "input",
        help="image, NIfTI volume, or folder searched recursively; nnU-Net channel files <case>_0000.nii.gz, ... "
        "(a run trained on data.name=nnunet, or an imagesTs/ folder of an nnU-Net dataset) are one case each, "
        "written as <case>.nii.gz; other volumes as <name>_seg.nii.gz",
    )
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
        "so that slices are about data.image_size); the default for runs trained with data.sampling=patch",
    )
    p.add_argument("--tta", action="store_true", help="average over horizontal and vertical flips")
    p.add_argument(
        "--probabilities",
        action="store_true",
        help="also write the softmax maps: <name>_probabilities.nii.gz for volumes (4D, classes last, on the input's "
        "voxel grid and affine, 16-bit) and <name>_probabilities.npy (float16 H x W x K) for 2D images",
    )
    post = p.add_mutually_exclusive_group()
    post.add_argument(
        "--largest-component",
        action="store_true",
        help="keep only the largest connected component of every class (3D for volumes), instead of the "
        "run's recorded post-processing",
    )
    post.add_argument(
        "--no-postprocessing",
        action="store_true",
        help="apply no post-processing; by default the run's postprocessing.json (written by finetune for "
        "volume runs: the largest component of the classes where that raised the val Dice) is applied",
    )
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_predict)
