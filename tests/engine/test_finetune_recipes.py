"""Fine-tuning recipes: per-part learning rates, frozen warm-up, transferred BatchNorm handling, decoder re-init."""

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from decon_med.config import FinetuneConfig, FreezeConfig, LrMultConfig, ModelConfig, TrainConfig, load_config
from decon_med.data.datasets import build_dataset
from decon_med.data.layouts import get_layout
from decon_med.data.splits import split_fraction
from decon_med.data.synthetic import make_isic
from decon_med.engine import finetune as finetune_module
from decon_med.engine.checkpoint import load_checkpoint
from decon_med.engine.finetune import _initial_network
from decon_med.engine.optim import build_optimizer, param_groups, part_of, poly_schedule
from decon_med.engine.pretrain import seed_everything
from decon_med.engine.recipes import (
    FreezeSchedule,
    decoder_blocks,
    format_recipes,
    lr_mult,
    recompute_bn_stats,
    reinit_prefixes,
)
from decon_med.errors import ConfigError
from decon_med.models.network import build_network
from tests.engine.test_finetune import make_cfg, run
from tests.engine.test_transfer import seeded_network, write_export


def _pretrained_like(seed: int = 123) -> nn.Module:
    """A U-Net/resnet18 whose BatchNorm statistics and affine parameters are far from a fresh init's."""
    network = seeded_network(classes=1, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, _BatchNorm):
                c = module.num_features
                module.running_mean.copy_(torch.randn(c, generator=generator))
                module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
                module.num_batches_tracked.fill_(7)
                module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(c, generator=generator) * 0.1)
    return network


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recipes_data")
    make_isic(root / "isic", n=8, seed=0)  # 8 train, 2 val, 2 test
    write_export(_pretrained_like(), root / "export", "unet", "resnet18")
    return root


def pretrained_cfg(data: Path, out: Path, **options) -> FinetuneConfig:
    return make_cfg(data, out, init=str(data / "export"), transfer="encoder_decoder", **options)


def _part(state: dict[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if part_of(k) == part}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _all_differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], suffix: str) -> bool:
    keys = [k for k in a if k.endswith(suffix)]
    return bool(keys) and all(not torch.equal(a[k], b[k]) for k in keys)


def _initial_state(cfg: FinetuneConfig) -> dict[str, torch.Tensor]:
    network, _ = _initial_network(cfg, classes=2, fresh=True)
    return {k: v.clone() for k, v in network.state_dict().items()}


# -- config -------------------------------------------------------------------------------------------------------------
def test_recipes_are_off_by_default():
    cfg = FinetuneConfig()
    assert cfg.train.lr_mult == LrMultConfig(1.0, 1.0, 1.0) and cfg.train.freeze == FreezeConfig([], 0)
    assert (cfg.transfer_bn, cfg.transfer_bn_affine, cfg.reinit_decoder_blocks) == ("keep", "keep", 0)
    assert lr_mult(cfg.train) is None and not FreezeSchedule(cfg.train).active
    # one learning rate: the optimiser groups of before (no per-part groups, no lr_scale)
    groups = build_optimizer(
        cfg.train, seeded_network().named_parameters(), 0.1, lr_mult(cfg.train)
    ).param_groups
    assert len(groups) == 2 and all("lr_scale" not in g and "part" not in g for g in groups)


def test_recipe_keys_load_from_overrides():
    cfg = load_config(
        None,
        [
            "train.lr_mult.encoder=0.1",
            "train.freeze={parts: [encoder, decoder], iters: 50}",
            "transfer_bn=recompute",
            "transfer_bn_affine=reset",
            "reinit_decoder_blocks=2",
            "init=weights",
            "transfer=encoder_decoder",
        ],
        schema=FinetuneConfig,
    )
    assert cfg.train.lr_mult == LrMultConfig(encoder=0.1) and lr_mult(cfg.train) == {
        "encoder": 0.1,
        "decoder": 1.0,
        "head": 1.0,
    }
    assert cfg.train.freeze == FreezeConfig(parts=["encoder", "decoder"], iters=50)
    assert (cfg.transfer_bn, cfg.transfer_bn_affine, cfg.reinit_decoder_blocks) == ("recompute", "reset", 2)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lr_mult.encoder=-0.1", "train.lr_mult.encoder"),
        ("train.lr_mult.head=.inf", "train.lr_mult.head"),
        ("train.lr_mult={encoder: 0, decoder: 0, head: 0}", "train.lr_mult"),
        ("train.lr_mult.neck=1", "train.lr_mult.neck"),
        ("train.freeze.iters=-1", "train.freeze.iters"),
        ("train.freeze.iters=10", "train.freeze.parts"),
        ("train.freeze.parts=[encoder]", "train.freeze.iters"),
        ("train.freeze={parts: [head], iters: 5}", "train.freeze.parts[0]"),
        ("train.freeze={parts: [encoder, encoder], iters: 5}", "train.freeze.parts"),
        ("transfer_bn=recalc", "transfer_bn"),
        ("transfer_bn_affine=recompute", "transfer_bn_affine"),
        ("reinit_decoder_blocks=-1", "reinit_decoder_blocks"),
    ],
)
def test_bad_recipe_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
        load_config(None, [override], schema=FinetuneConfig)


# -- train.lr_mult --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "lars"])
def test_lr_mult_gives_each_part_its_groups_and_rate(optimizer):
    network = seeded_network()
    mult = {"encoder": 0.1, "decoder": 0.5, "head": 2.0}
    opt = build_optimizer(
        TrainConfig(optimizer=optimizer, weight_decay=1e-4), network.named_parameters(), 0.01, mult
    )
    groups = opt.param_groups
    assert [g["part"] for g in groups] == ["encoder", "encoder", "decoder", "decoder", "head", "head"]
    for group in groups:
        assert group["lr_scale"] == mult[group["part"]]
        assert group["lr"] == pytest.approx(0.01 * mult[group["part"]], rel=1e-15)
        assert all(part_of(name) == group["part"] for name in group["names"])
        assert group["weight_decay"] == (0.0 if group["lars_exclude"] else 1e-4)
        assert all((p.ndim <= 1) == group["lars_exclude"] for p in group["params"])
    placed = [id(p) for g in groups for p in g["params"]]
    assert sorted(placed) == sorted(id(p) for p in network.parameters())  # every parameter exactly once


def test_lr_mult_zero_leaves_a_part_out():
    network = seeded_network()
    groups = param_groups(network.named_parameters(), 1e-4, {"encoder": 0.0, "decoder": 1.0, "head": 1.0})
    names = [n for g in groups for n in g["names"]]
    assert {part_of(n) for n in names} == {"decoder", "head"}
    assert sorted(names) == sorted(n for n, _ in network.named_parameters() if part_of(n) != "encoder")


def test_lr_mult_in_a_run(data, tmp_path, monkeypatch):
    """Per-step group lrs are the poly schedule times the multiplier; a multiplier of 0 freezes the encoder,
    BatchNorm statistics included."""
    seen: list[list[tuple[str, float]]] = []
    real_update = finetune_module._Run.update

    def update(self):
        lr = real_update(self)
        seen.append([(g["part"], g["lr"]) for g in self.optimizer.param_groups])
        return lr

    monkeypatch.setattr(finetune_module._Run, "update", update)
    mult = {"encoder": 0.0, "decoder": 0.5, "head": 2.0}
    cfg = pretrained_cfg(
        data, tmp_path / "run", train={"iters": 3, "val_every": 3, "lr_mult": LrMultConfig(**mult)}
    )
    start = _initial_state(cfg)
    out = run(cfg)
    schedule = poly_schedule(0.01, 3, power=0.9)
    assert len(seen) == 3
    for step, groups in enumerate(seen):
        assert [part for part, _ in groups] == ["decoder", "decoder", "head", "head"]
        np.testing.assert_allclose(
            [lr for _, lr in groups], [schedule[step] * mult[p] for p, _ in groups], rtol=1e-15
        )
    last = load_checkpoint(out / "last.ckpt")
    saved_groups = last["optimizer"]["param_groups"]
    assert [g["lr_scale"] for g in saved_groups] == [0.5, 0.5, 2.0, 2.0]
    end = last["network"]
    assert _same(_part(start, "encoder"), _part(end, "encoder"))  # weights and running statistics
    assert _all_differ(_part(start, "decoder"), _part(end, "decoder"), "running_mean")
    assert not _same(_part(start, "head"), _part(end, "head"))
    report = json.loads((out / "init_report.json").read_text())
    assert report["recipes"] == {"lr_mult": mult}


# -- train.freeze ---------------------------------------------------------------------------------------------------------
def test_freeze_schedule_sets_grads_and_batchnorm_modes():
    train = TrainConfig(
        freeze=FreezeConfig(parts=["encoder", "decoder"], iters=2), lr_mult=LrMultConfig(head=0.5)
    )
    schedule = FreezeSchedule(train)
    assert schedule.active and schedule.toggles
    assert [sorted(schedule.frozen(step)) for step in (0, 1, 2, 3)] == [["decoder", "encoder"]] * 2 + [[]] * 2
    network = seeded_network().train()
    frozen = schedule.apply(network, 1)
    assert {id(p) for p in frozen} == {id(p) for n, p in network.named_parameters() if part_of(n) != "head"}
    assert all(p.requires_grad == (part_of(n) == "head") for n, p in network.named_parameters())
    assert not any(m.training for m in network.modules() if isinstance(m, _BatchNorm))
    assert network.training
    assert schedule.apply(network, 2) == []
    assert all(p.requires_grad for p in network.parameters())
    assert all(m.training for m in network.modules())
    always = FreezeSchedule(TrainConfig(lr_mult=LrMultConfig(encoder=0.0)))
    assert always.active and not always.toggles and always.frozen(10**6) == {"encoder"}


def test_frozen_warmup_holds_weights_and_statistics_then_trains(data, tmp_path):
    """Encoder frozen for 3 of 5 iterations, the run interrupted at 2 and at 3: bit-identical encoder (weights and
    BatchNorm buffers) up to iteration 3, changed after; the resumed run equals an uninterrupted one."""
    train = {"iters": 5, "val_every": 5, "freeze": FreezeConfig(parts=["encoder"], iters=3)}
    cfg = pretrained_cfg(data, tmp_path / "run", train=train)
    start = _initial_state(cfg)
    out = Path(cfg.out_dir)
    run(cfg, max_iters=2)
    at_2 = load_checkpoint(out / "last.ckpt")["network"]
    run(cfg, resume=True, max_iters=3)
    at_3 = load_checkpoint(out / "last.ckpt")["network"]
    assert _same(_part(start, "encoder"), _part(at_2, "encoder"))
    assert _same(_part(start, "encoder"), _part(at_3, "encoder"))
    assert _all_differ(_part(start, "decoder"), _part(at_3, "decoder"), "running_mean")
    assert not _same(_part(start, "decoder"), _part(at_3, "decoder"))
    run(cfg, resume=True)
    end = load_checkpoint(out / "last.ckpt")
    assert end["step"] == 5
    encoder_end = _part(end["network"], "encoder")
    assert _all_differ(_part(start, "encoder"), encoder_end, "running_mean")
    assert _all_differ(_part(start, "encoder"), encoder_end, "conv1.weight")
    straight = run(pretrained_cfg(data, tmp_path / "straight", train=train))
    assert _same(load_checkpoint(straight / "last.ckpt")["network"], end["network"])
    report = json.loads((straight / "init_report.json").read_text())
    assert report["recipes"] == {"freeze": {"parts": ["encoder"], "iters": 3}}


# -- transfer_bn, transfer_bn_affine, reinit_decoder_blocks --------------------------------------------------------------
def test_transfer_bn_reset_and_affine_reset(data, tmp_path):
    loaded = _initial_state(pretrained_cfg(data, tmp_path / "plain"))
    cfg = pretrained_cfg(data, tmp_path / "reset", transfer_bn="reset", transfer_bn_affine="reset")
    network, report = _initial_network(cfg, classes=2, fresh=True)
    layers = [(n, m) for n, m in network.named_modules() if isinstance(m, _BatchNorm)]
    assert len(layers) > 20
    for name, module in layers:
        assert torch.equal(module.running_mean, torch.zeros_like(module.running_mean)), name
        assert torch.equal(module.running_var, torch.ones_like(module.running_var)), name
        assert int(module.num_batches_tracked) == 0
        assert torch.equal(module.weight, torch.ones_like(module.weight))
        assert torch.equal(module.bias, torch.zeros_like(module.bias))
        assert not torch.equal(
            loaded[f"{name}.running_mean"], module.running_mean
        )  # the export's were not 0 / 1
    bn_keys = {
        f"{n}.{k}"
        for n, _ in layers
        for k in ("running_mean", "running_var", "num_batches_tracked", "weight", "bias")
    }
    state = network.state_dict()
    assert _same(
        {k: v for k, v in loaded.items() if k not in bn_keys},
        {k: v for k, v in state.items() if k not in bn_keys},
    )
    recipes = report["recipes"]
    assert recipes["transfer_bn"] == "reset" and recipes["transfer_bn_layers"] == [n for n, _ in layers]
    assert recipes["transfer_bn_affine"] == "reset" and recipes["transfer_bn_affine_layers"] == [
        n for n, _ in layers
    ]
    assert format_recipes(recipes).startswith("recipes: BatchNorm statistics reset in")
    # transfer=encoder: only the encoder's layers are the transferred ones
    _, report = _initial_network(
        make_cfg(data, tmp_path / "enc", init=str(data / "export"), transfer="encoder", transfer_bn="reset"),
        2,
        True,
    )
    assert report["recipes"]["transfer_bn_layers"] == [n for n, _ in layers if n.startswith("encoder.")]


def test_reinit_decoder_blocks_restores_the_fresh_init(data, tmp_path):
    loaded = _initial_state(pretrained_cfg(data, tmp_path / "plain"))
    cfg = pretrained_cfg(data, tmp_path / "reinit", reinit_decoder_blocks=2, transfer_bn_affine="reset")
    network, report = _initial_network(cfg, classes=2, fresh=True)
    state = network.state_dict()
    seed_everything(cfg.seed)  # a fresh network of the same seed: what transfer=random starts from
    fresh = build_network(ModelConfig(arch="unet", encoder="resnet18"), in_channels=3, classes=2).state_dict()
    reinit = [k for k in state if k.startswith(("decoder.blocks.3.", "decoder.blocks.4."))]
    assert reinit and report["recipes"]["reinitialised"] == reinit
    assert report["recipes"]["reinit_decoder_blocks"] == 2
    for key in reinit:
        assert torch.equal(state[key], fresh[key]), key
    assert _all_differ({k: loaded[k] for k in reinit}, state, "conv1.0.weight")
    assert _all_differ({k: loaded[k] for k in reinit}, state, "running_var")
    kept = [k for k in state if k.startswith("decoder.blocks.") and k not in reinit and "conv" in k]
    assert kept and all(
        torch.equal(state[k], loaded[k]) for k in kept if not k.endswith((".1.weight", ".1.bias"))
    )
    # the re-initialised blocks are no longer transferred: affine reset only touched the other layers
    affine_layers = report["recipes"]["transfer_bn_affine_layers"]
    assert "decoder.blocks.2.conv2.1" in affine_layers and not any(
        n.startswith("decoder.blocks.4") for n in affine_layers
    )


def test_decoder_blocks_of_each_arch():
    for arch, count in (("unet", 5), ("fpn", 4), ("fcn", 2)):
        network = build_network(ModelConfig(arch=arch, encoder="resnet18"), in_channels=3, classes=2)
        blocks = decoder_blocks(network)
        assert len(blocks) == count
        prefixes = reinit_prefixes(network, count, arch)
        decoder_keys = [k for k in network.state_dict() if k.startswith("decoder.")]
        assert all(k.startswith(prefixes) for k in decoder_keys), (
            arch
        )  # every decoder tensor is in some block
        with pytest.raises(ConfigError, match=f"'reinit_decoder_blocks'.*{count} blocks"):
            reinit_prefixes(network, count + 1, arch)
    fpn = build_network(ModelConfig(arch="fpn", encoder="resnet18"), in_channels=3, classes=2)
    assert decoder_blocks(fpn)[-1] == ("decoder.p2.", "decoder.seg_blocks.3.")


def _bn_inputs(network: nn.Module, batches: list[torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """Every input of each BatchNorm layer in ``names`` over ``batches`` (B * H * W, C), the network in train mode."""
    modules = dict(network.named_modules())
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [
        modules[n].register_forward_hook(
            lambda m, i, o, n=n: seen[n].append(i[0].detach().transpose(0, 1).flatten(1))
        )
        for n in names
    ]
    with torch.no_grad():
        for batch in batches:
            network(batch)
    for h in hooks:
        h.remove()
    return {n: torch.cat(seen[n], dim=1) for n in names}


def test_recompute_bn_stats_is_the_exact_statistic_of_the_transferred_layers():
    """Uneven batches; only the named (encoder) layers change; modes and momenta come back."""
    network = _pretrained_like(seed=5).train()
    names = [n for n, m in network.named_modules() if isinstance(m, _BatchNorm) and n.startswith("encoder.")]
    others = {k: v.clone() for k, v in network.state_dict().items() if not k.startswith("encoder.")}
    params = {k: v.clone() for k, v in network.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(b, 3, 64, 64, generator=generator) * 2 + 1 for b in (3, 3, 2)]
    reference = copy.deepcopy(network)
    for name, module in reference.named_modules():
        if isinstance(module, _BatchNorm) and name not in names:
            module.eval()
    inputs = _bn_inputs(reference, batches, names)
    network.decoder.blocks[0].conv1[1].eval()  # a mode of its own, restored afterwards
    result = recompute_bn_stats(network, names, iter(batches))
    assert result == {"images": 8, "batches": 3, "layers": len(names)}
    modules = dict(network.named_modules())
    for name in names:
        x = inputs[name].double()
        module = modules[name]
        torch.testing.assert_close(module.running_mean, x.mean(1).float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(module.running_var, x.var(1, unbiased=True).float(), atol=1e-5, rtol=1e-5)
        assert int(module.num_batches_tracked) == 3 and module.momentum == 0.1
    assert _same(others, {k: v for k, v in network.state_dict().items() if k in others})
    assert _same(params, dict(network.named_parameters()))
    assert network.training and not network.decoder.blocks[0].conv1[1].training
    assert all(m.training for n, m in network.named_modules() if n != "decoder.blocks.0.conv1.1")


def test_transfer_bn_recompute_in_a_run(data, tmp_path, monkeypatch):
    """The run's pass: the un-augmented training images in micro-batches of the training size."""
    captured: dict[str, torch.Tensor] = {}
    real = finetune_module.recompute_bn_stats

    def spy(network, names, batches):
        result = real(network, names, batches)
        captured.update({k: v.clone() for k, v in network.state_dict().items()})
        return result

    monkeypatch.setattr(finetune_module, "recompute_bn_stats", spy)
    cfg = pretrained_cfg(data, tmp_path / "run", transfer_bn="recompute", train={"iters": 1, "val_every": 1})
    loaded = _initial_state(cfg)
    out = run(cfg)
    report = json.loads((out / "init_report.json").read_text())["recipes"]
    assert report["transfer_bn"] == "recompute"
    assert report["bn_recompute"] == {"images": 8, "batches": 2, "layers": len(report["transfer_bn_layers"])}
    # independently: the loaded network in train mode over the same images, in batches of 4
    network, _ = _initial_network(cfg, classes=2, fresh=True)
    network.train()
    dataset = build_dataset(
        cfg, "train", "eval", items=split_fraction(get_layout(cfg.data).items("train"), 1.0, 0)
    )
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    names = report["transfer_bn_layers"]
    assert names == [n for n, m in network.named_modules() if isinstance(m, _BatchNorm)]
    inputs = _bn_inputs(network, [images[:4], images[4:]], names)
    for name in names:
        x = inputs[name].double()
        torch.testing.assert_close(captured[f"{name}.running_mean"], x.mean(1).float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(captured[f"{name}.running_var"], x.var(1).float(), atol=1e-5, rtol=1e-5)
        assert int(captured[f"{name}.num_batches_tracked"]) == 2
        assert not torch.equal(captured[f"{name}.running_mean"], loaded[f"{name}.running_mean"])
    weights = [k for k in loaded if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.equal(captured[k], loaded[k]) for k in weights)  # the pass updated no parameter
