"""Teacher updates: an exponential moving average of the student, with a cosine momentum schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def cosine_momentum(step: int, total_steps: int, start: float = 0.99, end: float = 1.0) -> float:
    """Momentum at ``step`` rising from ``start`` to ``end`` on a half cosine (BYOL / SlotCon).

    Example:
        >>> cosine_momentum(0, 100), cosine_momentum(100, 100)
        (0.99, 1.0)
    """
    if total_steps <= 0:
        return end
    progress = min(max(step / total_steps, 0.0), 1.0)
    return end - (end - start) * (math.cos(math.pi * progress) + 1.0) / 2.0


@torch.no_grad()
def update_momentum(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """``teacher = momentum * teacher + (1 - momentum) * student``, parameter by parameter.

    Both modules must have the same structure. Buffers are left alone: as in SlotCon, the teacher runs in train
    mode and keeps its own BatchNorm running statistics.
    """
    t_params = list(teacher.parameters())
    s_params = list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError("student and teacher have different parameter lists")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, [p.detach() for p in s_params], alpha=1.0 - momentum)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with gradients switched off (the teacher's starting point)."""
    import copy

    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
