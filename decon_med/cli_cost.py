"""The ``cost`` sub-command of the ``decon-med`` command line: what a pre-training step of a config costs.

Example::

    decon-med cost configs/pretrain/decon_ml.yaml --checkpointing none all
    decon-med cost configs/pretrain/decon_ml.yaml ssl.decoder.dim_hidden=2048 --checkpointing all --cuda
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from decon_med.cli_args import positive_int

#: GPU sizes (GiB) of the "largest batch that fits" column; 1 GiB of each is left for the CUDA context.
GPUS = (24, 48, 80)


def _cmd_cost(args: argparse.Namespace) -> int:
    import torch

    from decon_med.config import PretrainConfig, load_config
    from decon_med.cost import cost_report, largest_batch, measure_cuda
    from decon_med.errors import DeconError

    cfg = load_config(args.config, args.overrides, schema=PretrainConfig)
    if args.cuda and not torch.cuda.is_available():
        raise DeconError("--cuda: no CUDA device is present")
    modes = args.checkpointing or [cfg.train.checkpointing]
    if len(set(args.batches)) != len(args.batches):
        raise DeconError(f"--batches: give each batch size once, got {' '.join(map(str, args.batches))}")
    report = cost_report(cfg, checkpointing=modes, batches=sorted(args.batches))
    print(
        f"{cfg.ssl.label}: {cfg.model.arch}-{cfg.model.encoder} @ {cfg.data.image_size}px, batch "
        f"{cfg.train.batch_size // cfg.train.accum_steps}, amp {cfg.train.amp}, optimizer {cfg.train.optimizer}"
    )
    for mode, row in report.items():
        g, mem = row["gflop_per_image"], row["memory_gib"]
        params = ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in row["params"].items())
        fits = ", ".join(f"{gib} GB: {largest_batch(row, gib - 1.0)}" for gib in GPUS)
        row["fits"] = {str(gib): largest_batch(row, gib - 1.0) for gib in GPUS}
        print(f"\ncheckpointing {mode}")
        print(
            f"  GFLOP / image   {g['total']:.1f} (encoder {g['encoder']:.1f}, decoder {g['decoder']:.1f}, "
            f"heads {g['heads']:.1f}, teacher {g['teacher']:.1f})"
        )
        print(f"  parameters      {params}")
        print(f"  activations     {row['activation_mib_per_image']:.1f} MiB / image kept for backward")
        print(
            f"  projected peak  {mem['peak']:.2f} GiB = weights {mem['weights']:.2f} + buffers {mem['buffers']:.2f}"
            f" + grads {mem['grads']:.2f} + optimizer {mem['optimizer']:.2f} + activations "
            f"{mem['activations']:.2f} + allowance {mem['allowance']:.2f}"
        )
        print(f"  largest batch   {fits}")
        if args.cuda:
            measured = measure_cuda(cfg, mode)
            row["measured"] = measured
            print(
                f"  measured        peak {measured['peak_gib']:.2f} GiB, {measured['img_per_s']:.0f} img/s "
                f"on {measured['device']}"
            )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``cost`` on the sub-command parsers of ``decon-med``.

    Example:
        >>> parser = argparse.ArgumentParser(); add_commands(parser.add_subparsers(dest="command"))
    """
    p = subparsers.add_parser(
        "cost",
        help="FLOPs, parameters, activation memory and projected peak of a pre-training step (no GPU needed)",
    )
    p.add_argument("config", help="YAML pre-training config")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument(
        "--checkpointing",
        nargs="+",
        default=None,
        choices=["none", "decoder", "encoder", "all"],
        help="modes to report (default: the config's train.checkpointing)",
    )
    p.add_argument(
        "--batches",
        type=positive_int,
        nargs="+",
        default=[1, 2, 3],
        help="batch sizes counted on CPU (fit through them)",
    )
    p.add_argument(
        "--cuda", action="store_true", help="also measure the real peak memory and img/s on the GPU"
    )
    p.add_argument("--json", help="also write the report to this JSON file")
    p.set_defaults(func=_cmd_cost)
