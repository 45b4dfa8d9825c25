"""Experiment grids: expansion, dry run, resume, result tables, paired comparison, failures, shipped configs.

A fake runner stands in for fine-tuning: it writes ``results.json`` + ``done.json`` with metrics derived from the
init, transfer, fraction and seed, so every table value can be computed by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from decon_med.cli_experiment import add_commands
from decon_med.config import Method, load_config
from decon_med.errors import ConfigError, DeconError
from decon_med.experiment import (
    PAPER_TABLE7,
    GridError,
    bootstrap_ci,
    expand_grid,
    load_experiment,
    paired_differences,
    run_experiment,
    run_name,
)
from decon_med.folders import EXPERIMENT_MARKER, OwnedFolder

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["background", "lesion"]
BONUS = {"slotcon": 0.03, "decon_ml": 0.05}


def fake_miou(init: str | None, transfer: str, fraction: float, seed: int) -> float:
    """random: 0.60 + 0.1 f + 0.01 s; pre-trained inits add a bonus, +0.005 s and +0.01 for encoder_decoder."""
    value = 0.60 + 0.1 * fraction + 0.01 * seed
    if init is not None:
        value += BONUS[Path(init).name] + 0.005 * seed + (0.01 if transfer == "encoder_decoder" else 0.0)
    return value


class FakeRunner:
    """Writes a finished run folder; records every call; fails for the run names in ``fail``."""

    def __init__(self, fail: tuple[str, ...] = ()):
        self.calls: list[tuple[str, bool, bool]] = []
        self.fail = fail

    def __call__(self, cfg, resume: bool = False, overwrite: bool = False) -> Path:
        run = Path(cfg.out_dir)
        self.calls.append((run.name, resume, overwrite))
        if run.name in self.fail:
            raise RuntimeError("simulated out-of-memory")
        OwnedFolder(run.parent.parent, EXPERIMENT_MARKER).create()  # as run_experiment does before any run
        run.mkdir(parents=True, exist_ok=True)
        miou = fake_miou(cfg.init, cfg.transfer, cfg.fraction, cfg.seed)
        test = {
            "mIoU": miou,
            "mDice": miou + 0.1,
            "aAcc": 0.9,
            "IoU": {"background": 0.9, "lesion": 2 * miou - 0.9},
            "Dice": {"background": 0.95, "lesion": miou},
        }
        results = {
            "dataset": cfg.data.name,
            "init": cfg.init,
            "transfer": cfg.transfer,
            "fraction": cfg.fraction,
            "seed": cfg.seed,
            "n_train": round(100 * cfg.fraction),
            "select": "best",
            "selected_iter": 10,
            "val": dict(test),
            "test": test,
            "wall_time_s": 1.5,
            "class_names": CLASSES,
        }
        (run / "results.json").write_text(json.dumps(results))
        (run / "done.json").write_text(json.dumps({"iter": 20}))
        return run


@pytest.fixture
def weights(tmp_path) -> dict[str, Path]:
    paths = {}
    for label in BONUS:
        paths[label] = tmp_path / "weights" / label
        paths[label].mkdir(parents=True)
    return paths


def write_experiment(tmp_path: Path, weights: dict[str, Path], **changes) -> Path:
    raw = {
        "name": "test_grid",
        "finetune": str(REPO / "configs/finetune/isic.yaml"),
        "overrides": ["data.root=/nowhere/isic2017", "model.encoder=resnet18", "model.arch=unet"],
        "inits": {
            "random": {"path": None, "method": "random"},
            "slotcon": {"path": str(weights["slotcon"]), "method": "slotcon", "transfers": ["encoder"]},
            "decon_ml": {
                "path": str(weights["decon_ml"]),
                "method": "decon_ml",
                "overrides": ["train.log_every=7"],
            },
        },
        "transfers": ["encoder", "encoder_decoder"],
        "fractions": [0.05, 0.25, 1.0],
        "seeds": [0, 1, 2],
        "baseline": "random",
        "out_dir": str(tmp_path / "exp"),
    }
    raw.update(changes)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def exp_file(tmp_path, weights) -> Path:
    return write_experiment(tmp_path, weights)


@pytest.fixture
def finished(exp_file, capsys):
    """The whole grid run once with the fake runner: (config, runner, paths, printed output)."""
    cfg = load_experiment(exp_file)
    runner = FakeRunner()
    paths = run_experiment(cfg, runner=runner, progress=False)
    return cfg, runner, paths, capsys.readouterr().out


def test_grid_expansion_counts_names_and_configs(exp_file, tmp_path):
    specs = expand_grid(load_experiment(exp_file))
    assert len(specs) == 1 * 3 * 3 + 1 * 3 * 3 + 1 * 2 * 3 * 3
    names = [s.name for s in specs]
    assert len(set(names)) == len(names)
    assert names[0] == "random-random-f0.05-s0" and names[-1] == "decon_ml-encoder_decoder-f1.0-s2"
    assert {s.transfer for s in specs if s.init == "random"} == {"random"}
    assert all(s.transfer != "random" for s in specs if s.init != "random")
    spec = next(s for s in specs if s.name == "decon_ml-encoder_decoder-f0.25-s1")
    cfg = spec.cfg
    assert (cfg.init, cfg.transfer, cfg.fraction, cfg.seed) == (
        str(tmp_path / "weights/decon_ml"),
        "encoder_decoder",
        0.25,
        1,
    )
    assert cfg.out_dir == str(tmp_path / "exp" / "runs" / spec.name)
    assert (cfg.data.root, cfg.model.encoder, cfg.model.arch, cfg.train.iters, cfg.train.log_every) == (
        "/nowhere/isic2017",
        "resnet18",
        "unet",
        24000,
        7,
    )
    slot = next(s for s in specs if s.name == "slotcon-encoder-f1.0-s0").cfg
    assert (slot.model.arch, slot.train.log_every, slot.init) == (
        "unet",
        50,
        str(tmp_path / "weights/slotcon"),
    )
    rand = specs[0].cfg
    assert (rand.init, rand.transfer, rand.model.arch) == (None, "random", "unet")
    assert run_name("slotcon", "encoder", 1, 2) == "slotcon-encoder-f1.0-s2"
    # a finished grid run keeps only its selected weights unless the overrides say otherwise
    assert all(s.cfg.train.prune_finished for s in specs)
    kept = expand_grid(load_experiment(exp_file, ["overrides=[train.prune_finished=false]"]))
    assert not any(s.cfg.train.prune_finished for s in kept)


def test_dry_run_runs_nothing_and_lists_status(exp_file, capsys):
    cfg = load_experiment(exp_file)
    runs = Path(cfg.out_dir) / "runs"
    FakeRunner()(expand_grid(cfg)[0].cfg)  # one finished run
    (runs / "slotcon-encoder-f0.05-s0").mkdir(parents=True)
    (runs / "slotcon-encoder-f0.05-s0" / "last.ckpt").write_bytes(b"x")  # one interrupted run
    runner = FakeRunner()
    paths = run_experiment(cfg, dry_run=True, runner=runner, progress=False)
    out = capsys.readouterr().out
    assert runner.calls == []
    assert set(paths) == {"runs"}
    assert not (Path(cfg.out_dir) / "results.csv").exists()
    assert "36 runs" in out and "1 done, 1 interrupted, 34 pending" in out
    lines = {line.split()[0]: line.split()[-1] for line in out.splitlines()[2:] if line.strip()}
    assert lines["random-random-f0.05-s0"] == "done"
    assert lines["slotcon-encoder-f0.05-s0"] == "interrupted"
    assert lines["decon_ml-encoder_decoder-f1.0-s2"] == "pending"


def test_rerun_skips_finished_and_resumes_interrupted(finished):
    cfg, runner, paths, _ = finished
    assert len(runner.calls) == 36
    assert all(not resume and not overwrite for _, resume, overwrite in runner.calls)
    again = FakeRunner()
    run_experiment(cfg, runner=again, progress=False)
    assert again.calls == []
    runs = paths["runs"]
    (runs / "slotcon-encoder-f0.25-s1" / "done.json").unlink()  # crashed without a checkpoint: restart
    (runs / "decon_ml-encoder-f1.0-s0" / "done.json").unlink()
    (runs / "decon_ml-encoder-f1.0-s0" / "last.ckpt").write_bytes(b"x")  # crashed with a checkpoint: resume
    third = FakeRunner()
    run_experiment(cfg, runner=third, progress=False)
    assert third.calls == [
        ("slotcon-encoder-f0.25-s1", False, True),
        ("decon_ml-encoder-f1.0-s0", True, False),
    ]
    assert len(pd.read_csv(paths["results"])) == 36


def test_results_csv_columns_and_values(finished):
    _, _, paths, _ = finished
    results = pd.read_csv(paths["results"])
    assert list(results.columns) == [
        "dataset", "init", "method", "transfer", "fraction", "seed", "n_train", "mIoU", "mDice", "aAcc",
        "IoU_background", "IoU_lesion", "Dice_background", "Dice_lesion", "selected_iter", "wall_time_s", "run_dir",
    ]  # fmt: skip
    assert len(results) == 36
    row = results.set_index(results["run_dir"].map(lambda p: Path(p).name)).loc[
        "decon_ml-encoder_decoder-f0.25-s2"
    ]
    miou = 0.60 + 0.025 + 0.02 + 0.05 + 0.01 + 0.01
    assert (row["dataset"], row["init"], row["method"], row["transfer"]) == (
        "isic2017",
        "decon_ml",
        "decon_ml",
        "encoder_decoder",
    )
    assert (row["fraction"], row["seed"], row["n_train"], row["selected_iter"]) == (0.25, 2, 25, 10)
    assert row["mIoU"] == pytest.approx(miou)
    assert row["mDice"] == pytest.approx(miou + 0.1)
    assert row["IoU_lesion"] == pytest.approx(2 * miou - 0.9)
    assert row["Dice_lesion"] == pytest.approx(miou)
    assert row["wall_time_s"] == 1.5
    assert not list(paths["results"].parent.glob("*.tmp"))


def test_summary_mean_and_sample_std(finished):
    _, _, paths, _ = finished
    summary = pd.read_csv(paths["summary"])
    assert len(summary) == 4 * 3
    assert set(summary["n_seeds"]) == {3}
    at = summary.set_index(["init", "transfer", "fraction"])
    # random, 5 %: 60.5, 61.5, 62.5 -> mean 61.50, sample std 1.00
    assert at.loc[("random", "random", 0.05), ["mIoU_mean", "mIoU_std"]].tolist() == [61.5, 1.0]
    # slotcon / encoder, 5 %: 63.5, 65.0, 66.5 -> 65.00 +- 1.50
    assert at.loc[("slotcon", "encoder", 0.05), ["mIoU_mean", "mIoU_std"]].tolist() == [65.0, 1.5]
    # decon_ml / encoder_decoder, 100 %: 76.0, 77.5, 79.0 -> 77.50 +- 1.50; mDice is 10 points higher
    assert at.loc[("decon_ml", "encoder_decoder", 1.0), ["mIoU_mean", "mIoU_std", "mDice_mean"]].tolist() == [
        77.5,
        1.5,
        87.5,
    ]
    assert at.loc[("decon_ml", "encoder", 1.0), "method"] == "decon_ml"


def test_printed_table_has_the_shape_of_table_7(finished):
    _, _, _, out = finished
    lines = out.splitlines()
    header = lines.index("test_grid (isic2017): test mIoU %, mean ± sample std over seeds") + 1
    assert lines[header].split()[-6:] == ["5", "%", "25", "%", "100", "%"]
    rows = lines[header + 1 : header + 5]
    assert [r.split("  ")[0].strip() for r in rows] == [
        "random", "slotcon / encoder", "decon_ml / encoder", "decon_ml / encoder_decoder",
    ]  # fmt: skip
    assert rows[0].split()[1:] == ["61.50", "±", "1.00", "63.50", "±", "1.00", "71.00", "±", "1.00"]
    assert "65.00 ± 1.50" in rows[1]
    # the paper's reference rows follow, labelled as such
    ref = next(i for i, line in enumerate(lines) if "paper's Table 7 reference" in line)
    assert ref > header and "COCO-pretrained" in lines[ref]
    assert lines[ref + 1].split() == ["5", "%", "25", "%", "100", "%"]
    assert lines[ref + 2].split() == ["random", "75.66", "78.38", "80.65"]
    assert list(PAPER_TABLE7["isic"]) == ["random", "slotcon", "decon_sl/encoder", "decon_sl/encoder_decoder"]


def test_paired_differences_and_bootstrap_ci(finished):
    _, _, paths, out = finished
    paired = pd.read_csv(paths["paired"])
    assert len(paired) == 3 * 3
    assert set(paired["baseline"]) == {"random"} and set(paired["n_pairs"]) == {3}
    assert paired["fraction"].is_monotonic_increasing
    row = paired.set_index(["init", "transfer", "fraction"]).loc[("slotcon", "encoder", 0.05)]
    # differences 3.0, 3.5, 4.0 pp: the bootstrap of three values spans [min, max]
    assert (row["mean_diff"], row["ci_low"], row["ci_high"], row["n_better"]) == (3.5, 3.0, 4.0, 3)
    assert row["seeds"] == "0,1,2"
    assert (paired["ci_low"] <= paired["mean_diff"]).all() and (
        paired["mean_diff"] <= paired["ci_high"]
    ).all()
    assert "+3.50 [+3.00, +4.00] (n=3)" in out
    results = pd.read_csv(paths["results"])
    pd.testing.assert_frame_equal(
        paired_differences(results, "random"), paired_differences(results, "random")
    )


def test_bootstrap_ci_is_reproducible_and_nan_below_two_pairs():
    diffs = [0.3, -1.2, 2.5, 0.8, 1.1]
    low, high = bootstrap_ci(diffs)
    assert (low, high) == bootstrap_ci(diffs)
    assert low < sum(diffs) / len(diffs) < high
    assert bootstrap_ci(diffs, seed=1) != (low, high)
    assert all(math.isnan(v) for v in bootstrap_ci([1.0]))
    assert all(math.isnan(v) for v in bootstrap_ci([]))


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["train.batch_sise=4"], "train.batch_sise"),
        (["train.batch_size=0"], "train.batch_size"),
        (["model.arch=segformer"], "model.arch"),
    ],
)
def test_bad_run_override_stops_before_anything_runs(tmp_path, weights, overrides, key):
    path = write_experiment(tmp_path, weights, overrides=overrides)
    runner = FakeRunner()
    with pytest.raises(ConfigError, match=rf"run random-random-f0.05-s0: .*{key}"):
        run_experiment(load_experiment(path), runner=runner, progress=False)
    assert runner.calls == []
    assert not (tmp_path / "exp").exists()


def test_bad_init_override_names_the_run(tmp_path, weights):
    path = write_experiment(tmp_path, weights)
    cfg = load_experiment(path, ["inits.decon_ml.overrides=[train.lr=-1]"])
    with pytest.raises(ConfigError, match=r"run decon_ml-encoder-f0.05-s0: .*train\.lr"):
        run_experiment(cfg, runner=FakeRunner(), progress=False)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["sedes=[0]"], "sedes"),
        (["fractions=[0.0]"], "fractions"),
        (["baseline=imagenet"], "baseline"),
        (["transfers=[random]"], "transfers"),
        (["inits.slotcon.method=random"], "inits.slotcon.method"),
        (["inits.random.colour=1"], "inits.random.colour"),
        (["overrides=[fraction=0.5]"], "overrides"),
        (["data.root=/x"], "data"),
        (["transfer_overrides.encoder=model.arch"], "transfer_overrides.encoder"),
    ],
)
def test_bad_experiment_keys_are_named(exp_file, overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}"):
        load_experiment(exp_file, overrides)


def test_missing_init_weights_stop_before_anything_runs(exp_file, weights):
    weights["slotcon"].rmdir()
    runner = FakeRunner()
    with pytest.raises(ConfigError, match="inits.slotcon.path"):
        run_experiment(load_experiment(exp_file), runner=runner, progress=False)
    assert runner.calls == []
    # leaving the init out runs the rest
    run_experiment(load_experiment(exp_file, ["inits.slotcon=null"]), runner=runner, progress=False)
    assert len(runner.calls) == 9 + 2 * 9


def test_failed_run_is_reported_and_the_others_complete(exp_file, capsys):
    cfg = load_experiment(exp_file)
    bad = "decon_ml-encoder_decoder-f0.25-s1"
    runner = FakeRunner(fail=(bad,))
    with pytest.raises(GridError, match=f"1 of 36 runs failed \\({bad}\\)") as info:
        run_experiment(cfg, runner=runner, progress=False)
    out, err = capsys.readouterr()
    assert len(runner.calls) == 36
    assert info.value.failed == [bad]
    assert f"run {bad} failed: RuntimeError: simulated out-of-memory" in out + err
    log = Path(cfg.out_dir) / "failed" / f"{bad}.txt"
    assert "simulated out-of-memory" in log.read_text()
    assert len(pd.read_csv(info.value.paths["results"])) == 35
    assert (
        pd.read_csv(info.value.paths["summary"])
        .set_index(["init", "transfer", "fraction"])
        .loc[("decon_ml", "encoder_decoder", 0.25), "n_seeds"]
        == 2
    )
    retry = FakeRunner()
    run_experiment(cfg, runner=retry, progress=False)
    assert [name for name, _, _ in retry.calls] == [bad]
    assert not log.exists()


def test_cli_parses_experiment_dry_run(exp_file, capsys):
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["experiment", str(exp_file), "seeds=[0]", "inits.decon_ml=null", "--dry-run"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "6 runs" in out and "0 done, 0 interrupted, 6 pending" in out


SHIPPED_GRIDS = {
    # name: (runs, the one fine-tuning arch of every row)
    "table7_isic": (1 * 3 * 3 + 1 * 3 * 3 + 2 * 2 * 3 * 3, "unet"),
    "table7_refuge": (1 * 3 * 3 + 1 * 3 * 3 + 2 * 2 * 3 * 3, "unet"),
    "table7_isic_fcn": (1 * 3 * 3 + 1 * 3 * 3 + 1 * 2 * 3 * 3, "fcn"),
    "table7_refuge_fcn": (1 * 3 * 3 + 1 * 3 * 3 + 1 * 2 * 3 * 3, "fcn"),
    "demo": (1 * 3 * 2 + 1 * 3 * 2 + 1 * 2 * 3 * 2, "unet"),
    "methods_isic": (3 * 3 * 3 + 5 * 2 * 3 * 3, "unet"),
}


def test_every_shipped_grid_is_listed():
    assert {p.stem for p in (REPO / "configs/experiment").glob("*.yaml")} == set(SHIPPED_GRIDS)


@pytest.mark.parametrize("name", sorted(SHIPPED_GRIDS))
def test_shipped_grids_pass_dry_run_with_one_network(monkeypatch, capsys, tmp_path, name):
    monkeypatch.chdir(tmp_path)  # a checkout whose pre-training runs are exported (a dry run needs its inits)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    for spec in load_experiment(f"configs/experiment/{name}.yaml").inits.values():
        if spec.path is not None:
            Path(spec.path).mkdir(parents=True, exist_ok=True)
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["experiment", f"configs/experiment/{name}.yaml", "--dry-run", "--quiet"])
    assert args.func(args) == 0
    count, arch = SHIPPED_GRIDS[name]
    assert f"experiment {name}: {count} runs" in capsys.readouterr().out
    specs = expand_grid(load_experiment(f"configs/experiment/{name}.yaml"))
    assert {s.cfg.model.arch for s in specs} == {arch}
    assert len({(s.cfg.model.encoder, s.cfg.data.image_size, s.cfg.train.iters) for s in specs}) == 1
    # an encoder-only method never transfers its (untrained) decoder
    assert not [
        s.name for s in specs if s.method in ("slotcon", "densecl") and s.transfer == "encoder_decoder"
    ]
    if name == "methods_isic":
        # every pre-training method is compared, each init pointing at its own method's export
        inits = load_experiment(f"configs/experiment/{name}.yaml").inits.values()
        assert {spec.method for spec in inits} == {"random", *Method.choices()}  # the registry's names
        assert all(spec.path is None or f"/{spec.method}_isic/" in spec.path for spec in inits)
    if arch == "fcn":
        # the FCN grids read the exports of the FCN pre-training configs
        for spec in load_experiment(f"configs/experiment/{name}.yaml").inits.values():
            if spec.path is not None:
                pretrain = load_config(
                    f"configs/pretrain/{spec.method}_fcn{'_refuge' if 'refuge' in name else ''}.yaml"
                )
                assert pretrain.model.arch == "fcn" and f"{pretrain.out_dir}/export" == spec.path


def test_mixed_architectures_are_refused_before_anything_runs(tmp_path, weights):
    path = write_experiment(tmp_path, weights, transfer_overrides={"encoder_decoder": ["model.arch=fpn"]})
    runner = FakeRunner()
    with pytest.raises(
        ConfigError,
        match=r"'model\.arch'.*'unet' in random-random-f0.05-s0 and 'fpn' in "
        r"decon_ml-encoder_decoder-f0.05-s0 \(set by transfer_overrides\.encoder_decoder\)",
    ):
        run_experiment(load_experiment(path), runner=runner, progress=False)
    with pytest.raises(ConfigError, match=r"'model\.arch'"):
        run_experiment(load_experiment(path), dry_run=True, runner=runner, progress=False)
    assert runner.calls == []
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize(
    ("override", "key", "source"),
    [
        ("inits.decon_ml.overrides=[train.iters=30]", "train.iters", "inits.decon_ml.overrides"),
        ("inits.slotcon.overrides=[model.encoder=resnet34]", "model.encoder", "inits.slotcon.overrides"),
        ("inits.decon_ml.overrides=[data.image_size=256]", "data.image_size", "inits.decon_ml.overrides"),
        ("transfer_overrides.encoder=[train.loss=dice_ce]", "train.loss", "transfer_overrides.encoder"),
    ],
)
def test_rows_that_differ_in_a_setting_are_refused_naming_the_key(exp_file, override, key, source):
    with pytest.raises(ConfigError, match=rf"config key '{re.escape(key)}'.*\(set by {re.escape(source)}\)"):
        expand_grid(load_experiment(exp_file, [override]))


def test_rows_may_differ_in_logging_and_storage_keys(exp_file):
    specs = expand_grid(
        load_experiment(exp_file, ["transfer_overrides.encoder=[train.ckpt_every=7, data.num_workers=0]"])
    )
    assert {s.cfg.train.ckpt_every for s in specs} == {7, 500}


@pytest.mark.parametrize("method", ["slotcon", "densecl"])
def test_decoder_transfer_of_an_encoder_only_method_is_refused(exp_file, method):
    for override, key in [
        ("inits.slotcon.transfers=[encoder, encoder_decoder]", "inits.slotcon.transfers"),
        ("inits.slotcon.transfers=null", "transfers"),
    ]:
        with pytest.raises(ConfigError, match=rf"'{key}'.*\({method}\) .*decoder was never trained"):
            load_experiment(exp_file, [override, f"inits.slotcon.method={method}"])


def test_init_recording_another_decoder_is_refused_before_anything_runs(exp_file, weights):
    (weights["decon_ml"] / "export.json").write_text(
        json.dumps({"arch": "fcn", "encoder": "resnet18", "in_channels": 3})
    )
    runner = FakeRunner()
    with pytest.raises(
        ConfigError, match=r"inits\.decon_ml\.path.*decoder pre-trained as fcn, fine-tuning unet"
    ):
        run_experiment(load_experiment(exp_file), runner=runner, progress=False)
    assert runner.calls == []
    # encoder transfer alone takes an FCN-pre-trained encoder
    run_experiment(load_experiment(exp_file, ["transfers=[encoder]"]), runner=runner, progress=False)
    assert len(runner.calls) == 27


def test_duplicate_key_in_a_grid_config_is_refused_naming_the_file_and_key(tmp_path, weights):
    path = write_experiment(tmp_path, weights)
    path.write_text(path.read_text() + "seeds: [4]\n")
    with pytest.raises(ConfigError, match=f"{re.escape(str(path))}: .*duplicate key 'seeds'") as info:
        load_experiment(path)
    assert "\n" not in str(info.value)


def test_fractions_in_exponent_notation_are_floats(tmp_path, weights):
    path = write_experiment(tmp_path, weights)
    path.write_text(re.sub(r"fractions:(\n- [0-9.]+)+", "fractions: [5e-1, 1.0]", path.read_text()))
    cfg = load_experiment(path)
    assert cfg.fractions == [0.5, 1.0] and isinstance(cfg.fractions[0], float)
    assert {s.fraction for s in expand_grid(cfg)} == {0.5, 1.0}


def test_missing_init_path_is_refused_by_a_dry_run_too(exp_file, weights, capsys):
    weights["decon_ml"].rmdir()
    runner = FakeRunner()
    with pytest.raises(
        ConfigError, match=f"inits.decon_ml.path': '{re.escape(str(weights['decon_ml']))}'"
    ) as info:
        run_experiment(load_experiment(exp_file), dry_run=True, runner=runner, progress=False)
    assert "\n" not in str(info.value) and runner.calls == []
    assert "runs in" not in capsys.readouterr().out  # refused before the plan is listed
    # once every run that needs it has finished, the missing weights no longer matter
    cfg = load_experiment(exp_file)
    for spec in expand_grid(cfg):
        if spec.init == "decon_ml":
            FakeRunner()(spec.cfg)
    run_experiment(cfg, dry_run=True, runner=runner, progress=False)


@pytest.mark.parametrize("where", ["is", "holds", "inside"])
def test_out_dir_at_in_or_around_the_data_root_is_refused(tmp_path, weights, where):
    data = tmp_path / "data" / "isic"
    data.mkdir(parents=True)
    out = {"is": data, "holds": tmp_path / "data", "inside": data / "experiment"}[where]
    path = write_experiment(
        tmp_path,
        weights,
        overrides=[f"data.root={data}", "model.encoder=resnet18", "model.arch=unet"],
        out_dir=str(out),
    )
    runner = FakeRunner()
    for dry_run in (True, False):
        with pytest.raises(ConfigError, match="config key 'out_dir'.*data root") as info:
            run_experiment(load_experiment(path), dry_run=dry_run, runner=runner, progress=False)
        assert "\n" not in str(info.value)
    assert runner.calls == [] and sorted(p.name for p in tmp_path.joinpath("data").iterdir()) == ["isic"]
    assert list(data.iterdir()) == []


def test_overwrite_runs_every_run_again_and_a_stopped_overwrite_continues(finished):
    cfg, _, paths, _ = finished
    keep = paths["runs"].parent / "notes.txt"
    keep.write_text("mine")

    class StopAfter(FakeRunner):
        def __call__(self, run_cfg, resume=False, overwrite=False):
            if len(self.calls) == 5:
                raise KeyboardInterrupt
            return super().__call__(run_cfg, resume=resume, overwrite=overwrite)

    first = StopAfter()
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, runner=first, progress=False, overwrite=True)
    assert len(first.calls) == 5 and all(not r and o for _, r, o in first.calls)
    assert not paths["summary"].exists()  # the old tables went with the old runs
    assert len(pd.read_csv(paths["results"])) == 5  # only the runs already redone
    # the same command without --overwrite redoes the remaining 31 (finished but stale) runs
    rest = FakeRunner()
    run_experiment(cfg, runner=rest, progress=False)
    assert len(rest.calls) == 31 and all(not r and o for _, r, o in rest.calls)
    assert {n for n, _, _ in first.calls}.isdisjoint(n for n, _, _ in rest.calls)
    assert len(pd.read_csv(paths["results"])) == 36 and paths["summary"].is_file()
    assert not (paths["runs"].parent / "overwrite.json").exists()
    assert keep.read_text() == "mine"
    again = FakeRunner()
    run_experiment(cfg, runner=again, progress=False)
    assert again.calls == []


def test_cli_experiment_takes_overwrite(exp_file):
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["experiment", str(exp_file), "--overwrite"]).overwrite


def test_ctrl_c_inside_a_run_stops_the_grid(exp_file):
    """A KeyboardInterrupt that a library turned into another exception (torch.save's writer raises a RuntimeError
    when interrupted) stops the grid instead of counting as a failed run; the same command continues."""

    class InterruptedWrite(FakeRunner):
        def __call__(self, cfg, resume=False, overwrite=False):
            if len(self.calls) == 2:
                self.calls.append((Path(cfg.out_dir).name, resume, overwrite))
                try:
                    raise KeyboardInterrupt
                except KeyboardInterrupt:
                    raise RuntimeError("unexpected pos 73264320 vs 73264208") from None
            return super().__call__(cfg, resume=resume, overwrite=overwrite)

    cfg = load_experiment(exp_file)
    runner = InterruptedWrite()
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, runner=runner, progress=False)
    assert len(runner.calls) == 3 and not (Path(cfg.out_dir) / "failed").exists()
    rest = FakeRunner()
    run_experiment(cfg, runner=rest, progress=False)
    assert len(rest.calls) == 34


def test_an_unmarked_out_dir_is_never_an_experiment(exp_file):
    cfg = load_experiment(exp_file)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True)
    (out / "results.csv").write_text("my own table")
    runner = FakeRunner()
    with pytest.raises(DeconError, match="holds no experiment"):
        run_experiment(cfg, runner=runner, progress=False)
    assert runner.calls == [] and (out / "results.csv").read_text() == "my own table"
