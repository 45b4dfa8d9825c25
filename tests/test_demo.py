"""The demo's configs: tiny pre-training configs and a 30-run grid pointed into the demo folder."""

from pathlib import Path

import pytest

from decon_med.demo import METHOD_OVERRIDES, demo_experiment, demo_pretrain_config
from decon_med.experiment import expand_grid


def test_demo_pretrain_configs(tmp_path):
    for method in METHOD_OVERRIDES:
        cfg = demo_pretrain_config(tmp_path, method, tmp_path / "data")
        assert cfg.ssl.method == method
        assert cfg.model.encoder == "resnet18" and cfg.data.image_size == 64
        assert Path(cfg.out_dir) == tmp_path / "pretrain" / method
        assert cfg.data.name == "unlabeled" and cfg.data.root == str(tmp_path / "data" / "unlabeled")
        # AdamW's step after the linear batch scaling is 1e-3, not the 6e-5 that batch 8 made of 0.002
        assert cfg.train.lr * cfg.train.batch_size / 256 == pytest.approx(1e-3)


def test_demo_grid_points_into_the_demo_folder(tmp_path):
    exports = {m: tmp_path / "pretrain" / m / "export" for m in METHOD_OVERRIDES}
    cfg = demo_experiment(tmp_path, tmp_path / "data", exports)
    specs = expand_grid(cfg)
    # random: 3 fractions x 2 seeds; slotcon: encoder only; decon_ml: 2 transfers x 3 fractions x 2 seeds
    assert len(specs) == 6 + 6 + 12
    assert Path(cfg.out_dir) == tmp_path / "experiment"
    assert {s.cfg.init for s in specs} == {None, *map(str, exports.values())}
    assert all(s.cfg.data.root == str(tmp_path / "data" / "labeled") for s in specs)
    assert {s.cfg.model.arch for s in specs} == {"unet"} and {s.cfg.data.num_classes for s in specs} == {3}
    assert all(Path(s.cfg.out_dir).is_relative_to(tmp_path / "experiment") for s in specs)
