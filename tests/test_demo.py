"""The demo's configs: tiny pre-training configs and a 30-run grid pointed into the demo folder."""

from pathlib import Path

from decon_med.demo import METHOD_OVERRIDES, demo_experiment, demo_pretrain_config
from decon_med.experiment import expand_grid


def test_demo_pretrain_configs(tmp_path):
    for method in METHOD_OVERRIDES:
        cfg = demo_pretrain_config(tmp_path, method, tmp_path / "data")
        assert cfg.ssl.method == method
        assert cfg.model.encoder == "resnet18" and cfg.data.image_size == 64
        assert Path(cfg.out_dir) == tmp_path / "pretrain" / method


def test_demo_grid_points_into_the_demo_folder(tmp_path):
    exports = {m: tmp_path / "pretrain" / m / "export" for m in METHOD_OVERRIDES}
    cfg = demo_experiment(tmp_path, tmp_path / "data" / "isic2017", exports)
    specs = expand_grid(cfg)
    # random: 3 fractions x 2 seeds; slotcon: encoder only; decon_ml: 2 transfers x 3 fractions x 2 seeds
    assert len(specs) == 6 + 6 + 12
    assert Path(cfg.out_dir) == tmp_path / "experiment"
    assert {s.cfg.init for s in specs} == {None, *map(str, exports.values())}
    assert all(s.cfg.data.root == str(tmp_path / "data" / "isic2017") for s in specs)
    assert all(Path(s.cfg.out_dir).is_relative_to(tmp_path / "experiment") for s in specs)
