"""Initialisation from pre-trained weights: what each transfer mode copies, and the errors for weights that do not fit."""

import copy
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from segmentation_models_pytorch.encoders import get_encoder
from torch import nn

from decon_med.config import ModelConfig
from decon_med.engine.checkpoint import save_checkpoint
from decon_med.engine.transfer import format_report, load_init
from decon_med.errors import DataError, DeconError
from decon_med.models.network import build_network


def seeded_network(
    arch: str = "unet", encoder: str = "resnet18", classes: int = 2, seed: int = 0
) -> nn.Module:
    torch.manual_seed(seed)
    return build_network(ModelConfig(arch=arch, encoder=encoder), in_channels=3, classes=classes)


def _part(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {k: v.clone().contiguous() for k, v in state.items() if k.startswith(prefixes)}


def write_export(network: nn.Module, folder: Path, arch: str, encoder: str) -> Path:
    """An export folder as ``decon-med export`` writes it, for ``network`` (pre-trained with ``arch``/``encoder``)."""
    folder.mkdir(parents=True)
    state = network.state_dict()
    save_file(_part(state, ("encoder.",)), str(folder / "encoder.safetensors"))
    save_file(_part(state, ("encoder.", "decoder.")), str(folder / "encoder_decoder.safetensors"))
    network.save_pretrained(str(folder / "smp"))
    meta = {"arch": arch, "encoder": encoder, "in_channels": 3, "classes": 1, "source": "x.ckpt", "step": 1}
    (folder / "export.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Iterator[dict]:
    """A U-Net/resnet18 'pre-trained' with seed 123, in every format ``init`` accepts."""
    root = tmp_path_factory.mktemp("transfer")
    network = seeded_network(classes=1, seed=123)
    state = {k: v.clone() for k, v in network.state_dict().items()}
    export = write_export(network, root / "export", "unet", "resnet18")
    bare = root / "weights.safetensors"  # no export.json next to it: nothing recorded
    save_file(_part(state, ("encoder.", "decoder.")), str(bare))
    ckpt = save_checkpoint(
        {
            "method": {f"network.{k}": v for k, v in state.items()},
            "network_meta": {"arch": "unet", "encoder": "resnet18", "in_channels": 3, "classes": 1},
        },
        root / "pretrain.ckpt",
    )
    yield {"state": state, "export": export, "bare": bare, "ckpt": ckpt, "smp": export / "smp", "root": root}
    shutil.rmtree(root, ignore_errors=True)


def _keys(network: nn.Module, prefixes: tuple[str, ...], keep: bool = True) -> list[str]:
    return [k for k in network.state_dict() if k.startswith(prefixes) == keep]


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys: list[str]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in keys)


@pytest.mark.parametrize("fmt", ["export", "bare", "ckpt", "smp"])
def test_encoder_transfer_keeps_a_fresh_decoder(source, fmt):
    network = seeded_network()
    fresh = seeded_network().state_dict()  # the same network built with the same seed, never loaded
    report = load_init(network, source[fmt], "encoder", arch="unet", encoder="resnet18")
    state = network.state_dict()
    encoder_keys = _keys(network, ("encoder.",))
    rest = _keys(network, ("encoder.",), keep=False)
    assert _equal(state, source["state"], encoder_keys)
    assert _equal(state, fresh, rest)
    decoder_convs = [k for k in rest if k.startswith("decoder.") and state[k].ndim == 4]
    assert decoder_convs and not any(torch.equal(state[k], source["state"][k]) for k in decoder_convs)
    assert report["loaded"] == encoder_keys and report["missing"] == rest
    unused = {
        "export": [],  # encoder.safetensors holds the encoder only
        "bare": _keys(network, ("decoder.",)),
        "ckpt": [k for k in source["state"] if not k.startswith("encoder.")],
        "smp": [k for k in source["state"] if not k.startswith("encoder.")],
    }[fmt]
    assert report["unexpected"] == sorted(unused)
    assert report["transfer"] == "encoder" and report["source"].endswith(
        {"export": "encoder.safetensors", "bare": "weights.safetensors", "ckpt": "pretrain.ckpt"}.get(
            fmt, "model.safetensors"
        )
    )
    assert report["pretrained"] == (
        {} if fmt == "bare" else {"arch": "unet", "encoder": "resnet18", "in_channels": 3}
    )


@pytest.mark.parametrize("fmt", ["export", "bare", "ckpt", "smp"])
def test_encoder_decoder_transfer_only_the_head_is_new(source, fmt):
    network = seeded_network()
    fresh = copy.deepcopy(network).state_dict()
    report = load_init(network, source[fmt], "encoder_decoder", arch="unet", encoder="resnet18")
    state = network.state_dict()
    assert not torch.equal(state["decoder.blocks.0.conv1.0.weight"], fresh["decoder.blocks.0.conv1.0.weight"])
    transferred = _keys(network, ("encoder.", "decoder."))
    head = _keys(network, ("segmentation_head.",))
    assert _equal(state, source["state"], transferred) and _equal(state, fresh, head)
    assert report["loaded"] == transferred and report["missing"] == head
    expected_unused = [] if fmt in ("export", "bare") else _keys(network, ("segmentation_head.",))
    assert report["unexpected"] == sorted(expected_unused)
    assert "segmentation_head.0.weight" in report["missing"]
    line = format_report(report)
    assert line.startswith(f"init: loaded {len(transferred)} tensors (encoder_decoder) from ")
    assert line.endswith(f"; {len(head)} freshly initialised, {len(expected_unused)} unused")


def test_encoder_transfer_across_archs(source):
    """A U-Net-pre-trained encoder initialises the (dilated) encoder of the FCN fine-tuning network."""
    network = seeded_network("fcn")
    report = load_init(network, source["export"], "encoder", arch="fcn", encoder="resnet18")
    assert _equal(network.state_dict(), source["state"], report["loaded"])
    assert report["missing"] == _keys(network, ("encoder.",), keep=False)


def test_random_loads_nothing(source):
    network = seeded_network()
    fresh = copy.deepcopy(network).state_dict()
    report = load_init(network, None, "random", arch="unet", encoder="resnet18")
    assert report["loaded"] == [] and report["missing"] == list(fresh) and report["source"] is None
    assert _equal(network.state_dict(), fresh, list(fresh))
    report = load_init(network, source["export"], "random", arch="unet", encoder="resnet18")
    assert "ignored because transfer is 'random'" in report["note"] and report["loaded"] == []
    assert format_report(report).startswith(
        f"init: random (all {len(fresh)} tensors freshly initialised); init "
    )


def test_missing_init_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "encoder.safetensors"
    with pytest.raises(DataError, match=f"^{missing}: init weights not found"):
        load_init(seeded_network(), missing, "encoder", arch="unet", encoder="resnet18")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not an export folder"):
        load_init(seeded_network(), tmp_path / "empty", "encoder", arch="unet", encoder="resnet18")


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> Iterator[dict[str, Path]]:
    """Bare encoder weights of other ResNets (nothing recorded about them)."""
    root = tmp_path_factory.mktemp("foreign")
    files = {}
    for name in ("resnet34", "resnet50"):
        torch.manual_seed(1)
        encoder = get_encoder(name, in_channels=3, depth=5, weights=None)
        files[name] = root / f"{name}.safetensors"
        save_file({f"encoder.{k}": v for k, v in encoder.state_dict().items()}, str(files[name]))
    yield files
    shutil.rmtree(root, ignore_errors=True)


def test_recorded_encoder_must_match(tmp_path):
    network = seeded_network(classes=1)
    export = write_export(network, tmp_path / "export", "unet", "resnet34")  # recorded as resnet34
    with pytest.raises(
        DeconError, match="pre-trained with resnet34, fine-tuning resnet18; set model.encoder="
    ):
        load_init(seeded_network(), export, "encoder", arch="unet", encoder="resnet18")


def test_unrecorded_mismatched_encoders_fail_with_keys(source, foreign):
    with pytest.raises(
        DeconError,
        match=r"does not fit model.encoder=resnet18: \d+ keys the network lacks, e.g. encoder\.layer1\.2\.",
    ):
        load_init(seeded_network(), foreign["resnet34"], "encoder", arch="unet", encoder="resnet18")
    r18 = source["bare"]
    with pytest.raises(DeconError, match=f"^{r18}: .*network keys the weights lack, e.g. encoder.layer1.2."):
        torch.manual_seed(0)
        resnet34 = build_network(ModelConfig(arch="fpn", encoder="resnet34"), in_channels=3, classes=2)
        load_init(resnet34, r18, "encoder", arch="fpn", encoder="resnet34")
    with pytest.raises(
        DeconError,
        match=r"shape mismatches \(weights vs network\), e.g. "
        r"encoder.layer1.0.conv1.weight \(64, 64, 1, 1\) vs \(64, 64, 3, 3\)",
    ):
        load_init(seeded_network(), foreign["resnet50"], "encoder", arch="unet", encoder="resnet18")


def test_encoder_decoder_needs_a_fitting_decoder(source, tmp_path):
    encoder_only = source["export"] / "encoder.safetensors"
    with pytest.raises(DeconError, match="holds no decoder weights .*; use transfer=encoder$"):
        load_init(seeded_network(), encoder_only, "encoder_decoder", arch="unet", encoder="resnet18")
    with pytest.raises(
        DeconError, match="decoder pre-trained as unet, fine-tuning fcn; .* or use transfer=encoder"
    ):
        load_init(seeded_network("fcn"), source["export"], "encoder_decoder", arch="fcn", encoder="resnet18")
    with pytest.raises(
        DeconError, match="the pre-trained decoder does not fit model.arch=fcn: .*use transfer=encoder"
    ):
        load_init(seeded_network("fcn"), source["bare"], "encoder_decoder", arch="fcn", encoder="resnet18")


def test_a_failed_load_changes_nothing(foreign):
    network = seeded_network()
    before = copy.deepcopy(network).state_dict()
    with pytest.raises(DeconError):
        load_init(network, foreign["resnet50"], "encoder", arch="unet", encoder="resnet18")
    assert _equal(network.state_dict(), before, list(before))
