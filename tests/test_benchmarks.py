"""The benchmark scripts run end to end on CPU with a tiny model (correctness only, no timing asserts)."""

import importlib.util
import json
from pathlib import Path

from decon_med.ssl import registry

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--profile", "cpu", "--device", "cpu", "--size", "64", "--batch-sizes", "4", "--steps", "1"]
TINY += [
    "--warmup",
    "0",
    "--dim-hidden",
    "32",
    "--queue-size",
    "64",
    "--loader-images",
    "8",
    "--loader-epochs",
    "2",
]


def test_pretrain_throughput_measures_every_method_and_the_loader(tmp_path, capsys):
    bench = _load("pretrain_throughput")
    out = tmp_path / "bench.json"
    result = bench.main([*TINY, "--loader-workers", "0", "--json", str(out)])
    assert [r["method"] for r in result["methods"]] == bench.METHODS
    for row in result["methods"]:
        assert row["img_per_s"] > 0 and row["batch_size"] == 4 and row["peak_mem_gib"] is None
        assert row["amp"] == "none" and row["channels_last"] is False
    slotcon = result["methods"][0]
    assert slotcon["vs_slotcon"] == 1.0
    loader = result["loaders"][0]
    # 2 epochs of 2 batches of 4, read once through one stream and once with a loader per epoch
    assert {k: loader[k] for k in ("loader_workers", "epochs", "images")} == {
        "loader_workers": 0,
        "epochs": 2,
        "images": 16,
    }
    assert loader["img_per_s"] > 0 and loader["per_epoch_img_per_s"] > 0
    assert json.loads(out.read_text())["methods"][1]["method"] == "decon_sl"
    printed = capsys.readouterr().out
    assert "decon_sl_densecl" in printed and "loader:" in printed


def test_lever_ladder_and_accumulation(tmp_path):
    bench = _load("pretrain_throughput")
    result = bench.main(
        [*TINY, "--methods", "slotcon", "--accum-steps", "2", "--levers", "--lever-method", "slotcon"]
        + ["--compile-backend", "eager"]
        + ["--loader-workers"]
    )
    assert result["methods"][0]["accum_steps"] == 2
    names = [r["lever"] for r in result["levers"]]
    assert names == [name for name, _ in bench.LEVERS]
    # each rung keeps the levers of the rungs before it
    last = result["levers"][-1]
    assert last["amp"] == "bf16" and last["channels_last"] is True and last["compile"] is True
    assert result["levers"][1]["amp"] == "bf16" and result["levers"][1]["channels_last"] is False
    assert result["loaders"] == []


def test_loader_on_a_given_dataset(synth_root):
    bench = _load("pretrain_throughput")
    argv = [*TINY, "--methods", "--loader-workers", "0", "--loader-images", "4"]
    result = bench.main([*argv, "--loader-root", str(synth_root / "isic")])
    assert result["methods"] == [] and result["loaders"][0]["images"] == 2 * 4  # 2 epochs of one batch of 4


def test_validity_study_configs_tables_and_health(tmp_path, monkeypatch):
    """The study's configs are what docs/validity.md says (one U-Net, AdamW step 1e-3 after scaling) and its
    tables are built from the results JSON; the study itself runs from benchmarks/, not here."""
    validity = _load("validity")
    cfg = validity.pretrain_config(tmp_path, "decon_ml", "decon_ml", validity.FULL, [])
    assert cfg.model.arch == "unet" and cfg.model.encoder == "resnet18" and cfg.data.image_size == 64
    assert cfg.train.lr * cfg.train.batch_size / 256 == validity.PRETRAIN_LR
    assert cfg.ssl.decoder.levels == [0, 1, 2, 3, 4] and cfg.data.root == str(tmp_path / "data" / "unlabeled")
    # the recipe validity_tune.py chose
    assert cfg.ssl.slotcon.teacher_temp == 0.04 and cfg.augment.blur_sigma is None
    assert cfg.ssl.teacher_temp == 0.04  # the flat name the study scripts read still reads
    assert (
        cfg.probe.root == str(tmp_path / "data" / "labeled")
        and cfg.probe.every == validity.FULL["probe_every"]
    )
    monkeypatch.syspath_prepend(str(BENCH))  # validity_tune imports validity as its sibling script
    tune = _load("validity_tune")
    for label, (method, _, overrides) in tune.CANDIDATES.items():  # every candidate builds a valid config
        candidate = validity.pretrain_config(tmp_path, label, method, validity.FULL, overrides)
        assert candidate.ssl.method == registry.get(method).name  # decon_ml: slotcon + ssl.decoder.preset ml
        if "paper" in label:
            assert candidate.ssl.slotcon.teacher_temp == 0.07 and candidate.augment.blur_sigma == [0.1, 2.0]
        assert (
            candidate.probe.root is None if tune.NO_PROBE in overrides else candidate.probe.root is not None
        )

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.csv").write_text(
        "step,loss,enc_entropy,lr\n5,5.5,0.68,0.001\n10,4.9,,0.001\n15,4.8,0.92,0.001\n"
    )
    (tmp_path / "run" / "probe.csv").write_text(
        "step,enc_mIoU,dec_mIoU,seconds\n0,0.25,0.5,1.0\n100,0.3,0.625,1.0\n"
    )
    curve = validity.probe_curve(tmp_path / "run")
    assert curve == [
        {"step": 0, "enc_mIoU": 25.0, "dec_mIoU": 50.0},
        {"step": 100, "enc_mIoU": 30.0, "dec_mIoU": 62.5},
    ]
    assert validity.probe_curve(tmp_path) == []
    health = validity.health_summary(tmp_path / "run")
    assert health == {"loss": {"first": 5.5, "last": 4.8}, "enc_entropy": {"first": 0.68, "last": 0.92}}

    row = {"n_seeds": 3, "mDice_mean": 0.0, "mDice_std": 0.0, "method": "x"}
    result = {
        "summary": [
            {
                **row,
                "init": "random",
                "transfer": "random",
                "fraction": 0.05,
                "mIoU_mean": 40.0,
                "mIoU_std": 2.0,
            },
            {
                **row,
                "init": "ml",
                "transfer": "encoder",
                "fraction": 0.05,
                "mIoU_mean": 41.5,
                "mIoU_std": 1.25,
            },
        ],
        "paired": [
            {
                "init": "ml",
                "transfer": "encoder",
                "fraction": 0.05,
                "mean_diff": 1.5,
                "ci_low": -0.5,
                "ci_high": 3.0,
                "n_better": 2,
                "n_pairs": 3,
            }
        ],
        "health": {"ml": health},
        "probe_curves": {"ml": curve, "sl": []},
    }
    table = validity.markdown(result)
    assert "| random | 40.00 ± 2.00 |" in table
    assert "| ml / encoder | 41.50 ± 1.25 |" in table
    assert "| ml / encoder | +1.50 [-0.50, +3.00] (2/3 better) |" in table
    assert "| ml | enc_entropy | 0.680 | 0.920 |" in table
    assert "| step | ml: enc / dec |" in table and "| 100 | 30.0 / 62.5 |" in table
