"""The method registry: a method is one module (here: a toy one in this file) plus its registration, and the config,
the engine, the experiment's init methods, the CLI help and the config reference all follow the registry."""

from __future__ import annotations

import csv
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from decon_med.config import (
    ENCODER_ONLY_METHODS,
    DecoderConfig,
    PretrainConfig,
    check,
    load_config,
    to_dict,
)
from decon_med.config_reference import reference_markdown
from decon_med.engine.checkpoint import load_checkpoint
from decon_med.engine.pretrain import pretrain
from decon_med.errors import ConfigError
from decon_med.ssl import build_method, registry
from decon_med.ssl.base import SettingError
from decon_med.ssl.decon import DeCon, build_decon
from decon_med.ssl.ema import frozen_copy, update_momentum

TINY = ["model.encoder=resnet18", "data.image_size=64", "ssl.dim_hidden=32", "ssl.dim_out=16"]


# -- a toy method: what a new method file holds -------------------------------------------------------------------
@dataclass
class ToySettings:
    """The toy method's own keys (``ssl.toy``).

    Attributes:
        weight: scale of the toy loss.
    """

    weight: float = 1.0

    def validate(self) -> None:
        check(self.weight > 0, "ssl.toy.weight", "must be > 0")


class ToyHead(nn.Module):
    """BYOL-like: the pooled student projection of view 1 predicts the pooled teacher projection of view 2."""

    symmetric = False
    record_health = False

    def __init__(self, in_channels: int, dim_out: int, weight: float):
        super().__init__()
        self.projector = nn.Conv2d(in_channels, dim_out, 1)
        self.projector_t = frozen_copy(self.projector)
        self.weight = weight

    def forward(self, s1, s2, t1, t2, *geometry):
        q = F.normalize(self.projector(s1).mean(dim=(2, 3)), dim=1)
        with torch.no_grad():
            k = F.normalize(self.projector_t(t2).mean(dim=(2, 3)), dim=1)
        return {"loss": self.weight * (2 - 2 * (q * k).sum(dim=1)).mean()}

    def update_teacher(self, momentum: float) -> None:
        update_momentum(self.projector, self.projector_t, momentum)


def build_toy(cfg: PretrainConfig) -> DeCon:
    weight = cfg.ssl.settings.weight
    return build_decon(cfg, lambda channels, is_decoder: ToyHead(channels, cfg.ssl.dim_out, weight))


@pytest.fixture
def toy():
    spec = registry.register(
        registry.MethodSpec(
            "toy", ToySettings, build_toy, summary="a toy method", export="teacher", decoder=True
        )
    )
    yield spec
    registry.unregister("toy")


@pytest.fixture(scope="module")
def isic(tmp_path_factory):
    from decon_med.data.synthetic import make_isic

    root = tmp_path_factory.mktemp("registry") / "isic"
    make_isic(root, n=4, seed=0)
    return root


# -- tests -------------------------------------------------------------------------------------------------------
def test_a_registered_method_pretrains_through_the_engine_with_decoder_supervision(toy, isic, tmp_path):
    cfg = load_config(
        None,
        [
            *TINY,
            "ssl.method=toy",
            "ssl.toy.weight=2.0",
            "ssl.decoder.preset=sl",
            f"data.root={isic}",
            "data.num_workers=0",
            "train.batch_size=4",
            "train.epochs=2",
            "train.loggers=[csv]",
            "train.log_every=1",
            f"out_dir={tmp_path / 'run'}",
        ],
        schema=PretrainConfig,
    )
    assert cfg.ssl.toy is cfg.ssl.settings and cfg.ssl.settings == ToySettings(weight=2.0)
    run = pretrain(cfg, progress=False, max_steps=1)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [row["step"] for row in rows] == ["1"]
    assert {"enc", "dec4", "dec"} <= set(rows[0])  # the encoder head and the one decoder level ([-1] = 4)
    loss = float(rows[0]["loss"])
    assert 0.0 < loss <= 2.0 * 4.0  # 0.5 * enc + 0.5 * dec, each 2 * (2 - 2 cos) at most
    saved = yaml.safe_load((run / "config.yaml").read_text())["ssl"]
    assert saved["method"] == "toy" and saved["toy"] == {"weight": 2.0} and saved["decoder"]["preset"] == "sl"
    checkpoint = load_checkpoint(run / "last.ckpt")
    assert checkpoint["step"] == 1 and checkpoint["network_meta"]["state_prefix"] == "teacher."
    assert any(k.startswith("dec_heads.0.projector.") for k in checkpoint["method"])
    # The registry feeds the config reference and the CLI help while the method is registered.
    assert "| `ssl.toy.weight` | float | `1.0` | scale of the toy loss. |" in reference_markdown()
    assert "toy: a toy method" in registry.help_text()


def test_an_unregistered_method_is_unknown_again(toy):
    registry.unregister("toy")
    try:
        with pytest.raises(ConfigError, match=r"unknown method 'toy'"):
            load_config(None, ["ssl.method=toy"], schema=PretrainConfig)
    finally:
        registry.register(toy)  # the fixture unregisters it


def test_unknown_method_is_one_error_with_a_did_you_mean():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["ssl.method=slotcn"], schema=PretrainConfig)
    message = str(info.value)
    assert message.startswith("config key 'ssl.method': unknown method 'slotcn' (did you mean 'slotcon'?)")
    assert message.endswith("slotcon, densecl, mim, decon_sl, decon_ml, decon_sl_densecl, decon_ml_densecl")


def test_names_aliases_and_what_each_method_declares():
    assert registry.names(with_aliases=False) == ["slotcon", "densecl", "mim"]
    assert {a.name: (a.method, a.preset) for a in registry.aliases().values()} == {
        "decon_sl": ("slotcon", "sl"),
        "decon_ml": ("slotcon", "ml"),
        "decon_sl_densecl": ("densecl", "sl"),
        "decon_ml_densecl": ("densecl", "ml"),
    }
    specs = registry.methods()
    assert [(s.export, s.teacher, s.decoder, s.trains_decoder) for s in specs.values()] == [
        ("teacher", True, True, False),
        ("student", True, True, False),
        ("student", False, False, True),
    ]
    assert list(ENCODER_ONLY_METHODS) == ["slotcon", "densecl"]
    assert "decon_ml" not in ENCODER_ONLY_METHODS and "mim" not in ENCODER_ONLY_METHODS


def test_register_refuses_taken_and_reserved_names():
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.MethodSpec("decon_ml", ToySettings, build_toy))
    with pytest.raises(ValueError, match="reserved"):
        registry.register(registry.MethodSpec("decoder", ToySettings, build_toy))
    with pytest.raises(ValueError, match="must be a dataclass"):
        registry.register(registry.MethodSpec("toy2", dict, build_toy))


def test_experiment_init_methods_come_from_the_registry(toy):
    from decon_med.config import from_dict
    from decon_med.experiment import InitSpec

    assert from_dict(InitSpec, {"path": "w", "method": "toy"}).method == "toy"
    assert from_dict(InitSpec, {"method": "random"}).method == "random"
    with pytest.raises(
        ConfigError, match=r"'inits.x.method': unknown method 'decon_mll' \(did you mean 'decon_ml'\?\)"
    ):
        from_dict(InitSpec, {"path": "w", "method": "decon_mll"}, prefix="inits.x.")


def test_a_section_of_another_method_is_checked_then_left_out_and_unknown_keys_are_errors():
    cfg = load_config(None, ["ssl.method=slotcon", "ssl.densecl.queue_size=8"], schema=PretrainConfig)
    assert "densecl" not in to_dict(cfg)["ssl"] and isinstance(
        cfg.ssl.settings, registry.get("slotcon").settings
    )
    with pytest.raises(ConfigError, match=r"unknown config key 'ssl.densecl.queue_sise' \(did you mean"):
        load_config(None, ["ssl.method=slotcon", "ssl.densecl.queue_sise=8"], schema=PretrainConfig)
    with pytest.raises(ConfigError, match=r"unknown config key 'ssl.slotcon.teacher_tmp' \(did you mean"):
        load_config(None, ["ssl.slotcon.teacher_tmp=0.1"], schema=PretrainConfig)
    with pytest.raises(
        ConfigError, match=r"unknown config key 'ssl.slotcn' \(did you mean 'ssl.slotcon'\?\)"
    ):
        load_config(None, ["ssl.slotcn={teacher_temp: 0.1}"], schema=PretrainConfig)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["ssl.slotcon.teacher_temp=0"], "config key 'ssl.slotcon.teacher_temp': must be > 0"),
        (
            ["ssl.method=densecl", "ssl.densecl.queue_size=0"],
            "config key 'ssl.densecl.queue_size': must be >= 1",
        ),
        (["ssl.method=mim", "ssl.mim.mask_ratio=1.0"], "config key 'ssl.mim.mask_ratio': must be in (0, 1)"),
        (
            ["ssl.method=mim", "ssl.mim.mask_patch=24"],
            "config key 'ssl.mim.mask_patch': must divide data.image_size",
        ),
        (
            ["ssl.method=mim", "ssl.decoder.preset=sl"],
            "config key 'ssl.decoder.levels': mim takes no decoder",
        ),
        (
            ["ssl.method=mim", "ssl.export_branch=teacher"],
            "config key 'ssl.export_branch': mim has no teacher",
        ),
        (["ssl.decoder.levels=[0]"], "config key 'ssl.decoder.alpha': must be < 1 with decoder levels"),
        (
            ["ssl.decoder.skip_dropout=0.5"],
            "config key 'ssl.decoder.skip_dropout': applies only with decoder",
        ),
        (
            ["ssl.decoder.preset=sl", "ssl.decoder.levels=[0, 1]"],
            "preset sl supervises exactly one decoder level",
        ),
        (
            ["ssl.decoder.preset=ml", "ssl.decoder.skip_dropout=1.0"],
            "'ssl.decoder.skip_dropout': must be in [0, 1)",
        ),
        (
            ["ssl.decoder.preset=ml", "model.arch=fcn"],
            "'ssl.decoder.preset': model.arch=fcn has one decoder level",
        ),
    ],
)
def test_bad_values_are_one_error_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [*TINY, *overrides], schema=PretrainConfig)
    assert message in str(info.value)


def test_network_errors_name_no_key_and_the_config_layer_names_it():
    cfg = load_config(
        None, [*TINY, "ssl.decoder.preset=ml", "ssl.decoder.levels=[0, 7]"], schema=PretrainConfig
    )
    with pytest.raises(ConfigError) as info:
        build_method(cfg)
    assert str(info.value) == (
        "config key 'ssl.decoder.levels': level 7 is out of range for Unet with 5 decoder levels (use 0..4 or -5..-1)"
    )
    assert isinstance(info.value.__cause__, SettingError) and "ssl." not in str(info.value.__cause__)


def test_decoder_presets_fill_what_is_unset():
    assert (DecoderConfig().levels, DecoderConfig().alpha, DecoderConfig().skip_dropout) == ([], 1.0, 0.0)
    ml = DecoderConfig(preset="ml", skip_dropout=0.25)
    assert (ml.levels, ml.alpha, ml.skip_dropout) == ([0, 1, 2, 3, 4], 0.0, 0.25)
    cfg = load_config(None, [*TINY, "ssl.method=densecl", "ssl.decoder.preset=sl"], schema=PretrainConfig)
    assert (cfg.ssl.decoder.levels, cfg.ssl.decoder.alpha) == ([-1], 0.5)
    # decon_sl_densecl, today's way: the same method and preset
    method = build_method(cfg)
    assert len(method.dec_heads) == 1 and method.alpha == 0.5 and method.export_prefix == "network."
