"""The online linear probe: the fit on built features, probe.csv of a tiny pre-training run, resume truncation."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from decon_med.config import load_config
from decon_med.engine.pretrain import pretrain
from decon_med.engine.probe import ProbeLog, linear_probe_miou
from decon_med.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_linear_probe_separates_a_linearly_coded_label_and_not_noise():
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (4, 16, 16))
    codes = torch.eye(3)[labels].permute(0, 3, 1, 2)  # one-hot channels
    feats = torch.cat([codes * 2.0 + 0.1 * torch.randn_like(codes), torch.randn(4, 5, 16, 16)], dim=1)
    assert linear_probe_miou(feats[:2], labels[:2], feats[2:], labels[2:], num_classes=3) == 1.0
    noise = torch.randn(4, 8, 16, 16)
    assert linear_probe_miou(noise[:2], labels[:2], noise[2:], labels[2:], num_classes=3) < 0.5
    # ignored pixels (255) are neither fitted nor scored; the fit is reproducible
    ignored = labels.clone()
    ignored[:, :4] = 255
    first = linear_probe_miou(noise[:2], ignored[:2], noise[2:], ignored[2:], num_classes=3)
    assert first == linear_probe_miou(noise[:2], ignored[:2], noise[2:], ignored[2:], num_classes=3)


def test_pretraining_writes_probe_csv_at_start_every_n_steps_and_end(tmp_path, synth_root):
    overrides = [
        f"data.root={synth_root / 'isic'}", "data.image_size=64", "data.num_workers=0", "model.encoder=resnet18",
        "train.batch_size=4", "train.epochs=10", "train.amp=none", "train.sync_bn=false", "train.log_every=1",
        "ssl.dim_hidden=64", "ssl.dim_out=32", "ssl.num_prototypes=16", "ssl.num_prototypes_dec=16",
        f"probe.root={synth_root / 'isic'}", "probe.name=isic2017", "probe.every=2", "probe.images=2",
        "probe.val_images=2", "probe.size=16", "probe.steps=20", f"out_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    cfg = load_config(REPO / "configs/pretrain/decon_sl.yaml", overrides)
    pretrain(cfg, progress=False, max_steps=3)
    with open(tmp_path / "run" / "probe.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 2, 3]
    assert list(rows[0]) == ["step", "enc_mIoU", "dec_mIoU", "seconds"]
    for row in rows:
        assert 0.0 <= float(row["enc_mIoU"]) <= 1.0 and 0.0 <= float(row["dec_mIoU"]) <= 1.0
        assert float(row["seconds"]) > 0
    # resuming from step 2 drops the rows after it, then probes again
    log = ProbeLog(tmp_path / "run" / "probe.csv", resumed_step=2)
    log.write(4, {"enc_mIoU": 0.5, "dec_mIoU": 0.25, "seconds": 1.0})
    with open(tmp_path / "run" / "probe.csv", newline="") as f:
        assert [(r["step"], r["dec_mIoU"]) for r in csv.DictReader(f)][1:] == [
            ("2", rows[1]["dec_mIoU"]),
            ("4", "0.25"),
        ]


@pytest.mark.parametrize(
    ("override", "key"), [("probe.every=0", "probe.every"), ("probe.name=unlabeled", "probe.name")]
)
def test_bad_probe_keys_are_named(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(REPO / "configs/pretrain/slotcon.yaml", [override])
