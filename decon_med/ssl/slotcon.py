"""SlotCon: self-supervised semantic grouping and slot contrast on one feature level (Wen et al., NeurIPS 2022).

:class:`SlotConHead` holds the auxiliary layers of one feature level — student projector, prototypes and slot
predictor, their teacher copies, and the teacher centre — and computes the level's loss from student and teacher
feature maps of two views:

- **group loss**: the student's per-pixel prototype assignment of view 1 predicts the teacher's (centred,
  sharpened) assignment of view 2 on their overlap, which both score maps are resampled to with ``roi_align``;
- **slot loss**: InfoNCE between the student's predicted slots of view 1 and the teacher's slots of view 2, only
  for prototypes that own at least one pixel in both views, scaled by ``2 * tau``;

``loss = w * group + (1 - w) * slot``, summed over both directions (1 -> 2 and 2 -> 1), as in the reference.

This module is the ``slotcon`` method: its settings (``ssl.slotcon.*``, :class:`SlotConSettings`), its heads
(:func:`slotcon_heads`) and its registration (it exports the EMA teacher, as SlotCon's reference transfers its
momentum encoder). The method is :class:`decon_med.ssl.decon.DeCon` with these heads: no decoder level for SlotCon,
decoder levels with ``ssl.decoder`` (DeCon-SL / DeCon-ML; the aliases ``decon_sl`` and ``decon_ml``).

Example:
    >>> head = SlotConHead(in_channels=512, num_prototypes=256, dim_hidden=1024, dim_out=256)
    >>> out = head(s1, s2, t1, t2, box1, box2, flip1, flip2)     # student maps s*, teacher maps t*
    >>> out["loss"].backward(); head.update_teacher(momentum=0.99)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from decon_med.config import check
from decon_med.distributed import all_gather_no_grad, all_reduce_mean, all_reduce_sum, rank, world_size
from decon_med.models.heads import MLP, MLP2d, SemanticGrouping
from decon_med.ssl.base import full_precision
from decon_med.ssl.decon import HeadFactory, build_decon, head_width
from decon_med.ssl.ema import frozen_copy, update_momentum
from decon_med.ssl.health import assignment_health, embedding_std
from decon_med.ssl.registry import Alias, MethodSpec, register, register_alias

if TYPE_CHECKING:
    from decon_med.config import PretrainConfig
    from decon_med.ssl.base import SSLMethod


def align_to_overlap(x: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Resample each map of ``x`` (N, C, H, W) onto its view's overlap box, undoing the view's horizontal flip.

    ``boxes`` (N, 4) are ``[x0, y0, x1, y1]`` in [0, 1] of the unflipped crop and ``flips`` (N,) say whether the
    view was mirrored: the map is un-mirrored first, then the box is cut out with ``roi_align(aligned=True)`` at the
    map's own resolution. Two views' aligned maps then cover the same image region pixel for pixel.
    """
    n, _, h, w = x.shape
    flips = flips.to(device=x.device, dtype=torch.bool).view(n, 1, 1, 1)
    x = torch.where(flips, x.flip(-1), x)
    scale = torch.tensor([w, h, w, h], device=x.device, dtype=x.dtype)
    index = torch.arange(n, device=x.device, dtype=x.dtype).view(n, 1)
    rois = torch.cat([index, boxes.to(device=x.device, dtype=x.dtype) * scale], dim=1)
    # sampling_ratio -1 (adaptive) as in SlotCon: bins are at most one map pixel, so one bilinear sample each.
    return roi_align(x, rois, output_size=(h, w), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


class SlotConHead(nn.Module):
    """SlotCon's auxiliary layers and loss for one feature level, with their EMA teacher.

    Args:
        in_channels: channels of the feature level (2048 for ResNet-50's last level, 256 for FPN levels).
        num_prototypes: prototypes K (256; DeCon decoder levels 256 or 384).
        dim_hidden: hidden width of projector and predictor (4096).
        dim_out: projector output / slot dimension (256).
        teacher_temp: teacher assignment temperature (0.07), also the grouping temperature.
        student_temp: student assignment temperature (0.1).
        center_momentum: EMA momentum of the teacher centre (0.9).
        group_loss_weight: w in ``w * group + (1 - w) * slot`` (0.5).
        slot_temp: InfoNCE temperature tau (0.2).
    """

    #: The loss is symmetrised: student and teacher maps of both views are used.
    symmetric = True
    #: Set by the owning method for a log step's forward pass: fill ``last_health`` (see
    #: :mod:`decon_med.ssl.health`: ``z_std``, ``protos``, ``entropy``, ``center``).
    record_health = False

    def __init__(
        self,
        in_channels: int,
        num_prototypes: int = 256,
        dim_hidden: int = 4096,
        dim_out: int = 256,
        teacher_temp: float = 0.07,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        group_loss_weight: float = 0.5,
        slot_temp: float = 0.2,
    ):
        super().__init__()
        self.teacher_temp = teacher_temp
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.group_loss_weight = group_loss_weight
        self.slot_temp = slot_temp
        self.projector = MLP2d(in_channels, dim_hidden, dim_out)
        self.grouping = SemanticGrouping(num_prototypes, dim_out, teacher_temp)
        self.predictor = MLP(dim_out, dim_hidden, dim_out)
        self.projector_t = frozen_copy(self.projector)
        self.grouping_t = frozen_copy(self.grouping)
        self.register_buffer("center", torch.zeros(1, num_prototypes))
        self.last_health: dict[str, torch.Tensor] = {}

    def forward(
        self,
        s1: torch.Tensor,
        s2: torch.Tensor,
        t1: torch.Tensor,
        t2: torch.Tensor,
        box1: torch.Tensor,
        box2: torch.Tensor,
        flip1: torch.Tensor,
        flip2: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Loss of one level from student maps ``s1, s2`` and teacher maps ``t1, t2`` of the two views."""
        z1 = self.projector(s1)
        q1, score_q1 = self.grouping(z1)
        q2, score_q2 = self.grouping(self.projector(s2))
        with torch.no_grad():
            k1, score_k1 = self.grouping_t(self.projector_t(t1))
            k2, score_k2 = self.grouping_t(self.projector_t(t2))
            k1_aligned = align_to_overlap(score_k1, box1, flip1)
            k2_aligned = align_to_overlap(score_k2, box2, flip2)
        q1_aligned = align_to_overlap(score_q1, box1, flip1)
        q2_aligned = align_to_overlap(score_q2, box2, flip2)

        group = self._self_distill(q1_aligned, k2_aligned) + self._self_distill(q2_aligned, k1_aligned)
        slot = self._slot_contrast(q1, k2, score_q1, score_k2) + self._slot_contrast(
            q2, k1, score_q2, score_k1
        )
        if self.record_health:  # before the centre moves: the centre this step's loss used
            teacher_scores = torch.cat([score_k1, score_k2])
            self.last_health = {
                "z_std": embedding_std(z1),
                **assignment_health(teacher_scores, self.center, self.teacher_temp),
            }
        if self.training:
            self._update_center(torch.cat([score_k1, score_k2]))
        w = self.group_loss_weight
        loss = w * group + (1.0 - w) * slot
        return {"loss": loss, "group": group.detach(), "slot": slot.detach()}

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA update of the teacher projector and prototypes."""
        update_momentum(self.projector, self.projector_t, momentum)
        update_momentum(self.grouping, self.grouping_t, momentum)

    def _self_distill(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Cross-entropy between teacher and student prototype assignments, averaged over pixels."""
        q = q.permute(0, 2, 3, 1).flatten(0, 2)
        k = k.permute(0, 2, 3, 1).flatten(0, 2)
        log_q = F.log_softmax(q.float() / self.student_temp, dim=-1)
        p_k = F.softmax((k.float() - self.center) / self.teacher_temp, dim=-1)
        return torch.sum(-p_k * log_q, dim=-1).mean()

    def _slot_contrast(
        self, q: torch.Tensor, k: torch.Tensor, score_q: torch.Tensor, score_k: torch.Tensor
    ) -> torch.Tensor:
        """InfoNCE over slots that own at least one pixel in both views (negatives: the other teacher slots).

        The mean runs over the query slots of every process, so N processes with B/N images each give the loss and
        (after DDP's gradient average) the gradients of one process with B images.
        """
        b, num_k, _ = q.shape
        present_q = _owned_prototypes(score_q).view(-1)
        present_k = _owned_prototypes(score_k).view(-1)
        idx_q = (present_q & present_k).nonzero().squeeze(-1)
        # Every collective runs on every process, before any process leaves early.
        all_present_k = all_gather_no_grad(present_k)
        all_keys = all_gather_no_grad(k.flatten(0, 1))
        # BatchNorm in the predictor needs two samples; a process with fewer contributes no slot term.
        count = idx_q.numel() if idx_q.numel() >= 2 else 0
        total = all_reduce_sum(torch.tensor(float(count), device=q.device))
        if count == 0:
            return q.sum() * 0.0
        keys = F.normalize(all_keys.float(), dim=1)[all_present_k.nonzero().squeeze(-1)]
        queries = F.normalize(self.predictor(q.flatten(0, 1)[idx_q]).float(), dim=1)
        labels = all_present_k.long().cumsum(0)[idx_q + b * num_k * rank()] - 1
        with full_precision(queries):
            logits = queries @ keys.t() / self.slot_temp
            loss_sum = F.cross_entropy(logits, labels, reduction="sum")
        return loss_sum * (world_size() / total) * (2.0 * self.slot_temp)

    @torch.no_grad()
    def _update_center(self, teacher_scores: torch.Tensor) -> None:
        batch_center = all_reduce_mean(teacher_scores.float().mean(dim=(0, 2, 3)).unsqueeze(0))
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)


def _owned_prototypes(scores: torch.Tensor) -> torch.Tensor:
    """(B, K) bool: prototype k is the arg-max of at least one pixel of image b."""
    owner = scores.argmax(dim=1)  # (B, h, w)
    owned = torch.zeros(scores.shape[:2], dtype=torch.bool, device=scores.device)
    return owned.scatter_(1, owner.flatten(1), True)


@dataclass
class SlotConSettings:
    """SlotCon's own keys, the ``ssl.slotcon`` section (the heads' widths are ``ssl.dim_hidden`` / ``ssl.dim_out``).

    Attributes:
        num_prototypes: prototypes K of the encoder level's head (SlotCon 256).
        num_prototypes_dec: prototypes of each supervised decoder level's head (DeCon: 256 or 384).
        teacher_temp: teacher softmax temperature of the prototype scores, also the grouping temperature (0.07).
        student_temp: student softmax temperature (0.1).
        center_momentum: EMA momentum of the teacher centre (0.9).
        group_loss_weight: weight of the grouping (self-distillation) loss vs the slot contrastive loss (0.5).
        slot_temp: temperature of the slot InfoNCE loss (0.2).

    Example:
        >>> load_config(None, ["ssl.method=slotcon", "ssl.slotcon.teacher_temp=0.04"]).ssl.slotcon.teacher_temp
        0.04
    """

    num_prototypes: int = 256
    num_prototypes_dec: int = 256
    teacher_temp: float = 0.07
    student_temp: float = 0.1
    center_momentum: float = 0.9
    group_loss_weight: float = 0.5
    slot_temp: float = 0.2

    def validate(self) -> None:
        for key in ("num_prototypes", "num_prototypes_dec"):
            check(getattr(self, key) >= 1, f"ssl.slotcon.{key}", "must be >= 1")
        for key in ("teacher_temp", "student_temp", "slot_temp"):
            check(getattr(self, key) > 0, f"ssl.slotcon.{key}", "must be > 0")
        check(0.0 <= self.center_momentum < 1.0, "ssl.slotcon.center_momentum", "must be in [0, 1)")
        check(0.0 <= self.group_loss_weight <= 1.0, "ssl.slotcon.group_loss_weight", "must be in [0, 1]")


def slotcon_heads(cfg: PretrainConfig) -> HeadFactory:
    """A :class:`SlotConHead` per level, from ``ssl.slotcon`` and the shared head widths.

    Example:
        >>> head = slotcon_heads(cfg)(512, False)      # the encoder level's head of a ResNet-18
    """
    s: SlotConSettings = cfg.ssl.settings

    def factory(in_channels: int, is_decoder: bool) -> SlotConHead:
        return SlotConHead(
            in_channels,
            num_prototypes=s.num_prototypes_dec if is_decoder else s.num_prototypes,
            dim_hidden=head_width(cfg, is_decoder),
            dim_out=cfg.ssl.dim_out,
            teacher_temp=s.teacher_temp,
            student_temp=s.student_temp,
            center_momentum=s.center_momentum,
            group_loss_weight=s.group_loss_weight,
            slot_temp=s.slot_temp,
        )

    return factory


def build_slotcon(cfg: PretrainConfig) -> SSLMethod:
    """The ``slotcon`` method of a config (with ``ssl.decoder`` levels: DeCon-SL / DeCon-ML)."""
    return build_decon(cfg, slotcon_heads(cfg))


register(
    MethodSpec(
        "slotcon",
        SlotConSettings,
        build_slotcon,
        summary="SlotCon: prototype self-distillation + slot InfoNCE on the encoder's last level",
        export="teacher",
        decoder=True,
        config="pretrain/slotcon",
    )
)
register_alias(Alias("decon_sl", "slotcon", "sl", config="pretrain/decon_sl"))
register_alias(Alias("decon_ml", "slotcon", "ml", config="pretrain/decon_ml"))
