"""DenseCL: dense contrastive learning with a global and a dense head, each against a queue (Wang et al., CVPR 2021).

:class:`DenseCLHead` holds the auxiliary layers of one feature level — the global head (average pool -> fc -> ReLU
-> fc) and the dense head (1x1 conv -> ReLU -> 1x1 conv), their momentum ("key") copies and the two queues of
negatives — and computes the level's loss from the query encoder's map of view 1 and the key encoder's map of
view 2, as in the reference (the loss is not symmetrised, so each view runs through one encoder only):

- **global**: InfoNCE between the pooled query and the pooled key of the same image; negatives are the global
  queue of earlier keys;
- **dense**: each query location's positive is the key location whose *backbone* feature (the level's input map)
  is most similar in cosine; negatives are the dense queue, which holds one pooled dense key per earlier image;
- ``loss = (1 - lambda) * global + lambda * dense``, with ``lambda = 0`` for the first ``warmup_steps`` optimiser
  steps (the loss climbs on small datasets without it) and ``dense_weight`` afterwards.

The queues and the step counter are buffers, so they are saved in checkpoints and a resumed run continues exactly.
Under torchrun the key encoder runs on a share of the global key batch shuffled across processes, as in the
reference (MoCo's shuffle BN, ``ssl.densecl.shuffle_bn``); in one process its BatchNorm sees the whole key batch.

This module is the ``densecl`` method: its settings (``ssl.densecl.*``, :class:`DenseCLSettings`), its heads
(:func:`densecl_heads`) and its registration (it exports the student, DenseCL's query encoder). DenseCL is
:class:`decon_med.ssl.decon.DeCon` with these heads and no decoder level; with ``ssl.decoder`` levels (DeCon-SL /
DeCon-ML, the aliases ``decon_sl_densecl`` and ``decon_ml_densecl``) each level has its own heads and queues.

Example:
    >>> head = DenseCLHead(in_channels=512, dim_hidden=2048, dim_out=128, queue_size=16384)
    >>> out = head(s1, None, None, t2, box1, box2, flip1, flip2)   # query map of view 1, key map of view 2
    >>> out["loss"].backward(); head.update_teacher(momentum=0.999)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from decon_med.config import check, check_memory
from decon_med.distributed import all_gather_no_grad
from decon_med.ssl.base import full_precision
from decon_med.ssl.decon import HeadFactory, build_decon, head_width
from decon_med.ssl.ema import frozen_copy, update_momentum
from decon_med.ssl.health import embedding_std
from decon_med.ssl.registry import Alias, MethodSpec, register, register_alias

if TYPE_CHECKING:
    from decon_med.config import PretrainConfig
    from decon_med.ssl.base import SSLMethod


class DenseCLHead(nn.Module):
    """DenseCL's global and dense heads, key copies and queues for one feature level.

    Args:
        in_channels: channels of the feature level (2048 for ResNet-50's last level).
        dim_hidden: hidden width of both heads (2048).
        dim_out: embedding dimension (128).
        queue_size: negatives in each queue (65536 in DenseCL, 16384 in DeCon).
        temperature: InfoNCE temperature tau (0.2).
        dense_weight: lambda after the warm-up (0.5).
        warmup_steps: optimiser steps with lambda = 0.
    """

    #: The head uses the student (query) map of view 1 and the teacher (key) map of view 2 only.
    symmetric = False
    #: Set by the owning method for a log step's forward pass: fill ``last_health`` (see
    #: :mod:`decon_med.ssl.health`: ``z_std``, ``pos_sim``, ``neg_sim`` of the dense head).
    record_health = False

    def __init__(
        self,
        in_channels: int,
        dim_hidden: int = 2048,
        dim_out: int = 128,
        queue_size: int = 65536,
        temperature: float = 0.2,
        dense_weight: float = 0.5,
        warmup_steps: int = 0,
    ):
        super().__init__()
        self.temperature = temperature
        self.dense_weight = dense_weight
        self.warmup_steps = warmup_steps
        self.global_head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(in_channels, dim_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(dim_hidden, dim_out),
        )
        self.dense_head = nn.Sequential(
            nn.Conv2d(in_channels, dim_hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim_hidden, dim_out, 1),
        )
        self.global_head_t = frozen_copy(self.global_head)
        self.dense_head_t = frozen_copy(self.dense_head)
        self.register_buffer("queue_global", F.normalize(torch.randn(dim_out, queue_size), dim=0))
        self.register_buffer("queue_dense", F.normalize(torch.randn(dim_out, queue_size), dim=0))
        self.register_buffer("ptr_global", torch.zeros((), dtype=torch.long))
        self.register_buffer("ptr_dense", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.last_health: dict[str, torch.Tensor] = {}

    @property
    def loss_lambda(self) -> torch.Tensor:
        """lambda of the current step (a tensor on the head's device, no host sync): 0 during the warm-up, then
        ``dense_weight``."""
        return (self.steps_done >= self.warmup_steps).float() * self.dense_weight

    def forward(
        self,
        s1: torch.Tensor,
        s2: torch.Tensor | None,
        t1: torch.Tensor | None,
        t2: torch.Tensor,
        box1: torch.Tensor | None = None,
        box2: torch.Tensor | None = None,
        flip1: torch.Tensor | None = None,
        flip2: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss of one level from the query map ``s1`` (view 1) and the key map ``t2`` (view 2).

        ``s2``, ``t1`` and the crop geometry are not used: dense positives are found by feature similarity.
        """
        q_global = F.normalize(self.global_head(s1).float(), dim=1)  # (B, D)
        q_dense = F.normalize(self.dense_head(s1).float().flatten(2), dim=1)  # (B, D, S)
        with torch.no_grad():
            k_global = F.normalize(self.global_head_t(t2).float(), dim=1)
            k_dense_map = self.dense_head_t(t2).float().flatten(2)  # (B, D, S)
            k_dense = F.normalize(k_dense_map, dim=1)
            k_pooled = F.normalize(k_dense_map.mean(dim=2), dim=1)  # one dense key per image, for the queue
            match = match_locations(s1.detach().float(), t2.float())  # (B, S)
        positives_dense = torch.gather(k_dense, 2, match.unsqueeze(1).expand(-1, k_dense.shape[1], -1))

        global_loss = info_nce(q_global, k_global, self.queue_global, self.temperature)
        queries = q_dense.transpose(1, 2).flatten(0, 1)  # (B*S, D)
        keys = positives_dense.transpose(1, 2).flatten(0, 1)
        dense_loss = info_nce(queries, keys, self.queue_dense, self.temperature)
        lam = self.loss_lambda
        loss = (1.0 - lam) * global_loss + lam * dense_loss
        if self.record_health:  # before the queue takes this batch's keys
            self.last_health = _contrast_health(queries, keys, self.queue_dense)
        if self.training:
            enqueue(self.queue_global, self.ptr_global, all_gather_no_grad(k_global))
            enqueue(self.queue_dense, self.ptr_dense, all_gather_no_grad(k_pooled))
        return {
            "loss": loss,
            "global": global_loss.detach(),
            "dense": dense_loss.detach(),
            "lambda": lam.detach(),
        }

    def check_data(self, images_per_epoch: int) -> list[str]:
        """A queue that holds an epoch or more of keys contrasts each query with earlier keys of its own image."""
        size = self.queue_global.shape[1]
        if size < images_per_epoch:
            return []
        return [
            f"ssl.densecl.queue_size {size} is not smaller than the {images_per_epoch} images of an epoch, so the "
            "queues hold earlier keys of the very images they are contrasted with; use a queue below the epoch size "
            "(DenseCL's 65536 is for COCO's 118k images)"
        ]

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA update of the key heads; also counts the optimiser step for the lambda warm-up."""
        update_momentum(self.global_head, self.global_head_t, momentum)
        update_momentum(self.dense_head, self.dense_head_t, momentum)
        self.steps_done += 1


@torch.no_grad()
def _contrast_health(
    queries: torch.Tensor, keys: torch.Tensor, queue: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Spread of the queries and their mean cosine similarity to the positives and to the queue's negatives (the
    mean over all negatives is the similarity to the queue's mean vector, so no (N, K) product is formed)."""
    queries = queries.detach().float()
    return {
        "z_std": embedding_std(queries),
        "pos_sim": (queries * keys.detach().float()).sum(dim=1).mean(),
        "neg_sim": (queries @ queue.float().mean(dim=1)).mean(),
    }


def match_locations(query_maps: torch.Tensor, key_maps: torch.Tensor) -> torch.Tensor:
    """For each location of each query map, the index of the key location with the highest cosine similarity.

    Args:
        query_maps: (B, C, H, W) backbone features of view 1.
        key_maps: (B, C, H, W) backbone features of view 2.

    Returns:
        (B, H * W) indices into the flattened key locations.
    """
    q = F.normalize(query_maps.flatten(2), dim=1)  # (B, C, S)
    k = F.normalize(key_maps.flatten(2), dim=1)
    with full_precision(q):
        return torch.bmm(q.transpose(1, 2).float(), k.float()).argmax(dim=2)


def info_nce(
    queries: torch.Tensor, keys: torch.Tensor, queue: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Cross-entropy of each query's positive key against the queue's negatives (all L2-normalised), in fp32."""
    with full_precision(queries):
        queries, keys = queries.float(), keys.float()
        positive = (queries * keys).sum(dim=1, keepdim=True)
        negative = queries @ queue.detach().clone().float()  # the queue is updated in place before backward
        logits = torch.cat([positive, negative], dim=1) / temperature
        labels = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, labels)


@torch.no_grad()
def enqueue(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """Write ``keys`` (N, D) into the ring buffer ``queue`` (D, K) from ``ptr`` on, wrapping; advance ``ptr``.

    With more keys than the queue holds, only the last K are kept.
    """
    size = queue.shape[1]
    keys = keys[-size:].to(queue.dtype)
    index = (ptr + torch.arange(len(keys), device=queue.device)) % size
    queue[:, index] = keys.t()
    ptr.copy_((ptr + len(keys)) % size)


@dataclass
class DenseCLSettings:
    """DenseCL's own keys, the ``ssl.densecl`` section (the heads' widths are ``ssl.dim_hidden`` / ``ssl.dim_out``,
    the key encoder's momentum ``ssl.teacher_momentum`` with ``ssl.momentum_schedule: constant``).

    Attributes:
        queue_size: negatives kept in each queue (65536 in DenseCL, 16384 in DeCon, both on COCO); keep it below
            the images of one epoch (a warning says when it is not).
        contrast_temp: InfoNCE temperature of the global and dense losses (0.2).
        dense_weight: lambda in ``(1 - lambda) * global + lambda * dense`` (0.5).
        dense_warmup_steps: lambda is held at 0 for this many optimiser steps (small datasets need it).
        shuffle_bn: under torchrun, the key encoder sees the global batch, shuffled each step in an order shared
            by every process (MoCo's shuffle BN), so BatchNorm statistics cannot tell which key matches a query;
            no effect in one process.

    Example:
        >>> load_config(None, ["ssl.method=densecl", "ssl.densecl.queue_size=512"]).ssl.densecl.queue_size
        512
    """

    queue_size: int = 65536
    contrast_temp: float = 0.2
    dense_weight: float = 0.5
    dense_warmup_steps: int = 1000
    shuffle_bn: bool = True

    def validate(self) -> None:
        check(self.queue_size >= 1, "ssl.densecl.queue_size", "must be >= 1")
        check(self.contrast_temp > 0, "ssl.densecl.contrast_temp", "must be > 0")
        check(0.0 <= self.dense_weight <= 1.0, "ssl.densecl.dense_weight", "must be in [0, 1]")
        check(self.dense_warmup_steps >= 0, "ssl.densecl.dense_warmup_steps", "must be >= 0")


def check_queues(cfg: PretrainConfig) -> None:
    """The queues of every head (a global and a dense one on the encoder and on each decoder level) must fit in
    this machine's memory."""
    s = cfg.ssl
    heads = 1 + len(s.decoder.levels)
    size = s.settings.queue_size
    check_memory(
        "ssl.densecl.queue_size",
        2 * heads * size * s.dim_out * 4,
        f"the DenseCL queues ({heads} head(s) x 2 queues x {size:,} x ssl.dim_out {s.dim_out} x 4 bytes)",
    )


def densecl_heads(cfg: PretrainConfig) -> HeadFactory:
    """A :class:`DenseCLHead` per level, from ``ssl.densecl`` and the shared head widths.

    Example:
        >>> head = densecl_heads(cfg)(512, False)      # the encoder level's head of a ResNet-18
    """
    s: DenseCLSettings = cfg.ssl.settings

    def factory(in_channels: int, is_decoder: bool) -> DenseCLHead:
        return DenseCLHead(
            in_channels,
            dim_hidden=head_width(cfg, is_decoder),
            dim_out=cfg.ssl.dim_out,
            queue_size=s.queue_size,
            temperature=s.contrast_temp,
            dense_weight=s.dense_weight,
            warmup_steps=s.dense_warmup_steps,
        )

    return factory


def build_densecl(cfg: PretrainConfig) -> SSLMethod:
    """The ``densecl`` method of a config (with ``ssl.decoder`` levels: DeCon-SL / DeCon-ML around DenseCL)."""
    return build_decon(cfg, densecl_heads(cfg), shuffle_teacher_bn=cfg.ssl.settings.shuffle_bn)


register(
    MethodSpec(
        "densecl",
        DenseCLSettings,
        build_densecl,
        summary="DenseCL: global + dense InfoNCE against two queues",
        export="student",
        decoder=True,
        check=check_queues,
        config="pretrain/densecl",
    )
)
register_alias(Alias("decon_sl_densecl", "densecl", "sl", config="pretrain/decon_sl_densecl"))
register_alias(Alias("decon_ml_densecl", "densecl", "ml", config="pretrain/decon_ml_densecl"))
