"""Cost of the online linear probe relative to pre-training, at the probe's default settings.

For each method: the time of one optimiser step (the shipped config at the benchmark's network size, random views,
as in ``pretrain_throughput.py``) and the time of one probe call (:class:`decon_med.engine.probe.OnlineProbe` at
its defaults: 8 + 8 images, 64 x 64 probe grid, 100 Adam steps per classifier) on synthetic ISIC images, measured
in the same process, one after the other. The probe's share of a run is ``probe_s / (every * step_s + probe_s)``
with ``every`` = ``probe.every`` (default 500).

Example::

    nice -n 5 python benchmarks/probe_cost.py --json benchmarks/results/probe_cost_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_throughput import method_config, random_batch  # noqa: E402

from decon_med.config import ProbeConfig  # noqa: E402
from decon_med.data.synthetic import make_isic  # noqa: E402
from decon_med.engine.optim import build_optimizer, scaled_lr  # noqa: E402
from decon_med.engine.probe import OnlineProbe  # noqa: E402
from decon_med.ssl import build_method  # noqa: E402

SETTING = {"amp": "none", "channels_last": False, "compile": False}


def measure(method_name: str, args: argparse.Namespace, root: Path) -> dict:
    device = torch.device(args.device)
    cfg = method_config(method_name, args, args.batch_size, SETTING)
    cfg.probe.root, cfg.probe.name = str(root), "isic2017"
    cfg.data.num_workers = 0
    torch.manual_seed(0)
    method = build_method(cfg).to(device).train()
    optimizer = build_optimizer(
        cfg.train, method.trainable_parameters(), scaled_lr(cfg.train.lr, args.batch_size, world_size=1)
    )
    batch = random_batch(args.batch_size, args.size, device, False)

    def step(i: int) -> None:
        method(batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_step(i, 10_000)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(args.warmup):
        step(i)
    sync()
    start = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    sync()
    step_s = (time.perf_counter() - start) / args.steps

    load_start = time.perf_counter()
    probe = OnlineProbe(cfg, device)
    load_s = time.perf_counter() - load_start
    network = getattr(method, method.export_prefix.rstrip("."))
    probe(network)  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(args.probe_repeats):
        scores = probe(network)
    sync()
    probe_s = (time.perf_counter() - start) / args.probe_repeats
    every = cfg.probe.every
    return {
        "method": method_name,
        "step_s": step_s,
        "probe_s": probe_s,
        "probe_load_s": load_s,
        "every": every,
        "probe_share": probe_s / (every * step_s + probe_s),
        "enc_mIoU": scores["enc_mIoU"],
        "dec_mIoU": scores["dec_mIoU"],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["slotcon", "decon_sl", "decon_ml", "mim"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--arch", default="unet")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--probe-repeats", type=int, default=3)
    p.add_argument("--dim-hidden", type=int, default=None)
    p.add_argument("--dec-grid", type=int, default=None)
    p.add_argument("--queue-size", type=int, default=None)
    p.add_argument("--accum-steps", type=int, default=1)
    p.add_argument("--images", type=int, default=24, help="synthetic ISIC images written for the probe")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "isic"
        make_isic(root, n=args.images, seed=0)
        rows = [measure(m, args, root) for m in args.methods]
    defaults = ProbeConfig()
    result = {
        "machine": platform.processor() or platform.machine(),
        "device": args.device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "network": f"{args.arch} {args.encoder} {args.size} px, batch {args.batch_size}",
        "probe_defaults": {
            k: getattr(defaults, k) for k in ("every", "images", "val_images", "size", "steps")
        },
        "methods": rows,
    }
    print(f"probe cost ({result['network']}; probe every {defaults.every} steps, {args.device})")
    print(
        f"{'method':<10} {'step (s)':>9} {'probe (s)':>10} {'share of run':>13} {'enc mIoU':>9} {'dec mIoU':>9}"
    )
    for r in rows:
        print(
            f"{r['method']:<10} {r['step_s']:>9.3f} {r['probe_s']:>10.3f} {100 * r['probe_share']:>12.2f}% "
            f"{r['enc_mIoU']:>9.3f} {r['dec_mIoU']:>9.3f}"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
