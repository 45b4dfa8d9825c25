"""Fine-tuning on a label fraction: poly-decayed SGD for a fixed number of iterations, validation, test.

A run folder (``cfg.out_dir``) holds::

    config.yaml        the resolved config
    train_ids.json     the training images used (seeded, nested across fractions, the same for every init)
    init_report.json   which tensors were loaded from ``init`` and which are fresh
    metrics.csv        one row per log step: step (iteration), epoch (passes over the subset), loss, lr, img_s
    val.csv            one row per validation: iter, mIoU, mDice, aAcc (case_dice when selecting on it), IoU
    modalities.csv     volume runs: each file's modality and how it was decided (declared / auto and why)
    tb/                TensorBoard events of both
    checkpoints/       step_0000500.ckpt every train.ckpt_every iterations (the newest train.keep_checkpoints)
    last.ckpt          the newest state (written with every numbered checkpoint, every validation, and at the end)
    best.ckpt          train.select=best: the weights with the highest val train.select_metric (earliest on ties)
    postprocessing.json  volume runs: per class, whether keeping the largest 3D component raised the selected
                       checkpoint's mean per-case val Dice (both Dice values recorded; see decon_med.engine.postprocess)
    results.json       the selected checkpoint's val and test scores, once the run has finished
    done.json          final iteration and wall time, once the run has finished

Every checkpoint is a fine-tuning checkpoint of :mod:`decon_med.engine.model_io` (``load_segmentation_model``
and ``decon-med evaluate`` read it); ``last.ckpt`` and the numbered ones also hold the training state. With
``train.prune_finished`` (set by experiment grids) a finished run keeps only the selected weights: ``best.ckpt``,
or ``last.ckpt`` without its training state, and no numbered checkpoints; such a run cannot be resumed.

**Data.** The training images are ``split_fraction(train, fraction, seed)``. They are read as an endless stream
of passes: pass ``p`` visits the subset in the order ``epoch_order(seed, p, n)`` with the augmentations of epoch
``p``, and iteration ``i`` takes stream positions ``[i * batch_size, (i + 1) * batch_size)``. Batches are
always full and may straddle two passes, so a subset smaller than a batch (5 % of a small dataset) simply
repeats within a batch, each repeat differently augmented; every image is seen equally often.

**Resume** is bit-exact on CPU, as for pre-training: the batch of an iteration depends only on (seed, iteration),
and the optimiser, scaler, generator states, best score and last validation are in every checkpoint.

**Selection.** ``train.select_metric`` (``auto``: ``case_dice`` when the val split holds NIfTI cases, else
``miou``) is resolved once, when the run starts, and recorded with the best score in every checkpoint, so a
resumed run selects the same way (a checkpoint written before the key existed selected on ``miou``).

**Recipes** (:mod:`decon_med.engine.recipes`, all off by default): per-part learning-rate multipliers
(``train.lr_mult``), a frozen warm-up (``train.freeze``), the transferred BatchNorm layers' statistics and affine
parameters (``transfer_bn``, ``transfer_bn_affine``) and re-initialised decoder blocks (``reinit_decoder_blocks``).
The transfer recipes are applied once, to a new run's network (a resumed run reads its checkpoint), and recorded
under ``recipes`` in ``init_report.json``.

Example:
    >>> cfg = load_config("configs/finetune/isic.yaml", ["data.root=/data/isic2017", "init=weights/ml",
    ...                    "transfer=encoder_decoder", "fraction=0.05", "out_dir=runs/ft/ml_5pc_s0"])
    >>> run = finetune(cfg)                       # later: finetune(cfg, resume=True) after an interruption
    >>> json.loads((run / "results.json").read_text())["test"]["mIoU"]
    0.78
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.data import DataLoader
from torch import nn
from torch.utils.data import Dataset

from decon_med import distributed
from decon_med.config import FinetuneConfig, save_config
from decon_med.data.check import write_modalities
from decon_med.data.datasets import build_dataset
from decon_med.data.layouts import get_layout, num_classes, slice_options
from decon_med.data.splits import split_fraction, write_split
from decon_med.data.stream import PassStream
from decon_med.engine.checkpoint import check_finite_state, save_checkpoint
from decon_med.engine.evaluate import class_names, evaluate_network, write_json
from decon_med.engine.loop import IntervalMeter, TrainingSession, autocast, check_compile
from decon_med.engine.model_io import load_segmentation_model, model_part, segmentation_state
from decon_med.engine.optim import build_optimizer, poly_schedule
from decon_med.engine.postprocess import POSTPROCESSING, decide_postprocessing, format_decision
from decon_med.engine.pretrain import MetricsLogger, RunPaths, seed_everything
from decon_med.engine.recipes import (
    FreezeSchedule,
    apply_transfer_recipes,
    format_recipes,
    fresh_tensors,
    lr_mult,
    recompute_bn_stats,
    reinit_prefixes,
)
from decon_med.engine.run_folder import prepare_run_folder, resume_is_noop, run_folder_lock
from decon_med.engine.tracking import check_loggers, finish_run, flat_scores
from decon_med.engine.transfer import format_report, load_init
from decon_med.engine.volume_metrics import foreground_dice
from decon_med.errors import ConfigError, DataError, DeconError, find_error
from decon_med.folders import atomic_write, record_written
from decon_med.models.network import build_network
from decon_med.summary import print_summary

#: Target value of pixels the cross-entropy loss and the metrics skip.
IGNORE_INDEX = 255


@dataclass(frozen=True)
class FinetunePaths(RunPaths):
    """The files of a fine-tuning run folder (those of :class:`RunPaths` plus the ones below).

    Example:
        >>> FinetunePaths(Path("runs/ft")).results
        PosixPath('runs/ft/results.json')
    """

    @property
    def best(self) -> Path:
        return self.root / "best.ckpt"

    @property
    def val_metrics(self) -> Path:
        return self.root / "val.csv"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def init_report(self) -> Path:
        return self.root / "init_report.json"

    @property
    def train_ids(self) -> Path:
        return self.root / "train_ids.json"


def finetune(
    cfg: FinetuneConfig,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    max_iters: int | None = None,
    summary: bool | None = None,
) -> Path:
    """Fine-tune ``cfg.model`` initialised from ``cfg.init`` on a fraction of the training images, then test.

    Args:
        cfg: resolved fine-tuning config; the run folder is ``cfg.out_dir``.
        resume: continue the run in ``cfg.out_dir`` from its ``last.ckpt``.
        overwrite: delete the run already in ``cfg.out_dir`` first.
        progress: show progress bars.
        max_iters: stop after this many iterations in total (the schedule still spans ``train.iters``); the run
            stays unfinished and can be resumed.
        summary: print the run summary (:mod:`decon_med.summary`) at start; default: with ``progress``.

    Returns:
        The run folder.

    Raises:
        DeconError: the folder holds a run and neither ``resume`` nor ``overwrite`` was given, the resumed config
            differs, ``init`` does not fit the network, a micro-batch has fewer than 2 images, or the loss became
            non-finite (the last good checkpoint stays in place).

    Example:
        >>> finetune(load_config("configs/finetune/refuge.yaml", ["out_dir=runs/ft/r", "fraction=0.25"]))
        PosixPath('runs/ft/r')
    """
    check_loggers(cfg.train)  # before any work
    paths = FinetunePaths(Path(cfg.out_dir))
    check_compile(cfg.train)  # before any work
    with run_folder_lock(paths.root, "finetune"):
        if resume_is_noop(paths, cfg, resume=resume, overwrite=overwrite):
            return paths.root
        _run(cfg, paths, resume, overwrite, progress, max_iters, summary)
    return paths.root


def _run(
    cfg: FinetuneConfig,
    paths: FinetunePaths,
    resume: bool,
    overwrite: bool,
    progress: bool,
    max_iters: int | None,
    summary: bool | None,
) -> None:
    """The body of :func:`finetune` once the run folder is locked."""
    _check_micro_batch(cfg)
    classes = num_classes(cfg.data)
    class_names(cfg, classes)  # wrong-length data.class_names stop the run before anything is written
    checkpoint = prepare_run_folder(paths, cfg, resume=resume, overwrite=overwrite)
    layout = get_layout(cfg.data)
    all_train = layout.items("train")
    subset = split_fraction(all_train, cfg.fraction, cfg.seed)
    dataset = build_dataset(cfg, "train", "train", items=subset)
    val_items = layout.items("val")
    select_metric = resolve_select_metric(cfg.train.select_metric, val_items)
    volumes = any("slice" in item for item in (*subset, *val_items))
    show = (progress if summary is None else summary) and distributed.is_main_process()
    splits = {"train": subset, "val": val_items, "test": layout.items("test")} if show or volumes else {}
    if show:
        stop = cfg.train.iters if max_iters is None else min(cfg.train.iters, max_iters)
        print_summary("finetune", cfg, splits, steps=f"{stop} of {cfg.train.iters} iterations")
    network, report = _initial_network(cfg, classes, fresh=checkpoint is None)
    run = _Run(
        cfg,
        paths,
        network,
        classes,
        dataset,
        checkpoint,
        max_iters,
        report=report,
        items=subset,
        select_metric=select_metric,
        volumes=volumes,
    )
    if distributed.is_main_process():
        save_config(cfg, paths.config)
        write_split(subset, paths.train_ids, fraction=cfg.fraction, seed=cfg.seed, n_total=len(all_train))
        if volumes:
            write_modalities(paths.root / "modalities.csv", splits, slice_options(cfg.data))
    if report is not None and distributed.is_main_process():
        write_json(paths.init_report, report)
        if progress:  # a grid of runs keeps its output to one line per run; the report is in the run folder
            print(format_report(report))
            if report.get("recipes"):
                print(format_recipes(report["recipes"]))
    run.train(progress)


def _initial_network(cfg: FinetuneConfig, classes: int, fresh: bool) -> tuple[nn.Module, dict | None]:
    """The network, seeded and initialised from ``cfg.init`` for a new run (a resumed one loads its checkpoint),
    with the transfer recipes applied (``transfer_bn=recompute`` is left to :class:`_Run`, on the device)."""
    if not fresh:
        return build_network(cfg.model, in_channels=cfg.data.in_channels, classes=classes), None
    seed_everything(cfg.seed)
    network = build_network(cfg.model, in_channels=cfg.data.in_channels, classes=classes)
    fresh_blocks = fresh_tensors(network, reinit_prefixes(network, cfg.reinit_decoder_blocks, cfg.model.arch))
    report = load_init(
        network,
        cfg.init,
        cfg.transfer,
        arch=cfg.model.arch,
        encoder=cfg.model.encoder,
        in_channels=cfg.data.in_channels,
    )
    applied = apply_transfer_recipes(network, cfg, report, fresh_blocks)
    mult = lr_mult(cfg.train)
    if mult is not None:
        applied["lr_mult"] = mult
    if cfg.train.freeze.iters > 0:
        applied["freeze"] = {"parts": list(cfg.train.freeze.parts), "iters": cfg.train.freeze.iters}
    if applied:
        report["recipes"] = applied
    return network, report


def validate(
    network: nn.Module, cfg: FinetuneConfig, classes: int, case_dice: bool = False
) -> dict[str, Any]:
    """Scores of ``network`` on the whole val split (best-checkpoint selection maximises one of them); with
    ``case_dice`` also ``case_dice``, the mean per-case 3D foreground Dice of the NIfTI val cases
    (:func:`~decon_med.engine.volume_metrics.foreground_dice`).

    Example:
        >>> validate(network, cfg, classes=3, case_dice=True)["case_dice"]
        0.71
    """
    metrics = evaluate_network(network, cfg, "val", classes, per_case=case_dice, distances=False)
    if case_dice:
        rows = metrics.pop("cases")
        metrics["case_dice"] = foreground_dice(rows, class_names(cfg, classes)[1:])
    return metrics


#: ``train.select_metric`` -> the key of :func:`validate`'s scores it maximises.
SELECT_KEYS = {"miou": "mIoU", "case_dice": "case_dice"}


def resolve_select_metric(setting: str, val_items: list[dict]) -> str:
    """``train.select_metric`` resolved for a run: ``auto`` is ``case_dice`` when the val split holds NIfTI cases
    (items with a ``slice``), else ``miou``.

    Raises:
        ConfigError: ``case_dice`` with no NIfTI case in the val split.

    Example:
        >>> resolve_select_metric("auto", layout.items("val"))     # a folder of NIfTI cases
        'case_dice'
    """
    volumes = any("slice" in item for item in val_items)
    if setting == "auto":
        return "case_dice" if volumes else "miou"
    if setting == "case_dice" and not volumes:
        raise ConfigError(
            "config key 'train.select_metric': case_dice needs NIfTI cases in the val split, which holds only 2D "
            "images; use miou (or auto)"
        )
    return setting


def selection_score(metrics: dict[str, Any], metric: str) -> float:
    """The score ``metric`` (``miou`` or ``case_dice``) of :func:`validate`'s ``metrics`` as a comparable number:
    NaN or missing rank lowest. The checkpoint with the higher score is kept (the earlier one on ties).

    Example:
        >>> a, b = {"mIoU": 0.80, "case_dice": 0.60}, {"mIoU": 0.78, "case_dice": 0.70}
        >>> max((a, b), key=lambda m: selection_score(m, "case_dice")) is b
        True
    """
    return _score(metrics.get(SELECT_KEYS[metric]))


def build_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss ``train.loss``: ``ce`` (cross-entropy, 255 ignored) or ``dice_ce`` (MONAI DiceCE on softmax).

    It is called as ``loss(logits, labels)`` with ``(B, C, H, W)`` logits and ``(B, H, W)`` class indices.

    Example:
        >>> build_loss("dice_ce")(torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.long)).shape
        torch.Size([])
    """
    if name == "ce":
        return nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    if name == "dice_ce":
        from monai.losses import DiceCELoss

        dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
        return lambda logits, labels: dice_ce(logits, labels.unsqueeze(1))
    raise ValueError(f"unknown loss '{name}'; expected ce or dice_ce")


def _check_micro_batch(cfg: FinetuneConfig) -> None:
    micro = cfg.train.batch_size // cfg.train.accum_steps
    if micro < 2:
        raise DeconError(
            f"train.batch_size / train.accum_steps = {micro} image per forward pass; BatchNorm needs at least 2 "
            "(raise train.batch_size or lower train.accum_steps)"
        )


class _Run(TrainingSession):
    """One training session of a fine-tuning run folder: optimiser, checkpoint restore, iterations, test."""

    unit = "iteration"
    bar_unit = "it"

    def __init__(
        self,
        cfg: FinetuneConfig,
        paths: FinetunePaths,
        network: nn.Module,
        classes: int,
        dataset: Dataset,
        checkpoint: dict[str, Any] | None,
        max_iters: int | None,
        report: dict[str, Any] | None = None,
        items: list[dict] | None = None,
        select_metric: str = "miou",
        volumes: bool = False,
    ):
        self.cfg, self.paths, self.classes, self.dataset = cfg, paths, classes, dataset
        self.select_metric, self.volumes = select_metric, volumes
        self.device = distributed.device()
        train = cfg.train
        self.total = train.iters
        self.stop = train.iters if max_iters is None else min(train.iters, max_iters)
        self.network = network.to(self.device)
        if train.channels_last:
            self.network.to(memory_format=torch.channels_last)
        recipes = (report or {}).get("recipes", {})
        if checkpoint is None and recipes.get("transfer_bn") == "recompute":
            recipes["bn_recompute"] = self._recompute_bn(recipes["transfer_bn_layers"], items)
        self.network.train()
        self.loss_fn = build_loss(train.loss)
        self.lr_schedule = poly_schedule(train.lr, train.iters, power=train.poly_power, min_lr=train.min_lr)
        self.freezing = FreezeSchedule(train)
        self.frozen_params: list[nn.Parameter] = []
        if self.freezing.always:  # parts with lr_mult 0: no gradient and no optimiser group, ever
            self.freezing.apply(self.network, self.total)
        self.params = [p for p in network.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(train, network.named_parameters(), train.lr, lr_mult=lr_mult(train))
        self.best: dict[str, Any] = {"iter": -1, "mIoU": None, "metric": select_metric, "score": None}
        self.last_val: dict[str, Any] | None = None
        if checkpoint is not None:
            self._load(checkpoint)
        # parts frozen for a while take no part in those backward passes: DDP must look for unused parameters
        start = int(checkpoint["step"]) if checkpoint is not None else 0
        self.wrap_model(
            self.network, find_unused_parameters=self.freezing.toggles and start < train.freeze.iters
        )
        self.init_session(checkpoint)

    def _recompute_bn(self, layers: list[str], items: list[dict] | None) -> dict[str, int]:
        """``transfer_bn=recompute``: one pass over the training images without augmentation (eval transforms,
        each image once, micro-batches of the training size) sets the statistics of the BatchNorm ``layers``."""
        train = self.cfg.train
        dataset = build_dataset(self.cfg, "train", "eval", items=items)
        loader = DataLoader(
            dataset,
            batch_size=train.batch_size // train.accum_steps,
            shuffle=False,
            num_workers=self.cfg.data.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )

        def images() -> Iterator[torch.Tensor]:
            for batch in loader:
                batch_images = batch["image"].to(self.device, non_blocking=True)
                if train.channels_last:
                    batch_images = batch_images.contiguous(memory_format=torch.channels_last)
                yield batch_images

        with torch.random.fork_rng(devices=[]):  # the pass draws nothing from the training run's generators
            return recompute_bn_stats(self.network, layers, images())

    # -- state ---------------------------------------------------------------------------------------------------
    def _load(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get("n_train") != len(self.dataset):
            raise DeconError(
                f"{self.paths.root}: cannot resume, the training subset changed size "
                f"({checkpoint.get('n_train')} images saved, {len(self.dataset)} now)"
            )
        self.network.load_state_dict(checkpoint["network"])
        self.best = dict(checkpoint["best"])
        # the metric the run started with (a checkpoint from before train.select_metric selected on mIoU)
        self.select_metric = self.best.setdefault("metric", "miou")
        self.last_val = checkpoint.get("val")

    def _state(self) -> dict[str, Any]:
        return segmentation_state(
            self.network,
            self.cfg,
            self.classes,
            step=self.step,
            val=self.last_val,
            best=self.best,
            n_train=len(self.dataset),
            data_position=self.step * self.cfg.train.batch_size * distributed.world_size(),
            **self.training_state(),
        )

    # -- data ----------------------------------------------------------------------------------------------------
    def _micro_batches(self) -> Iterator[dict]:
        """Micro-batches from the current iteration up to the stop iteration."""
        batch_size, seed = self.cfg.train.batch_size, self.cfg.seed
        loader = DataLoader(
            PassStream(self.dataset, seed),
            batch_size=batch_size // self.cfg.train.accum_steps,
            sampler=distributed.shard_batches(self.step, self.stop, batch_size),
            shuffle=False,
            num_workers=self.cfg.data.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(seed),
        )
        yield from loader

    def _inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch["image"].to(self.device, non_blocking=True)
        if self.cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, batch["label"].to(self.device, non_blocking=True).long()

    # -- one iteration -------------------------------------------------------------------------------------------
    def _optimizer_step(self, batches: Iterator[dict]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Forward / backward over ``accum_steps`` micro-batches, then clip and step; returns ({loss}, {lr})."""
        train = self.cfg.train
        if self.freezing.active:  # derived from the iteration, so a resumed run freezes exactly the same
            self.frozen_params = self.freezing.apply(self.network, self.step)
        total = torch.zeros((), device=self.device)
        for index in range(train.accum_steps):
            images, labels = self._inputs(next(batches))
            with self.micro_batch_context(index):
                with autocast(self.device, train.amp):
                    logits = self.model(images)
                loss = self.loss_fn(logits.float(), labels)
                self.backward(loss)
            total = total + loss.detach() / train.accum_steps
        for p in self.frozen_params:  # whatever DDP left there: a frozen parameter is never stepped
            p.grad = None
        lr = self.update()
        self.advance(total)
        return {"loss": total}, {"lr": lr}

    # -- the loop ------------------------------------------------------------------------------------------------
    def train(self, progress: bool) -> None:
        """Run up to the stop iteration; test and write ``results.json`` / ``done.json`` once all are done."""
        if self.step < self.stop:
            if distributed.is_main_process():
                self.paths.done.unlink(missing_ok=True)
            self.run_loop(progress)
        if self.step >= self.total and distributed.is_main_process():
            try:
                self._finish(progress)
            except Exception as exc:
                found = find_error(exc)
                if isinstance(found, DataError):  # training is done; only the test is left to run
                    raise DataError(
                        f"{found}; training finished but the test did not: fix or remove the file, then pass --resume"
                    ) from exc
                raise
        distributed.barrier()

    def _open_logs(self, resumed_step: int | None) -> None:
        if distributed.is_main_process():
            self.val_log = _ValLog(self.paths.val_metrics, resumed_step=resumed_step)

    def _after_step(self, logger: MetricsLogger, meter: IntervalMeter) -> bool:
        """Validate every ``val_every`` iterations and at the end (rank 0; the others wait at the next gradient
        synchronisation); a validation asks for ``last.ckpt``."""
        if self.step % self.cfg.train.val_every != 0 and self.step != self.total:
            return False
        self.check_finite()  # on every rank: it is a collective under torchrun
        self.check_weights()  # a state with NaN / inf BatchNorm statistics is never scored or kept as best
        if distributed.is_main_process():
            self._validate(logger, self.val_log)
        meter.restart_clock()
        return True

    def _postfix(self, row: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{row['loss']:.4f}", "lr": f"{row['lr']:.2e}"}

    def _log_row(self, meter: IntervalMeter, scalars: dict[str, Any]) -> dict[str, float]:
        means, steps, seconds = meter.collect(self.step)
        batch_size = self.cfg.train.batch_size * distributed.world_size()
        return {
            "step": self.step,
            "epoch": round(self.step * batch_size / len(self.dataset), 4),
            "loss": means["loss"],
            "lr": scalars["lr"],
            "img_s": steps * batch_size / max(seconds, 1e-9),
        }

    def _validate(self, logger: MetricsLogger, val_log: _ValLog) -> None:
        """Score the val split; keep ``best.ckpt`` when it is the best so far (strictly: ties keep the earlier)."""
        metrics = validate(self.network, self.cfg, self.classes, case_dice=self.select_metric == "case_dice")
        self.last_val = {"iter": self.step, "metrics": metrics}
        row = val_log.write(self.step, metrics)
        logger.track({f"val/{key}": value for key, value in row.items() if key != "iter"}, self.step)
        for key in ("mIoU", "mDice", "case_dice"):
            if key in metrics:
                logger.tb.add_scalar(f"val/{key}", metrics[key], self.step)
        for name, value in metrics["IoU"].items():
            logger.tb.add_scalar(f"val/IoU_{name}", value, self.step)
        score = selection_score(metrics, self.select_metric)
        best = _score(self.best.get("score", self.best.get("mIoU")))
        if self.best["iter"] < 0 or score > best:
            key = SELECT_KEYS[self.select_metric]
            self.best = {
                "iter": self.step,
                "mIoU": metrics["mIoU"],
                "metric": self.select_metric,
                "score": metrics.get(key),
            }
            if self.cfg.train.select == "best":
                state = segmentation_state(
                    self.network, self.cfg, self.classes, step=self.step, val=self.last_val
                )
                save_checkpoint(state, self.paths.best)

    # -- the end -------------------------------------------------------------------------------------------------
    def selected_checkpoint(self) -> Path:
        """``best.ckpt`` for ``train.select=best`` (when written), else ``last.ckpt``."""
        if self.cfg.train.select == "best" and self.paths.best.is_file():
            return self.paths.best
        return self.paths.last

    def _finish(self, progress: bool) -> None:
        """Evaluate the selected checkpoint on the test split; write ``results.json`` and ``done.json``."""
        start = time.perf_counter()
        selected = self.selected_checkpoint()
        network, _, state = load_segmentation_model(selected)
        check_finite_state(state["network"], selected)
        network.to(self.device)
        test = evaluate_network(network, self.cfg, "test", self.classes, progress=progress)
        decision = None
        if self.volumes:  # per class: does keeping the largest 3D component raise the val Dice?
            decision = decide_postprocessing(
                network, self.cfg, self.classes, self.paths.root, selected.name, int(state["step"]), progress
            )
            if decision is not None and progress:
                print(format_decision(decision))
        wall_time = self.elapsed + time.perf_counter() - start
        val = state.get("val") or {}
        results = {
            "dataset": self.cfg.data.name,
            "init": self.cfg.init,
            "transfer": self.cfg.transfer,
            "fraction": self.cfg.fraction,
            "seed": self.cfg.seed,
            "n_train": len(self.dataset),
            "select": self.cfg.train.select,
            "select_metric": self.select_metric,
            "selected_iter": int(state["step"]),
            "checkpoint": selected.name,
            "val": val.get("metrics"),
            "test": test,
            "wall_time_s": round(wall_time, 3),
            "class_names": class_names(self.cfg, self.classes),
        }
        if decision is not None:
            results["postprocessing"] = {
                "file": POSTPROCESSING,
                "largest_component": [
                    name for name, c in decision["classes"].items() if c["largest_component"]
                ],
            }
        write_json(self.paths.results, results)
        done = {
            "step": self.step,
            "iters": self.total,
            "wall_time_s": round(wall_time, 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        write_json(self.paths.done, done)
        finish_run(self.cfg, self.paths.root, flat_scores("test", test), self.step)
        if self.cfg.train.prune_finished:
            self._prune(selected, state)

    def _prune(self, selected: Path, state: dict[str, Any]) -> None:
        """Keep only the selected weights of the finished run (``train.prune_finished``)."""
        for path in self.paths.numbered_checkpoints():
            path.unlink()
        if self.paths.checkpoints.is_dir() and not any(self.paths.checkpoints.iterdir()):
            self.paths.checkpoints.rmdir()
        if selected == self.paths.best:
            self.paths.last.unlink(missing_ok=True)
        else:
            save_checkpoint(model_part(state), self.paths.last)


def _score(value: float | None) -> float:
    """A validation score as a comparable number (NaN / missing rank lowest)."""
    return value if value is not None and math.isfinite(value) else -math.inf


class _ValLog:
    """``val.csv``: one row per validation (iter, mIoU, mDice, aAcc, IoU_<class>); on resume, later rows go."""

    def __init__(self, path: Path, resumed_step: int | None):
        self.path = path
        rows: list[dict[str, str]] = []
        if resumed_step is not None and path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("iter") and int(r["iter"]) <= resumed_step]
        self.columns: list[str] | None = list(rows[0]) if rows else None
        self._write_all(rows)

    def write(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        row = {
            "iter": step,
            "mIoU": metrics["mIoU"],
            "mDice": metrics["mDice"],
            "aAcc": metrics["aAcc"],
            **({"case_dice": metrics["case_dice"]} if "case_dice" in metrics else {}),
            **{f"IoU_{name}": value for name, value in metrics["IoU"].items()},
        }
        new = self.columns is None
        if new:
            self.columns = list(row)
        record_written(self.path)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
        return row

    def _write_all(self, rows: list[dict[str, str]]) -> None:
        if not rows:
            self.path.unlink(missing_ok=True)
            return
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.path, text.getvalue())


def read_results(run: str | Path) -> dict[str, Any]:
    """The ``results.json`` of a finished run folder."""
    return json.loads((Path(run) / "results.json").read_text())
