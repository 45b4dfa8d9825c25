"""Summary of ``benchmarks/gpu_check.sh``: the CUDA tests' outcome and measured gaps, and every measured cost row
(peak memory beside the projection, img/s, ok / oom / skipped) in one JSON file and one printed table.

Usage (the shell script calls it last):
    python benchmarks/gpu_check.py --device "NVIDIA H100 80GB HBM3" --out benchmarks/results/gpu_nvidia_h100.json \
        --pytest-rc 0 --pytest-log pytest.log --cuda-report cuda_tests.json --cost cost.json --cost-rc 0

Exit status: 0 when the tests passed and the cost step finished, else 1 (the JSON is written either way).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path


def _read_json(path: str | None) -> dict:
    try:
        return json.loads(Path(path).read_text()) if path else {}
    except (OSError, ValueError):
        return {}


def _last_summary_line(path: str | None) -> str:
    """pytest's closing line ("12 passed, 3 deselected in 80.1s"), or what is known without it."""
    try:
        lines = [line.strip("= \n") for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, TypeError):
        return "no pytest output"
    found = [
        line for line in lines if " in " in line and any(w in line for w in ("passed", "failed", "error"))
    ]
    return found[-1] if found else (lines[-1] if lines else "no pytest output")


def cost_rows(cost: dict) -> list[dict]:
    """One flat row per measured (method, checkpointing, batch)."""
    rows = []
    for row in cost.get("rows", []):
        for entry in row.get("measured_at", []):
            peak = entry.get("peak_gib")
            projected = entry.get("projected_peak_gib")
            rows.append(
                {
                    "label": row["label"],
                    "checkpointing": row["checkpointing"],
                    "spec": entry.get("spec"),
                    "batch": entry["batch"],
                    "projected_peak_gib": projected,
                    "peak_gib": peak,
                    "measured_over_projected": peak / projected if peak is not None and projected else None,
                    "img_per_s": entry.get("img_per_s"),
                    "status": entry["status"],
                    "error": entry.get("error"),
                }
            )
    return rows


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(result: dict) -> None:
    print(f"GPU check on {result['device']} (torch {result['torch']}); tests: {result['tests']['summary']}")
    print(
        f"{'method':<12} {'ckpt':<5} {'batch':>6} {'proj GiB':>9} {'peak GiB':>9} {'peak/proj':>9} "
        f"{'img/s':>7}  status"
    )
    for r in result["rows"]:
        print(
            f"{r['label']:<12} {r['checkpointing']:<5} {r['batch']:>6} {_fmt(r['projected_peak_gib'], '.1f'):>9} "
            f"{_fmt(r['peak_gib'], '.1f'):>9} {_fmt(r['measured_over_projected'], '.2f'):>9} "
            f"{_fmt(r['img_per_s'], '.0f'):>7}  {r['status']}"
        )
    if not result["rows"]:
        print("(no cost row was measured)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--pytest-rc", type=int, required=True)
    parser.add_argument("--pytest-log")
    parser.add_argument("--cuda-report")
    parser.add_argument("--cost")
    parser.add_argument("--cost-rc", type=int, required=True)
    parser.add_argument("--elapsed-s", type=float, default=None)
    args = parser.parse_args(argv)
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:  # pragma: no cover - the package needs torch
        torch_version = "?"
    cost = _read_json(args.cost)
    result = {
        "device": args.device,
        "machine": platform.node(),
        "torch": torch_version,
        "elapsed_s": args.elapsed_s,
        "tests": {
            "rc": args.pytest_rc,
            "passed": args.pytest_rc == 0,
            "summary": _last_summary_line(args.pytest_log),
            "measured": _read_json(args.cuda_report),
        },
        "cost": {"rc": args.cost_rc, "finished": args.cost_rc == 0, "args": cost.get("args")},
        "rows": cost_rows(cost),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print_table(result)
    print(f"wrote {args.out}")
    return 0 if args.pytest_rc == 0 and args.cost_rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
