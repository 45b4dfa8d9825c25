"""Typed configuration: dataclasses loaded from YAML with command-line dotlist overrides.

A YAML section maps one-to-one onto a dataclass; every key is type-checked and validated when the config is
loaded, so a typo or a bad value stops a command before any work starts, with an error that names the key.

Example:
    >>> cfg = load_config("configs/finetune/isic.yaml", ["data.root=/data/isic", "train.batch_size=8"])
    >>> cfg.train.batch_size
    8
    >>> save_config(cfg, "runs/x/config.yaml")
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from decon_med.errors import ConfigError
from decon_med.shipped import not_found, resolve_config

DatasetName = Literal["isic2017", "refuge", "folder", "unlabeled", "nnunet", "datalist"]
Modality = Literal["rgb", "gray", "mr", "ct", "auto"]
MrNormalisation = Literal["percentile", "zscore"]
Orientation = Literal["RAS", "none"]
SkipEmpty = Literal["pretrain", "train"]
Arch = Literal["unet", "fpn", "fcn"]
Transfer = Literal["random", "encoder", "encoder_decoder"]
Optimizer = Literal["lars", "sgd", "adamw"]
Amp = Literal["none", "bf16", "fp16"]
Checkpointing = Literal["none", "decoder", "encoder", "all"]
Method = Literal["slotcon", "decon_sl", "decon_ml", "densecl", "decon_sl_densecl", "decon_ml_densecl", "mim"]
MomentumSchedule = Literal["cosine", "constant"]
MaskFill = Literal["token", "zero"]
ExportBranch = Literal["auto", "teacher", "student"]
Photometric = Literal["byol", "mocov2"]

#: Methods that train the encoder only (alpha must be 1).
ENCODER_ONLY_METHODS = ("slotcon", "densecl")
#: Methods that add decoder heads to an encoder method (alpha < 1, at least one level).
DECODER_METHODS = ("decon_sl", "decon_ml", "decon_sl_densecl", "decon_ml_densecl")
Loss = Literal["ce", "dice_ce"]
Select = Literal["best", "last"]
Logger = Literal["csv", "tensorboard", "mlflow"]

#: Largest ``seed``: numpy's generators take 32-bit unsigned seeds.
MAX_SEED = 2**32 - 1
#: Largest ``train.epochs`` / ``train.warmup_epochs`` (no run is meant to be longer).
MAX_EPOCHS = 100_000
#: Largest ``train.iters``.
MAX_ITERS = 100_000_000
#: Finest ``data.spacing`` in mm (finer resamples a scan to more pixels than any memory holds).
MIN_SPACING = 0.01


@dataclass
class DataConfig:
    """Where the images are and how they are read.

    Attributes:
        name: dataset layout: ``isic2017``, ``refuge``, ``folder`` (images/ + masks/), ``unlabeled`` (any tree),
            ``nnunet`` (nnU-Net raw: imagesTr/, labelsTr/, dataset.json) or ``datalist`` (MSD / MONAI JSON).
        root: dataset root folder (``datalist``: the JSON file, or a folder holding ``dataset.json``).
        image_size: side of the square network input in pixels (a multiple of 32 for U-Nets).
        num_workers: DataLoader worker processes.
        in_channels: network input channels, 1 or 3; greyscale scans are replicated to 3 channels when 3.
        modality: ``rgb`` photos (dermoscopy, fundus), ``gray``, ``mr``, ``ct``, ``auto`` (volumes: decided per
            file from the intensities), or a mapping ``{sub-folder or file glob: modality}`` per file. Picks the
            intensity handling and the augmentations; CT / MR slices never get RGB colour augmentation.
        num_classes: number of segmentation classes; ``null`` takes the dataset's own (ISIC 2, REFUGE 3).
            Required for ``folder``.
        class_names: optional names of the classes, in index order.
        cache_rate: fraction of decoded samples held in memory by MONAI's CacheDataset (0 = plain Dataset).
        val_fraction: ``folder`` without splits.json: fraction of images held out for validation.
        test_fraction: ``folder`` without splits.json: fraction of images held out for testing.
        slice_axis: NIfTI volumes become 2D slices along this voxel axis (0, 1 or 2; after RAS reorientation 0 is
            sagittal, 1 coronal, 2 axial).
        clip_percentiles: MR/grey volumes: intensities clipped to these percentiles, then scaled to [0, 1].
        ct_window: CT volumes: [level, width] window in Hounsfield units, or a list of windows (one channel each).
        foreground_threshold: a normalised intensity above this counts as foreground.
        min_foreground: slices whose foreground fraction is below this are skipped (0 keeps all); see skip_empty.
        skip_empty: where the empty-slice rule applies: ``pretrain`` (unlabelled pre-training images only) or
            ``train`` (also the labelled training split). Labelled val/test slices are never skipped.
        mr_normalisation: MR/grey volumes: ``percentile`` (clip_percentiles) or ``zscore`` (mean +- 3 SD of the
            nonzero voxels mapped to [0, 1]).
        orientation: volumes are reoriented to ``RAS`` before slicing (``none``: stored voxel order).
        spacing: in-plane pixel size (mm) slices are resampled to; ``null`` takes each volume's finer in-plane
            spacing (square pixels), ``0`` keeps the voxel grid as stored.
        channels: which volumes of 4D images (or ``_XXXX`` channel files of nnU-Net layouts) to use as input
            channels; ``null`` = a 4D image is an error, nnU-Net uses all channel files.
        affine_tolerance: largest difference (mm) allowed between a label's affine and its image's.
        fold: labelled layouts: use cross-validation fold ``fold`` (0-based) as val, the other folds as train.
        num_folds: number of cross-validation folds (seeded, deterministic).
        cache_gb: NIfTI volumes: size bound (GB) of a persistent disk cache of decoded volumes, read back
            memory-mapped by every worker and every later run, and of slice indexes (reused by every run of a grid,
            keyed by file size and modification time); least recently used entries are deleted. ``0`` disables it
            (each worker keeps 4 decoded volumes in memory).
        cache_dir: folder of that cache; ``null`` = ``$XDG_CACHE_HOME/decon-med`` (default ``~/.cache/decon-med``).
    """

    name: DatasetName = "isic2017"
    root: str = "data/isic2017"
    image_size: int = 224
    num_workers: int = 4
    in_channels: int = 3
    modality: Modality | dict = "rgb"
    num_classes: int | None = None
    class_names: list[str] | None = None
    cache_rate: float = 0.0
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    slice_axis: int = 2
    clip_percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    ct_window: list[float] | list[list[float]] = field(default_factory=lambda: [40.0, 400.0])
    foreground_threshold: float = 0.05
    min_foreground: float = 0.05
    skip_empty: SkipEmpty = "pretrain"
    mr_normalisation: MrNormalisation = "percentile"
    orientation: Orientation = "RAS"
    spacing: float | None = None
    channels: list[int] | None = None
    affine_tolerance: float = 1e-3
    fold: int | None = None
    num_folds: int = 5
    cache_gb: float = 0.0
    cache_dir: str | None = None

    def validate(self) -> None:
        _check(
            self.image_size >= 32 and self.image_size % 32 == 0,
            "data.image_size",
            f"must be a positive multiple of 32 (U-Net strides), got {self.image_size}",
        )
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _check(self.in_channels in (1, 3), "data.in_channels", f"must be 1 or 3, got {self.in_channels}")
        _check(self.num_classes is None or self.num_classes >= 2, "data.num_classes", "must be >= 2")
        _check(
            self.name != "folder" or self.num_classes is not None,
            "data.num_classes",
            "is required when data.name is 'folder'",
        )
        if self.class_names is not None and self.num_classes is not None:
            _check(
                len(self.class_names) == self.num_classes,
                "data.class_names",
                f"has {len(self.class_names)} names but data.num_classes is {self.num_classes}",
            )
        _check(0.0 <= self.cache_rate <= 1.0, "data.cache_rate", "must be in [0, 1]")
        _check(
            0.0 <= self.val_fraction < 1.0
            and 0.0 <= self.test_fraction < 1.0
            and self.val_fraction + self.test_fraction < 1.0,
            "data.val_fraction",
            "val_fraction and test_fraction must be in [0, 1) and sum to less than 1",
        )
        _check(self.slice_axis in (0, 1, 2), "data.slice_axis", f"must be 0, 1 or 2, got {self.slice_axis}")
        lo_hi = self.clip_percentiles
        _check(
            len(lo_hi) == 2 and 0.0 <= lo_hi[0] < lo_hi[1] <= 100.0,
            "data.clip_percentiles",
            "must be [low, high] with 0 <= low < high <= 100",
        )
        windows = (
            self.ct_window if self.ct_window and isinstance(self.ct_window[0], list) else [self.ct_window]
        )
        _check(
            all(len(w) == 2 and w[1] > 0 for w in windows),
            "data.ct_window",
            "must be [level, width] with width > 0, or a list of such windows",
        )
        if isinstance(self.modality, dict):
            for pattern, value in self.modality.items():
                _check(
                    value in typing.get_args(Modality),
                    f"data.modality.{pattern}",
                    f"{value!r} is not one of {', '.join(repr(m) for m in typing.get_args(Modality))}",
                )
        _check(self.spacing is None or self.spacing >= 0, "data.spacing", "must be >= 0 (or null)")
        _check(
            self.spacing is None or self.spacing == 0 or self.spacing >= MIN_SPACING,
            "data.spacing",
            f"{self.spacing:g} mm is finer than {MIN_SPACING} mm, which would resample each slice to more pixels "
            "than memory holds (0 keeps the stored voxel grid)"
            if self.spacing is not None
            else "",
        )
        if self.cache_gb > 0 and self.cache_dir is not None:
            folder = Path(self.cache_dir).expanduser()
            _check(
                not folder.exists() or folder.is_dir(),
                "data.cache_dir",
                f"{folder} exists and is not a folder",
            )
        _check(
            self.channels is None or (len(self.channels) > 0 and min(self.channels) >= 0),
            "data.channels",
            "must be a non-empty list of volume indices >= 0 (or null)",
        )
        _check(self.affine_tolerance >= 0, "data.affine_tolerance", "must be >= 0")
        _check(
            self.cache_gb >= 0, "data.cache_gb", f"must be >= 0 (0 disables the cache), got {self.cache_gb}"
        )
        _check(self.num_folds >= 2, "data.num_folds", f"must be >= 2, got {self.num_folds}")
        _check(
            self.fold is None or 0 <= self.fold < self.num_folds,
            "data.fold",
            f"must be in [0, data.num_folds - 1 = {self.num_folds - 1}] (or null)",
        )
        _check(0.0 <= self.foreground_threshold < 1.0, "data.foreground_threshold", "must be in [0, 1)")
        _check(0.0 <= self.min_foreground <= 1.0, "data.min_foreground", "must be in [0, 1]")


@dataclass
class AugmentConfig:
    """Augmentation strengths.

    Attributes:
        crop_scale: pre-training random-resized-crop area range (SlotCon: 0.08-1).
        min_overlap: pre-training: the two views must overlap on at least this fraction of the image.
        finetune_crop_scale: fine-tuning random-resized-crop area range.
        hflip: probability of a horizontal flip.
        vflip: probability of a vertical flip (fine-tuning only).
        color: colour / intensity augmentations on (suited to data.modality).
        photometric: pre-training view recipe: ``byol`` (SlotCon / BYOL: blur always on view 1, rarely on view 2,
            solarisation on view 2) or ``mocov2`` (DenseCL / MoCo v2: both views alike, blur p 0.5, saturation 0.4).
        blur_sigma: pre-training Gaussian blur sigma range [low, high] in pixels of a view; ``null`` = the
            recipes' 0.1-2.0 px at 224 px scaled to ``data.image_size`` (at 64 px: 0.03-0.57), so a small view
            keeps the texture a 224-px view keeps.
    """

    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    min_overlap: float = 0.01
    finetune_crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    hflip: float = 0.5
    vflip: float = 0.0
    color: bool = True
    photometric: Photometric = "byol"
    blur_sigma: list[float] | None = None

    def validate(self) -> None:
        for key in ("crop_scale", "finetune_crop_scale"):
            lo_hi = getattr(self, key)
            _check(
                len(lo_hi) == 2 and 0.0 < lo_hi[0] <= lo_hi[1] <= 1.0,
                f"augment.{key}",
                "must be [low, high] with 0 < low <= high <= 1",
            )
        _check(0.0 <= self.min_overlap < 1.0, "augment.min_overlap", "must be in [0, 1)")
        if self.blur_sigma is not None:
            _check(
                len(self.blur_sigma) == 2 and 0.0 < self.blur_sigma[0] <= self.blur_sigma[1],
                "augment.blur_sigma",
                "must be null or [low, high] with 0 < low <= high",
            )
        _check(0.0 <= self.hflip <= 1.0, "augment.hflip", "must be a probability in [0, 1]")
        _check(0.0 <= self.vflip <= 1.0, "augment.vflip", "must be a probability in [0, 1]")


@dataclass
class ModelConfig:
    """The segmentation network, built by segmentation-models-pytorch.

    Attributes:
        arch: decoder: ``unet`` (default), ``fpn`` or ``fcn`` (the paper's fine-tuning head).
        encoder: any smp encoder name, e.g. ``resnet18``, ``resnet50``.
        encoder_weights: ``null`` (random init), a local weights file, or a weights name smp lists for the encoder
            (e.g. ``imagenet``), read from the Hugging Face Hub cache (downloaded there once when online).
    """

    arch: Arch = "unet"
    encoder: str = "resnet50"
    encoder_weights: str | None = None

    def validate(self) -> None:
        import segmentation_models_pytorch as smp

        names = smp.encoders.get_encoder_names()
        if self.encoder not in names:
            close = difflib.get_close_matches(self.encoder, names, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"model.encoder: unknown smp encoder '{self.encoder}'{hint}")
        if self.encoder_weights is not None:
            from decon_med.models.encoder_weights import weight_names

            listed = weight_names(self.encoder)
            _check(
                Path(self.encoder_weights).is_file() or self.encoder_weights in listed,
                "model.encoder_weights",
                f"must be null, a local weights file or a weights name smp lists for {self.encoder} "
                f"({', '.join(listed) or 'it lists none'}); '{self.encoder_weights}' is neither",
            )


#: Parts of a segmentation network, as the fine-tuning recipes name them (state-dict prefixes ``encoder.``,
#: ``decoder.``, and everything else: ``segmentation_head.``).
NetworkPart = Literal["encoder", "decoder", "head"]
FreezePart = Literal["encoder", "decoder"]
TransferBN = Literal["keep", "reset", "recompute"]
TransferBNAffine = Literal["keep", "reset"]


@dataclass
class LrMultConfig:
    """Fine-tuning learning-rate multipliers per part of the network (mmseg's ``paramwise_cfg`` ``lr_mult``).

    Attributes:
        encoder: fine-tuning: the encoder's learning rate is the scheduled one times this; 0 freezes the encoder
            for the whole run (no gradient, left out of the optimiser, BatchNorm statistics fixed).
        decoder: fine-tuning: the same for the decoder.
        head: fine-tuning: the same for the segmentation head (every parameter outside encoder and decoder).
    """

    encoder: float = 1.0
    decoder: float = 1.0
    head: float = 1.0

    def validate(self) -> None:
        for key in ("encoder", "decoder", "head"):
            value = getattr(self, key)
            _check(
                math.isfinite(value) and value >= 0,
                f"train.lr_mult.{key}",
                f"must be a finite number >= 0 (0 freezes the part), got {value}",
            )
        _check(
            any(getattr(self, key) > 0 for key in ("encoder", "decoder", "head")),
            "train.lr_mult",
            "freezes every part of the network; at least one multiplier must be > 0",
        )


@dataclass
class FreezeConfig:
    """Frozen warm-up of fine-tuning (LP-FT, Kumar et al. 2022): some parts are held fixed at the start.

    Attributes:
        parts: fine-tuning: parts held fixed during the first ``iters`` iterations, ``encoder`` and / or
            ``decoder`` (no gradient, no optimiser update, BatchNorm layers in eval mode so their running
            statistics stay as loaded); then everything trains, on the same learning-rate schedule.
        iters: fine-tuning: length of the frozen warm-up in iterations (0 = off); when it ends follows from the
            iteration, so a resumed run freezes and unfreezes exactly as an uninterrupted one.
    """

    parts: list[FreezePart] = field(default_factory=list)
    iters: int = 0

    def validate(self) -> None:
        _check(self.iters >= 0, "train.freeze.iters", f"must be >= 0 (0 = off), got {self.iters}")
        _check(
            len(set(self.parts)) == len(self.parts), "train.freeze.parts", f"has repeated parts: {self.parts}"
        )
        _check(
            self.iters == 0 or bool(self.parts),
            "train.freeze.parts",
            f"must name the parts to freeze (encoder, decoder) when train.freeze.iters is {self.iters}",
        )
        _check(
            not self.parts or self.iters > 0,
            "train.freeze.iters",
            f"must be >= 1 when train.freeze.parts is set ({', '.join(self.parts)}); 0 freezes nothing",
        )


@dataclass
class TrainConfig:
    """Optimisation: budget, optimiser, schedule, precision and checkpointing.

    Attributes:
        batch_size: images per optimiser step (per process under torchrun; with accumulation, the sum over
            ``accum_steps`` micro-batches).
        epochs: pre-training length in epochs.
        iters: fine-tuning length in iterations.
        val_every: fine-tuning: validate every this many iterations.
        optimizer: ``lars`` (no weight decay / adaptation on biases and norm parameters), ``sgd`` or ``adamw``.
        lr: base learning rate; pre-training scales it by ``batch_size * world_size / 256``.
        weight_decay: weight decay (not applied to biases and norm parameters).
        momentum: SGD / LARS momentum.
        betas: AdamW's ``[beta1, beta2]`` (MAE and GLID: ``[0.9, 0.95]``).
        warmup_epochs: linear learning-rate warm-up before the cosine decay (pre-training).
        min_lr: learning rate at the end of the decay: cosine in pre-training, poly in fine-tuning (mmseg: 1e-4).
        amp: mixed precision: ``none``, ``bf16`` or ``fp16`` (with a gradient scaler).
        accum_steps: micro-batches accumulated per optimiser step.
        clip_grad: clip the gradient norm to this value (0 = off).
        channels_last: use the channels-last memory format.
        ckpt_every: write a numbered checkpoint every this many optimiser steps (``last`` is always written).
        keep_checkpoints: numbered checkpoints kept on disk, the newest ones (``null`` keeps all).
        prune_finished: fine-tuning: once the run has finished and been tested, keep only the selected weights
            (``best.ckpt``, or ``last.ckpt`` without its training state) and delete the numbered checkpoints;
            experiment grids set it (a run then takes about a third of the disk space).
        log_every: write a ``metrics.csv`` row and TensorBoard scalars every this many steps.
        loss: fine-tuning loss: ``ce`` (cross-entropy) or ``dice_ce`` (MONAI DiceCE).
        select: fine-tuning checkpoint evaluated on test: ``best`` (highest val mIoU) or ``last``.
        poly_power: fine-tuning poly learning-rate decay power.
        sync_bn: under torchrun, convert BatchNorm layers to SyncBatchNorm (batch statistics over all processes).
        compile: wrap the forward pass in ``torch.compile`` (faster steps on GPU after a one-off compile).
        checkpointing: pre-training activation checkpointing of the student: ``none``, ``decoder`` (U-Net decoder
            blocks), ``encoder`` (ResNet stages) or ``all``; recomputed in the backward pass, so memory drops for
            extra FLOPs and the results are unchanged (see docs/benchmarks.md).
        health_patience: pre-training: warn (once per signal) when a level's health signal stays collapsed or
            uniform for this many consecutive log steps (0 = never; see README "Is pre-training learning?").
        lr_mult: fine-tuning: learning-rate multiplier of each part of the network (``encoder``, ``decoder``,
            ``head``); each part gets its own optimiser groups. All 1 = off.
        freeze: fine-tuning: frozen warm-up, ``{parts: [encoder], iters: N}``. Off (``iters: 0``) by default.
        loggers: where the metrics go: ``csv`` (``metrics.csv``, always on), ``tensorboard`` (``tb/``) and
            ``mlflow`` (needs ``pip install 'decon-med[mlflow]'``; the store is ``MLFLOW_TRACKING_URI``, else
            ``./mlruns`` under the current directory; see README "Tracking").
        mlflow_experiment: MLflow experiment of the run; ``null``: the name of the folder holding the run folder
            (``ft`` for ``out_dir=runs/ft/ml_5pc_s0``).
    """

    batch_size: int = 16
    epochs: int = 100
    iters: int = 1000
    val_every: int = 500
    optimizer: Optimizer = "lars"
    lr: float = 1.0
    weight_decay: float = 1e-5
    momentum: float = 0.9
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_epochs: float = 5.0
    min_lr: float = 0.0
    amp: Amp = "none"
    accum_steps: int = 1
    clip_grad: float = 0.0
    channels_last: bool = False
    ckpt_every: int = 1000
    keep_checkpoints: int | None = 3
    prune_finished: bool = False
    log_every: int = 10
    loss: Loss = "ce"
    select: Select = "best"
    poly_power: float = 0.9
    sync_bn: bool = False
    compile: bool = False
    checkpointing: Checkpointing = "none"
    health_patience: int = 5
    lr_mult: LrMultConfig = field(default_factory=LrMultConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    loggers: list[Logger] = field(default_factory=lambda: ["csv", "tensorboard"])
    mlflow_experiment: str | None = None

    def validate(self) -> None:
        _check(
            "csv" in self.loggers,
            "train.loggers",
            f"must include csv (metrics.csv is always written), got {list(self.loggers)}",
        )
        _check(self.health_patience >= 0, "train.health_patience", "must be >= 0 (0 = never warn)")
        for key in ("batch_size", "epochs", "iters", "val_every", "accum_steps", "ckpt_every", "log_every"):
            _check(getattr(self, key) >= 1, f"train.{key}", "must be >= 1")
        _check(
            self.batch_size % self.accum_steps == 0,
            "train.accum_steps",
            f"must divide train.batch_size ({self.batch_size})",
        )
        _check(self.lr > 0, "train.lr", "must be > 0")
        _check(0.0 <= self.min_lr <= self.lr, "train.min_lr", "must be in [0, train.lr]")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(0.0 <= self.momentum < 1.0, "train.momentum", "must be in [0, 1)")
        _check(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            "train.betas",
            "must be [beta1, beta2], each in [0, 1)",
        )
        _check(self.warmup_epochs >= 0, "train.warmup_epochs", "must be >= 0")
        _check(self.epochs <= MAX_EPOCHS, "train.epochs", f"must be <= {MAX_EPOCHS:,}, got {self.epochs:,}")
        _check(
            self.warmup_epochs <= MAX_EPOCHS,
            "train.warmup_epochs",
            f"must be <= {MAX_EPOCHS:,}, got {self.warmup_epochs:g}",
        )
        _check(self.iters <= MAX_ITERS, "train.iters", f"must be <= {MAX_ITERS:,}, got {self.iters:,}")
        _check(self.clip_grad >= 0, "train.clip_grad", "must be >= 0 (0 = off)")
        _check(self.poly_power > 0, "train.poly_power", "must be > 0")
        _check(
            self.keep_checkpoints is None or self.keep_checkpoints >= 1,
            "train.keep_checkpoints",
            "must be >= 1 (null keeps all)",
        )


@dataclass
class SSLConfig:
    """Self-supervised method and its hyper-parameters (SlotCon defaults; DeCon adds the decoder terms).

    Attributes:
        method: ``slotcon`` (encoder only), ``decon_sl`` (one decoder level) or ``decon_ml`` (several levels,
            deep supervision, skip channel dropout); ``densecl``, ``decon_sl_densecl`` and ``decon_ml_densecl``
            are the same three with DenseCL heads; ``mim`` is masked image modelling of the whole encoder-decoder.
        alpha: loss = alpha * L_enc + (1 - alpha) * L_dec; must be 1 for ``slotcon`` and < 1 with a decoder.
        levels: supervised decoder levels, 0 = coarsest decoder output; negative indices count from the finest
            (``[-1]`` = the last decoder feature map before the segmentation head).
        skip_dropout: Dropout2d probability on encoder features entering the decoder through skip connections
            (student only, pre-training only).
        dec_grid: supervised decoder levels are average-pooled to at most this grid before their heads, so
            their cost stays near the encoder head's (0 = no pooling).
        num_prototypes: encoder prototypes (SlotCon 256).
        num_prototypes_dec: prototypes of each decoder level (256 or 384).
        dim_hidden: projector / predictor hidden width (4096).
        dim_hidden_dec: hidden width of the decoder levels' heads; ``null`` takes ``dim_hidden``. The U-Net's
            decoder levels have 16 to 256 channels, so a narrower width there cuts DeCon's head cost.
        dim_out: projector output and slot dimension (256).
        teacher_temp: teacher softmax temperature of the prototype scores (0.07).
        student_temp: student softmax temperature (0.1).
        center_momentum: EMA momentum of the teacher centre (0.9).
        group_loss_weight: weight of the grouping (self-distillation) loss vs the slot contrastive loss (0.5).
        slot_temp: temperature of the slot InfoNCE loss (0.2).
        teacher_momentum: starting EMA momentum of the teacher, raised to 1 on a cosine schedule (0.99).
        momentum_schedule: ``cosine`` (teacher_momentum -> 1, SlotCon) or ``constant`` (DenseCL's 0.999).
        queue_size: DenseCL: negatives kept in each queue (65536 in DenseCL, 16384 in DeCon, both on COCO); keep it
            below the images of one epoch (a warning says when it is not).
        contrast_temp: DenseCL: InfoNCE temperature of the global and dense losses (0.2).
        dense_weight: DenseCL: lambda in ``(1 - lambda) * global + lambda * dense`` (0.5).
        dense_warmup_steps: DenseCL: lambda is held at 0 for this many optimiser steps (small datasets need it).
        shuffle_bn: DenseCL under torchrun: the key encoder sees the global batch, shuffled each step in an order
            shared by every process (MoCo's shuffle BN), so BatchNorm statistics cannot tell which key matches a
            query; no effect in one process.
        mask_ratio: MIM: fraction of patches masked (0.75).
        mask_patch: MIM: side of a masked patch in pixels (must divide data.image_size).
        mask_fill: MIM: masked patches are replaced by a learnable ``token`` or by ``zero``.
        norm_pix_loss: MIM: targets normalised per patch (mean 0, std 1) before the loss (MAE: better features).
        export_branch: which network is exported and fine-tuned: ``teacher`` (the EMA network, which the SlotCon
            reference transfers), ``student`` (the back-propagated network; DenseCL's reference extracts its query
            encoder) or ``auto``: the teacher for the SlotCon family, the student for the DenseCL family and MIM.
    """

    method: Method = "slotcon"
    alpha: float = 1.0
    levels: list[int] = field(default_factory=lambda: [-1])
    skip_dropout: float = 0.0
    dec_grid: int = 7
    num_prototypes: int = 256
    num_prototypes_dec: int = 256
    dim_hidden: int = 4096
    dim_hidden_dec: int | None = None
    dim_out: int = 256
    teacher_temp: float = 0.07
    student_temp: float = 0.1
    center_momentum: float = 0.9
    group_loss_weight: float = 0.5
    slot_temp: float = 0.2
    teacher_momentum: float = 0.99
    momentum_schedule: MomentumSchedule = "cosine"
    queue_size: int = 65536
    contrast_temp: float = 0.2
    dense_weight: float = 0.5
    dense_warmup_steps: int = 1000
    shuffle_bn: bool = True
    mask_ratio: float = 0.75
    mask_patch: int = 32
    mask_fill: MaskFill = "token"
    norm_pix_loss: bool = True
    export_branch: ExportBranch = "auto"

    def validate(self) -> None:
        _check(0.0 <= self.alpha <= 1.0, "ssl.alpha", f"must be in [0, 1], got {self.alpha}")
        if self.method in ENCODER_ONLY_METHODS:
            _check(self.alpha == 1.0, "ssl.alpha", f"must be 1 for {self.method} (it has no decoder loss)")
            _check(self.skip_dropout == 0.0, "ssl.skip_dropout", "applies only to methods with decoder heads")
        elif self.method in DECODER_METHODS:
            _check(self.alpha < 1.0, "ssl.alpha", f"must be < 1 for {self.method} (1 ignores the decoder)")
            _check(len(self.levels) >= 1, "ssl.levels", "needs at least one decoder level")
            _check(len(set(self.levels)) == len(self.levels), "ssl.levels", "has repeated levels")
        if self.method.startswith("decon_sl"):
            _check(len(self.levels) == 1, "ssl.levels", f"{self.method} supervises exactly one decoder level")
        _check(
            0.0 <= self.skip_dropout < 1.0, "ssl.skip_dropout", f"must be in [0, 1), got {self.skip_dropout}"
        )
        _check(self.dec_grid >= 0, "ssl.dec_grid", "must be >= 0 (0 = no pooling)")
        _check(
            self.dim_hidden_dec is None or self.dim_hidden_dec >= 1,
            "ssl.dim_hidden_dec",
            "must be >= 1 or null",
        )
        for key in ("num_prototypes", "num_prototypes_dec", "dim_hidden", "dim_out"):
            _check(getattr(self, key) >= 1, f"ssl.{key}", "must be >= 1")
        for key in ("teacher_temp", "student_temp", "slot_temp"):
            _check(getattr(self, key) > 0, f"ssl.{key}", "must be > 0")
        _check(0.0 <= self.center_momentum < 1.0, "ssl.center_momentum", "must be in [0, 1)")
        _check(0.0 <= self.group_loss_weight <= 1.0, "ssl.group_loss_weight", "must be in [0, 1]")
        _check(0.0 <= self.teacher_momentum <= 1.0, "ssl.teacher_momentum", "must be in [0, 1]")
        _check(self.queue_size >= 1, "ssl.queue_size", "must be >= 1")
        if "densecl" in self.method:  # a global and a dense queue per head: the encoder's and each level's
            heads = 1 + (len(self.levels) if self.method in DECODER_METHODS else 0)
            check_memory(
                "ssl.queue_size",
                2 * heads * self.queue_size * self.dim_out * 4,
                f"the DenseCL queues ({heads} head(s) x 2 queues x {self.queue_size:,} x ssl.dim_out "
                f"{self.dim_out} x 4 bytes)",
            )
        _check(self.contrast_temp > 0, "ssl.contrast_temp", "must be > 0")
        _check(0.0 <= self.dense_weight <= 1.0, "ssl.dense_weight", "must be in [0, 1]")
        _check(self.dense_warmup_steps >= 0, "ssl.dense_warmup_steps", "must be >= 0")
        _check(0.0 < self.mask_ratio < 1.0, "ssl.mask_ratio", f"must be in (0, 1), got {self.mask_ratio}")
        _check(self.mask_patch >= 1, "ssl.mask_patch", "must be >= 1")
        _check(
            not (self.method == "mim" and self.export_branch == "teacher"),
            "ssl.export_branch",
            "mim has no teacher network (use auto or student)",
        )


@dataclass
class ProbeConfig:
    """Online linear probe during pre-training: a small labelled set scored on the frozen exported network.

    Attributes:
        root: labelled data read by the probe (any labelled layout the loaders read); ``null`` = no probe.
        name: its layout (``data.name`` values: ``isic2017``, ``refuge``, ``folder``, ...); the other data
            settings (image size, channels, modality) are the pre-training data's.
        num_classes: classes of a ``folder`` layout (background included).
        every: probe every this many optimiser steps (and before the first and after the last).
        images: labelled training images the probe is fitted on (the first of the train split).
        val_images: validation images its mIoU is measured on (the first of the val split).
        size: features and masks are resized to ``size`` x ``size`` for the probe.
        steps: Adam steps of each linear 1x1 classifier (full batch on at most 8192 sampled pixels).
    """

    root: str | None = None
    name: DatasetName = "folder"
    num_classes: int | None = None
    every: int = 500
    images: int = 8
    val_images: int = 8
    size: int = 64
    steps: int = 100

    def validate(self) -> None:
        for key in ("every", "images", "val_images", "steps"):
            _check(getattr(self, key) >= 1, f"probe.{key}", "must be >= 1")
        _check(self.size >= 4, "probe.size", "must be >= 4")
        _check(self.name != "unlabeled", "probe.name", "needs labelled data (unlabeled has no masks)")


@dataclass
class Config:
    """Sections shared by every command.

    Attributes:
        seed: seed for splits, augmentation and initialisation.
        out_dir: folder under which run folders are created.
    """

    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    out_dir: str = "runs"

    def __post_init__(self) -> None:
        if isinstance(self.out_dir, str) and self.out_dir.startswith("~"):
            # as data.root and init: never a folder named ~
            self.out_dir = str(Path(self.out_dir).expanduser())

    def validate(self) -> None:
        _check(
            0 <= self.seed <= MAX_SEED, "seed", f"must be in [0, 2**32 - 1] (numpy's seeds), got {self.seed}"
        )
        views = 2 if hasattr(self, "ssl") else 1  # pre-training reads two views of each image
        size, channels, batch = self.data.image_size, self.data.in_channels, self.train.batch_size
        check_memory(
            "data.image_size",
            views * batch * channels * size * size * 4,
            f"input batches of {size} x {size} px (train.batch_size {batch} x {views} view(s) x {channels} "
            "channel(s) x 4 bytes)",
        )


@dataclass
class FinetuneConfig(Config):
    """Fine-tuning: the shared sections plus the initialisation and the label fraction.

    Attributes:
        init: ``null`` (random) or an exported weights folder / safetensors file / pre-training checkpoint.
        transfer: ``random``, ``encoder`` (fresh decoder) or ``encoder_decoder`` (only the classifier is new).
            With an init, ``encoder`` is the measured choice: in the CPU validity study a transferred DeCon decoder
            fine-tunes below encoder-only transfer and random init (docs/validity.md).
        fraction: fraction of the labelled training images used, in (0, 1].
        transfer_bn: BatchNorm running statistics of the transferred layers: ``keep`` (as pre-trained), ``reset``
            (mean 0, variance 1, counter 0) or ``recompute`` (before the first iteration, the exact per-channel
            mean and unbiased variance of each layer's input over the labelled training images, read without
            augmentation, the network in training mode and nothing else updated). No effect with
            ``transfer=random``.
        transfer_bn_affine: BatchNorm weight and bias of the transferred layers: ``keep`` or ``reset`` (1 and 0).
        reinit_decoder_blocks: after loading, give the last (finest) this many decoder blocks back their fresh
            initialisation, the weights of a ``transfer=random`` run with the same seed (U-Net: ``decoder.blocks``;
            FPN: the four pyramid levels, each with its segmentation block; FCN: its two conv layers); 0 = off.
            Changes something only with ``transfer=encoder_decoder``.
    """

    init: str | None = None
    transfer: Transfer = "random"
    fraction: float = 1.0
    transfer_bn: TransferBN = "keep"
    transfer_bn_affine: TransferBNAffine = "keep"
    reinit_decoder_blocks: int = 0

    def validate(self) -> None:
        super().validate()
        _check(0.0 < self.fraction <= 1.0, "fraction", f"must be in (0, 1], got {self.fraction}")
        _check(
            self.reinit_decoder_blocks >= 0,
            "reinit_decoder_blocks",
            f"must be >= 0 (0 = off), got {self.reinit_decoder_blocks}",
        )
        _check(
            self.transfer == "random" or self.init is not None,
            "init",
            f"is required when transfer is '{self.transfer}'",
        )
        _check(
            self.transfer != "random" or self.init is None,
            "init",
            f"is '{self.init}' but transfer is 'random', which would ignore it; pass transfer=encoder or "
            "transfer=encoder_decoder to load it, or init=null for a random init",
        )


@dataclass
class PretrainConfig(Config):
    """Pre-training: the shared sections plus the self-supervised method.

    Example:
        >>> cfg = load_config("configs/pretrain/decon_ml.yaml", ["data.root=/data/scans"])
        >>> cfg.ssl.method, cfg.ssl.levels
        ('decon_ml', [0, 1, 2, 3])
    """

    ssl: SSLConfig = field(default_factory=SSLConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def validate(self) -> None:
        super().validate()
        if self.model.arch == "fcn" and self.ssl.method.startswith("decon_ml"):
            single = self.ssl.method.replace("decon_ml", "decon_sl")
            raise ConfigError(
                f"config key 'ssl.method': model.arch=fcn has one decoder level, so {self.ssl.method} (several "
                f"levels) does not apply; use {single}"
            )
        if self.model.arch == "fcn" and self.ssl.method in DECODER_METHODS:
            _check(
                all(level in (0, -1) for level in self.ssl.levels),
                "ssl.levels",
                f"model.arch=fcn has one decoder level (0 or -1), got {self.ssl.levels}",
            )
        if self.ssl.method == "mim":
            _check(
                self.data.image_size % self.ssl.mask_patch == 0,
                "ssl.mask_patch",
                f"must divide data.image_size ({self.data.image_size}), got {self.ssl.mask_patch}",
            )


#: Config classes a YAML file can be read into, tried in order when the command does not name one.
SCHEMAS: list[type[Config]] = [Config, FinetuneConfig, PretrainConfig]


def load_config(
    path: str | Path | list[str | Path] | tuple[str | Path, ...] | None,
    overrides: list[str] | tuple[str, ...] = (),
    schema: type[Config] | None = None,
    require: tuple[str, ...] = (),
) -> Config:
    """Read YAML config file(s), apply ``key.sub=value`` overrides, type-check and validate.

    Args:
        path: a YAML file, several merged left to right (later files override earlier keys, sections are merged
            key by key), or ``None`` for the schema's defaults. An empty section (``data:`` with every key
            commented out) changes nothing; a file that sets no key at all is named in a ``warning: FILE sets
            nothing`` line on stderr.
        overrides: dotlist overrides; values are parsed as YAML (``8``, ``null``, ``[0.5, 1.0]``, ``1e-3``).
        schema: the config class; ``None`` picks the narrowest one in ``SCHEMAS`` that knows every top-level key.
        require: top-level sections the files and overrides together must set (e.g. ``("ssl",)`` for
            pre-training), so a command never silently runs built-in defaults.

    Raises:
        ConfigError: unreadable file, duplicate or unknown key, wrong type, non-finite number, invalid value or a
            missing required section (the message names the file or the key).

    Example:
        >>> cfg = load_config(["configs/pretrain/decon_ml.yaml", "configs/data/inhouse_ct.yaml"], ["data.root=ct"])
        >>> cfg.ssl.method, cfg.data.modality
        ('decon_ml', 'ct')
    """
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    raw: dict[str, Any] = {}
    for file in paths:
        sections = _section_names()
        tree = {  # a section whose keys are all commented out is empty, not a reset of the section
            key: value for key, value in read_yaml(file).items() if not (key in sections and value is None)
        }
        if all(key in sections and value == {} for key, value in tree.items()):
            print(f"warning: {file} sets nothing", file=sys.stderr)  # e.g. every key commented out
        merge_into(raw, tree)
    for item in overrides:
        key, value = parse_override(item)
        set_nested(raw, key, value)
    if paths:
        missing = [name for name in require if name not in raw]
        if missing:
            files = ", ".join(str(p) for p in paths)
            name = missing[0]
            raise ConfigError(
                f"{files}: no '{name}' section, which this command needs{SECTION_HINTS.get(name, '')}"
            )
    if schema is None:
        schema = _infer_schema(raw)
    cfg = from_dict(schema, raw)
    validate_config(cfg)
    return cfg


#: What a missing top-level section means, for the error of :func:`load_config`'s ``require``.
SECTION_HINTS: dict[str, str] = {
    "ssl": " (the pre-training method): add a method config such as configs/pretrain/decon_ml.yaml first",
    "train": " (the optimisation settings): start from configs/finetune/isic.yaml or configs/finetune/refuge.yaml",
    "data": " (the dataset): add a data config such as configs/data/folder.yaml",
}


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys and reads ``1e-3``, ``1E6`` and ``.5`` as floats."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: SafeLoader reports it
                    break
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key '{key}'", key_node.start_mark
                    )
                seen[key] = True
        return super().construct_mapping(node, deep=deep)


_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def yaml_load(text: str) -> Any:
    """Parse YAML text safely (plain data only), refusing duplicate keys; ``1e-3`` is a float."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of one YAML config file, or of the shipped config ``path`` names (see
    :mod:`decon_med.shipped`) when no such file exists.

    Raises:
        ConfigError: missing, unreadable, not UTF-8, not valid YAML, duplicate keys, or not a mapping.
    """
    path = resolve_config(path)  # a file that exists, else the shipped config a name names
    if not path.is_file():
        raise ConfigError(not_found(path))
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})"
        ) from exc
    try:
        loaded = yaml_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {_yaml_problem(exc)}") from exc
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return loaded or {}


def _section_names() -> set[str]:
    """Top-level keys that are sections (``data``, ``train``, ``ssl``, ...) in any schema."""
    return {
        name
        for schema in SCHEMAS
        for name, hint in typing.get_type_hints(schema).items()
        if dataclasses.is_dataclass(hint)
    }


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: where in the file and what is wrong."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is not None and problem:
        return f"not valid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return f"not valid YAML ({' '.join(str(exc).split())})"


def merge_into(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Merge ``update`` into ``base`` in place: mappings key by key, any other value replaces.

    Example:
        >>> merge_into({"data": {"root": "a", "image_size": 64}}, {"data": {"root": "b"}})
        {'data': {'root': 'b', 'image_size': 64}}
    """
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge_into(base[key], value)
        else:
            base[key] = value
    return base


def split_config_args(args: list[str] | tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Command-line words -> (YAML files, overrides): a word without ``=`` is a file when it ends in ``.yaml`` /
    ``.yml``, is an existing file or has no ``.`` (a shipped config name such as ``decon_ml``); every other word
    is a ``key=value`` override.

    Example:
        >>> split_config_args(["configs/pretrain/decon_ml.yaml", "configs/data/inhouse_ct.yaml", "data.root=ct"])
        (['configs/pretrain/decon_ml.yaml', 'configs/data/inhouse_ct.yaml'], ['data.root=ct'])
    """
    files = [
        a
        for a in args
        if "=" not in a and (a.lower().endswith((".yaml", ".yml")) or "." not in a or Path(a).is_file())
    ]
    return files, [a for a in args if a not in files]


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``"train.batch_size=8"`` into ``("train.batch_size", 8)``; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value (e.g. train.batch_size=8)")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key, value


def from_dict(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking every key and type; errors name the dotted key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown config key '{prefix}{key}'{hint}; valid keys here: {', '.join(names)}")
    kwargs = {key: _coerce(hints[key], value, f"{prefix}{key}") for key, value in raw.items()}
    return cls(**kwargs)


def validate_config(cfg: Any) -> None:
    """Run ``validate()`` on a config and on every nested section."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate_config(value)
    if hasattr(cfg, "validate"):
        cfg.validate()


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML-safe Python data."""
    return dataclasses.asdict(cfg)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> ``{"section.key": value}`` (tuples as lists), e.g. to compare two configs."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically) so a run folder records exactly what ran."""
    from decon_med.folders import atomic_write

    atomic_write(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _infer_schema(raw: dict[str, Any]) -> type[Config]:
    """The first schema that knows the most top-level keys (the narrowest when several know them all)."""

    def unknown(schema: type[Config]) -> int:
        return len(set(raw) - {f.name for f in dataclasses.fields(schema)})

    return min(SCHEMAS, key=unknown)


def set_nested(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``raw["a"]["b"] = value`` for ``dotted="a.b"``, creating sections; a non-section on the way is an error."""
    parts = dotted.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    node[parts[-1]] = value


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against type hint ``tp`` (converting int to float and lists to tuples where asked)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"config key '{key}': invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"config key '{key}': {value!r} is not one of {choices}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"config key '{key}': expected {len(args)} values, got {len(value)}")
            return tuple(
                _coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
            )
        item_tp = args[0] if args else Any
        items = [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"config key '{key}': must be a finite number, got {value!r}")
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"config key '{key}': expected {name}, got {value!r} ({type(value).__name__})")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


def memory_bytes() -> int:
    """This machine's physical memory in bytes (psutil when installed, else ``sysconf``; 0 when unknown)."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):  # not a POSIX system
        return 0


def check_memory(key: str, nbytes: int, what: str) -> None:
    """Refuse ``key`` when ``what`` (estimated at ``nbytes``) needs more than this machine's memory, before
    anything is allocated.

    Example:
        >>> check_memory("ssl.queue_size", 10**14, "the DenseCL queues")
        Traceback (most recent call last):
        decon_med.errors.ConfigError: config key 'ssl.queue_size': the DenseCL queues need about 93132 GiB, ...
    """
    total = memory_bytes()
    if total and nbytes > total:
        raise ConfigError(
            f"config key '{key}': {what} need about {nbytes / 2**30:,.0f} GiB, more than this machine's "
            f"{total / 2**30:,.0f} GiB of memory"
        )
