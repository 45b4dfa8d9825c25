"""What the pre-training and fine-tuning loops share: the loop, optimiser step, finite-loss guard, checkpoints.

A subclass sets up ``cfg``, ``paths`` (:class:`~decon_med.engine.pretrain.RunPaths`), ``device``, ``params``,
``optimizer``, ``lr_schedule``, ``stop`` (last step of this session) and ``total`` (last step of the schedule),
wraps its module with :meth:`TrainingSession.wrap_model` (DDP under torchrun, optional SyncBN and
``torch.compile``), calls :meth:`TrainingSession.init_session`, and implements ``_state()`` (what its checkpoints
hold), ``_micro_batches()``, ``_optimizer_step(batches) -> (loss parts, scalars)`` and ``_log_row(meter, scalars)``.
:meth:`TrainingSession.run_loop` then runs the steps, logs, and writes checkpoints.

Under torchrun every process runs the same steps on its share of each global batch; DDP averages the gradients.
Only rank 0 shows the progress bar and writes metrics and checkpoints; logged losses are means over processes;
checkpoints hold the random-generator state of every rank, so a resume with the same number of processes is exact.

Example:
    >>> class MyRun(TrainingSession):
    ...     def _state(self): return {"step": self.step, **self.training_state()}
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from decon_med import distributed
from decon_med.engine.checkpoint import (
    capture_rng_state,
    copy_checkpoint,
    nonfinite_tensors,
    restore_rng_state,
    save_checkpoint,
)
from decon_med.errors import ConfigError, DataError, DeconError, find_error

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device | str, amp: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``train.amp`` (``none``, ``bf16``, ``fp16``) on ``device``."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=AMP_DTYPES[amp])


def check_world_size(checkpoint: dict[str, Any], root: Any) -> None:
    """Raise unless ``checkpoint`` was written by as many processes as are running now."""
    saved = int(checkpoint.get("world_size", 1))
    if saved != distributed.world_size():
        raise DeconError(
            f"{root}: cannot resume, the run was trained with {saved} process(es) and "
            f"{distributed.world_size()} are running; resume with the same number"
        )


def check_compile(train: Any, device: torch.device | str | None = None) -> None:
    """Refuse ``train.compile`` without a CUDA device (``device``, else any): on CPU the one-off compile runs for
    so long that the run seems to hang."""
    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if train.compile and not on_cuda:
        raise ConfigError(
            "train.compile needs a CUDA device and none is in use here (on CPU the one-off compile takes so "
            "long the run seems to hang); set train.compile=false"
        )


class IntervalMeter:
    """Sums of the loss parts since the last log step, kept on the device until :meth:`collect`.

    Example:
        >>> meter = IntervalMeter(step=0); meter.add({"loss": torch.tensor(2.0)}); meter.collect(step=1)[0]
        {'loss': 2.0}
    """

    def __init__(self, step: int):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.since_step = step
        self.since_time = time.perf_counter()

    def add(self, parts: dict[str, torch.Tensor]) -> None:
        for key, value in parts.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.count += 1

    def restart_clock(self) -> None:
        """Leave the time just spent (e.g. validation) out of the next throughput figure."""
        self.since_time = time.perf_counter()

    def collect(self, step: int) -> tuple[dict[str, float], int, float]:
        """Means since the last call (over processes too; one host sync), steps and seconds elapsed; then start a
        new interval. Under torchrun every process must call it at the same step."""
        keys = list(self.sums)
        values = []
        if keys:
            stacked = torch.stack([self.sums[k] for k in keys]) / max(self.count, 1)
            values = distributed.all_reduce_mean(stacked).tolist()
        now = time.perf_counter()
        result = (dict(zip(keys, values, strict=True)), step - self.since_step, now - self.since_time)
        self.sums, self.count, self.since_step, self.since_time = {}, 0, step, now
        return result


class TrainingSession:
    """Mixin holding the step counter, the gradient scaler and the finite-loss guard of a training run."""

    #: Word used in messages for one optimiser step ("step" or "iteration").
    unit = "step"
    #: Unit shown by the progress bar.
    bar_unit = "step"

    def wrap_model(self, module: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
        """The callable used for forward passes: ``module`` itself in one process; under torchrun wrapped in
        DistributedDataParallel (after SyncBN conversion with ``train.sync_bn``); compiled with ``train.compile``.

        ``module`` keeps its parameters and state-dict keys, so checkpoints are the same in every setting.
        """
        train = self.cfg.train
        model = module
        if distributed.is_distributed():
            if train.sync_bn:
                if self.device.type != "cuda":
                    raise ConfigError("config key 'train.sync_bn': SyncBatchNorm needs CUDA devices")
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=device_ids, find_unused_parameters=find_unused_parameters
            )
        if train.compile:
            check_compile(train, self.device)
            model = torch.compile(model)
        self.model = model
        self.module = module
        return model

    def micro_batch_context(self, index: int) -> contextlib.AbstractContextManager:
        """Gradient synchronisation only on the last of the ``accum_steps`` micro-batches (DDP ``no_sync``)."""
        ddp = getattr(self.model, "_orig_mod", self.model)
        if index < self.cfg.train.accum_steps - 1 and hasattr(ddp, "no_sync"):
            return ddp.no_sync()
        return contextlib.nullcontext()

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
            check_world_size(checkpoint, self.paths.root)
            ranks = checkpoint.get("rng_ranks")
            self.rng_state = ranks[distributed.rank()] if ranks else checkpoint["rng"]
        self.saved_step = self.step if checkpoint is not None else -1
        # First step whose loss was not finite (-1: none); updated on the device, read at log / save time.
        self.bad_step = torch.tensor(-1, device=self.device)

    def training_state(self) -> dict[str, Any]:
        """The shared part of a checkpoint: optimiser, scaler, RNG states (of every rank), counters.

        Under torchrun every process must call it (the RNG states are gathered).
        """
        rng_ranks = distributed.all_gather_objects(capture_rng_state())
        return {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": rng_ranks[0],
            "rng_ranks": rng_ranks if len(rng_ranks) > 1 else None,
            "world_size": distributed.world_size(),
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
        """Raise if any step so far had a non-finite loss on any process (one host sync)."""
        bad = int(distributed.all_reduce_max(self.bad_step).item())
        if bad >= 0:
            last = self.paths.last if self.paths.last.is_file() else "none (no checkpoint was written)"
            raise DeconError(f"non-finite loss at {self.unit} {bad}; the last good checkpoint is {last}")

    def check_weights(self) -> None:
        """Raise if any parameter or buffer (e.g. BatchNorm running statistics) of the module holds NaN or inf on
        any process (one host sync); a checkpoint is written or named good only after this check."""
        state = self.module.state_dict()
        tensors = [t for t in state.values() if t.is_floating_point()]
        if not tensors:
            return
        finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
        bad = distributed.all_reduce_max((~finite).to(torch.int32).reshape(1))
        if int(bad.item()) == 0:
            return
        names = nonfinite_tensors(state)
        example = f", e.g. {names[0]}" if names else " on another process"
        last = self.paths.last if self.paths.last.is_file() else "none (no checkpoint was written)"
        raise DeconError(
            f"non-finite weights at {self.unit} {self.step} ({len(names)} tensor(s){example}); "
            f"the last good checkpoint is {last}; lower train.lr or set train.clip_grad"
        )

    def save(self, numbered: bool) -> None:
        """Write ``last.ckpt`` (and the numbered checkpoint); never from a state whose loss, parameters or buffers
        are not finite. Rank 0 writes."""
        self.check_finite()
        self.check_weights()
        state = self._state()
        if distributed.is_main_process():
            if numbered:
                path = save_checkpoint(state, self.paths.step_checkpoint(self.step))
                copy_checkpoint(path, self.paths.last)
                self._drop_old_checkpoints()
            else:
                save_checkpoint(state, self.paths.last)
        distributed.barrier()
        self.saved_step = self.step

    def _drop_old_checkpoints(self) -> None:
        """Delete the numbered checkpoints beyond the newest ``train.keep_checkpoints``."""
        keep = self.cfg.train.keep_checkpoints
        if keep is not None:
            for old in self.paths.numbered_checkpoints()[:-keep]:
                old.unlink(missing_ok=True)

    def run_loop(self, progress: bool) -> None:
        """Optimiser steps up to ``self.stop``: log every ``log_every``, checkpoint every ``ckpt_every`` and at the end."""
        from decon_med.engine.pretrain import MetricsLogger

        main = distributed.is_main_process()
        resumed = self.step if self.saved_step >= 0 else None
        logger = MetricsLogger(self.paths, resumed_step=resumed, cfg=self.cfg) if main else None
        self._open_logs(resumed)
        bar = tqdm(
            total=self.stop,
            initial=self.step,
            disable=not (progress and main),
            unit=self.bar_unit,
            dynamic_ncols=True,
        )
        batches = self._micro_batches()
        if self.rng_state is not None:
            restore_rng_state(self.rng_state)
        meter = IntervalMeter(self.step)
        session_start, elapsed_before = time.perf_counter(), self.elapsed
        try:
            self._steps(batches, bar, logger, meter, session_start, elapsed_before)
        except Exception as exc:
            found = find_error(exc)
            if isinstance(found, DataError):  # a bad file met mid-run: say how to continue once it is fixed
                raise DataError(f"{found}; {self.stopped_hint()}") from exc
            raise
        finally:
            batches.close()
            bar.close()
            if logger is not None:
                logger.close()

    def stopped_hint(self) -> str:
        """Where a run stopped by a bad file stands, and how to continue it."""
        if self.paths.last.is_file():
            kept = f"its last checkpoint {self.paths.last} is kept"
        else:
            kept = "no checkpoint was written yet"
        return (
            f"the run stopped at {self.unit} {self.step} ({kept}); fix or remove the file, then pass --resume"
        )

    def _steps(self, batches, bar, logger, meter, session_start: float, elapsed_before: float) -> None:
        """The steps of :meth:`run_loop`: log, validate (subclass hook), checkpoint."""
        train = self.cfg.train
        while self.step < self.stop:
            parts, scalars = self._optimizer_step(batches)
            meter.add(parts)
            bar.update(1)
            if self.step % train.log_every == 0 or self.step == self.total:
                self.check_finite()
                row = self._log_row(meter, scalars)
                if logger is not None:
                    logger.write(row)
                    self.metrics_rows = logger.rows
                bar.set_postfix(self._postfix(row))
            wants_save = self._after_step(logger, meter)
            self.elapsed = elapsed_before + time.perf_counter() - session_start
            if self.step % train.ckpt_every == 0:
                self.save(numbered=True)
            elif wants_save:
                self.save(numbered=False)
        if self.saved_step != self.step:
            self.save(numbered=False)

    # -- hooks -------------------------------------------------------------------------------------------------------
    def _open_logs(self, resumed_step: int | None) -> None:
        """Open logs of the subclass's own (called once per session)."""

    def _after_step(self, logger: Any, meter: IntervalMeter) -> bool:
        """Work after a step's logging (e.g. validation; ``logger`` is None on ranks other than 0); True asks for
        ``last.ckpt`` to be written now, and must be the same on every rank."""
        return False

    def _postfix(self, row: dict[str, float]) -> dict[str, str]:
        """What the progress bar shows after a log step."""
        return {"loss": f"{row['loss']:.4f}", "img_s": f"{row['img_s']:.1f}"}

    def _state(self) -> dict[str, Any]:  # pragma: no cover - provided by the subclass
        raise NotImplementedError

    def _micro_batches(self) -> Iterator[dict]:  # pragma: no cover - provided by the subclass
        raise NotImplementedError

    def _optimizer_step(self, batches: Iterator[dict]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        raise NotImplementedError  # pragma: no cover - provided by the subclass

    def _log_row(self, meter: IntervalMeter, scalars: dict[str, Any]) -> dict[str, float]:
        raise NotImplementedError  # pragma: no cover - provided by the subclass
