"""The method-agnostic pre-training loop: data, optimisation, logging, checkpoints and bit-exact resume.

A run folder (``cfg.out_dir``) holds::

    config.yaml        the resolved config
    metrics.csv        one row per log step: step, epoch, loss parts, after-step scalars, lr, img_s
    tb/                TensorBoard events with the same scalars
    checkpoints/       step_0001000.ckpt every train.ckpt_every optimiser steps (the newest train.keep_checkpoints)
    last.ckpt          the newest checkpoint (written with every numbered one and at the end)
    done.json          final step, wall time and throughput, once the run has finished

The engine knows nothing about the method: it calls ``forward(batch)``, ``after_step(step, total_steps)``,
``trainable_parameters()`` and ``state_dict()`` (see :class:`decon_med.ssl.base.SSLMethod`). ``after_step`` gets
the 0-based index of the optimiser step just taken (0 after the first step, as DINO / SlotCon index their
schedules); checkpoints, metrics and ``max_steps`` count completed steps (1 after the first step).

Resuming is bit-exact on CPU: the shuffle order of an epoch depends only on (seed, epoch), augmentations only on
(seed, epoch, sample id), DataLoaders use their own generators, and the global generators (dropout) are saved in
every checkpoint. A run resumed from step k ends with exactly the parameters of an uninterrupted run.

Example:
    >>> cfg = load_config("configs/pretrain/decon_ml.yaml", ["data.root=/data/scans", "out_dir=runs/ml"])
    >>> run = pretrain(cfg)                       # later: pretrain(cfg, resume=True) after an interruption
    >>> sorted(p.name for p in run.iterdir())
    ['checkpoints', 'config.yaml', 'done.json', 'last.ckpt', 'metrics.csv', 'tb']
"""

from __future__ import annotations

import csv
import io
import json
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.data import DataLoader
from torch import nn
from tqdm.auto import tqdm

from decon_med import distributed
from decon_med.config import PretrainConfig, save_config, to_dict
from decon_med.data.datasets import build_dataset
from decon_med.data.stream import EpochPositions, PassStream
from decon_med.engine.loop import IntervalMeter, TrainingSession, autocast, check_compile, check_world_size
from decon_med.engine.optim import build_optimizer, cosine_schedule, scaled_lr
from decon_med.engine.probe import OnlineProbe, ProbeLog
from decon_med.engine.run_folder import (  # noqa: F401  (check_resumable, RESUMABLE_KEYS: public here too)
    RESUMABLE_KEYS,
    check_resumable,
    prepare_run_folder,
    resume_is_noop,
    run_folder_lock,
)
from decon_med.engine.tracking import check_loggers, finish_run
from decon_med.errors import DeconError
from decon_med.folders import Manifest, atomic_write, make_folder, record_new_files, record_written
from decon_med.models.network import set_checkpointing
from decon_med.ssl.health import ENTROPY_SIGNAL, STD_SIGNAL, HealthWatchdog
from decon_med.summary import print_summary

if TYPE_CHECKING:
    from decon_med.ssl.base import SSLMethod

#: Autocast dtype of each ``train.amp`` setting other than ``none``.


@dataclass(frozen=True)
class RunPaths:
    """The files of a run folder.

    Example:
        >>> RunPaths(Path("runs/ml")).step_checkpoint(1000)
        PosixPath('runs/ml/checkpoints/step_0001000.ckpt')
    """

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def tb(self) -> Path:
        return self.root / "tb"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last(self) -> Path:
        return self.root / "last.ckpt"

    @property
    def done(self) -> Path:
        return self.root / "done.json"

    def step_checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:07d}.ckpt"

    def numbered_checkpoints(self) -> list[Path]:
        """The numbered checkpoints the run wrote (recorded in its manifest), oldest first; a user's file in
        ``checkpoints/`` is never one of them."""
        if not self.checkpoints.is_dir():
            return []
        recorded = Manifest(self.root).entries()
        return sorted(
            p for p in self.checkpoints.glob("step_*.ckpt") if f"{self.checkpoints.name}/{p.name}" in recorded
        )


@dataclass(frozen=True)
class Plan:
    """Step counts of a run.

    Attributes:
        steps_per_epoch: optimiser steps per epoch (``len(dataset) // batch_size``).
        total_steps: length of the schedules, ``epochs * steps_per_epoch``.
        stop_step: the run stops after this many optimiser steps (``total_steps`` unless ``max_steps`` is less).
        micro_batch: images per forward pass (``batch_size // accum_steps``).
    """

    steps_per_epoch: int
    total_steps: int
    stop_step: int
    micro_batch: int


def pretrain(
    cfg: PretrainConfig,
    resume: bool = False,
    overwrite: bool = False,
    method: SSLMethod | None = None,
    progress: bool = True,
    max_steps: int | None = None,
    summary: bool | None = None,
) -> Path:
    """Pre-train ``method`` (default ``decon_med.ssl.build_method(cfg)``) on the training images of ``cfg``.

    Args:
        cfg: resolved pre-training config; the run folder is ``cfg.out_dir``.
        resume: continue the run in ``cfg.out_dir`` from its ``last.ckpt`` (``train.epochs`` may be extended).
        overwrite: delete the run already in ``cfg.out_dir`` first.
        method: a ready-built method; ``None`` builds the one named by ``cfg.ssl.method``.
        progress: show a progress bar.
        max_steps: stop after this many optimiser steps in total (the schedules still span ``train.epochs``);
            the run stays unfinished and can be resumed.
        summary: print the run summary (:mod:`decon_med.summary`) at start; default: with ``progress``.

    Returns:
        The run folder.

    Raises:
        DeconError: the folder holds a run and neither ``resume`` nor ``overwrite`` was given, the resumed config
            differs, the dataset is smaller than one batch, or the loss became non-finite.

    Example:
        >>> pretrain(load_config("configs/pretrain/slotcon.yaml", ["out_dir=runs/s"]), max_steps=100)
        PosixPath('runs/s')
    """
    check_compile(cfg.train)  # before any work
    check_loggers(cfg.train)
    paths = RunPaths(Path(cfg.out_dir))
    with run_folder_lock(paths.root, "pretrain"):
        if resume_is_noop(paths, cfg, resume=resume, overwrite=overwrite):
            return paths.root
        checkpoint = prepare_run_folder(paths, cfg, resume=resume, overwrite=overwrite)
        _run(cfg, paths, checkpoint, method, progress, max_steps, summary)
    return paths.root


def _run(
    cfg: PretrainConfig,
    paths: RunPaths,
    checkpoint: dict[str, Any] | None,
    method: SSLMethod | None,
    progress: bool,
    max_steps: int | None,
    summary: bool | None,
) -> None:
    """The body of :func:`pretrain` once the run folder is locked and ready."""
    dataset = build_dataset(cfg, "train", "pretrain")
    plan = make_plan(cfg, len(dataset), max_steps)
    if (progress if summary is None else summary) and distributed.is_main_process():
        print_summary(
            "pretrain",
            cfg,
            {"train": dataset.data},
            steps=f"{plan.stop_step} of {plan.total_steps} ({cfg.train.epochs} epochs x {plan.steps_per_epoch})",
        )
    if checkpoint is None:
        seed_everything(cfg.seed)
    if method is None:
        from decon_med.ssl import build_method

        method = build_method(cfg)
    if distributed.is_main_process():
        images_per_epoch = plan.steps_per_epoch * cfg.train.batch_size * distributed.world_size()
        for message in method.check_data(images_per_epoch):
            print(f"warning: {message}", file=sys.stderr)
    run = _Run(cfg, paths, plan, dataset, method, checkpoint)
    if distributed.is_main_process():
        save_config(cfg, paths.config)
        from decon_med.data.check import write_modalities  # each volume's modality and how it was decided
        from decon_med.data.layouts import slice_options

        write_modalities(paths.root / "modalities.csv", {"train": dataset.data}, slice_options(cfg.data))
    run.train(progress)


def make_plan(cfg: PretrainConfig, dataset_size: int, max_steps: int | None = None) -> Plan:
    """Step counts of a run over ``dataset_size`` images (whole batches only)."""
    train = cfg.train
    global_batch = train.batch_size * distributed.world_size()
    steps_per_epoch = dataset_size // global_batch
    if steps_per_epoch == 0:
        raise DeconError(
            f"{cfg.data.root}: the training set has {dataset_size} images, fewer than one global batch "
            f"(train.batch_size={train.batch_size} x {distributed.world_size()} process(es))"
        )
    total = train.epochs * steps_per_epoch
    stop = total if max_steps is None else min(total, max_steps)
    return Plan(steps_per_epoch, total, stop, train.batch_size // train.accum_steps)


def seed_everything(seed: int) -> None:
    """Seed the torch, numpy and Python global generators."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class _Run(TrainingSession):
    """One training session of a run folder: builds the optimiser, restores a checkpoint, runs the steps."""

    def __init__(
        self,
        cfg: PretrainConfig,
        paths: RunPaths,
        plan: Plan,
        dataset,
        method: SSLMethod,
        checkpoint: dict[str, Any] | None,
    ):
        self.cfg, self.paths, self.plan, self.dataset = cfg, paths, plan, dataset
        self.device = distributed.device()
        train = cfg.train
        self.method = method.to(self.device)
        set_checkpointing(self.method.network, train.checkpointing)  # student only; the teacher runs no_grad
        if train.channels_last:
            self.method.to(memory_format=torch.channels_last)
        self.method.train()
        base_lr = scaled_lr(train.lr, train.batch_size, world_size=distributed.world_size())
        self.lr_schedule = cosine_schedule(
            base_lr, train.min_lr, plan.total_steps, round(train.warmup_epochs * plan.steps_per_epoch)
        )
        self.params = [p for _, p in method.trainable_parameters()]
        self.optimizer = build_optimizer(train, method.trainable_parameters(), base_lr)
        if checkpoint is not None:
            self._load(checkpoint)
        # Heads that a configuration leaves out of the loss (e.g. alpha = 0) and the segmentation head, which
        # pre-training never runs, get no gradient: DDP has to look for unused parameters.
        self.wrap_model(self.method, find_unused_parameters=True)
        if checkpoint is None and distributed.world_size() > 1:
            torch.manual_seed(
                cfg.seed + 7919 * distributed.rank()
            )  # own dropout / masking stream per process
        self.stop, self.total = plan.stop_step, plan.total_steps
        self.init_session(checkpoint)

    # -- state ---------------------------------------------------------------------------------------------------
    def _load(self, checkpoint: dict[str, Any]) -> None:
        check_world_size(checkpoint, self.paths.root)
        if checkpoint.get("steps_per_epoch", self.plan.steps_per_epoch) != self.plan.steps_per_epoch:
            raise DeconError(
                f"{self.paths.root}: cannot resume, the training set changed size "
                f"({checkpoint['steps_per_epoch']} steps per epoch saved, {self.plan.steps_per_epoch} now)"
            )
        self.method.load_state_dict(checkpoint["method"])

    def _state(self) -> dict[str, Any]:
        epoch, batch_in_epoch = divmod(self.step, self.plan.steps_per_epoch)
        return {
            "method": self.method.state_dict(),
            "step": self.step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "steps_per_epoch": self.plan.steps_per_epoch,
            "config": to_dict(self.cfg),
            "network_meta": network_meta(self.cfg, self.method),
            **self.training_state(),
        }

    # -- data ----------------------------------------------------------------------------------------------------
    def _micro_batches(self) -> Iterator[dict]:
        """Micro-batches from the current step to the stop step, from one loader whose workers serve every epoch
        (skipped images are never loaded)."""
        positions = EpochPositions(
            self.step, self.stop, self.plan.steps_per_epoch, self.cfg.train.batch_size, len(self.dataset)
        )
        loader = DataLoader(
            PassStream(self.dataset, self.cfg.seed),
            batch_size=self.plan.micro_batch,
            sampler=positions,
            shuffle=False,
            num_workers=self.cfg.data.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )
        yield from loader

    def _to_device(self, batch: dict) -> dict:
        out = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device, non_blocking=True)
                if self.cfg.train.channels_last and value.ndim == 4:
                    value = value.contiguous(memory_format=torch.channels_last)
            out[key] = value
        return out

    # -- one optimiser step --------------------------------------------------------------------------------------
    def _optimizer_step(self, batches: Iterator[dict]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Forward / backward over ``accum_steps`` micro-batches, then clip, step and ``after_step``.

        Returns the step's loss parts (means over the micro-batches, still on the device) and after_step's dict.
        """
        train = self.cfg.train
        parts: dict[str, torch.Tensor] = {}
        # Health signals are computed (no gradient) in the last micro-batch of a step that is logged.
        logged = (self.step + 1) % train.log_every == 0 or self.step + 1 == self.plan.total_steps
        for index in range(train.accum_steps):
            batch = self._to_device(next(batches))
            self.method.record_health = logged and index == train.accum_steps - 1
            with self.micro_batch_context(index):
                with autocast(self.device, train.amp):
                    out = self.model(batch)
                self.backward(out["loss"])
            for key, value in out.items():
                share = value.detach().float() / train.accum_steps
                parts[key] = parts[key] + share if key in parts else share
        self.method.record_health = False
        self.health = self.method.health() if logged else {}
        lr = self.update()
        extra = self.method.after_step(self.step, self.plan.total_steps)
        self.advance(parts["loss"])
        return parts, {**(extra or {}), "lr": lr}

    # -- the loop ------------------------------------------------------------------------------------------------
    def train(self, progress: bool) -> None:
        """Run up to ``plan.stop_step``; write ``done.json`` once the whole schedule is done."""
        if self.step < self.plan.stop_step:
            if distributed.is_main_process():
                self.paths.done.unlink(missing_ok=True)
            self.run_loop(progress)
        if self.step >= self.plan.total_steps and distributed.is_main_process():
            self._finish()

    def _log_row(self, meter: IntervalMeter, extra: dict[str, Any]) -> dict[str, float]:
        epoch = (self.step - 1) // self.plan.steps_per_epoch
        means, steps, seconds = meter.collect(self.step)
        means = {"loss": means.pop("loss"), **means}
        img_s = steps * self.cfg.train.batch_size * distributed.world_size() / max(seconds, 1e-9)
        scalars = {key: float(value) for key, value in extra.items()}
        health = self._collect_health()
        return {"step": self.step, "epoch": epoch, **means, **scalars, **health, "img_s": img_s}

    # -- health signals and the online probe (logging only) ---------------------------------------------------------
    def _collect_health(self) -> dict[str, float]:
        """The method's health signals of this log step (means over processes) and the watchdog's warnings."""
        health = getattr(self, "health", {})
        if not health:
            return {}
        keys = list(health)
        values = distributed.all_reduce_mean(torch.stack([health[k].float() for k in keys])).tolist()
        signals = dict(zip(keys, values, strict=True))
        if distributed.is_main_process():
            for message in self.watchdog.update(self.step, signals):
                tqdm.write(message, file=sys.stderr)
        return signals

    def _open_logs(self, resumed_step: int | None) -> None:
        self.watchdog = HealthWatchdog(self.cfg.train.health_patience)
        self.probe: OnlineProbe | None = None
        self.probe_scores: dict[str, float] = {}
        self.pending_probe: list[tuple[int, dict[str, float]]] = []
        if self.cfg.probe.root is not None and distributed.is_main_process():
            self.probe = OnlineProbe(self.cfg, self.device)
            self.probe_log = ProbeLog(self.paths.root / "probe.csv", resumed_step)
            if resumed_step is None:
                self._run_probe(None)  # the untrained network: the baseline the later probes are read against

    def _after_step(self, logger: MetricsLogger | None, meter: IntervalMeter) -> bool:
        """The online probe every ``probe.every`` steps and at the end of the session (rank 0; the others wait
        at the next gradient synchronisation); its time is left out of the throughput."""
        if self.probe is not None and (self.step % self.cfg.probe.every == 0 or self.step == self.stop):
            self._run_probe(logger)
            meter.restart_clock()
        return False

    def _run_probe(self, logger: MetricsLogger | None) -> None:
        network = getattr(self.method, self.method.export_prefix.rstrip("."))
        self.probe_scores = self.probe(network)
        self.probe_log.write(self.step, self.probe_scores)
        self.pending_probe.append((self.step, self.probe_scores))
        if logger is not None:
            for step, scores in self.pending_probe:
                for key in ("enc_mIoU", "dec_mIoU"):
                    logger.tb.add_scalar(f"probe/{key}", scores[key], step)
                logger.track({f"probe/{key}": value for key, value in scores.items()}, step)
            self.pending_probe = []

    def _postfix(self, row: dict[str, float]) -> dict[str, str]:
        """Loss, the weakest level's spread (``std``, min of ``*_z_std``) and the most uniform teacher assignment
        (``ent``, max of ``*_entropy``), the latest probe mIoU (decoder / encoder), throughput."""
        post = {"loss": f"{row['loss']:.4f}"}
        stds = [v for k, v in row.items() if k.endswith(f"_{STD_SIGNAL}")]
        entropies = [v for k, v in row.items() if k.endswith(f"_{ENTROPY_SIGNAL}")]
        if stds:
            post["std"] = f"{min(stds):.2f}"
        if entropies:
            post["ent"] = f"{max(entropies):.2f}"
        if self.probe_scores:
            post["probe"] = f"{self.probe_scores['dec_mIoU']:.2f}/{self.probe_scores['enc_mIoU']:.2f}"
        post["img_s"] = f"{row['img_s']:.1f}"
        return post

    def _finish(self) -> None:
        images = self.step * self.cfg.train.batch_size * distributed.world_size()
        done = {
            "step": self.step,
            "epochs": self.cfg.train.epochs,
            "images": images,
            "wall_time_s": round(self.elapsed, 3),
            "img_s": round(images / max(self.elapsed, 1e-9), 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        atomic_write(self.paths.done, json.dumps(done, indent=1) + "\n")
        finish_run(self.cfg, self.paths.root, {}, self.step)


class MetricsLogger:
    """Appends rows to ``metrics.csv`` (columns fixed by the first row) and scalars to TensorBoard and the tracker
    of ``train.loggers`` (:mod:`decon_med.engine.tracking`; ``cfg=None``: CSV and TensorBoard).

    On resume, rows past the resumed step are dropped and TensorBoard events past it are purged.

    Example:
        >>> log = MetricsLogger(RunPaths(Path("runs/x")), resumed_step=None)
        >>> log.write({"step": 10, "epoch": 0, "loss": 1.5, "lr": 0.1, "img_s": 80.0}); log.close()
    """

    def __init__(self, paths: RunPaths, resumed_step: int | None, cfg: Any = None):
        from torch.utils.tensorboard import SummaryWriter

        from decon_med.engine import tracking

        loggers = cfg.train.loggers if cfg is not None else ("csv", "tensorboard")
        self.tracker = tracking.open_tracker(cfg, paths.root, resumed=resumed_step is not None)
        if self.tracker is not None:
            tracking.log_config_params(self.tracker, cfg)
        self.path = paths.metrics
        self.columns: list[str] | None = None
        self.rows = 0
        if resumed_step is not None and self.path.is_file():
            self.columns, self.rows = _truncate_csv(self.path, resumed_step)
        elif self.path.exists():
            self.path.unlink()
        record_written(self.path)
        self.file = open(self.path, "a", newline="")
        self.writer: csv.DictWriter | None = None
        if self.columns:
            self.writer = csv.DictWriter(self.file, self.columns, extrasaction="ignore")
        if "tensorboard" not in loggers:
            self.tb = tracking.NullWriter()
            return
        purge = resumed_step + 1 if resumed_step is not None else None
        make_folder(paths.tb)
        before = set(paths.tb.iterdir())
        self.tb = SummaryWriter(log_dir=str(paths.tb), purge_step=purge)
        self.tb.flush()
        record_new_files(paths.tb, before)  # TensorBoard names its event files itself

    def write(self, row: dict[str, float]) -> None:
        """One CSV row and one TensorBoard scalar per column (except step and epoch)."""
        if self.writer is None:
            self.columns = list(row)
            self.writer = csv.DictWriter(self.file, self.columns, extrasaction="ignore")
            self.writer.writeheader()
        self.writer.writerow(row)
        self.file.flush()
        self.rows += 1
        for key, value in row.items():
            if key != "step":
                self.tb.add_scalar(key, value, int(row["step"]))
        self.track(row, int(row["step"]))

    def track(self, values: dict[str, float], step: int) -> None:
        """``values`` to the tracker of ``train.loggers`` (MLflow), if any."""
        if self.tracker is not None:
            self.tracker.log_metrics(values, step)

    def close(self) -> None:
        self.file.close()
        self.tb.close()
        if self.tracker is not None:
            self.tracker.close()


def _truncate_csv(path: Path, last_step: int) -> tuple[list[str] | None, int]:
    """Keep the rows of ``path`` with ``step <= last_step``; returns the header and the number of rows kept."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames
        rows = [row for row in reader if row.get("step") and int(float(row["step"])) <= last_step]
    if not columns:
        path.unlink()
        return None, 0
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, text.getvalue())
    return list(columns), len(rows)


def network_meta(cfg: PretrainConfig, method: SSLMethod) -> dict[str, Any]:
    """What is needed to rebuild the exported network: arch, encoder, in_channels, classes and the method state's
    prefix of its weights (``network.`` for the student, ``teacher.`` for the EMA teacher)."""
    head = getattr(method.network, "segmentation_head", None)
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)] if head is not None else []
    return {
        "arch": cfg.model.arch,
        "encoder": cfg.model.encoder,
        "in_channels": cfg.data.in_channels,
        "classes": convs[-1].out_channels if convs else 1,
        "state_prefix": method.export_prefix,
    }
