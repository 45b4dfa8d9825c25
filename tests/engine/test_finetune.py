"""The fine-tuning engine on synthetic ISIC / REFUGE images: schedule, selection, fractions, resume, errors, CLI."""

import argparse
import csv
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from decon_med import cli, cli_finetune
from decon_med.config import DataConfig, FinetuneConfig, ModelConfig, TrainConfig, to_dict
from decon_med.data.synthetic import make_isic, make_refuge
from decon_med.engine import finetune as finetune_module
from decon_med.engine.checkpoint import load_checkpoint
from decon_med.engine.finetune import finetune
from decon_med.engine.optim import poly_schedule
from decon_med.errors import DeconError
from tests.engine.test_transfer import seeded_network, write_export


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("finetune_data")
    make_isic(root / "isic", n=8, seed=0)  # 8 train, 2 val, 2 test
    make_refuge(root / "refuge", n=8, seed=0)
    write_export(seeded_network(classes=1, seed=123), root / "export", "unet", "resnet18")
    return root


def make_cfg(data: Path, out: Path, dataset: str = "isic", **options) -> FinetuneConfig:
    train = {"batch_size": 4, "iters": 6, "val_every": 3, "optimizer": "sgd", "lr": 0.01, "ckpt_every": 100}
    train.update(options.pop("train", {}))
    return FinetuneConfig(
        data=DataConfig(
            name={"isic": "isic2017", "refuge": "refuge"}[dataset],
            root=str(data / dataset),
            image_size=64,
            num_workers=0,
        ),
        model=ModelConfig(arch="unet", encoder="resnet18"),
        train=TrainConfig(log_every=1, **train),
        out_dir=str(out),
        **options,
    )


def run(cfg: FinetuneConfig, **kwargs) -> Path:
    return finetune(cfg, progress=False, **kwargs)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Iterator[Path]:
    """An uninterrupted 6-iteration run from random weights, validated at 3 and 6, checkpointed every 2."""
    root = tmp_path_factory.mktemp("reference")
    yield run(make_cfg(data, root / "run", train={"ckpt_every": 4}))
    shutil.rmtree(root, ignore_errors=True)


def test_run_folder_and_results(reference, data):
    assert sorted(p.name for p in reference.iterdir()) == [
        ".decon-manifest",
        ".decon-run",
        "best.ckpt",
        "checkpoints",
        "config.yaml",
        "done.json",
        "init_report.json",
        "last.ckpt",
        "metrics.csv",
        "results.json",
        "tb",
        "train_ids.json",
        "val.csv",
    ]
    assert sorted(p.name for p in (reference / "checkpoints").iterdir()) == ["step_0000004.ckpt"]
    res = results(reference)
    assert {k: res[k] for k in ("dataset", "init", "transfer", "fraction", "seed", "n_train", "select")} == {
        "dataset": "isic2017",
        "init": None,
        "transfer": "random",
        "fraction": 1.0,
        "seed": 0,
        "n_train": 8,
        "select": "best",
    }
    assert res["class_names"] == ["background", "lesion"] and res["wall_time_s"] > 0
    assert set(res["test"]) >= {"mIoU", "mDice", "aAcc", "IoU", "Dice", "Acc", "n_pixels"}
    # scored at the original resolution: every pixel of every original test mask counts once
    masks = sorted((data / "isic").glob("ISIC-2017_Test_v2_Part1_GroundTruth/*.png"))
    assert res["test"]["n_pixels"] == sum(Image.open(m).width * Image.open(m).height for m in masks)
    assert 0.0 <= res["test"]["mIoU"] <= 1.0
    val_rows = read_csv(reference / "val.csv")
    assert list(val_rows[0]) == ["iter", "mIoU", "mDice", "aAcc", "IoU_background", "IoU_lesion"]
    assert [int(r["iter"]) for r in val_rows] == [3, 6]
    best_row = max(val_rows, key=lambda r: float(r["mIoU"]))
    assert res["selected_iter"] == int(best_row["iter"]) and res["val"]["mIoU"] == float(best_row["mIoU"])
    report = json.loads((reference / "init_report.json").read_text())
    assert report["transfer"] == "random" and report["loaded"] == [] and len(report["missing"]) > 100
    assert json.loads((reference / "done.json").read_text())["step"] == 6
    last = load_checkpoint(reference / "last.ckpt")
    assert last["kind"] == "finetune" and last["step"] == 6 and last["n_train"] == 8
    assert last["network_meta"] == {"arch": "unet", "encoder": "resnet18", "in_channels": 3, "classes": 2}


def test_lr_follows_the_poly_schedule(reference):
    rows = read_csv(reference / "metrics.csv")
    assert list(rows[0]) == ["step", "epoch", "loss", "lr", "img_s"]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [float(r["epoch"]) for r in rows] == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]  # 4 of 8 images per iteration
    lrs = np.array([float(r["lr"]) for r in rows])
    np.testing.assert_allclose(lrs, poly_schedule(0.01, 6, power=0.9), rtol=1e-12)
    assert lrs[0] == 0.01 and np.all(np.diff(lrs) < 0)
    assert lrs[-1] == pytest.approx(
        0.01 * (1 / 6) ** 0.9
    )  # the decay's last step; it reaches 0 at iteration 6
    assert all(math.isfinite(float(r["loss"])) for r in rows)


def test_poly_decay_ends_at_min_lr(data, tmp_path):
    out = run(make_cfg(data, tmp_path / "run", train={"iters": 4, "val_every": 4, "min_lr": 0.004}))
    lrs = [float(r["lr"]) for r in read_csv(out / "metrics.csv")]
    np.testing.assert_allclose(lrs, poly_schedule(0.01, 4, power=0.9, min_lr=0.004), rtol=1e-12)
    assert lrs[-1] > 0.004


def _scripted_validation(monkeypatch, mious: list[float]) -> list[int]:
    """Make validation return the real scores with mIoU replaced by ``mious`` in turn; returns the iterations."""
    real = finetune_module.validate
    seen: list[int] = []

    def scripted(network, cfg, classes, case_dice=False):
        metrics = real(network, cfg, classes, case_dice)
        seen.append(len(seen))
        return {**metrics, "mIoU": mious[len(seen) - 1]}

    monkeypatch.setattr(finetune_module, "validate", scripted)
    return seen


def test_best_checkpoint_is_the_highest_val_miou(data, tmp_path, monkeypatch):
    _scripted_validation(monkeypatch, [0.3, 0.7, 0.7, 0.5])  # at iterations 2, 4, 6, 8; the tie keeps 4
    out = run(make_cfg(data, tmp_path / "run", train={"iters": 8, "val_every": 2, "ckpt_every": 4}))
    res = results(out)
    assert res["selected_iter"] == 4 and res["checkpoint"] == "best.ckpt" and res["val"]["mIoU"] == 0.7
    assert [float(r["mIoU"]) for r in read_csv(out / "val.csv")] == [0.3, 0.7, 0.7, 0.5]
    best, numbered = (
        load_checkpoint(out / "best.ckpt"),
        load_checkpoint(out / "checkpoints/step_0000004.ckpt"),
    )
    assert best["step"] == 4 and best["val"]["iter"] == 4 and "optimizer" not in best
    assert all(torch.equal(v, numbered["network"][k]) for k, v in best["network"].items())
    last = load_checkpoint(out / "last.ckpt")
    assert not torch.equal(best["network"]["encoder.conv1.weight"], last["network"]["encoder.conv1.weight"])
    assert last["best"] == {"iter": 4, "mIoU": 0.7, "metric": "miou", "score": 0.7}  # 2D images: auto is miou


def test_select_last(data, tmp_path, monkeypatch):
    _scripted_validation(monkeypatch, [0.9, 0.1])
    out = run(make_cfg(data, tmp_path / "run", train={"iters": 4, "val_every": 2, "select": "last"}))
    res = results(out)
    assert not (out / "best.ckpt").exists()
    assert res["selected_iter"] == 4 and res["checkpoint"] == "last.ckpt" and res["val"]["mIoU"] == 0.1


@pytest.mark.parametrize("keep, kept", [(2, [5, 6]), (None, [1, 2, 3, 4, 5, 6])])
def test_only_the_newest_numbered_checkpoints_are_kept(data, tmp_path, keep, kept):
    out = run(make_cfg(data, tmp_path / "run", train={"ckpt_every": 1, "iters": 6, "keep_checkpoints": keep}))
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == [f"step_{step:07d}.ckpt" for step in kept]
    assert load_checkpoint(out / "last.ckpt")["step"] == 6


@pytest.mark.parametrize("select", ["best", "last"])
def test_prune_finished_keeps_only_the_selected_weights(data, tmp_path, monkeypatch, select):
    _scripted_validation(monkeypatch, [0.3, 0.7, 0.5] * 2)  # at iterations 2, 4, 6 of both runs
    train = {"iters": 6, "val_every": 2, "ckpt_every": 2, "select": select}
    kept = run(make_cfg(data, tmp_path / "kept", train=train))
    pruned = run(make_cfg(data, tmp_path / "pruned", train={**train, "prune_finished": True}))
    weights = "best.ckpt" if select == "best" else "last.ckpt"
    assert sorted(p.name for p in pruned.iterdir() if p.suffix == ".ckpt" or p.is_dir()) == [weights, "tb"]
    state = load_checkpoint(pruned / weights)
    assert "optimizer" not in state and "rng" not in state and state["step"] == (4 if select == "best" else 6)
    reference = load_checkpoint(kept / weights)["network"]
    assert all(torch.equal(v, state["network"][k]) for k, v in reference.items())
    assert results(pruned)["test"] == results(kept)["test"]
    from decon_med.engine.evaluate import evaluate

    assert evaluate(pruned, split="test", progress=False)["mIoU"] == results(kept)["test"]["mIoU"]
    cfg = make_cfg(data, tmp_path / "pruned", train={**train, "prune_finished": True})
    before = (pruned / "results.json").read_bytes()
    assert run(cfg, resume=True) == pruned  # a finished run: --resume does nothing
    assert (pruned / "results.json").read_bytes() == before


def test_label_fractions_are_nested_and_paired(data, tmp_path):
    ids = {}
    for fraction, transfer in [(0.25, "random"), (0.5, "random"), (0.5, "encoder")]:
        out = tmp_path / f"{fraction}_{transfer}"
        init = str(data / "export") if transfer != "random" else None
        cfg = make_cfg(data, out, fraction=fraction, init=init, transfer=transfer, train={"iters": 1})
        res = results(run(cfg))
        assert res["n_train"] == math.ceil(fraction * 8) and res["fraction"] == fraction
        split = json.loads((out / "train_ids.json").read_text())
        assert split["n_images"] == res["n_train"] and split["n_total"] == 8 and split["seed"] == 0
        ids[fraction, transfer] = set(split["ids"])
    assert ids[0.25, "random"] < ids[0.5, "random"]
    assert ids[0.5, "random"] == ids[0.5, "encoder"]  # every init sees the same images


def _assert_same_state(a: Path, b: Path) -> None:
    state_a, state_b = load_checkpoint(a), load_checkpoint(b)
    assert state_a["step"] == state_b["step"]
    different = [k for k, v in state_a["network"].items() if not torch.equal(v, state_b["network"][k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    moments_a, moments_b = state_a["optimizer"]["state"], state_b["optimizer"]["state"]
    assert moments_a.keys() == moments_b.keys()
    assert all(
        torch.equal(moments_a[i]["momentum_buffer"], moments_b[i]["momentum_buffer"]) for i in moments_a
    )


@pytest.mark.parametrize("kill", ["max_iters", "crash"])
def test_kill_and_resume_is_bit_exact(data, reference, tmp_path, monkeypatch, kill):
    cfg = make_cfg(data, tmp_path / "run", train={"ckpt_every": 4})
    out = Path(cfg.out_dir)
    if kill == "max_iters":
        run(cfg, max_iters=3)
        assert load_checkpoint(out / "last.ckpt")["step"] == 3
    else:
        real = finetune_module.validate

        def crash_at_6(network, cfg, classes, case_dice=False):
            if int(read_csv(out / "metrics.csv")[-1]["step"]) == 6:
                raise RuntimeError("simulated crash")
            return real(network, cfg, classes, case_dice)

        monkeypatch.setattr(finetune_module, "validate", crash_at_6)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(cfg)
        monkeypatch.setattr(finetune_module, "validate", real)
        assert load_checkpoint(out / "last.ckpt")["step"] == 4  # the crash lost iterations 5-6
    assert not (out / "done.json").exists() and not (out / "results.json").exists()
    run(cfg, resume=True)
    _assert_same_state(reference / "last.ckpt", out / "last.ckpt")
    ref_best, best = load_checkpoint(reference / "best.ckpt"), load_checkpoint(out / "best.ckpt")
    assert ref_best["step"] == best["step"]
    assert all(torch.equal(v, best["network"][k]) for k, v in ref_best["network"].items())
    assert [int(r["step"]) for r in read_csv(out / "metrics.csv")] == [1, 2, 3, 4, 5, 6]
    assert read_csv(out / "val.csv") == read_csv(reference / "val.csv")
    assert results(out)["test"] == results(reference)["test"]


def test_pretrained_init_dice_ce_amp_on_refuge(data, tmp_path, capsys):
    cfg = make_cfg(
        data,
        tmp_path / "run",
        dataset="refuge",
        init=str(data / "export"),
        transfer="encoder_decoder",
        fraction=0.5,
        train={
            "iters": 2,
            "val_every": 2,
            "loss": "dice_ce",
            "accum_steps": 2,
            "clip_grad": 1.0,
            "amp": "bf16",
            "channels_last": True,
        },
    )
    out = finetune(cfg, progress=True)
    summary = capsys.readouterr().out
    assert (
        "init: loaded" in summary
        and "(encoder_decoder) from" in summary
        and "encoder_decoder.safetensors" in summary
    )
    report = json.loads((out / "init_report.json").read_text())
    assert report["missing"] == ["segmentation_head.0.weight", "segmentation_head.0.bias"]
    res = results(out)
    assert (
        res["init"] == str(data / "export") and res["transfer"] == "encoder_decoder" and res["n_train"] == 4
    )
    assert res["class_names"] == ["background", "disc", "cup"] == list(res["test"]["IoU"])
    assert math.isfinite(res["test"]["mDice"])


def test_non_finite_loss_stops_with_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    real = finetune_module.build_loss

    def nan_from_third_call(name):
        loss_fn, calls = real(name), [0]

        def loss(logits, labels):
            calls[0] += 1
            value = loss_fn(logits, labels)
            return value * float("nan") if calls[0] >= 3 else value

        return loss

    monkeypatch.setattr(finetune_module, "build_loss", nan_from_third_call)
    out = tmp_path / "run"
    with pytest.raises(
        DeconError, match="non-finite loss at iteration 3; the last good checkpoint is .*last.ckpt"
    ):
        run(make_cfg(data, out, train={"ckpt_every": 2}))
    state = load_checkpoint(out / "last.ckpt")
    assert state["step"] == 2 and all(
        torch.isfinite(v).all() for v in state["network"].values() if v.is_floating_point()
    )
    assert not (out / "results.json").exists()


def test_run_folder_guards(data, reference, tmp_path):
    cfg = make_cfg(data, reference, train={"ckpt_every": 4})
    with pytest.raises(DeconError, match="finished run exists; pass --overwrite"):
        run(cfg)
    before = (reference / "results.json").read_bytes()
    assert run(cfg, resume=True) == reference  # a finished run: --resume is a no-op
    assert (reference / "results.json").read_bytes() == before
    unfinished = tmp_path / "unfinished"
    run(make_cfg(data, unfinished, train={"ckpt_every": 4}), max_iters=2)
    changed = make_cfg(data, unfinished, train={"ckpt_every": 4, "lr": 0.02})
    with pytest.raises(
        DeconError, match=r"cannot resume, the config differs .* train\.lr \(0\.01 -> 0\.02\)"
    ):
        run(changed, resume=True)
    with pytest.raises(DeconError, match="BatchNorm needs at least 2"):
        run(make_cfg(data, tmp_path / "run", train={"batch_size": 2, "accum_steps": 2}))


# -- command line -----------------------------------------------------------------------------------------------
def cli_main(argv: list[str], monkeypatch) -> int:
    """``decon-med`` with ``finetune`` / ``evaluate`` registered (whether or not build_parser already does)."""
    build = cli.build_parser

    def build_with_finetune() -> argparse.ArgumentParser:
        parser = build()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if "finetune" not in sub.choices:
            cli_finetune.add_commands(sub)
        return parser

    monkeypatch.setattr(cli, "build_parser", build_with_finetune)
    return cli.main(argv)


@pytest.fixture
def config_file(data, tmp_path) -> Path:
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(to_dict(make_cfg(data, tmp_path / "cli_run", train={"iters": 1}))))
    return path


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["fraction=0"], "error: config key 'fraction': must be in (0, 1], got 0.0"),
        (["fraction=1.5"], "error: config key 'fraction': must be in (0, 1], got 1.5"),
        (["transfer=encoder"], "error: config key 'init': is required when transfer is 'encoder'"),
        (["init=/no/such/export", "transfer=encoder"], "error: /no/such/export: init weights not found"),
        (
            ["model.encoder=resnet34", "init=EXPORT", "transfer=encoder"],
            "pre-trained with resnet18, fine-tuning resnet34",
        ),
        (
            ["model.arch=fcn", "init=EXPORT", "transfer=encoder_decoder"],
            "decoder pre-trained as unet, fine-tuning fcn",
        ),
    ],
)
def test_cli_errors_are_one_line(data, config_file, monkeypatch, capsys, overrides, message):
    overrides = [o.replace("EXPORT", str(data / "export")) for o in overrides]
    assert cli_main(["finetune", str(config_file), *overrides, "--quiet"], monkeypatch) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_cli_finetune_and_evaluate(config_file, tmp_path, monkeypatch, capsys):
    assert cli_main(["finetune", str(config_file), "--quiet"], monkeypatch) == 0
    out = capsys.readouterr().out
    assert "fine-tuning finished: run folder" in out and "test mIoU" in out
    run_dir = tmp_path / "cli_run"
    assert cli_main(["evaluate", str(run_dir), "--split", "val", "--quiet"], monkeypatch) == 0
    assert "mIoU" in capsys.readouterr().out and (run_dir / "metrics_val.json").is_file()
    assert cli_main(["evaluate", str(run_dir), "train.lr=1", "--quiet"], monkeypatch) == 2
    assert "evaluate accepts only data.root, data.num_workers overrides" in capsys.readouterr().err
