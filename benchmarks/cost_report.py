"""Hardware-independent cost of a pre-training step for every shipped method: FLOPs by part, parameters,
activation bytes, projected peak memory, and the largest batch that fits 24 / 48 / 80 GB, with and without
activation checkpointing (see ``decon_med/cost.py`` for what is counted and how the peak is projected).

Counting runs on CPU at a few small batches and is exact for FLOPs and bytes whatever the machine; ``--cuda``
(when a GPU is present) also measures the real peak memory and img/s of each row at the config's batch.

Usage:
    # the paper's setting: ResNet-50 U-Net, 224 px, batch 256, bf16, every method, with the lever rows
    python benchmarks/cost_report.py --levers --json benchmarks/results/cost_r50_224.json
    # the same, measured beside projected on one GPU
    python benchmarks/cost_report.py --levers --cuda --json benchmarks/results/cost_r50_224_gpu.json
    # measured at batch 64 and at the largest batch the projection fits on this GPU, beside committed projections
    # (an out-of-memory row is recorded and the next one runs; benchmarks/gpu_check.sh runs this)
    python benchmarks/cost_report.py --cuda --methods slotcon decon_ml --measure-batches 64 fit \
        --projection benchmarks/results/cost_r50_224_decon_ml.json
    # tiny CPU check
    python benchmarks/cost_report.py --encoder resnet18 --size 64 --batch-size 16 --dim-hidden 64
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

from decon_med.config import PretrainConfig, load_config
from decon_med.cost import cost_report, largest_batch, measure_cuda, projected_peak_gib

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"

#: Methods reported by default, each from its shipped config.
METHODS = ["slotcon", "decon_sl", "decon_ml", "densecl", "decon_sl_densecl", "mim"]
#: GPU sizes of the fit table (GiB); 1 GiB of each is left for the CUDA context and cuDNN workspaces.
GPUS = [24, 48, 80]
RESERVE_GIB = 1.0
#: Cheaper decoder heads for DeCon-ML (``--levers``): extra overrides, each with checkpointing none and all.
LEVERS = [
    ("dim_hidden_dec 2048", ["ssl.dim_hidden_dec=2048"]),
    ("dim_hidden_dec 1024", ["ssl.dim_hidden_dec=1024"]),
]


def method_config(
    method: str, args: argparse.Namespace, extra: list[str] = (), batch_size: int | None = None
) -> PretrainConfig:
    """The shipped config of ``method`` at the report's network size, batch (or ``batch_size``) and precision."""
    overrides = [f"model.encoder={args.encoder}", f"data.image_size={args.size}"]
    for key, value in (
        ("train.batch_size", batch_size or args.batch_size),
        ("train.amp", args.amp),
        ("ssl.dim_hidden", args.dim_hidden),
        ("ssl.queue_size", args.queue_size),
    ):
        if value is not None:
            overrides.append(f"{key}={value}")
    return load_config(CONFIGS / f"{method}.yaml", [*overrides, *extra], schema=PretrainConfig)


def report_rows(args: argparse.Namespace, done=None) -> list[dict]:
    """One row per (method or lever, checkpointing mode); ``done(rows)`` is called after each method."""
    jobs = [(m, m, []) for m in args.methods]
    if args.levers:
        jobs += [(f"decon_ml + {name}", "decon_ml", extra) for name, extra in LEVERS]
    rows: list[dict] = []
    projections = load_projections(args.projection, args) if args.projection else None
    for label, method, extra in jobs:
        cfg = method_config(method, args, extra)
        start = time.perf_counter()
        if projections is not None:
            report = {mode: projections[(label, mode)] for mode in args.checkpointing}
        else:
            report = cost_report(cfg, checkpointing=args.checkpointing, batches=args.batches)
        seconds = time.perf_counter() - start
        verb = "loaded" if projections is not None else "counted"
        print(f"{verb} {label} in {seconds:.0f} s", file=sys.stderr, flush=True)
        for mode, row in report.items():
            row["label"] = label
            row["overrides"] = list(extra)
            if projections is None:
                row["count_s"] = seconds
            row["fits"] = {str(g): largest_batch(row, g - RESERVE_GIB) for g in GPUS}
            if args.cuda and not args.measure_batches:
                row["measured"] = measure_cuda(cfg, mode, warmup=args.warmup, steps=args.steps)
            rows.append(row)
        _compare(rows)
        if done is not None:
            done(rows)
    if args.cuda and args.measure_batches:
        measure_rows(rows, args, done)
    return rows


def load_projections(paths: list[str], args: argparse.Namespace) -> dict[tuple[str, str], dict]:
    """Rows of earlier ``--json`` files by (label, checkpointing), so that ``--cuda`` can measure beside a
    projection without counting again (the projection does not depend on the machine). The files must be of the
    report's encoder and image size; a (label, mode) asked for and in none of them stops the report."""
    found: dict[tuple[str, str], dict] = {}
    for path in paths:
        for row in json.loads(Path(path).read_text())["rows"]:
            if (row["encoder"], row["image_size"]) == (args.encoder, args.size):
                found.setdefault((row["label"], row["checkpointing"]), dict(row, projection_from=str(path)))
    labels = [*args.methods, *(f"decon_ml + {name}" for name, _ in LEVERS if args.levers)]
    missing = [
        f"{label}/{mode}" for label in labels for mode in args.checkpointing if (label, mode) not in found
    ]
    if missing:
        raise SystemExit(
            f"--projection: no row for {', '.join(missing)} at {args.encoder} / {args.size} px in {', '.join(paths)}"
        )
    return found


def cuda_memory_gib() -> float:
    """Memory of the current CUDA device (GiB)."""
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30


def measure_rows(rows: list[dict], args: argparse.Namespace, done=None) -> None:
    """``--measure-batches``: measure every row at every batch (an int, or ``fit``: the largest batch the
    projection fits in this device's memory less the reserve), batch by batch, into ``row["measured_at"]``.

    Each entry has ``batch``, ``projected_peak_gib`` and ``status``: ``ok`` (with the measurement), ``oom`` (the
    step ran out of device memory; the next entry runs) or ``skipped`` (past ``--deadline``). ``done(rows)`` is
    called after every entry, so a run stopped from outside keeps what it measured.
    """
    device_gib = cuda_memory_gib()
    for spec in args.measure_batches:
        for row in rows:
            batch = largest_batch(row, device_gib - RESERVE_GIB) if spec == "fit" else int(spec)
            entry = {"spec": spec, "batch": batch, "projected_peak_gib": projected_peak_gib(row, batch)}
            entry["device_gib"] = device_gib
            if args.deadline is not None and time.time() >= args.deadline:
                entry["status"] = "skipped"
            elif batch < 1:
                entry["status"] = "skipped"
            else:
                cfg = method_config(row["method"], args, row.get("overrides", []), batch_size=batch)
                try:
                    entry.update(
                        measure_cuda(cfg, row["checkpointing"], warmup=args.warmup, steps=args.steps)
                    )
                    entry["status"] = "ok"
                except torch.cuda.OutOfMemoryError as exc:
                    entry["status"] = "oom"
                    entry["error"] = (str(exc).strip().splitlines() or ["out of memory"])[0][:200]
                if entry["status"] == "oom":  # the failed step's tensors are gone with the exception
                    gc.collect()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
            print(
                f"measured {row['label']} / {row['checkpointing']} at batch {batch}: {entry['status']}",
                file=sys.stderr,
                flush=True,
            )
            row.setdefault("measured_at", []).append(entry)
            if done is not None:
                done(rows)


def _compare(rows: list[dict]) -> None:
    """``vs_slotcon``: each row's FLOPs over SlotCon's without checkpointing (when SlotCon is among the rows)."""
    base = {r["checkpointing"]: r for r in rows if r["label"] == "slotcon"}
    base_none = base.get("none")
    for row in rows:
        ref = base_none or base.get(row["checkpointing"])
        row["vs_slotcon"] = row["gflop_per_image"]["total"] / ref["gflop_per_image"]["total"] if ref else None


def print_tables(rows: list[dict], args: argparse.Namespace) -> None:
    print(
        f"unet-{args.encoder} @ {args.size}px, batch "
        f"{rows[0]['batch_size'] if rows else '-'}, amp {rows[0]['amp'] if rows else '-'}; counted on "
        f"{platform.processor() or 'cpu'}, torch {torch.__version__}"
    )
    head = (
        f"{'method':<30} {'ckpt':<8} {'enc':>6} {'dec':>6} {'heads':>6} {'teach':>6} {'GFLOP':>7} "
        f"{'xSlotCon':>8} {'Mparams':>8} {'MiB/img':>8} {'peak GiB':>9}"
    )
    print(head)
    for r in rows:
        g = r["gflop_per_image"]
        params = sum(r["params"].values()) / 1e6
        print(
            f"{r['label']:<30} {r['checkpointing']:<8} {g['encoder']:>6.1f} {g['decoder']:>6.1f} "
            f"{g['heads']:>6.1f} {g['teacher']:>6.1f} {g['total']:>7.1f} {_fmt(r['vs_slotcon'], '.2f'):>8} "
            f"{params:>8.1f} {r['activation_mib_per_image']:>8.1f} {r['memory_gib']['peak']:>9.1f}"
        )
    print(f"\nlargest batch that fits (projected, {RESERVE_GIB:g} GiB reserved):")
    print(f"{'method':<30} {'ckpt':<8} " + " ".join(f"{str(g) + ' GB':>7}" for g in GPUS))
    for r in rows:
        print(
            f"{r['label']:<30} {r['checkpointing']:<8} " + " ".join(f"{r['fits'][str(g)]:>7}" for g in GPUS)
        )
    at = [(r, e) for r in rows for e in r.get("measured_at", [])]
    if at:
        print(f"\nmeasured at batch sizes ({at[0][1]['device_gib']:.0f} GiB device):")
        for r, e in at:
            got = (
                f"peak {e['peak_gib']:.1f} GiB, {e['img_per_s']:.0f} img/s"
                if e["status"] == "ok"
                else e["status"]
            )
            print(
                f"{r['label']:<30} {r['checkpointing']:<8} batch {e['batch']:>5} projected "
                f"{e['projected_peak_gib']:.1f} GiB: {got}"
            )
    measured = [r for r in rows if r.get("measured")]
    if measured:
        print(f"\nmeasured on {measured[0]['measured']['device']}:")
        for r in measured:
            m = r["measured"]
            print(
                f"{r['label']:<30} {r['checkpointing']:<8} peak {m['peak_gib']:.1f} GiB (projected "
                f"{r['memory_gib']['peak']:.1f}), {m['img_per_s']:.0f} img/s"
            )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=METHODS, help="methods (shipped configs) to report")
    parser.add_argument(
        "--checkpointing",
        nargs="+",
        default=["none", "all"],
        choices=["none", "decoder", "encoder", "all"],
        help="train.checkpointing modes to report",
    )
    parser.add_argument("--levers", action="store_true", help="also DeCon-ML with narrower decoder heads")
    parser.add_argument("--encoder", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's (256)")
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default=None, help="default: the config's")
    parser.add_argument("--dim-hidden", type=int, default=None, help="ssl.dim_hidden (default: the config's)")
    parser.add_argument("--queue-size", type=int, default=None, help="ssl.queue_size (default: the config's)")
    parser.add_argument(
        "--batches", type=int, nargs="+", default=[1, 2, 3], help="batch sizes counted (fit through them)"
    )
    parser.add_argument("--cuda", action="store_true", help="also measure peak memory and img/s on the GPU")
    parser.add_argument("--warmup", type=int, default=3, help="--cuda: warm-up steps")
    parser.add_argument("--steps", type=int, default=10, help="--cuda: timed steps")
    parser.add_argument(
        "--measure-batches",
        nargs="+",
        default=None,
        help="--cuda: measure each row at these batch sizes ('fit': the largest the projection fits on this "
        "device) instead of the config's; a row out of memory is recorded and the next one runs",
    )
    parser.add_argument(
        "--projection",
        nargs="+",
        default=None,
        help="take the projected rows from these earlier --json files instead of counting them again",
    )
    parser.add_argument(
        "--deadline", type=float, default=None, help="--cuda: unix time after which rows are skipped"
    )
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    for spec in args.measure_batches or []:
        if spec != "fit" and not (spec.isdigit() and int(spec) > 0):
            parser.error(f"--measure-batches: {spec!r} is neither a positive batch size nor 'fit'")
    if args.cuda and not torch.cuda.is_available():
        parser.error("--cuda needs a CUDA device")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "args": vars(args),
        "gpus_gib": GPUS,
        "reserve_gib": RESERVE_GIB,
        "rows": [],
    }

    def write(rows: list[dict]) -> None:  # after every method, so a long run keeps what it has counted
        result["rows"] = rows
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=1))

    rows = report_rows(args, write)
    print_tables(rows, args)
    return result


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
