"""What the pre-training and fine-tuning loops share: optimiser step, finite-loss guard and checkpoints.

A subclass sets up ``cfg``, ``paths`` (:class:`~decon_med.engine.pretrain.RunPaths`), ``device``, ``params``,
``optimizer`` and ``lr_schedule``, calls :meth:`TrainingSession.init_session` and implements ``_state()`` (what its
checkpoints hold). Everything else about one optimiser step and about writing checkpoints lives here.

Example:
    >>> class MyRun(TrainingSession):
    ...     def _state(self): return {"step": self.step, **self.training_state()}
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from decon_med.engine.checkpoint import capture_rng_state, copy_checkpoint, save_checkpoint
from decon_med.errors import DeconError


class TrainingSession:
    """Mixin holding the step counter, the gradient scaler and the finite-loss guard of a training run."""

    #: Word used in messages for one optimiser step ("step" or "iteration").
    unit = "step"

    def init_session(self, checkpoint: dict[str, Any] | None) -> None:
        """Create the scaler and counters, then restore the shared training state from ``checkpoint``."""
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.cfg.train.amp == "fp16")
        self.step = 0
        self.elapsed = 0.0
        self.metrics_rows = 0
        self.rng_state: dict[str, Any] | None = None
        if checkpoint is not None:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            if checkpoint.get("scaler"):
                self.scaler.load_state_dict(checkpoint["scaler"])
            self.step = int(checkpoint["step"])
            self.elapsed = float(checkpoint.get("elapsed_s", 0.0))
            self.metrics_rows = int(checkpoint.get("metrics_rows", 0))
            self.rng_state = checkpoint["rng"]
        self.saved_step = self.step if checkpoint is not None else -1
        # First step whose loss was not finite (-1: none); updated on the device, read at log / save time.
        self.bad_step = torch.tensor(-1, device=self.device)

    def training_state(self) -> dict[str, Any]:
        """The shared part of a checkpoint: optimiser, scaler, RNG states, counters."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": capture_rng_state(),
            "metrics_rows": self.metrics_rows,
            "elapsed_s": self.elapsed,
        }

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss, scaled for accumulation (and fp16)."""
        self.scaler.scale(loss / self.cfg.train.accum_steps).backward()

    def update(self) -> float:
        """Learning rate of this step, gradient clipping, optimiser step, scaler update; returns the lr."""
        lr = float(self.lr_schedule[self.step])
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        if self.cfg.train.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.params, self.cfg.train.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def advance(self, loss: torch.Tensor) -> None:
        """Count the step and remember it (on the device, no sync) if its loss was not finite."""
        self.step += 1
        self.bad_step = torch.where((self.bad_step < 0) & ~torch.isfinite(loss), self.step, self.bad_step)

    def check_finite(self) -> None:
        """Raise if any step so far had a non-finite loss (one host sync)."""
        bad = int(self.bad_step.item())
        if bad >= 0:
            last = self.paths.last if self.paths.last.is_file() else "none (no checkpoint was written)"
            raise DeconError(f"non-finite loss at {self.unit} {bad}; the last good checkpoint is {last}")

    def save(self, numbered: bool) -> None:
        """Write ``last.ckpt`` (and the numbered checkpoint); never from a non-finite state."""
        self.check_finite()
        state = self._state()
        if numbered:
            path = save_checkpoint(state, self.paths.step_checkpoint(self.step))
            copy_checkpoint(path, self.paths.last)
        else:
            save_checkpoint(state, self.paths.last)
        self.saved_step = self.step

    def _state(self) -> dict[str, Any]:  # pragma: no cover - provided by the subclass
        raise NotImplementedError
