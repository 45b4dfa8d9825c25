"""The demo's configs: tiny pre-training configs and a 30-run grid pointed into the demo folder."""

from pathlib import Path

import pytest

from decon_med.demo import METHOD_OVERRIDES, demo_experiment, demo_pretrain_config
from decon_med.experiment import expand_grid


def test_demo_pretrain_configs(tmp_path):
    for method in METHOD_OVERRIDES:
        cfg = demo_pretrain_config(tmp_path, method, tmp_path / "data")
        expected = {"slotcon": ("slotcon", "none"), "decon_ml": ("slotcon", "ml")}[method]
        assert (cfg.ssl.method, cfg.ssl.decoder.preset) == expected
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


def test_demo_cli_takes_overwrite():
    from decon_med.cli import build_parser

    assert build_parser().parse_args(["demo", "--quick", "--overwrite"]).overwrite
    assert not build_parser().parse_args(["demo"]).overwrite


def test_interrupted_demo_continues_where_it_stopped(tmp_path, monkeypatch):
    """Stopped (Ctrl-C) right after a pre-training checkpoint, or before a run wrote any, the demo run again
    continues: the first run resumes from its checkpoint, the second starts again from step 0, the data is reused
    and the tables are written."""
    import pandas as pd

    from decon_med.data import synthetic_textures
    from decon_med.demo import run_demo
    from decon_med.engine.loop import TrainingSession
    from decon_med.engine.pretrain import MetricsLogger

    saves: list[tuple[str, int]] = []
    stop = {"save": ("slotcon", 4), "log": None}
    save, write = TrainingSession.save, MetricsLogger.write

    def save_then_maybe_stop(self, numbered):
        save(self, numbered)
        saves.append((Path(self.paths.root).name, self.step))
        if saves[-1] == stop["save"]:
            raise KeyboardInterrupt

    def write_then_maybe_stop(self, row):
        write(self, row)
        if (self.path.parent.name, int(row["step"])) == stop["log"]:
            raise KeyboardInterrupt

    generated = []
    make_textures = synthetic_textures.make_textures
    monkeypatch.setattr(TrainingSession, "save", save_then_maybe_stop)
    monkeypatch.setattr(MetricsLogger, "write", write_then_maybe_stop)
    monkeypatch.setattr(
        synthetic_textures, "make_textures", lambda *a, **k: generated.append(a) or make_textures(*a, **k)
    )
    out = tmp_path / "demo"
    slotcon, decon_ml = out / "pretrain" / "slotcon", out / "pretrain" / "decon_ml"
    with pytest.raises(KeyboardInterrupt):  # stopped after slotcon's step-4 checkpoint
        run_demo(out, progress=False, quick=True)
    assert (slotcon / "last.ckpt").is_file() and not (slotcon / "done.json").exists()
    assert not (out / "experiment").exists() and len(generated) == 1

    stop.update(save=None, log=("decon_ml", 2))
    saves.clear()
    with pytest.raises(KeyboardInterrupt):  # stopped in decon_ml before its first checkpoint
        run_demo(out, progress=False, quick=True)
    # slotcon went on from its step-4 checkpoint (a restart would have saved step 4 again)
    assert saves == [("slotcon", 8)] and (slotcon / "done.json").is_file()
    assert (decon_ml / "metrics.csv").is_file() and not (decon_ml / "last.ckpt").exists()

    stop.update(log=None)
    saves.clear()
    paths = run_demo(out, progress=False, quick=True)  # no "unfinished run exists": decon_ml starts again
    assert [s for s in saves if s[0] in METHOD_OVERRIDES] == [("decon_ml", 4), ("decon_ml", 8)]
    for run in (slotcon, decon_ml):
        assert list(pd.read_csv(run / "metrics.csv")["step"]) == list(range(1, 9))
    assert len(generated) == 1  # the complete data was reused
    assert len(pd.read_csv(paths["results"])) == 8 and paths["summary"].is_file()  # the quick grid's 8 runs

    saves.clear()
    run_demo(out, progress=False, quick=True)  # everything finished: nothing runs again
    assert saves == []


def test_demo_overwrite_goes_through_each_steps_own_overwrite(tmp_path, monkeypatch):
    """``--overwrite`` regenerates the data, restarts pre-training, export and every grid run through their own
    ``overwrite`` (each removes only what it wrote); the demo folder itself is never removed."""
    from decon_med import demo, experiment
    from decon_med.data import synthetic_textures
    from decon_med.engine import export, pretrain

    calls = []
    make_textures = synthetic_textures.make_textures

    def fake_pretrain(cfg, resume=False, overwrite=False, progress=True):
        calls.append(("pretrain", Path(cfg.out_dir).name, resume, overwrite))
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(
        synthetic_textures,
        "make_textures",
        lambda *a, **k: calls.append(("data", k["overwrite"])) or make_textures(*a, **k),
    )
    monkeypatch.setattr(pretrain, "pretrain", fake_pretrain)
    monkeypatch.setattr(
        export, "export", lambda ckpt, out, overwrite=False: calls.append(("export", overwrite))
    )
    monkeypatch.setattr(demo, "health_report", lambda method, run: method)
    monkeypatch.setattr(
        experiment,
        "run_experiment",
        lambda cfg, progress=True, overwrite=False: calls.append(("grid", overwrite)),
    )
    out = tmp_path / "demo"
    (out / "notes.txt").parent.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    demo.run_demo(out, progress=False, quick=True)
    assert calls[0] == ("data", True) and calls[-1] == ("grid", False)
    assert ("pretrain", "slotcon", False, False) in calls and ("export", True) in calls
    calls.clear()
    demo.run_demo(out, progress=False, quick=True, overwrite=True)
    assert calls == [
        ("data", True),
        ("pretrain", "slotcon", False, True),
        ("export", True),
        ("pretrain", "decon_ml", False, True),
        ("export", True),
        ("grid", True),
    ]
    assert (out / "notes.txt").read_text() == "mine"


def test_demo_folder_with_other_settings_is_refused(tmp_path):
    import yaml

    from decon_med.config import to_dict
    from decon_med.demo import check_same_settings, prepare_data
    from decon_med.errors import DeconError

    prepare_data(tmp_path, n=8, quick=True)
    with pytest.raises(DeconError, match="holds 8 unlabelled and 12 labelled images.*--overwrite"):
        prepare_data(tmp_path, n=16, quick=True)
    quick = demo_pretrain_config(tmp_path, "slotcon", tmp_path / "data", quick=True)
    Path(quick.out_dir).mkdir(parents=True)
    (Path(quick.out_dir) / "config.yaml").write_text(yaml.safe_dump(to_dict(quick), sort_keys=False))
    check_same_settings(Path(quick.out_dir), quick)
    full = demo_pretrain_config(tmp_path, "slotcon", tmp_path / "data")
    with pytest.raises(DeconError, match=r"other settings \(train.batch_size 4 -> 16.*--overwrite"):
        check_same_settings(Path(quick.out_dir), full)
