from pathlib import Path

import pytest
import yaml

from decon_med.config import (
    Config,
    DataConfig,
    FinetuneConfig,
    flatten,
    load_config,
    parse_override,
    save_config,
    to_dict,
)
from decon_med.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name != "experiment")


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    raw = yaml.safe_load(path.read_text())
    # every value written in the file is the value in the typed config (nested sections such as ssl.decoder too)
    typed = flatten(to_dict(cfg))
    for key, value in flatten(raw).items():
        if key == "transfer" and value == "auto":  # resolved when built: no init in the file, so random
            assert typed[key] == ("random" if raw.get("init") is None else "encoder")
            continue
        assert typed[key] == value, key


def test_overrides_apply_with_yaml_types(tmp_path):
    cfg = load_config(
        REPO / "configs/finetune/isic.yaml",
        [
            "data.root=/x",
            "model.encoder=resnet18",
            "train.batch_size=8",
            "fraction=0.05",
            "model.encoder_weights=null",
            "augment.crop_scale=[0.2, 1]",
        ],
    )
    assert isinstance(cfg, FinetuneConfig)
    assert cfg.data.root == "/x"
    assert cfg.model.encoder == "resnet18"
    assert cfg.train.batch_size == 8
    assert cfg.fraction == 0.05
    assert cfg.model.encoder_weights is None
    assert cfg.augment.crop_scale == [0.2, 1.0]
    assert all(isinstance(v, float) for v in cfg.augment.crop_scale)


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(REPO / "configs/finetune/refuge.yaml", ["seed=3", "data.image_size=64"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert type(again) is FinetuneConfig


def test_defaults_without_file():
    cfg = load_config(None, ["data.name=refuge"])
    assert type(cfg) is Config
    assert cfg.data.name == "refuge"
    assert cfg.data.image_size == DataConfig().image_size


def test_schema_is_inferred_from_keys():
    assert type(load_config(None, ["fraction=0.25"])) is FinetuneConfig
    assert type(load_config(None, ["seed=1"])) is Config


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.bach_size=8", "unknown config key 'train.bach_size' (did you mean 'train.batch_size'?)"),
        ("trian.batch_size=8", "unknown config key 'trian'"),
        ("train.batch_size=abc", "config key 'train.batch_size': expected int, got 'abc'"),
        ("train.batch_size=8.5", "config key 'train.batch_size': expected int"),
        ("train.batch_size=true", "config key 'train.batch_size': expected int"),
        ("train.batch_size=0", "config key 'train.batch_size': must be >= 1"),
        ("data.name=kvasir", "config key 'data.name': 'kvasir' is not one of"),
        ("model.arch=deeplab", "config key 'model.arch'"),
        ("data.image_size=100", "config key 'data.image_size': must be a positive multiple of 32"),
        ("data.in_channels=0", "config key 'data.in_channels': must be >= 1"),
        ("data.slice_axis=3", "config key 'data.slice_axis'"),
        ("data.clip_percentiles=[99, 1]", "config key 'data.clip_percentiles'"),
        ("data.clip_percentiles=5", "config key 'data.clip_percentiles': expected a list"),
        ("augment.hflip=1.5", "config key 'augment.hflip'"),
        ("model.encoder=resnet19", "model.encoder: unknown smp encoder 'resnet19' (did you mean"),
        ("model.encoder_weights=/no/such/weights.pth", "config key 'model.encoder_weights'"),
        ("fraction=0", "config key 'fraction': must be in (0, 1]"),
        ("fraction=1.5", "config key 'fraction': must be in (0, 1]"),
        ("transfer=encoder", "config key 'init': is required when transfer is 'encoder'"),
        ("data=3", "data: expected a mapping"),
        ("seed", "must look like key=value"),
    ],
)
def test_bad_config_names_the_key(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs/finetune/isic.yaml", [override])
    assert fragment in str(info.value)


def test_folder_needs_num_classes():
    with pytest.raises(ConfigError, match="data.num_classes"):
        load_config(None, ["data.name=folder"])
    with pytest.raises(ConfigError, match="data.class_names"):
        load_config(None, ["data.name=folder", "data.num_classes=3", "data.class_names=[a, b]"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(top)


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("seed: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)


def test_parse_override_values():
    assert parse_override("a.b=1") == ("a.b", 1)
    assert parse_override("a=null") == ("a", None)
    assert parse_override("a=x=y") == ("a", "x=y")
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("a=/path/with spaces") == ("a", "/path/with spaces")


def test_transfer_auto_is_encoder_with_an_init_and_random_without():
    assert FinetuneConfig().transfer == "random"
    assert FinetuneConfig(init="runs/x/export").transfer == "encoder"
    assert FinetuneConfig(init="runs/x/export", transfer="encoder_decoder").transfer == "encoder_decoder"
    assert to_dict(FinetuneConfig(init="runs/x/export"))["transfer"] == "encoder"  # a saved config is concrete
    for name in ("folder", "isic", "refuge"):
        cfg = load_config(REPO / "configs" / "finetune" / f"{name}.yaml", ["init=runs/x/export"], schema=FinetuneConfig)
        assert cfg.transfer == "encoder"
