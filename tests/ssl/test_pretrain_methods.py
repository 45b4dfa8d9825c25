"""The real methods through the engine: a kill-and-resume is bit-exact, and export loads into smp."""

import json

import pytest
import segmentation_models_pytorch as smp
import torch
from safetensors.torch import load_file

from decon_med.cli import main
from decon_med.config import PretrainConfig, load_config, save_config
from decon_med.engine.checkpoint import load_checkpoint
from decon_med.engine.pretrain import pretrain
from decon_med.errors import ConfigError
from tests.ssl.test_slotcon_decon import TINY


@pytest.fixture(scope="module")
def isic(tmp_path_factory):
    from decon_med.data.synthetic import make_isic

    root = tmp_path_factory.mktemp("methods") / "isic"
    make_isic(root, n=8, seed=0)
    return root


def cfg_for(isic, out, method: str, *overrides: str) -> PretrainConfig:
    extra = {
        "slotcon": [],
        "decon_ml": ["ssl.alpha=0.25", "ssl.levels=[0, 2, 4]", "ssl.skip_dropout=0.5"],
        "decon_sl_densecl": [
            "ssl.alpha=0.5",
            "ssl.queue_size=6",  # 6 keys per step in a queue of 6: every step wraps
            "ssl.dense_warmup_steps=2",
            "ssl.momentum_schedule=constant",
            "ssl.teacher_momentum=0.999",
        ],
        "mim": ["ssl.mask_patch=16", "train.optimizer=adamw", "train.lr=0.001"],
    }[method]
    return load_config(
        None,
        [
            *TINY,
            f"ssl.method={method}",
            *extra,
            "data.name=isic2017",
            f"data.root={isic}",
            "data.num_workers=0",
            "train.batch_size=4",
            "train.epochs=2",
            "train.ckpt_every=2",
            "train.log_every=1",
            "train.lr=0.5",
            f"out_dir={out}",
            *overrides,
        ],
        schema=PretrainConfig,
    )


@pytest.mark.parametrize("method", ["slotcon", "decon_ml", "decon_sl_densecl", "mim"])
def test_kill_and_resume_equals_uninterrupted_run(isic, tmp_path, method):
    full = pretrain(cfg_for(isic, tmp_path / "full", method), progress=False)
    cut_cfg = cfg_for(isic, tmp_path / "cut", method)
    pretrain(cut_cfg, progress=False, max_steps=2)  # "killed" after step 2 (its checkpoint is written)
    pretrain(cut_cfg, progress=False, resume=True)
    a = load_checkpoint(full / "last.ckpt")
    b = load_checkpoint(tmp_path / "cut" / "last.ckpt")
    assert a["step"] == b["step"] == 4
    assert a["method"].keys() == b["method"].keys()
    for key, value in a["method"].items():
        assert torch.equal(value, b["method"][key]), key


def test_cli_pretrain_and_export_load_into_smp(isic, tmp_path, capsys):
    cfg = cfg_for(isic, tmp_path / "run", "decon_ml")
    config = tmp_path / "cfg.yaml"
    save_config(cfg, config)
    assert main(["pretrain", str(config), "--quiet"]) == 0
    assert main(["pretrain", str(config), "--quiet"]) == 2  # finished run is not overwritten
    assert "finished run exists" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "run" / "last.ckpt"), "--out", str(tmp_path / "export")]) == 0
    model = smp.create_model("unet", encoder_name="resnet18", encoder_weights=None, classes=3)
    result = model.load_state_dict(
        load_file(tmp_path / "export" / "encoder_decoder.safetensors"), strict=False
    )
    assert result.unexpected_keys == []
    assert all(k.startswith("segmentation_head.") for k in result.missing_keys)
    # The SlotCon family exports the EMA teacher, as SlotCon's reference transfers its momentum encoder.
    assert json.loads((tmp_path / "export" / "export.json").read_text())["branch"] == "teacher"
    state = load_checkpoint(tmp_path / "run" / "last.ckpt")["method"]
    for key, value in model.state_dict().items():
        if key.startswith(("encoder.", "decoder.")):
            assert torch.equal(value, state[f"teacher.{key}"]), key
    assert any(
        not torch.equal(state[f"teacher.{k}"], state[f"network.{k}"])
        for k in model.state_dict()
        if k.startswith("encoder.")
    )


@pytest.mark.parametrize(
    ("method", "branch", "prefix"),
    [
        ("slotcon", "auto", "teacher."),
        ("decon_ml", "auto", "teacher."),
        ("decon_sl_densecl", "auto", "network."),
        ("mim", "auto", "network."),
        ("slotcon", "student", "network."),
        ("decon_sl_densecl", "teacher", "teacher."),
    ],
)
def test_export_branch_per_method(isic, tmp_path, method, branch, prefix):
    from decon_med.ssl import build_method

    cfg = cfg_for(isic, tmp_path, method, f"ssl.export_branch={branch}")
    assert build_method(cfg).export_prefix == prefix


def test_mim_has_no_teacher_to_export():
    with pytest.raises(ConfigError, match="ssl.export_branch"):
        load_config(None, ["ssl.method=mim", "ssl.export_branch=teacher"], schema=PretrainConfig)


def test_cli_bad_pretrain_config_is_one_line(tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text(
        "ssl: {method: slotcon, decoder: {preset: ml, alpha: 0.5, levels: [0, 9]}}\nmodel: {encoder: resnet18}\n"
    )
    assert main(["pretrain", str(config), f"out_dir={tmp_path / 'x'}", "data.root=/nowhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ")
