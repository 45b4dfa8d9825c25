"""The sweep that chose the validity study's pre-training recipe, on the validation probe and the health signals.

Each candidate pre-trains one method on the study's unlabelled texture images (the settings of
``benchmarks/validity.py`` with the candidate's overrides on top), then records the first and last health
signals and the linear probe of the frozen network on the labelled train (fit) and val (score) images. Nothing
here reads the test images. The study then takes the settings whose teacher assignment leaves uniform and whose
probe rises above the random network's (``docs/validity.md``).

Usage:
    python benchmarks/validity_tune.py --out runs/validity              # every candidate (about 20 min, 2 cores)
    python benchmarks/validity_tune.py --out runs/validity --only slotcon_paper decon_ml_chosen
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from validity import (
    FULL,
    REPO,
    health_summary,
    pretrain_and_export,
    pretrain_config,
    pretrain_steps,
    probe_curve,
    probe_scores,
)

from decon_med.data.synthetic_textures import make_textures

#: The paper's blur (0.1-2.0 px whatever the view size); the package's default scales it to the view.
PAPER_BLUR = "augment.blur_sigma=[0.1, 2.0]"
PAPER_TEMP = "ssl.teacher_temp=0.07"
NO_PROBE = "probe.root=null"

#: label -> (method, pre-training epochs of 20 steps, overrides on top of the study's settings).
CANDIDATES: dict[str, tuple[str, int, list[str]]] = {
    "slotcon_paper": ("slotcon", 5, [PAPER_TEMP, PAPER_BLUR, NO_PROBE]),
    "slotcon_teacher_temp_0.04": ("slotcon", 5, ["ssl.teacher_temp=0.04", PAPER_BLUR, NO_PROBE]),
    "slotcon_center_momentum_0.99": (
        "slotcon",
        5,
        [PAPER_TEMP, "ssl.center_momentum=0.99", PAPER_BLUR, NO_PROBE],
    ),
    "slotcon_dim_out_32": ("slotcon", 5, [PAPER_TEMP, "ssl.dim_out=32", PAPER_BLUR, NO_PROBE]),
    "slotcon_300_steps": ("slotcon", 15, [PAPER_TEMP, PAPER_BLUR, NO_PROBE]),
    "slotcon_blur_scaled": ("slotcon", 5, [PAPER_TEMP, NO_PROBE]),
    "slotcon_blur_scaled_teacher_temp_0.04": ("slotcon", 5, ["ssl.teacher_temp=0.04", NO_PROBE]),
    "slotcon_blur_scaled_crop_0.2": ("slotcon", 5, [PAPER_TEMP, "augment.crop_scale=[0.2, 1.0]", NO_PROBE]),
    "decon_sl_paper": ("decon_sl", 5, [PAPER_TEMP, PAPER_BLUR, NO_PROBE]),
    "decon_sl_blur_scaled": ("decon_sl", 5, [PAPER_TEMP, NO_PROBE]),
    # the study's recipe: scaled blur, teacher temperature 0.04, 400 steps, the probe logged every 100 steps
    "decon_ml_chosen": ("decon_ml", 20, ["ssl.teacher_temp=0.04"]),
}

#: Signals reported per level (``<level>_<signal>``), besides the loss.
SIGNALS = ("group", "slot", "entropy", "protos", "z_std")


def run_candidate(out: Path, label: str, progress: bool) -> dict:
    """Pre-train one candidate (or reuse its finished run) and return its health and probe figures."""
    method, epochs, overrides = CANDIDATES[label]
    size = {**FULL, "pretrain_epochs": epochs}
    cfg = pretrain_config(out / "tune", label, method, size, overrides)
    _, seconds = pretrain_and_export(cfg, progress)
    run = Path(cfg.out_dir)
    health = {
        name: values
        for name, values in health_summary(run).items()
        if name == "loss" or name.endswith(tuple(f"_{s}" for s in SIGNALS))
    }
    return {
        "method": method,
        "steps": pretrain_steps(size),
        "overrides": overrides,
        "pretrain_seconds": seconds,
        "health": health,
        "probe": probe_scores(out, {label: run}, [], size)[label],
        "probe_curve": probe_curve(run),
    }


def markdown(results: dict) -> str:
    """One row per candidate: steps, encoder-level group loss and entropy first -> last, final probe."""
    lines = [
        "| candidate | steps | group loss (2 ln K = 6.93) | entropy / ln K | probe val mIoU %: enc / dec |",
        "|---|---|---|---|---|",
    ]
    for label, r in results.items():
        h = r["health"]
        level = "enc" if "enc_group" in h else max(k.split("_")[0] for k in h if k.endswith("_group"))
        group, entropy = h[f"{level}_group"], h[f"{level}_entropy"]
        lines.append(
            f"| {label} | {r['steps']} | {level}: {group['first']:.2f} → {group['last']:.2f} | "
            f"{entropy['first']:.2f} → {entropy['last']:.2f} | "
            f"{r['probe']['enc_mIoU']:.1f} / {r['probe']['dec_mIoU']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/validity", help="the study folder (its data is reused)")
    parser.add_argument("--only", nargs="*", choices=list(CANDIDATES), help="run these candidates only")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "validity_tune.json"))
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    out = Path(args.out)
    if not (out / "data" / "labeled" / "splits.json").is_file():
        make_textures(out / "data", FULL["n_unlabeled"], FULL["n_labeled"], seed=0, overwrite=True)
    path = Path(args.json)
    results = json.loads(path.read_text()) if path.is_file() else {}
    for label in args.only or CANDIDATES:
        print(f"candidate {label} ...")
        results[label] = run_candidate(out, label, not args.quiet)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1) + "\n")
    print(markdown({label: results[label] for label in CANDIDATES if label in results}))


if __name__ == "__main__":
    main()
