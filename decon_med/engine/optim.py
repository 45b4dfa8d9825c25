"""Optimisers and learning-rate schedules for pre-training and fine-tuning.

Biases and normalisation parameters (every parameter with at most one dimension) go into their own group with no
weight decay; LARS also skips its trust-ratio adaptation for that group, as in SlotCon / DINO / Barlow Twins.
Schedules are precomputed per optimiser step as numpy arrays and indexed by the step. With per-part learning-rate
multipliers (fine-tuning's ``train.lr_mult``) each part of the network (:func:`part_of`) gets its own pair of
groups, marked with ``part`` and ``lr_scale``; the engine sets every group's lr to ``schedule[step] * lr_scale``.

Example:
    >>> lr = scaled_lr(1.0, batch_size=256)
    >>> optimizer = build_optimizer(cfg.train, method.trainable_parameters(), lr)
    >>> schedule = cosine_schedule(lr, 0.0, total_steps=1000, warmup_steps=50)
    >>> for group in optimizer.param_groups:
    ...     group["lr"] = schedule[step]
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from decon_med.config import TrainConfig


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (LARS), in the SlotCon / DINO form.

    For each parameter ``p`` with gradient ``g`` in a regular group::

        d = g + weight_decay * p
        d = d * eta * ||p|| / ||d||        (only when both norms are > 0)
        mu = momentum * mu + d
        p = p - lr * mu

    Groups marked ``lars_exclude=True`` (biases and norm parameters, see :func:`param_groups`) skip the weight
    decay and the trust-ratio adaptation; they still use momentum.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (usually overwritten every step from a schedule).
        weight_decay: L2 penalty added to the gradient before adaptation.
        momentum: momentum factor.
        eta: trust coefficient of the adaptation (0.001).

    Example:
        >>> optimizer = LARS(param_groups(model.named_parameters(), 1e-5), lr=0.3, momentum=0.9)
        >>> loss.backward(); optimizer.step(); optimizer.zero_grad()
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        eta: float = 0.001,
    ):
        if lr < 0 or weight_decay < 0 or not 0.0 <= momentum < 1.0 or eta <= 0:
            raise ValueError(f"invalid LARS settings lr={lr} weight_decay={weight_decay} momentum={momentum}")
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "eta": eta,
            "lars_exclude": False,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim.Optimizer.step
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            updates = [p.grad for p in params]
            if not group["lars_exclude"]:
                updates = self._adapted(params, updates, group["weight_decay"], group["eta"])
            buffers = [self._momentum_buffer(p) for p in params]
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, updates)
            torch._foreach_add_(params, buffers, alpha=-group["lr"])
        return loss

    @staticmethod
    def _adapted(
        params: list[torch.Tensor], grads: list[torch.Tensor], weight_decay: float, eta: float
    ) -> list[torch.Tensor]:
        """``(g + wd * p) * q`` with trust ratio ``q = eta * ||p|| / ||g + wd * p||`` (1 where a norm is 0)."""
        updates = torch._foreach_add(grads, params, alpha=weight_decay)
        param_norms = torch._foreach_norm(params)
        update_norms = torch._foreach_norm(updates)
        ratios = [
            torch.where((pn > 0) & (un > 0), eta * pn / un, torch.ones_like(pn))
            for pn, un in zip(param_norms, update_norms, strict=True)
        ]
        torch._foreach_mul_(updates, ratios)
        return updates

    def _momentum_buffer(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "mu" not in state:
            state["mu"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["mu"]


#: Parts of a segmentation network for per-part settings, in the order of their optimiser groups.
PARTS: tuple[str, ...] = ("encoder", "decoder", "head")


def part_of(name: str) -> str:
    """The part of an smp network a parameter / buffer / module name belongs to: ``encoder``, ``decoder`` or
    ``head`` (everything else: the segmentation head).

    Example:
        >>> part_of("encoder.layer1.0.conv1.weight"), part_of("segmentation_head.0.bias")
        ('encoder', 'head')
    """
    for part in ("encoder", "decoder"):
        if name == part or name.startswith(f"{part}."):
            return part
    return "head"


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    weight_decay: float,
    lr_mult: dict[str, float] | None = None,
    lr: float | None = None,
) -> list[dict]:
    """Split parameters into a regular group and a bias / norm group (ndim <= 1, no decay, no LARS adaptation).

    Args:
        named_params: ``(name, parameter)`` pairs, e.g. ``model.named_parameters()``; frozen ones are skipped.
        weight_decay: weight decay of the regular group.
        lr_mult: ``{part: multiplier}`` (parts of :func:`part_of`, missing ones 1): one such pair of groups per
            part, in :data:`PARTS` order, each marked ``part`` and ``lr_scale``; a part with multiplier 0 is left
            out. ``None``: the two groups over all parameters.
        lr: with ``lr_mult``, each group's initial ``lr`` is ``lr * multiplier``.

    Returns:
        The groups (empty ones are left out), each with ``params``, ``names``, ``weight_decay`` and
        ``lars_exclude``.

    Example:
        >>> [len(g["params"]) for g in param_groups(nn.Linear(4, 2).named_parameters(), 1e-4)]
        [1, 1]
        >>> net = nn.ModuleDict({"encoder": nn.Linear(4, 4), "segmentation_head": nn.Linear(4, 2)})
        >>> [(g["part"], g["lr_scale"]) for g in param_groups(net.named_parameters(), 1e-4, {"encoder": 0.1})]
        [('encoder', 0.1), ('encoder', 0.1), ('head', 1.0), ('head', 1.0)]
    """
    named_params = list(named_params)
    if lr_mult is not None:
        groups = []
        for part in PARTS:
            scale = float(lr_mult.get(part, 1.0))
            if scale == 0:
                continue
            own = [(name, p) for name, p in named_params if part_of(name) == part]
            for group in param_groups(own, weight_decay):
                group.update({"part": part, "lr_scale": scale})
                if lr is not None:
                    group["lr"] = lr * scale
                groups.append(group)
        return groups
    regular: dict = {"params": [], "names": [], "weight_decay": weight_decay, "lars_exclude": False}
    excluded: dict = {"params": [], "names": [], "weight_decay": 0.0, "lars_exclude": True}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        group = excluded if p.ndim <= 1 else regular
        group["params"].append(p)
        group["names"].append(name)
    return [g for g in (regular, excluded) if g["params"]]


def build_optimizer(
    train_cfg: TrainConfig,
    named_params: Iterable[tuple[str, nn.Parameter]],
    lr: float,
    lr_mult: dict[str, float] | None = None,
) -> torch.optim.Optimizer:
    """The optimiser named by ``train_cfg.optimizer`` (``lars``, ``sgd`` or ``adamw``) over :func:`param_groups`.

    Args:
        train_cfg: ``optimizer``, ``weight_decay`` and ``momentum`` are read.
        named_params: ``(name, parameter)`` pairs to optimise.
        lr: initial learning rate (the engine overwrites it every step from its schedule).
        lr_mult: per-part learning-rate multipliers (see :func:`param_groups`); ``None``: one rate for all.

    Example:
        >>> optimizer = build_optimizer(TrainConfig(optimizer="adamw", weight_decay=0.05), model.named_parameters(), 1e-4)
        >>> optimizer = build_optimizer(TrainConfig(optimizer="sgd"), net.named_parameters(), 0.01, {"encoder": 0.1})
    """
    groups = param_groups(named_params, train_cfg.weight_decay, lr_mult=lr_mult, lr=lr)
    if not groups:
        raise ValueError("no trainable parameters to optimise")
    name = train_cfg.optimizer
    if name == "lars":
        return LARS(groups, lr=lr, weight_decay=train_cfg.weight_decay, momentum=train_cfg.momentum)
    if name == "sgd":
        return torch.optim.SGD(
            groups, lr=lr, momentum=train_cfg.momentum, weight_decay=train_cfg.weight_decay, foreach=True
        )
    if name == "adamw":
        fused = all(p.is_cuda for g in groups for p in g["params"])
        return torch.optim.AdamW(
            groups,
            lr=lr,
            betas=(train_cfg.betas[0], train_cfg.betas[1]),
            weight_decay=train_cfg.weight_decay,
            fused=True if fused else None,
            foreach=None if fused else True,
        )
    raise ValueError(f"unknown optimizer '{name}'; expected lars, sgd or adamw")


def scaled_lr(base_lr: float, batch_size: int, world_size: int = 1) -> float:
    """Linear scaling rule: ``base_lr * batch_size * world_size / 256``.

    Example:
        >>> scaled_lr(1.0, 64, world_size=2)
        0.5
    """
    return base_lr * batch_size * world_size / 256


def cosine_schedule(
    base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """Per-step values: linear warm-up from ``warmup_start`` to ``base``, then a half cosine down to ``final``.

    The warm-up covers the first ``warmup_steps`` steps (its last value is ``base``); the cosine covers the rest
    and ends exactly at ``final``.

    Args:
        base: value after warm-up.
        final: value at the last step.
        total_steps: length of the schedule.
        warmup_steps: steps of linear warm-up (clipped to ``total_steps``).
        warmup_start: value at step 0 when there is a warm-up.

    Example:
        >>> cosine_schedule(1.0, 0.0, total_steps=5, warmup_steps=2).round(3).tolist()
        [0.0, 1.0, 1.0, 0.5, 0.0]
    """
    if total_steps < 0:
        raise ValueError(f"total_steps must be >= 0, got {total_steps}")
    warmup_steps = min(max(int(warmup_steps), 0), total_steps)
    warmup = np.linspace(warmup_start, base, warmup_steps)
    decay_steps = total_steps - warmup_steps
    progress = np.arange(decay_steps) / max(decay_steps - 1, 1)
    decay = final + 0.5 * (base - final) * (1.0 + np.cos(math.pi * progress))
    return np.concatenate([warmup, decay]).astype(np.float64)


def poly_schedule(base: float, total_steps: int, power: float = 0.9, min_lr: float = 0.0) -> np.ndarray:
    """Per-step values of the polynomial decay ``(base - min_lr) * (1 - step / total_steps) ** power + min_lr``.

    Example:
        >>> poly_schedule(0.01, total_steps=4, power=1.0).tolist()
        [0.01, 0.0075, 0.005, 0.0025]
    """
    if total_steps < 0:
        raise ValueError(f"total_steps must be >= 0, got {total_steps}")
    remaining = 1.0 - np.arange(total_steps) / max(total_steps, 1)
    return (base - min_lr) * remaining**power + min_lr
