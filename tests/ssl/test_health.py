"""Health signals (exact values on built inputs), the watchdog, and the signals of tiny pre-training runs."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from decon_med.config import load_config
from decon_med.engine.pretrain import pretrain
from decon_med.ssl import build_method
from decon_med.ssl.decon import DeCon
from decon_med.ssl.health import HealthWatchdog, assignment_health, embedding_std

REPO = Path(__file__).resolve().parents[2]


def tiny_overrides(synth_root: Path, out: Path) -> list[str]:
    """A ResNet-18 U-Net at 64 px on the synthetic ISIC images, batch 4, AdamW at a rate that moves it."""
    return [
        f"data.root={synth_root / 'isic'}", "data.image_size=64", "data.num_workers=0", "model.encoder=resnet18",
        "train.batch_size=4", "train.epochs=10", "train.amp=none", "train.sync_bn=false", "train.optimizer=adamw",
        "train.lr=0.05", "train.warmup_epochs=0", "ssl.dim_hidden=64", "ssl.dim_out=32", "ssl.num_prototypes=16",
        "ssl.num_prototypes_dec=16", f"out_dir={out}",
    ]  # fmt: skip


def test_embedding_std_is_one_for_orthonormal_spread_and_zero_at_collapse():
    d = 8
    # the 2d vectors +-e_i: each channel is +-1 / 0 across the set; std (ddof 1) = sqrt(2 / (2d - 1))
    z = torch.cat([torch.eye(d), -torch.eye(d)])
    assert float(embedding_std(z)) == pytest.approx(math.sqrt(2 / (2 * d - 1)) * math.sqrt(d))
    assert float(embedding_std(torch.randn(20000, d))) == pytest.approx(1.0, abs=0.02)
    assert float(embedding_std(torch.ones(5, d) * 3.0)) == 0.0
    # maps: (B, D, H, W) are read per pixel
    maps = torch.randn(2, d, 4, 4)
    assert float(embedding_std(maps)) == pytest.approx(
        float(embedding_std(maps.permute(0, 2, 3, 1).reshape(-1, d)))
    )


def test_assignment_health_counts_owners_entropy_ratio_and_centre():
    scores = torch.zeros(1, 4, 1, 3)
    scores[0, 0, 0, 0] = scores[0, 2, 0, 1] = scores[0, 2, 0, 2] = 1.0  # owners 0, 2, 2
    out = assignment_health(scores, torch.zeros(1, 4), temperature=1.0)
    assert float(out["protos"]) == 2.0
    p = torch.softmax(torch.tensor([1.0, 0.0, 0.0, 0.0]), 0)
    assert float(out["entropy"]) == pytest.approx(float(-(p * p.log()).sum()) / math.log(4), rel=1e-6)
    uniform = assignment_health(torch.zeros(2, 4, 2, 2), torch.tensor([[3.0, 0.0, 4.0, 0.0]]) * 0, 0.07)
    assert float(uniform["entropy"]) == pytest.approx(1.0) and float(uniform["protos"]) == 1.0
    assert float(assignment_health(scores, torch.tensor([[3.0, 0.0, 4.0, 0.0]]), 1.0)["center"]) == 5.0


def test_watchdog_warns_once_per_signal_after_patience_and_resets_on_recovery():
    dog = HealthWatchdog(patience=3)
    healthy = {"enc_z_std": 0.8, "enc_entropy": 0.6}
    assert dog.update(1, healthy) == []
    assert dog.update(2, {"enc_z_std": 0.01, "dec3_entropy": 0.999}) == []
    assert dog.update(3, {"enc_z_std": 0.2, "dec3_entropy": 0.999}) == []  # enc recovered: count restarts
    fired = dog.update(4, {"enc_z_std": 0.01, "dec3_entropy": 0.995})
    assert (
        len(fired) == 1
        and "dec3_entropy" in fired[0]
        and "level 'dec3'" in fired[0]
        and "uniform" in fired[0]
    )
    assert dog.update(5, {"enc_z_std": 0.01, "dec3_entropy": 0.995}) == []
    fired = dog.update(6, {"enc_z_std": 0.01, "dec3_entropy": 0.995})
    assert (
        len(fired) == 1 and "enc_z_std" in fired[0] and "level 'enc'" in fired[0] and "collapse" in fired[0]
    )
    assert dog.update(7, {"enc_z_std": 0.0, "dec3_entropy": 1.0}) == []  # each signal warns once
    assert HealthWatchdog(patience=0).update(1, {"enc_z_std": 0.0}) == []


class ConstantInput(DeCon):
    """A forced collapse: every view is replaced by zeros, so every pixel of every image looks the same."""

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        zeros = torch.zeros_like(batch["view1"])
        return super().forward({**batch, "view1": zeros, "view2": zeros})


def run(tmp_path, synth_root, method_name: str, extra=(), collapse: bool = False):
    cfg = load_config(
        REPO / f"configs/pretrain/{method_name}.yaml",
        [
            *tiny_overrides(synth_root, tmp_path / "run"),
            "train.log_every=1",
            "train.health_patience=2",
            *extra,
        ],
    )
    method = None
    if collapse:
        torch.manual_seed(cfg.seed)
        method = build_method(cfg)
        method.__class__ = ConstantInput
    pretrain(cfg, overwrite=True, progress=False, method=method, max_steps=3)
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_collapse_warning_fires_on_constant_input(tmp_path, synth_root, capsys):
    rows = run(tmp_path, synth_root, "decon_sl", collapse=True)
    err = capsys.readouterr().err
    assert all(float(r["enc_z_std"]) < 1e-3 and float(r["dec4_z_std"]) < 1e-3 for r in rows)
    warnings = [line for line in err.splitlines() if line.startswith("warning: step")]
    # once per collapsed level and signal, at the second log step (the zero projector output is also uniform)
    assert sorted(w.split(":")[2].split()[0] for w in warnings) == sorted(
        ["enc_z_std", "enc_entropy", "dec4_z_std", "dec4_entropy"]
    ), err
    assert all(w.startswith("warning: step 2:") for w in warnings)
    assert "level 'enc'" in warnings[0] or "level 'dec4'" in warnings[0]


@pytest.mark.parametrize(
    ("method", "signals"),
    [
        ("slotcon", ["enc_z_std", "enc_protos", "enc_entropy", "enc_center"]),
        (
            "decon_ml",
            [f"{lv}_{s}" for lv in ("dec0", "dec3") for s in ("z_std", "protos", "entropy", "center")],
        ),
        ("densecl", ["enc_z_std", "enc_pos_sim", "enc_neg_sim"]),
        ("mim", ["dec_z_std"]),
    ],
)
def test_every_method_logs_health_columns_and_a_healthy_run_does_not_warn(
    tmp_path, synth_root, capsys, method, signals
):
    extra = {"densecl": ["ssl.queue_size=16"], "mim": ["ssl.mask_patch=16"]}.get(method, [])
    rows = run(tmp_path, synth_root, method, extra)
    assert "warning: step" not in capsys.readouterr().err
    assert len(rows) == 3
    for name in signals:
        values = [float(r[name]) for r in rows]
        assert all(math.isfinite(v) for v in values), name
    for row in rows:
        for name in signals:
            if name.endswith("z_std"):
                assert 0.05 < float(row[name]) < 1.5, (name, row[name])
            if name.endswith("entropy"):
                assert 0.0 < float(row[name]) < 0.98, (name, row[name])
            if name.endswith("protos"):
                assert float(row[name]) >= 2
