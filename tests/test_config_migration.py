"""Configs of the flat ``ssl`` format (before ``ssl.<method>`` and ``ssl.decoder``) keep working: YAML files, a run
folder's ``config.yaml`` and ``--resume``, a checkpoint's stored config, an export, and ``key=value`` overrides, each
load with one ``note:`` line. The old-format fixtures are written here from literal dicts of the flat keys."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from decon_med.cli import main
from decon_med.config import PretrainConfig, from_dict, load_config, to_dict, upgrade_config
from decon_med.engine.checkpoint import load_checkpoint, save_checkpoint
from decon_med.engine.pretrain import pretrain

#: An ``ssl`` section as the flat format saved it (every key of every method), for a DeCon-ML run.
FLAT_SSL = {
    "method": "decon_ml",
    "alpha": 0.25,
    "levels": [0, 2, 4],
    "skip_dropout": 0.5,
    "dec_grid": 4,
    "num_prototypes": 16,
    "num_prototypes_dec": 24,
    "dim_hidden": 32,
    "dim_hidden_dec": None,
    "dim_out": 16,
    "teacher_temp": 0.05,
    "student_temp": 0.1,
    "center_momentum": 0.9,
    "group_loss_weight": 0.5,
    "slot_temp": 0.2,
    "teacher_momentum": 0.99,
    "momentum_schedule": "cosine",
    "queue_size": 65536,
    "contrast_temp": 0.2,
    "dense_weight": 0.5,
    "dense_warmup_steps": 1000,
    "shuffle_bn": True,
    "mask_ratio": 0.75,
    "mask_patch": 32,
    "mask_fill": "token",
    "norm_pix_loss": True,
    "export_branch": "auto",
}

#: The same settings in the current keys.
NEW_SSL = [
    "ssl.method=slotcon",
    "ssl.dim_hidden=32",
    "ssl.dim_out=16",
    "ssl.slotcon.num_prototypes=16",
    "ssl.slotcon.num_prototypes_dec=24",
    "ssl.slotcon.teacher_temp=0.05",
    "ssl.decoder.preset=ml",
    "ssl.decoder.alpha=0.25",
    "ssl.decoder.levels=[0, 2, 4]",
    "ssl.decoder.grid=4",
]

BASE = ["model.encoder=resnet18", "data.image_size=64"]
#: A smaller network for the run folder of the resume test (its checkpoints are written and read four times).
SMALL = ["model.encoder=mobilenet_v2", "data.image_size=64"]


def notes(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]


def test_a_flat_config_file_reads_as_the_current_keys_with_one_note(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"ssl": FLAT_SSL}))
    cfg = load_config(old, BASE, schema=PretrainConfig)
    lines = notes(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"note: {old}: ssl settings in the flat format")
    assert "ssl.method=decon_ml -> ssl.method=slotcon + ssl.decoder.preset=ml" in lines[0]
    assert (
        "unused by slotcon: ssl.contrast_temp, ssl.dense_warmup_steps, ssl.dense_weight and 6 more"
        in lines[0]
    )
    assert to_dict(cfg) == to_dict(load_config(None, [*BASE, *NEW_SSL], schema=PretrainConfig))
    assert notes(capsys) == []
    # the old attribute names still read (benchmarks use them)
    assert (cfg.ssl.teacher_temp, cfg.ssl.skip_dropout, cfg.ssl.dec_grid) == (0.05, 0.5, 4)


@pytest.mark.parametrize(
    ("method", "base", "preset"),
    [
        ("decon_sl_densecl", "densecl", "sl"),
        ("decon_ml_densecl", "densecl", "ml"),
        ("decon_sl", "slotcon", "sl"),
    ],
)
def test_an_alias_keeps_the_flat_defaults_of_the_keys_it_leaves_unset(method, base, preset, capsys):
    cfg = load_config(None, [*BASE, f"ssl.method={method}", "ssl.alpha=0.5"], schema=PretrainConfig)
    d = cfg.ssl.decoder
    assert (cfg.ssl.method, d.preset, d.levels, d.alpha, d.skip_dropout) == (base, preset, [-1], 0.5, 0.0)
    (line,) = notes(capsys)
    assert f"ssl.method={method} -> ssl.method={base} + ssl.decoder.preset={preset}" in line
    assert "(unset levels [-1], skip_dropout 0.0, as before)" in line


def test_overrides_mix_formats_and_the_later_source_wins(tmp_path, capsys):
    new = tmp_path / "new.yaml"
    new.write_text("ssl:\n  method: densecl\n  densecl:\n    queue_size: 1024\n")
    old = tmp_path / "old.yaml"
    old.write_text("ssl:\n  method: densecl\n  queue_size: 512\n")
    assert load_config(new, ["ssl.queue_size=64"]).ssl.densecl.queue_size == 64  # a benchmark's flat override
    assert load_config(old, ["ssl.densecl.queue_size=32"]).ssl.densecl.queue_size == 32
    assert load_config([new, old]).ssl.densecl.queue_size == 512
    assert load_config([old, new]).ssl.densecl.queue_size == 1024
    capsys.readouterr()
    # flat keys of other methods and the ignored decoder keys of an encoder-only run are dropped, not errors
    cfg = load_config(new, ["ssl.teacher_temp=0.04", "ssl.alpha=1.0", "ssl.levels=[-1]"])
    assert (cfg.ssl.method, cfg.ssl.decoder.levels) == ("densecl", [])
    (line,) = notes(capsys)
    assert line.endswith("unused by densecl: ssl.teacher_temp, ssl.levels, ssl.alpha")


def test_a_mixed_dict_read_with_from_dict_lets_the_flat_key_win(capsys):
    """As a benchmark does: ``raw = to_dict(cfg); raw["ssl"].update(num_prototypes=256); from_dict(...)``."""
    raw = to_dict(load_config(None, [*BASE, *NEW_SSL], schema=PretrainConfig))
    raw["ssl"].update(dim_hidden=64, num_prototypes=256, num_prototypes_dec=384)
    cfg = from_dict(PretrainConfig, raw)
    assert (cfg.ssl.dim_hidden, cfg.ssl.slotcon.num_prototypes, cfg.ssl.slotcon.num_prototypes_dec) == (
        64,
        256,
        384,
    )
    assert len(notes(capsys)) == 1


def test_upgrade_config_of_a_stored_config():
    stored = {"seed": 0, "ssl": dict(FLAT_SSL, method="mim", mask_patch=16)}
    ssl = upgrade_config(stored)["ssl"]
    assert ssl["method"] == "mim" and ssl["mim"] == {
        "mask_ratio": 0.75,
        "mask_patch": 16,
        "mask_fill": "token",
        "norm_pix_loss": True,
    }
    assert (
        "slotcon" not in ssl and "densecl" not in ssl and stored["ssl"]["mask_patch"] == 16
    )  # input untouched
    assert upgrade_config({"data": {}}) == {"data": {}}


@pytest.fixture(scope="module")
def isic(tmp_path_factory):
    from decon_med.data.synthetic import make_isic

    root = tmp_path_factory.mktemp("migration") / "isic"
    make_isic(root, n=4, seed=0)
    return root


def test_resume_of_a_flat_format_run_folder_and_export_of_its_checkpoint(isic, tmp_path, capsys):
    """A run stopped after step 1 whose config.yaml and checkpoint config are in the flat format (rewritten from
    the literal dict) exports and loads for fine-tuning, and resumes from step 1 to the end."""
    run = tmp_path / "run"
    settings = [
        f"data.root={isic}",
        "data.num_workers=0",
        "train.batch_size=4",
        "train.epochs=2",
        "train.loggers=[csv]",
        "train.log_every=1",
        f"out_dir={run}",
    ]
    cfg = load_config(None, [*SMALL, *NEW_SSL, *settings], schema=PretrainConfig)
    pretrain(cfg, progress=False, max_steps=1)
    flat = {**{k: v for k, v in to_dict(cfg).items() if k != "ssl"}, "ssl": FLAT_SSL}
    (run / "config.yaml").write_text(yaml.safe_dump(flat, sort_keys=False))
    checkpoint = load_checkpoint(run / "last.ckpt")
    checkpoint["config"] = flat
    save_checkpoint(checkpoint, run / "last.ckpt")

    # an export of the checkpoint whose stored config is in the flat format, loaded for fine-tuning
    assert main(["export", str(run / "last.ckpt"), "--out", str(tmp_path / "export")]) == 0
    record = json.loads((tmp_path / "export" / "export.json").read_text())
    assert (record["arch"], record["encoder"], record["branch"], record["step"]) == (
        "unet",
        "mobilenet_v2",
        "teacher",
        1,
    )
    from decon_med.engine.transfer import load_init
    from decon_med.models.network import build_network

    network = build_network(cfg.model, in_channels=3, classes=2)
    load_init(network, tmp_path / "export", "encoder_decoder", "unet", "mobilenet_v2", in_channels=3)
    weights = {
        k.removeprefix("teacher."): v for k, v in checkpoint["method"].items() if k.startswith("teacher.")
    }
    for key, value in network.state_dict().items():
        if key.startswith(("encoder.", "decoder.")):
            assert torch.equal(value, weights[key]), key
    capsys.readouterr()

    assert main(["pretrain", str(run / "config.yaml"), "--resume", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("note:")][0].startswith(
        f"note: {run / 'config.yaml'}"
    )
    assert err.count("note:") == 1
    resumed = load_checkpoint(run / "last.ckpt")
    assert resumed["step"] == 2 and resumed["config"]["ssl"]["decoder"]["levels"] == [0, 2, 4]
