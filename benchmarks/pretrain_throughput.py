"""Pre-training throughput: images/s and peak memory of each method, the effect of each speed lever, and the loader.

Each image's two views count once. The model part runs the method exactly as the engine does (the shipped
``configs/pretrain/<method>.yaml`` with the sizes given here, the config's own optimiser, autocast, accumulation,
channels-last, optional ``torch.compile``, teacher EMA) on random tensors, so the figures are the model's alone.
The loader part decodes and augments synthetic ISIC-like JPEGs (official layout) into two views with N workers.
The lever ladder switches the levers on one after the other for one method and batch size.

Usage:
    # one GPU, the paper's network (ResNet-50 U-Net at 224 px, bf16, channels-last)
    python benchmarks/pretrain_throughput.py --profile gpu --batch-sizes 64 128 256 --levers \
        --loader-workers 8 16 --json benchmarks/results/bench_h100.json
    # CPU, tiny network
    python benchmarks/pretrain_throughput.py --profile cpu --json benchmarks/results/bench_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from decon_med.config import PretrainConfig, load_config
from decon_med.engine.loop import autocast
from decon_med.engine.optim import build_optimizer, scaled_lr
from decon_med.ssl import build_method

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"

#: Methods measured by default, each from its shipped config.
METHODS = ["slotcon", "decon_sl", "decon_ml", "densecl", "decon_sl_densecl", "mim"]

#: Settings of the two profiles; command-line options override them.
PROFILES = {
    "gpu": {
        "encoder": "resnet50",
        "size": 224,
        "amp": "bf16",
        "channels_last": True,
        "batch_sizes": [64, 128],
    },
    "cpu": {"encoder": "resnet18", "size": 64, "amp": "none", "channels_last": False, "batch_sizes": [16]},
}

#: The lever ladder: each rung adds one lever to the previous rung.
LEVERS = [
    ("fp32", {"amp": "none", "channels_last": False, "compile": False}),
    ("+ bf16 autocast", {"amp": "bf16"}),
    ("+ channels_last", {"channels_last": True}),
    ("+ torch.compile", {"compile": True}),
]


def method_config(method: str, args: argparse.Namespace, batch_size: int, setting: dict) -> PretrainConfig:
    """The shipped config of ``method`` at the benchmark's network size and settings."""
    overrides = [
        f"model.encoder={args.encoder}",
        f"model.arch={args.arch}",
        f"data.image_size={args.size}",
        f"train.batch_size={batch_size}",
        f"train.accum_steps={args.accum_steps}",
        f"train.amp={setting['amp']}",
        f"train.channels_last={str(setting['channels_last']).lower()}",
        f"train.compile={str(setting['compile']).lower()}",
    ]
    if args.dim_hidden is not None:
        overrides.append(f"ssl.dim_hidden={args.dim_hidden}")
    if args.dec_grid is not None:
        overrides.append(f"ssl.dec_grid={args.dec_grid}")
    if args.queue_size is not None:
        overrides.append(f"ssl.queue_size={args.queue_size}")
    return load_config(CONFIGS / f"{method}.yaml", overrides, schema=PretrainConfig)


def random_batch(batch_size: int, size: int, device: torch.device, channels_last: bool) -> dict:
    """Two random views with fixed overlap boxes and flips, shaped like a pre-training batch."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return {
        "view1": torch.randn(batch_size, 3, size, size, device=device).contiguous(memory_format=fmt),
        "view2": torch.randn(batch_size, 3, size, size, device=device).contiguous(memory_format=fmt),
        "box1": torch.tensor([[0.1, 0.1, 0.9, 0.9]], device=device).repeat(batch_size, 1),
        "box2": torch.tensor([[0.0, 0.2, 0.8, 1.0]], device=device).repeat(batch_size, 1),
        "flip1": torch.zeros(batch_size, dtype=torch.bool, device=device),
        "flip2": torch.ones(batch_size, dtype=torch.bool, device=device),
    }


def measure_method(method_name: str, batch_size: int, args: argparse.Namespace, setting: dict) -> dict:
    """Images/s, step time and peak memory of optimiser steps of one method (two views per image)."""
    device = torch.device(args.device)
    cfg = method_config(method_name, args, batch_size, setting)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the previous measurement's tensors are gone by now
    torch.manual_seed(0)
    method = build_method(cfg).to(device).train()
    if setting["channels_last"]:
        method.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(
        cfg.train, method.trainable_parameters(), scaled_lr(cfg.train.lr, batch_size, world_size=1)
    )
    forward = torch.compile(method, backend=args.compile_backend) if setting["compile"] else method
    micro = batch_size // args.accum_steps
    batch = random_batch(micro, args.size, device, setting["channels_last"])

    def step(i: int) -> None:
        for _ in range(args.accum_steps):
            with autocast(device, setting["amp"]):
                loss = forward(batch)["loss"]
            (loss / args.accum_steps).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_step(i, 10_000)

    for i in range(args.warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {
        "method": method_name,
        "batch_size": batch_size,
        "accum_steps": args.accum_steps,
        **setting,
        "img_per_s": batch_size * args.steps / seconds,
        "step_s": seconds / args.steps,
        "peak_mem_gib": peak,
    }


def measure_loader(args: argparse.Namespace, workers: int) -> dict:
    """Decode + two-view augmentation throughput of the pre-training dataset with ``workers`` processes.

    Reads ``--loader-root`` (a dataset of ``--loader-dataset``) when given, else synthetic ISIC-like JPEGs.
    """
    from decon_med.data.synthetic import make_isic

    if args.loader_root:
        return _loader_throughput(args, workers, Path(args.loader_root), args.loader_dataset)
    with tempfile.TemporaryDirectory() as tmp:
        make_isic(Path(tmp) / "isic", n=args.loader_images, seed=0)
        return _loader_throughput(args, workers, Path(tmp) / "isic", "isic2017")


def _loader_throughput(args: argparse.Namespace, workers: int, root: Path, name: str) -> dict:
    """Images/s over ``--loader-epochs`` epochs read as the engine reads them (one loader for the whole stream)
    and, for comparison, with a new loader per epoch (workers restart and the prefetch queue drains each epoch)."""
    from monai.data import DataLoader

    from decon_med.data.datasets import build_dataset, set_epoch
    from decon_med.data.stream import EpochPositions, PassStream, epoch_order

    overrides = [f"data.name={name}", f"data.root={root}", f"data.image_size={args.size}"]
    cfg = load_config(None, [*overrides, f"data.num_workers={workers}"], schema=PretrainConfig)
    ds = build_dataset(cfg, "train", "pretrain")
    if args.loader_root:
        ds = torch.utils.data.Subset(ds, range(min(len(ds), args.loader_images)))
        ds.seeder = ds.dataset.seeder
    bs = min(args.batch_sizes[0], len(ds))
    steps_per_epoch, epochs = len(ds) // bs, args.loader_epochs
    options = {"batch_size": bs, "num_workers": workers, "pin_memory": args.device.startswith("cuda")}

    def per_epoch_loaders():
        for epoch in range(epochs):
            set_epoch(ds, epoch)
            yield from DataLoader(
                ds, sampler=epoch_order(0, epoch, len(ds))[: steps_per_epoch * bs], **options
            )

    def one_stream():
        positions = EpochPositions(0, epochs * steps_per_epoch, steps_per_epoch, bs, len(ds))
        yield from DataLoader(PassStream(ds, seed=0), sampler=positions, **options)

    row = {"loader_workers": workers, "epochs": epochs, "images": epochs * steps_per_epoch * bs}
    for key, batches in (("img_per_s", one_stream), ("per_epoch_img_per_s", per_epoch_loaders)):
        start = time.perf_counter()
        n = sum(len(batch["id"]) for batch in batches())
        row[key] = n / (time.perf_counter() - start)
        if n != row["images"]:
            raise RuntimeError(f"the loader read {n} images, expected {row['images']}")
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=list(PROFILES), default=None, help="defaults for gpu or cpu")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--methods", nargs="*", default=METHODS, help="methods to measure (none: levers / loader only)"
    )
    parser.add_argument("--arch", default="unet")
    parser.add_argument("--encoder", default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--accum-steps", type=int, default=1, help="micro-batches per step (memory lever)")
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default=None)
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile the method's forward")
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend (eager: trace only)"
    )
    parser.add_argument("--dim-hidden", type=int, default=None, help="ssl.dim_hidden (default: the config's)")
    parser.add_argument("--dec-grid", type=int, default=None, help="ssl.dec_grid (default: the config's)")
    parser.add_argument("--queue-size", type=int, default=None, help="ssl.queue_size (default: the config's)")
    parser.add_argument("--levers", action="store_true", help="also run the lever ladder")
    parser.add_argument("--lever-method", default="decon_ml", help="method of the lever ladder")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--loader-workers", type=int, nargs="*", default=[2], help="worker counts to measure")
    parser.add_argument(
        "--loader-images", type=int, default=64, help="dataset size of the loader measurement"
    )
    parser.add_argument("--loader-epochs", type=int, default=3, help="epochs read per loader measurement")
    parser.add_argument("--loader-root", help="measure the loader on this dataset instead of synthetic JPEGs")
    parser.add_argument("--loader-dataset", default="isic2017", help="data.name of --loader-root")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile or ("gpu" if torch.cuda.is_available() else "cpu")]
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for key in ("encoder", "size", "amp", "channels_last", "batch_sizes"):
        if getattr(args, key) is None:
            setattr(args, key, profile[key])
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    setting = {"amp": args.amp, "channels_last": args.channels_last, "compile": args.compile}
    rows = []
    for bs in args.batch_sizes:
        batch_rows = [measure_method(m, bs, args, setting) for m in args.methods]
        base = next((r for r in batch_rows if r["method"] == "slotcon"), None)
        for r in batch_rows:
            r["vs_slotcon"] = r["step_s"] / base["step_s"] if base else None
        rows += batch_rows
    levers = []
    if args.levers:
        rung: dict = {}
        for name, change in LEVERS:
            rung = {**rung, **change}
            row = measure_method(args.lever_method, args.batch_sizes[0], args, rung)
            levers.append({"lever": name, **row})
    loaders = [measure_loader(args, w) for w in args.loader_workers]

    device_name = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    )
    print(
        f"device {device_name}, {args.arch}-{args.encoder} @ {args.size}px, amp {args.amp}, "
        f"channels_last {args.channels_last}, compile {args.compile}, accum {args.accum_steps}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'method':<18} {'batch':>6} {'img/s':>9} {'step s':>8} {'x SlotCon':>10} {'peak GiB':>9}")
    for r in rows:
        print(
            f"{r['method']:<18} {r['batch_size']:>6} {r['img_per_s']:>9.1f} {r['step_s']:>8.3f} "
            f"{_fmt(r['vs_slotcon'], '.2f'):>10} {_fmt(r['peak_mem_gib'], '.1f'):>9}"
        )
    if levers:
        print(f"\nlever ladder ({args.lever_method}, batch {args.batch_sizes[0]}):")
        for r in levers:
            print(f"  {r['lever']:<18} {r['img_per_s']:>9.1f} img/s {_fmt(r['peak_mem_gib'], '.1f'):>7} GiB")
    for loader in loaders:
        print(
            f"loader: {loader['img_per_s']:.1f} img/s with {loader['loader_workers']} workers (decode + two views; "
            f"{loader['per_epoch_img_per_s']:.1f} img/s with a new loader per epoch)"
        )
    result = {
        "device": device_name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "args": vars(args),
        "methods": rows,
        "levers": levers,
        "loaders": loaders,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
