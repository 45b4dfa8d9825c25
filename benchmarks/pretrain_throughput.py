"""Pre-training throughput: images/s and peak memory of each method, and of the data loader alone.

Each image's two views count once. The model part runs on random tensors (no disk), one optimiser step per
iteration (forward, backward, SGD step, teacher EMA); the loader part decodes and augments synthetic ISIC-like
images in the official layout with N workers.

Usage:
    python benchmarks/pretrain_throughput.py --device cpu --encoder resnet18 --size 64 --batch-sizes 8 \
        --steps 5 --json runs/bench/cpu.json
    python benchmarks/pretrain_throughput.py --device cuda --encoder resnet50 --size 224 --amp bf16 \
        --batch-sizes 64 128 256 --loader-workers 8
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
from decon_med.ssl import build_method

METHODS = {
    "slotcon": ["ssl.method=slotcon"],
    "decon_sl": ["ssl.method=decon_sl", "ssl.alpha=0.5", "ssl.levels=[-1]"],
    "decon_ml": [
        "ssl.method=decon_ml",
        "ssl.alpha=0.0",
        "ssl.levels=[0, 1, 2, 3, 4]",
        "ssl.skip_dropout=0.5",
    ],
}


def method_config(method: str, args: argparse.Namespace) -> PretrainConfig:
    overrides = [
        f"model.encoder={args.encoder}",
        f"model.arch={args.arch}",
        f"data.image_size={args.size}",
        f"ssl.dim_hidden={args.dim_hidden}",
        f"ssl.dec_grid={args.dec_grid}",
        *METHODS[method],
    ]
    return load_config(None, overrides, schema=PretrainConfig)


def random_batch(batch_size: int, size: int, device: torch.device) -> dict:
    return {
        "view1": torch.randn(batch_size, 3, size, size, device=device),
        "view2": torch.randn(batch_size, 3, size, size, device=device),
        "box1": torch.tensor([[0.1, 0.1, 0.9, 0.9]], device=device).repeat(batch_size, 1),
        "box2": torch.tensor([[0.0, 0.2, 0.8, 1.0]], device=device).repeat(batch_size, 1),
        "flip1": torch.zeros(batch_size, dtype=torch.bool, device=device),
        "flip2": torch.ones(batch_size, dtype=torch.bool, device=device),
    }


def measure_method(method_name: str, batch_size: int, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    method = build_method(method_config(method_name, args)).to(device).train()
    optimizer = torch.optim.SGD([p for _, p in method.trainable_parameters()], lr=0.01, momentum=0.9)
    batch = random_batch(batch_size, args.size, device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)

    def step(i: int) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = method(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        method.after_step(i, 1000)

    for i in range(args.warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(args.steps):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {
        "method": method_name,
        "batch_size": batch_size,
        "img_per_s": batch_size * args.steps / seconds,
        "step_s": seconds / args.steps,
        "peak_mem_gib": peak,
    }


def measure_loader(args: argparse.Namespace) -> dict:
    from decon_med.data.datasets import build_dataset, build_loader
    from decon_med.data.synthetic import make_isic

    with tempfile.TemporaryDirectory() as tmp:
        make_isic(Path(tmp) / "isic", n=args.loader_images, seed=0)
        cfg = load_config(
            None,
            [
                "data.name=isic2017",
                f"data.root={Path(tmp) / 'isic'}",
                f"data.image_size={args.size}",
                f"data.num_workers={args.loader_workers}",
            ],
            schema=PretrainConfig,
        )
        ds = build_dataset(cfg, "train", "pretrain")
        bs = min(args.batch_sizes[0], len(ds))
        loader = build_loader(
            ds, batch_size=bs, shuffle=True, num_workers=args.loader_workers, drop_last=True
        )
        start = time.perf_counter()
        n = sum(len(batch["id"]) for batch in loader)
        seconds = time.perf_counter() - start
    return {"loader_workers": args.loader_workers, "images": n, "img_per_s": n / seconds}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--arch", default="unet")
    parser.add_argument("--encoder", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--dim-hidden", type=int, default=4096)
    parser.add_argument(
        "--dec-grid", type=int, default=7, help="ssl.dec_grid (decoder levels pooled to this grid)"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64])
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--loader-workers", type=int, default=0)
    parser.add_argument("--loader-images", type=int, default=32)
    parser.add_argument("--no-loader", action="store_true", help="skip the data-loader measurement")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    rows = [measure_method(m, bs, args) for bs in args.batch_sizes for m in args.methods]
    loader = None if args.no_loader else measure_loader(args)
    device_name = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    )
    print(
        f"device {device_name}, {args.arch}-{args.encoder} @ {args.size}px, amp {args.amp}, torch {torch.__version__}"
    )
    print(f"{'method':<10} {'batch':>6} {'img/s':>9} {'step s':>8} {'peak GiB':>9}")
    for r in rows:
        peak = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
        print(f"{r['method']:<10} {r['batch_size']:>6} {r['img_per_s']:>9.1f} {r['step_s']:>8.3f} {peak:>9}")
    if loader:
        print(
            f"loader: {loader['img_per_s']:.1f} img/s with {loader['loader_workers']} workers (decode + two views)"
        )
    result = {
        "device": device_name,
        "threads": torch.get_num_threads(),
        "args": vars(args),
        "methods": rows,
        "loader": loader,
        "torch": torch.__version__,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
