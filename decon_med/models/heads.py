"""Projection / prediction heads and prototype layers shared by the self-supervised methods.

Example:
    >>> projector = MLP2d(2048, hidden_dim=4096, out_dim=256)     # 1x1-conv MLP on a feature map
    >>> grouping = SemanticGrouping(num_prototypes=256, dim=256, temp=0.07)
    >>> slots, scores = grouping(projector(torch.randn(2, 2048, 7, 7)))
    >>> slots.shape, scores.shape
    (torch.Size([2, 256, 256]), torch.Size([2, 256, 7, 7]))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _mlp_layers(linear, norm, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> list[nn.Module]:
    if num_layers == 1:
        return [linear(in_dim, out_dim)]
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (num_layers - 1)
    for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
        layers += [linear(d_in, d_out), norm(d_out), nn.GELU()]
    layers.append(linear(dims[-1], out_dim))
    return layers


def _init_trunc_normal(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class MLP(nn.Module):
    """DINO-style MLP: ``num_layers`` linear layers with BatchNorm + GELU between them (SlotCon's slot predictor).

    Example:
        >>> MLP(256, 4096, 256)(torch.randn(8, 256)).shape
        torch.Size([8, 256])
    """

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256, num_layers: int = 3):
        super().__init__()
        self.mlp = nn.Sequential(
            *_mlp_layers(nn.Linear, nn.BatchNorm1d, in_dim, hidden_dim, out_dim, num_layers)
        )
        self.apply(_init_trunc_normal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class MLP2d(nn.Module):
    """The same MLP as 1x1 convolutions on a feature map (SlotCon's dense projector: 3 layers, 4096 -> 256).

    Example:
        >>> MLP2d(512, 1024, 128)(torch.randn(2, 512, 7, 7)).shape
        torch.Size([2, 128, 7, 7])
    """

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256, num_layers: int = 3):
        super().__init__()

        def conv1x1(i: int, o: int) -> nn.Conv2d:
            return nn.Conv2d(i, o, 1)

        self.mlp = nn.Sequential(
            *_mlp_layers(conv1x1, nn.BatchNorm2d, in_dim, hidden_dim, out_dim, num_layers)
        )
        self.apply(_init_trunc_normal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class SemanticGrouping(nn.Module):
    """Learnable prototypes that softly group pixels into slots (SlotCon, Wen et al. 2022).

    Each pixel's projected feature is compared by cosine similarity with every prototype; a softmax over
    prototypes (temperature ``temp``) assigns pixels, and each slot is the assignment-weighted mean of the pixel
    features.

    Args:
        num_prototypes: number of prototypes K.
        dim: feature dimension D.
        temp: temperature of the pixel-to-prototype softmax (SlotCon's teacher temperature 0.07).

    Returns (forward):
        ``(slots, scores)``: slots (B, K, D) and the cosine scores (B, K, h, w) before the temperature.
    """

    def __init__(self, num_prototypes: int, dim: int, temp: float = 0.07, eps: float = 1e-6):
        super().__init__()
        self.num_prototypes = num_prototypes
        self.temp = temp
        self.eps = eps
        self.prototypes = nn.Embedding(num_prototypes, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        protos = F.normalize(self.prototypes.weight, dim=1)
        scores = torch.einsum("kd,bdhw->bkhw", protos, F.normalize(x, dim=1))
        attn = (scores / self.temp).softmax(dim=1) + self.eps
        attn = attn / attn.sum(dim=(2, 3), keepdim=True)
        slots = torch.einsum("bdhw,bkhw->bkd", x, attn)
        return slots, scores
