"""The contract between self-supervised methods and the method-agnostic pre-training engine."""

from __future__ import annotations

import torch
from torch import nn


class SSLMethod(nn.Module):
    """Base class of a pre-training method.

    A method owns the student ``network`` (an smp model; it or a teacher copy is exported, see ``export_prefix``),
    its own heads, and any teacher / queues / centres as sub-modules or buffers, so ``state_dict()`` captures
    everything a resume needs. The engine only calls:

    - ``forward(batch) -> dict``: ``"loss"`` (a scalar tensor with gradient) plus detached scalar parts for logging;
      ``batch`` holds ``view1``, ``view2`` (B, C, H, W), ``box1``, ``box2`` (B, 4), ``flip1``, ``flip2`` (B,);
    - ``after_step(step, total_steps) -> dict``: once per optimiser step, after ``optimizer.step()`` (teacher EMA,
      queue updates), with the 0-based index of the step just taken; returns scalars to log, e.g.
      ``{"momentum": 0.995}``;
    - ``trainable_parameters()``: named parameters the optimiser updates (the teacher's are excluded);
    - ``check_data(images_per_epoch) -> list[str]``: warnings printed before training (e.g. a queue larger
      than the dataset).
    - ``record_health`` / ``health() -> dict``: the engine sets ``record_health = True`` for the forward pass of
      a log step; the method then also computes its health signals (no gradient, see
      :mod:`decon_med.ssl.health`) and ``health()`` returns them as named 0-dim tensors, the same names every
      time (``metrics.csv`` columns are fixed by its first row).

    Example:
        >>> method = build_method(cfg)            # decon_med.ssl.build_method
        >>> out = method(batch); out["loss"].backward(); optimizer.step()
        >>> method.after_step(step=0, total_steps=1000)
    """

    network: nn.Module
    #: State-dict prefix of the network that is exported and fine-tuned: ``"network."`` (the student) or, for a
    #: method with an EMA teacher that its reference transfers, ``"teacher."``.
    export_prefix: str = "network."

    #: Set by the engine around the forward pass of a log step: compute the health signals too.
    record_health: bool = False

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def after_step(self, step: int, total_steps: int) -> dict[str, float]:
        return {}

    def health(self) -> dict[str, torch.Tensor]:
        """Health signals of the last forward pass run with ``record_health`` (empty when the method has none)."""
        return {}

    def check_data(self, images_per_epoch: int) -> list[str]:
        """Warnings about the method's settings for a dataset that yields ``images_per_epoch`` images per epoch."""
        return []

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, p) for name, p in self.named_parameters() if p.requires_grad]


class SettingError(ValueError):
    """A method argument that does not fit the network it is built on (e.g. a decoder level the network does not
    have). ``setting`` is the argument's name; the config layer that built the method names the config key.

    Example:
        >>> raise SettingError("levels", "level 7 is out of range for Unet with 5 decoder levels")
    """

    def __init__(self, setting: str, message: str):
        super().__init__(message)
        self.setting = setting

    def __reduce__(self):  # pickled with both arguments (DataLoader workers, multiprocessing)
        return type(self), (self.setting, str(self))


def full_precision(tensor: torch.Tensor) -> torch.autocast:
    """A context in which autocast is off on ``tensor``'s device: similarities and losses are computed in fp32
    even when the forward pass runs under bf16 / fp16 autocast (``.float()`` alone does not stop autocast from
    running a matmul in low precision).

    Example:
        >>> with full_precision(q):
        ...     logits = q.float() @ k.float().t() / tau
    """
    return torch.autocast(device_type=tensor.device.type, enabled=False)
