"""Activation checkpointing changes nothing that is computed: loss, every gradient and BatchNorm statistics."""

import copy
from pathlib import Path

import pytest
import torch

from decon_med.config import ModelConfig, PretrainConfig, load_config
from decon_med.errors import ConfigError
from decon_med.models.network import build_network, checkpointed_modules, set_checkpointing
from decon_med.ssl import build_method

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "pretrain"
TINY = ["model.encoder=resnet18", "data.image_size=64", "ssl.dim_hidden=64", "ssl.queue_size=64"]


def _batch(n: int = 4, size: int = 64) -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "view1": torch.randn(n, 3, size, size, generator=g),
        "view2": torch.randn(n, 3, size, size, generator=g),
        "box1": torch.tensor([[0.1, 0.0, 0.9, 0.8]]).repeat(n, 1),
        "box2": torch.tensor([[0.0, 0.2, 0.8, 1.0]]).repeat(n, 1),
        "flip1": torch.tensor([False, True] * (n // 2)),
        "flip2": torch.tensor([True, False] * (n // 2)),
    }


def _step(method, mode: str) -> tuple[torch.Tensor, dict, dict]:
    set_checkpointing(method.network, mode)
    method.train()
    torch.manual_seed(7)  # the skip dropout's draws
    loss = method(_batch())["loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in method.trainable_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in method.named_buffers()}
    return loss.detach(), grads, buffers


@pytest.mark.parametrize(
    ("config", "extra"),
    [("slotcon", []), ("decon_ml", ["ssl.skip_dropout=0.5"]), ("densecl", [])],
)
@pytest.mark.parametrize("mode", ["all", "decoder", "encoder"])
def test_checkpointing_is_bit_identical(config, extra, mode):
    cfg = load_config(CONFIGS / f"{config}.yaml", [*TINY, *extra], schema=PretrainConfig)
    torch.manual_seed(0)
    plain = build_method(cfg)
    checkpointed = copy.deepcopy(plain)
    loss0, grads0, buffers0 = _step(plain, "none")
    loss1, grads1, buffers1 = _step(checkpointed, mode)
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys() and len(grads0) > 0
    for name in grads0:
        assert torch.equal(grads0[name], grads1[name]), name
    # running statistics updated once per forward call, not again by the recomputation
    assert buffers0.keys() == buffers1.keys()
    for name in buffers0:
        assert torch.equal(buffers0[name], buffers1[name]), name
    tracked = buffers1["network.encoder.layer1.0.bn1.num_batches_tracked"]
    assert int(tracked) == (2 if plain.symmetric else 1)  # one forward per student view


def test_checkpointing_really_recomputes_and_is_switched_off_by_none():
    net = build_network(ModelConfig(arch="unet", encoder="resnet18"))
    calls = []
    net.decoder.blocks[0].conv1.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 3, 64, 64)
    set_checkpointing(net, "decoder")
    assert net.checkpointing == "decoder"
    net(x).sum().backward()
    assert len(calls) == 2  # forward + recomputation in backward
    with torch.no_grad():
        net(x)
    assert len(calls) == 3  # no graph: run once, not checkpointed
    set_checkpointing(net, "none")
    calls.clear()
    net(x).sum().backward()
    assert len(calls) == 1 and "forward" not in net.decoder.blocks[0].__dict__


def test_teacher_copy_of_a_checkpointed_network_runs_its_own_weights():
    net = build_network(ModelConfig(arch="unet", encoder="resnet18"))
    set_checkpointing(net, "all")
    teacher = copy.deepcopy(net)
    with torch.no_grad():
        for p in teacher.parameters():
            p.zero_()
    assert teacher.encoder.layer1.forward.__self__ is teacher.encoder.layer1
    x = torch.randn(2, 3, 64, 64)
    assert not torch.equal(net(x), teacher(x))


def test_modules_per_mode_and_unsupported_networks():
    net = build_network(ModelConfig(arch="unet", encoder="resnet18"))
    assert len(checkpointed_modules(net, "encoder")) == 4
    assert len(checkpointed_modules(net, "decoder")) == 5
    assert len(checkpointed_modules(net, "all")) == 9
    fpn = build_network(ModelConfig(arch="fpn", encoder="resnet18"))
    with pytest.raises(ConfigError, match="train.checkpointing"):
        set_checkpointing(fpn, "decoder")
    set_checkpointing(fpn, "encoder")
    assert fpn.checkpointing == "encoder"
