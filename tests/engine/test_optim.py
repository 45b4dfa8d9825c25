import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from decon_med.config import TrainConfig
from decon_med.engine.optim import (
    LARS,
    build_optimizer,
    cosine_schedule,
    param_groups,
    poly_schedule,
    scaled_lr,
)


def test_cosine_schedule_warmup_then_cosine_to_final():
    s = cosine_schedule(1.0, 0.1, total_steps=10, warmup_steps=4, warmup_start=0.2)
    assert len(s) == 10
    np.testing.assert_allclose(s[:4], np.linspace(0.2, 1.0, 4))
    assert s[4] == pytest.approx(1.0) and s[-1] == pytest.approx(0.1)
    assert np.all(np.diff(s[4:]) <= 0)
    # half way through the decay the cosine is at the mid point
    mid = cosine_schedule(1.0, 0.0, total_steps=5)
    assert mid.tolist() == pytest.approx(
        [1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5, 0.5 - 0.5 * math.cos(math.pi / 4), 0.0]
    )


def test_cosine_schedule_edge_cases():
    assert cosine_schedule(1.0, 0.0, total_steps=0).shape == (0,)
    assert cosine_schedule(1.0, 0.0, total_steps=3, warmup_steps=10).tolist() == pytest.approx(
        [0.0, 0.5, 1.0]
    )
    assert cosine_schedule(2.0, 0.5, total_steps=1).tolist() == [2.0]


def test_poly_schedule():
    s = poly_schedule(0.01, total_steps=100, power=0.9, min_lr=1e-4)
    assert len(s) == 100 and s[0] == pytest.approx(0.01)
    assert np.all(np.diff(s) < 0) and s[-1] > 1e-4
    assert s[50] == pytest.approx((0.01 - 1e-4) * 0.5**0.9 + 1e-4)
    assert poly_schedule(1.0, 4, power=1.0).tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_scaled_lr():
    assert scaled_lr(1.0, 256) == 1.0
    assert scaled_lr(0.5, 64, world_size=2) == pytest.approx(0.25)


def _model() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1, bias=False))
    model[2].weight.requires_grad_(False)
    return model


def test_param_groups_split_bias_and_norm():
    regular, excluded = param_groups(_model().named_parameters(), weight_decay=0.05)
    assert regular["names"] == ["0.weight"]
    assert regular["weight_decay"] == 0.05 and regular["lars_exclude"] is False
    assert excluded["names"] == ["0.bias", "1.weight", "1.bias"]
    assert excluded["weight_decay"] == 0.0 and excluded["lars_exclude"] is True
    # the frozen conv is left out; an empty group is dropped
    assert len(param_groups(nn.BatchNorm1d(3).named_parameters(), 0.1)) == 1


def test_lars_step_matches_hand_computed_update():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    b = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    lr, wd, mom, eta = 0.5, 0.1, 0.9, 0.001
    opt = LARS(param_groups([("w", w), ("b", b)], wd), lr=lr, weight_decay=wd, momentum=mom, eta=eta)
    g_w, g_b = torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)

    exp_w, exp_b = w.detach().clone(), b.detach().clone()
    mu_w, mu_b = torch.zeros_like(exp_w), torch.zeros_like(exp_b)
    for _ in range(2):
        w.grad, b.grad = g_w.clone(), g_b.clone()
        opt.step()
        d = g_w + wd * exp_w
        q = eta * exp_w.norm() / d.norm()
        mu_w = mom * mu_w + q * d
        exp_w = exp_w - lr * mu_w
        mu_b = mom * mu_b + g_b  # excluded: no decay, no adaptation, plain momentum
        exp_b = exp_b - lr * mu_b
        torch.testing.assert_close(w.detach(), exp_w, rtol=0, atol=1e-15)
        torch.testing.assert_close(b.detach(), exp_b, rtol=0, atol=1e-15)
    # first step by hand: d = [1.3, 0.4], ||d|| = sqrt(1.85), q = 0.005 / sqrt(1.85)
    assert mu_b.item() == pytest.approx(0.95)


def test_lars_zero_norm_uses_unit_ratio_and_skips_missing_grads():
    w = nn.Parameter(torch.zeros(2, 2))
    unused = nn.Parameter(torch.ones(2, 2))
    opt = LARS([w, unused], lr=1.0, momentum=0.0)
    w.grad = torch.ones(2, 2)
    opt.step()
    assert torch.equal(w.detach(), -torch.ones(2, 2))
    assert torch.equal(unused.detach(), torch.ones(2, 2)) and unused not in opt.state


@pytest.mark.parametrize("name", ["lars", "sgd", "adamw"])
def test_each_optimizer_steps(name):
    torch.manual_seed(0)
    model = _model()
    opt = build_optimizer(TrainConfig(optimizer=name, weight_decay=0.1), model.named_parameters(), lr=0.1)
    expected = {"lars": LARS, "sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[name]
    assert type(opt) is expected and len(opt.param_groups) == 2
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(2, 3, 8, 8)).square().mean().backward()
    opt.step()
    after = list(model.parameters())
    assert not torch.equal(before[0], after[0].detach())  # trained conv weight moved
    assert torch.equal(before[-1], after[-1].detach())  # frozen conv untouched
    if name != "lars":
        assert opt.defaults["foreach"] is True


def test_adamw_takes_the_configured_betas():
    from decon_med.config import PretrainConfig, load_config

    mim = load_config(
        Path(__file__).resolve().parents[2] / "configs/pretrain/mim.yaml", schema=PretrainConfig
    )
    opt = build_optimizer(mim.train, _model().named_parameters(), lr=0.1)
    assert opt.defaults["betas"] == (0.9, 0.95)
    assert build_optimizer(TrainConfig(optimizer="adamw"), _model().named_parameters(), 0.1).defaults[
        "betas"
    ] == (
        0.9,
        0.999,
    )


def test_bias_and_norm_get_no_weight_decay():
    model = _model()
    opt = build_optimizer(
        TrainConfig(optimizer="sgd", weight_decay=0.5, momentum=0.0), model.named_parameters(), 1.0
    )
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    bias_before = model[0].bias.detach().clone()
    weight_before = model[0].weight.detach().clone()
    opt.step()
    assert torch.equal(model[0].bias.detach(), bias_before)
    torch.testing.assert_close(model[0].weight.detach(), weight_before * 0.5)
