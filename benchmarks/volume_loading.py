"""Slices per second over one shuffled epoch of NIfTI volumes, without and with the persistent volume cache.

Writes synthetic CT volumes (int16 HU, gzip-compressed ``.nii.gz``, stored L-P-S so they are reoriented, like most
scanner exports) to a temporary folder, lists them as the ``unlabeled`` layout does at start-up, and reads slices
in a shuffled order exactly as a DataLoader worker does (``load_slice``), in one process:

- ``before``: the loading as it was: 4 decoded volumes kept per process, slices cut with ``ndarray.take``;
- ``memory``: the same in-memory cache, slices cut as views (``data.cache_gb: 0`` today);
- ``disk``: the persistent cache (``data.cache_gb > 0``): volumes decoded once at the scan, every slice read from a
  memory-mapped ``.npy``.

With more volumes than the in-memory cache holds, ``before`` and ``memory`` decode a whole volume for a large
share of the samples; they are timed on the first ``--samples`` samples of the shuffled epoch (a full epoch would
take hours), ``disk`` on the whole epoch. The scan (start-up listing) is timed without the cache, with a cold cache
(it also fills the volume cache), and reused as by the next run of a grid.

Usage:
    python benchmarks/volume_loading.py --json benchmarks/results/volume_loading_cpu.json
    python benchmarks/volume_loading.py --volumes 3 --shape 48 48 12 --samples 8     # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from decon_med.config import DataConfig
from decon_med.data import volumes
from decon_med.data.layout_base import slice_options
from decon_med.data.layouts import get_layout


def make_volumes(folder: Path, n: int, shape: tuple[int, int, int], seed: int = 0) -> list[Path]:
    """``n`` CT-like volumes: air, a soft-tissue ellipse with darker lungs and noise; 0.7 x 0.7 x 2.5 mm, L-P-S."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2 < 1
    lungs = ((np.abs(x) - 0.4) / 0.25) ** 2 + (y / 0.4) ** 2 < 1
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        volume = np.full(shape, -1000, dtype=np.int16)
        plane = np.where(body, 40, -1000).astype(np.int16)
        plane[lungs & body] = -800
        volume[...] = plane[:, :, None]
        volume += rng.integers(-30, 30, size=shape, dtype=np.int16)
        affine = np.diag([-0.7, -0.7, 2.5, 1.0])
        path = folder / f"ct_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(volume, affine), str(path))
        paths.append(path)
    return paths


def machine() -> str:
    """CPU model and core count."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def _forget() -> None:
    """Drop the per-process memos, as a new run (or a new worker) starts."""
    volumes._opened.cache_clear()
    volumes._cached_image.cache_clear()
    volumes._cached_label.cache_clear()
    volumes._TOO_BIG.clear()


class _Decodes:
    """Counts volume decodes while active."""

    def __init__(self):
        self.n = 0
        self._decode = volumes._decode

    def __enter__(self):
        def counting(path):
            self.n += 1
            return self._decode(path)

        volumes._decode = counting
        return self

    def __exit__(self, *exc):
        volumes._decode = self._decode


def _take(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    return volume.take(index, axis=axis)


def scan(cfg: DataConfig) -> tuple[list[dict], float, int]:
    """Items of the start-up listing, its time in seconds and the decodes it took."""
    with _Decodes() as decodes:
        start = time.perf_counter()
        items = get_layout(cfg).items("train", labeled=False)
        seconds = time.perf_counter() - start
    return items, seconds, decodes.n


def epoch(items: list[dict], cfg: DataConfig, samples: int | None, seed: int = 0) -> dict:
    """Read slices in a shuffled order (the first ``samples`` of the epoch, or all): slices/s and decodes."""
    opts = slice_options(cfg)
    order = np.random.default_rng(seed).permutation(len(items))[: samples or None]
    with _Decodes() as decodes:
        start = time.perf_counter()
        for i in order:
            volumes.load_slice(items[i], opts)
        seconds = time.perf_counter() - start
    return {
        "samples": len(order),
        "seconds": round(seconds, 3),
        "slices_per_s": round(len(order) / seconds, 2),
        "decodes": decodes.n,
        "decode_share": round(decodes.n / len(order), 3),
    }


def run(args: argparse.Namespace) -> dict:
    shape = tuple(args.shape)
    with tempfile.TemporaryDirectory(prefix="decon-volbench-", dir=args.tmp) as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        make_volumes(tmp / "scans", args.volumes, shape)
        generate_s = time.perf_counter() - start
        base = {"name": "unlabeled", "root": str(tmp / "scans"), "modality": "ct", "in_channels": 1}
        plain = DataConfig(**base)
        cached = DataConfig(**base, cache_gb=args.cache_gb, cache_dir=str(tmp / "cache"))

        _forget()
        items, scan_plain, _ = scan(plain)
        rows = {}
        _forget()
        original = volumes._plane
        volumes._plane = _take
        try:
            rows["before"] = epoch(items, plain, args.samples)
        finally:
            volumes._plane = original
        _forget()
        rows["memory"] = epoch(items, plain, args.samples)

        _forget()
        items_cold, scan_cold, decodes_cold = scan(cached)
        _forget()
        items_warm, scan_warm, decodes_warm = scan(cached)
        assert items_cold == items and items_warm == items
        _forget()
        rows["disk"] = epoch(items, cached, None)
        cache_bytes = sum(p.stat().st_size for p in (tmp / "cache").rglob("*") if p.is_file())
    voxels = int(np.prod(shape))
    return {
        "machine": machine(),
        "load_1min": round(os.getloadavg()[0], 2),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "volumes": args.volumes,
        "shape": list(shape),
        "slices": len(items),
        "generate_s": round(generate_s, 2),
        "scan_s": {
            "no cache": round(scan_plain, 3),
            "cold cache": round(scan_cold, 3),
            "reused": round(scan_warm, 4),
        },
        "scan_decodes": {"cold cache": decodes_cold, "reused": decodes_warm},
        "epoch": rows,
        "memory_cache_mb_per_worker": round(volumes.VOLUME_CACHE_SIZE * voxels * 4 / 1e6, 1),
        "disk_cache_mb": round(cache_bytes / 1e6, 1),
    }


def print_table(result: dict) -> None:
    print(
        f"{result['volumes']} volumes of {' x '.join(map(str, result['shape']))} "
        f"({result['slices']} slices), {result['machine']}, load {result['load_1min']}"
    )
    print(f"{'loading':<8} {'samples':>8} {'slices/s':>10} {'decodes/sample':>15}")
    for name, row in result["epoch"].items():
        print(f"{name:<8} {row['samples']:>8} {row['slices_per_s']:>10.1f} {row['decode_share']:>15.3f}")
    scan = result["scan_s"]
    print(
        f"scan: no cache {scan['no cache']:.2f} s, cold cache {scan['cold cache']:.2f} s, "
        f"reused {scan['reused'] * 1000:.1f} ms ({result['scan_decodes']['reused']} decodes)"
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--volumes", type=int, default=8, help="number of volumes (more than the 4 kept in memory)"
    )
    p.add_argument("--shape", type=int, nargs=3, default=[512, 512, 160], metavar=("X", "Y", "Z"))
    p.add_argument("--samples", type=int, default=48, help="samples timed for before/memory (0: whole epoch)")
    p.add_argument("--cache-gb", type=float, default=50.0, help="data.cache_gb of the disk run")
    p.add_argument("--tmp", default=None, help="folder for the temporary volumes and cache")
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
