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
Sampling = Literal["resize", "patch"]
Arch = Literal["unet", "fpn", "fcn"]
Transfer = Literal["random", "encoder", "encoder_decoder"]
#: ``transfer`` as a user writes it: ``auto`` is resolved when the config is built (``encoder`` with an init).
TransferChoice = Literal["auto", "random", "encoder", "encoder_decoder"]
Optimizer = Literal["lars", "sgd", "adamw"]
Amp = Literal["none", "bf16", "fp16"]
Checkpointing = Literal["none", "decoder", "encoder", "all"]
MomentumSchedule = Literal["cosine", "constant"]
MaskFill = Literal["token", "zero"]
ExportBranch = Literal["auto", "teacher", "student"]
Photometric = Literal["byol", "mocov2"]

DecoderPreset = Literal["none", "sl", "ml"]
Loss = Literal["ce", "dice_ce"]
Select = Literal["best", "last"]
SelectMetric = Literal["auto", "miou", "case_dice"]
Logger = Literal["csv", "tensorboard", "mlflow"]

#: Largest ``seed``: numpy's generators take 32-bit unsigned seeds.
MAX_SEED = 2**32 - 1
#: Largest ``train.epochs`` / ``train.warmup_epochs`` (no run is meant to be longer).
MAX_EPOCHS = 100_000
#: Largest ``train.iters``.
MAX_ITERS = 100_000_000
#: Finest ``data.spacing`` in mm (finer resamples a scan to more pixels than any memory holds).
MIN_SPACING = 0.01
#: Largest ``data.context_slices`` (a stack of 2 x 8 + 1 = 17 slices).
MAX_CONTEXT_SLICES = 8


@dataclass
class DataConfig:
    """Where the images are and how they are read.

    Attributes:
        name: dataset layout: ``isic2017``, ``refuge``, ``folder`` (images/ + masks/), ``unlabeled`` (any tree),
            ``nnunet`` (nnU-Net raw: imagesTr/, labelsTr/, dataset.json) or ``datalist`` (MSD / MONAI JSON).
        root: dataset root folder (``datalist``: the JSON file, or a folder holding ``dataset.json``).
        image_size: side of the square network input in pixels (a multiple of 32 for U-Nets).
        num_workers: DataLoader worker processes.
        in_channels: network input channels (>= 1): the data's channels (one per nnU-Net ``_XXXX`` channel file
            or selected 4D volume, times the CT windows of a CT channel); 1-channel data is replicated when 3
            (ImageNet-style encoders). Data with another number of channels is one error naming both. With
            ``context_slices: k``, ``2k + 1`` times the channels of one slice.
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
        channel_names: names of the input channels, in order (after ``channels``); each name decides its
            channel's intensity handling by nnU-Net's rule: ``CT`` = CT windows (``ct_window``), ``zscore``,
            ``rescale_to_0_1``, ``noNorm`` (values as stored, clipped to [0, 1]), ``rgb_to_0_1``; any other name
            (``MRI``, ``T2``, ``ADC``, ``FLAIR``) = MR (``mr_normalisation``). Volumes with names ignore
            ``modality``. ``null``: ``nnunet`` and ``datalist`` fill them in from their JSON (``channel_names``,
            MSD ``modality``) when the config is loaded, so the run records them; other layouts use ``modality``.
        affine_tolerance: largest difference (mm) allowed between a label's affine and its image's.
        fold: labelled layouts: use cross-validation fold ``fold`` (0-based) as val, the other folds as train;
            with an nnU-Net ``splits_final.json``, its fold ``fold`` (``null``: fold 0).
        num_folds: number of cross-validation folds (seeded, deterministic).
        cache_gb: NIfTI volumes: size bound (GB) of a persistent disk cache of decoded volumes, read back
            memory-mapped by every worker and every later run, and of slice indexes (reused by every run of a grid,
            keyed by file size and modification time); least recently used entries are deleted. ``0`` disables it
            (each worker keeps 4 decoded volumes in memory).
        cache_dir: folder of that cache; ``null`` = ``$XDG_CACHE_HOME/decon-med`` (default ``~/.cache/decon-med``).
        splits_file: ``nnunet``: an nnU-Net ``splits_final.json`` (a list of ``{"train": [...], "val": [...]}``,
            one per fold); ``null`` reads ``ROOT/splits_final.json`` when present. Its fold ``data.fold`` gives
            train and val; test is the labelled ``imagesTs``, else the cases the fold leaves out, else its val.
        include: ``unlabeled``: only the files whose path relative to ``root`` matches one of these globs are read
            (e.g. ``[imagesTr/*, imagesTs/*]``); this also says which files are scans, so a root that holds label
            maps (a ``labelsTr`` / ``masks`` folder, files of a few integer values) is then accepted.
        context_slices: NIfTI volumes: 2.5D input of ``k`` slices on each side; the ``2k + 1`` neighbouring slices
            of the same volume and axis (indices clamped at the volume's ends) are stacked as channels, for
            pre-training, fine-tuning, ``evaluate`` and ``predict``. ``data.in_channels`` must be ``2k + 1`` times
            the channels of one slice (1 for MR: ``k: 1`` needs ``in_channels: 3``). 2D images are refused.
        sampling: ``resize`` (each whole slice or image resized to ``image_size``, right for photographs) or
            ``patch`` (volumes at physical scale: slices resampled to ``data.spacing`` mm pixels, training on
            random ``image_size`` patches, a third of fine-tuning patches centred on foreground, smaller slices
            padded; validation, ``evaluate`` and ``predict`` use Gaussian-weighted sliding windows). ``patch``
            needs a fixed ``data.spacing`` > 0; 2D images are taken at their stored pixel grid.
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
    context_slices: int = 0
    sampling: Sampling = "resize"
    channel_names: list[str] | None = None
    splits_file: str | None = None
    include: list[str] | None = None

    def validate(self) -> None:
        _check(
            self.image_size >= 32 and self.image_size % 32 == 0,
            "data.image_size",
            f"must be a positive multiple of 32 (U-Net strides), got {self.image_size}",
        )
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _check(self.in_channels >= 1, "data.in_channels", f"must be >= 1, got {self.in_channels}")
        names = self.channel_names
        _check(
            names is None or (len(names) > 0 and all(str(n).strip() for n in names)),
            "data.channel_names",
            "must be a non-empty list of non-empty names (or null)",
        )
        _check(
            self.splits_file is None or self.name == "nnunet",
            "data.splits_file",
            "is read by data.name=nnunet only",
        )
        _check(
            self.include is None or (self.name == "unlabeled" and len(self.include) > 0),
            "data.include",
            "must be a non-empty list of globs, read by data.name=unlabeled only",
        )
        self._validate_context_and_sampling()
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

    def _validate_context_and_sampling(self) -> None:
        k = self.context_slices
        _check(
            0 <= k <= MAX_CONTEXT_SLICES,
            "data.context_slices",
            f"must be in [0, {MAX_CONTEXT_SLICES}], got {k}",
        )
        if k > 0:
            _check(
                self.name not in ("isic2017", "refuge"),
                "data.context_slices",
                f"{k} needs NIfTI volumes (neighbouring slices); data.name={self.name} holds 2D images",
            )
            stack = 2 * k + 1
            _check(
                self.in_channels >= stack and self.in_channels % stack == 0,
                "data.in_channels",
                f"{self.in_channels} is not a multiple of the {stack} stacked slices of data.context_slices={k} "
                f"(in_channels = {stack} x the channels of one slice, e.g. {stack} for MR)",
            )
        if self.sampling == "patch":
            _check(
                self.spacing is not None and self.spacing > 0,
                "data.sampling",
                "patch needs a fixed pixel size in mm, data.spacing > 0 "
                f"(got {'null' if self.spacing is None else f'{self.spacing:g}'}), so every slice has one scale",
            )


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
        select: fine-tuning checkpoint evaluated on test: ``best`` (highest val ``select_metric``) or ``last``.
        select_metric: the validation score ``select: best`` maximises: ``miou`` (pooled 2D mIoU over every val
            pixel, background included, as in the paper), ``case_dice`` (mean over the foreground classes of the
            mean per-case 3D Dice over the val cases; a missed structure or a false positive on an empty ground
            truth counts 0, a class empty in both is not scored; needs NIfTI val cases) or ``auto`` (default:
            ``case_dice`` when the val split holds NIfTI cases, else ``miou``). A resumed run keeps the metric it
            started with.
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
    select_metric: SelectMetric = "auto"
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


#: What each ``ssl.decoder.preset`` gives the keys a config leaves unset (null): ``sl`` is DeCon-SL (the last
#: decoder map, alpha 0.5 as in Table 7), ``ml`` DeCon-ML (the five U-Net / FPN levels, decoder losses only, skip
#: channel dropout 0.5: the paper's best).
DECODER_PRESETS: dict[str, dict[str, Any]] = {
    "none": {"levels": [], "alpha": 1.0, "skip_dropout": 0.0},
    "sl": {"levels": [-1], "alpha": 0.5, "skip_dropout": 0.0},
    "ml": {"levels": [0, 1, 2, 3, 4], "alpha": 0.0, "skip_dropout": 0.5},
}

#: ``ssl`` keys of the flat format (one section shared by every method, before the method registry) -> the key
#: each one is now, relative to ``ssl``. Configs, checkpoints and overrides that use them are still read.
LEGACY_SSL_KEYS: dict[str, str] = {
    "alpha": "decoder.alpha",
    "levels": "decoder.levels",
    "skip_dropout": "decoder.skip_dropout",
    "dec_grid": "decoder.grid",
    "dim_hidden_dec": "decoder.dim_hidden",
    "num_prototypes": "slotcon.num_prototypes",
    "num_prototypes_dec": "slotcon.num_prototypes_dec",
    "teacher_temp": "slotcon.teacher_temp",
    "student_temp": "slotcon.student_temp",
    "center_momentum": "slotcon.center_momentum",
    "group_loss_weight": "slotcon.group_loss_weight",
    "slot_temp": "slotcon.slot_temp",
    "queue_size": "densecl.queue_size",
    "contrast_temp": "densecl.contrast_temp",
    "dense_weight": "densecl.dense_weight",
    "dense_warmup_steps": "densecl.dense_warmup_steps",
    "shuffle_bn": "densecl.shuffle_bn",
    "mask_ratio": "mim.mask_ratio",
    "mask_patch": "mim.mask_patch",
    "mask_fill": "mim.mask_fill",
    "norm_pix_loss": "mim.norm_pix_loss",
}

#: Decoder keys of the flat format and the values it gave them when a config left them unset; an alias
#: (``ssl.method: decon_ml``) keeps them, so a config written then runs as it did.
LEGACY_DECODER_DEFAULTS: dict[str, Any] = {"levels": [-1], "alpha": 1.0, "skip_dropout": 0.0}


def _registry() -> Any:
    """:mod:`decon_med.ssl.registry` (imported on first use: it imports the methods, and with them torch)."""
    from decon_med.ssl import registry

    return registry


class MethodName(str):
    """Type of ``ssl.method``: a name the method registry (:mod:`decon_med.ssl.registry`) holds, a method or an
    alias; an unknown name is one error with a did-you-mean. Read values are plain ``str``.

    Example:
        >>> MethodName.coerce_config("slotcn", "ssl.method")
        Traceback (most recent call last):
        decon_med.errors.ConfigError: config key 'ssl.method': unknown method 'slotcn' (did you mean 'slotcon'?); ...
    """

    #: Names accepted besides the registry's.
    extra: tuple[str, ...] = ()

    @classmethod
    def choices(cls) -> list[str]:
        """Every accepted name: ``extra``, the registered methods, their aliases."""
        return [*cls.extra, *_registry().names()]

    @classmethod
    def coerce_config(cls, value: Any, key: str) -> str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a method name, got {value!r}")
        if value not in cls.choices():
            raise ConfigError(_registry().unknown_message(value, key, cls.extra))
        return str(value)


class InitMethodName(MethodName):
    """An experiment init's ``method``: ``random`` or a name ``ssl.method`` accepts."""

    extra = ("random",)


#: ``ssl.method`` values (the registry's names); kept under its earlier name.
Method = MethodName


class _EncoderOnlyMethods:
    """Live, read-only view of the method names that pre-train the encoder only (a registered method that neither
    trains the decoder by itself nor carries decoder supervision: ``slotcon``, ``densecl``)."""

    def __contains__(self, name: object) -> bool:
        spec = _registry().methods().get(name) if isinstance(name, str) else None
        return spec is not None and not spec.trains_decoder

    def __iter__(self) -> Any:
        return iter([name for name in _registry().methods() if name in self])

    def __repr__(self) -> str:
        return f"ENCODER_ONLY_METHODS({', '.join(self)})"


#: Names of the methods that train the encoder only (``name in ENCODER_ONLY_METHODS``), from the registry.
ENCODER_ONLY_METHODS = _EncoderOnlyMethods()


@dataclass
class DecoderConfig:
    """Decoder supervision (DeCon): the method's heads also on decoder levels, for any method that takes it
    (``slotcon``, ``densecl``): ``loss = alpha * L_enc + (1 - alpha) * mean_l L_dec[l]``.

    Attributes:
        preset: ``none`` (encoder only), ``sl`` (DeCon-SL: levels ``[-1]``, alpha 0.5) or ``ml`` (DeCon-ML: levels
            ``[0, 1, 2, 3, 4]``, alpha 0, skip_dropout 0.5); fills ``levels``, ``alpha`` and ``skip_dropout`` where
            they are null. ``sl`` supervises exactly one level; ``ml`` does not apply to ``model.arch=fcn``.
        levels: supervised decoder levels, 0 = coarsest decoder output; negative indices count from the finest
            (``[-1]`` = the last decoder feature map before the segmentation head); ``[]`` = encoder only.
            ``null``: the preset's.
        alpha: weight of the encoder loss: 1 without decoder levels, < 1 with them (0 = decoder losses only).
            ``null``: the preset's.
        skip_dropout: Dropout2d probability on encoder features entering the decoder through skip connections
            (student only, pre-training only); 0 without decoder levels. ``null``: the preset's.
        grid: supervised decoder levels are average-pooled to at most ``grid`` x ``grid`` before their heads, so
            their cost stays near the encoder head's (0 = no pooling).
        dim_hidden: hidden width of the decoder levels' heads; ``null`` takes ``ssl.dim_hidden``. The U-Net's
            decoder levels have 16 to 256 channels, so a narrower width there cuts DeCon's head cost.

    Example:
        >>> DecoderConfig(preset="ml", skip_dropout=0.25).levels
        [0, 1, 2, 3, 4]
    """

    preset: DecoderPreset = "none"
    levels: list[int] | None = None
    alpha: float | None = None
    skip_dropout: float | None = None
    grid: int = 7
    dim_hidden: int | None = None

    def __post_init__(self) -> None:
        for key, value in DECODER_PRESETS.get(self.preset, DECODER_PRESETS["none"]).items():
            if getattr(self, key) is None:
                setattr(self, key, list(value) if isinstance(value, list) else value)

    def validate(self) -> None:
        _check(0.0 <= self.alpha <= 1.0, "ssl.decoder.alpha", f"must be in [0, 1], got {self.alpha}")
        _check(
            0.0 <= self.skip_dropout < 1.0,
            "ssl.decoder.skip_dropout",
            f"must be in [0, 1), got {self.skip_dropout}",
        )
        _check(self.grid >= 0, "ssl.decoder.grid", "must be >= 0 (0 = no pooling)")
        _check(
            self.dim_hidden is None or self.dim_hidden >= 1, "ssl.decoder.dim_hidden", "must be >= 1 or null"
        )
        _check(
            len(set(self.levels)) == len(self.levels),
            "ssl.decoder.levels",
            f"has repeated levels {self.levels}",
        )
        if self.levels:
            _check(
                self.alpha < 1.0,
                "ssl.decoder.alpha",
                "must be < 1 with decoder levels (1 ignores the decoder); set it, or start from "
                "ssl.decoder.preset sl or ml",
            )
        else:
            _check(
                self.alpha == 1.0,
                "ssl.decoder.alpha",
                "must be 1 without decoder levels (ssl.decoder.levels)",
            )
            _check(
                self.skip_dropout == 0.0,
                "ssl.decoder.skip_dropout",
                "applies only with decoder levels (ssl.decoder.levels)",
            )
        if self.preset == "sl":
            _check(
                len(self.levels) == 1,
                "ssl.decoder.levels",
                f"preset sl supervises exactly one decoder level, got {self.levels}",
            )


@dataclass
class SSLConfig:
    """The self-supervised method: its name, the keys shared by the methods with heads, the method's own
    section ``ssl.<method>`` and decoder supervision ``ssl.decoder`` (see :mod:`decon_med.ssl.registry`).

    Configs in the flat format (``ssl.teacher_temp``, ``ssl.levels``, ``ssl.method: decon_ml_densecl``) are read
    too: each old key is moved to its place (:data:`LEGACY_SSL_KEYS`), keys of other methods are dropped, and
    one ``note:`` line per load says so.

    Attributes:
        method: the pre-training method, a name of the method registry: ``slotcon``, ``densecl`` or ``mim``;
            ``decon_sl`` / ``decon_ml`` mean ``slotcon`` with ``ssl.decoder.preset`` ``sl`` / ``ml``, and
            ``decon_sl_densecl`` / ``decon_ml_densecl`` the same around ``densecl`` (decoder keys a config leaves
            unset then keep the flat format's values: levels ``[-1]``, alpha 1, skip_dropout 0). The method's
            own keys are its section ``ssl.<method>``.
        dim_hidden: hidden width of the heads' projector / predictor (SlotCon 4096, DenseCL 2048).
        dim_out: projector output / embedding dimension (SlotCon 256, DenseCL 128).
        teacher_momentum: EMA momentum of the teacher: the start of the cosine schedule (SlotCon 0.99) or the
            constant (DenseCL 0.999).
        momentum_schedule: ``cosine`` (teacher_momentum -> 1, SlotCon) or ``constant`` (DenseCL).
        export_branch: which network is exported and fine-tuned: ``teacher`` (the EMA network, which the SlotCon
            reference transfers), ``student`` (the back-propagated network; DenseCL's reference extracts its query
            encoder) or ``auto``: the method's choice (the teacher for SlotCon, the student for DenseCL and MIM).
    """

    method: MethodName = "slotcon"
    dim_hidden: int = 4096
    dim_out: int = 256
    teacher_momentum: float = 0.99
    momentum_schedule: MomentumSchedule = "cosine"
    export_branch: ExportBranch = "auto"
    #: The method's settings (the ``ssl.<method>`` section): an instance of its registered settings dataclass.
    settings: Any = field(default=None, metadata={"method_section": True})
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    def __post_init__(self) -> None:
        registry = _registry()
        alias = registry.aliases().get(self.method)
        if alias is not None:  # built in code: the alias's method with the preset's values
            self.method = alias.method
            if self.decoder == DecoderConfig():
                self.decoder = DecoderConfig(preset=alias.preset)
        if self.settings is None:
            spec = registry.methods().get(self.method)
            self.settings = spec.settings() if spec is not None else None

    def __getattr__(self, name: str) -> Any:
        """``ssl.<method>`` is the method's settings; an old flat name (``ssl.teacher_temp``) reads the key it
        became (``ssl.slotcon.teacher_temp``)."""
        state = self.__dict__
        if name.startswith("__") or "settings" not in state or "decoder" not in state:
            raise AttributeError(name)
        if name == state.get("method"):
            return state["settings"]
        new = LEGACY_SSL_KEYS.get(name)
        if new is None:
            raise AttributeError(f"'SSLConfig' object has no attribute '{name}'")
        section, key = new.split(".")
        if section == "decoder":
            return getattr(state["decoder"], key)
        if section != state["method"]:
            raise AttributeError(
                f"ssl.{name} is now ssl.{new}, a setting of {section}, not of {state['method']}"
            )
        return getattr(state["settings"], key)

    def __setattr__(self, name: str, value: Any) -> None:
        """An old flat name (``cfg.ssl.num_prototypes = 8``) sets the key it became."""
        state = self.__dict__
        if name in LEGACY_SSL_KEYS and "settings" in state and "decoder" in state:
            section, key = LEGACY_SSL_KEYS[name].split(".")
            if section != "decoder" and section != state["method"]:
                raise AttributeError(
                    f"ssl.{name} is now ssl.{section}.{key}, not a setting of {state['method']}"
                )
            setattr(state["decoder"] if section == "decoder" else state["settings"], key, value)
            return
        object.__setattr__(self, name, value)

    @classmethod
    def from_raw(cls, raw: Any, prefix: str = "ssl.") -> SSLConfig:
        """The section from its YAML mapping: ``method``, the shared keys, ``ssl.<method>`` and ``decoder``;
        flat-format keys are moved first (one ``note:`` line). The section of another registered method (a config
        whose ``ssl.method`` an override changed) is checked for unknown keys and types, then left out.

        Raises:
            ConfigError: unknown method or key (with a did-you-mean), a bad type.
        """
        if not isinstance(raw, dict):
            raise ConfigError(f"{prefix.rstrip('.')}: expected a mapping, got {type(raw).__name__}")
        raw, moved, described = upgrade_ssl_keys(raw)
        raw, notes = resolve_ssl(raw, moved)
        line = old_format_note(prefix.rstrip("."), described, notes)
        if line:
            print(line, file=sys.stderr)
        registry = _registry()
        method = _coerce(MethodName, raw.get("method", cls.method), f"{prefix}method")
        spec = registry.get(method, f"{prefix}method")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.name != "settings"]
        for key, value in raw.items():
            if key in names or key == spec.name:
                continue
            other = registry.methods().get(key)
            if (
                other is not None
            ):  # another method's section (ssl.method switched by an override): checked, unused
                from_dict(other.settings, value if value is not None else {}, f"{prefix}{key}.")
                continue
            valid = [*names, spec.name]
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown config key '{prefix}{key}'{hint}; valid keys here: {', '.join(valid)}"
            )
        kwargs = {
            key: _coerce(hints[key], value, f"{prefix}{key}") for key, value in raw.items() if key in names
        }
        kwargs["method"] = spec.name
        section = raw.get(spec.name)
        kwargs["settings"] = from_dict(
            spec.settings, section if section is not None else {}, f"{prefix}{spec.name}."
        )
        return cls(**kwargs)

    @property
    def label(self) -> str:
        """The run's method as tables and summaries name it: the alias of the method with its decoder preset
        (``decon_ml`` for ``slotcon`` + ``ml``), ``<method>+decoder`` for decoder levels without a preset, else the
        method.

        Example:
            >>> load_config("configs/pretrain/decon_ml_densecl.yaml").ssl.label
            'decon_ml_densecl'
        """
        if not self.decoder.levels:
            return self.method
        for alias in _registry().aliases().values():
            if (alias.method, alias.preset) == (self.method, self.decoder.preset):
                return alias.name
        return f"{self.method}+decoder"

    def as_tree(self, tree: dict[str, Any]) -> dict[str, Any]:
        """``dataclasses.asdict`` of this section with ``settings`` written under the method's name."""
        return {(self.method if key == "settings" else key): value for key, value in tree.items()}

    def validate(self) -> None:
        spec = _registry().get(self.method)
        _check(
            isinstance(self.settings, spec.settings),
            f"ssl.{self.method}",
            f"must hold {spec.settings.__name__}, got {type(self.settings).__name__}",
        )
        for key in ("dim_hidden", "dim_out"):
            _check(getattr(self, key) >= 1, f"ssl.{key}", "must be >= 1")
        _check(0.0 <= self.teacher_momentum <= 1.0, "ssl.teacher_momentum", "must be in [0, 1]")
        _check(
            spec.decoder or not self.decoder.levels,
            "ssl.decoder.levels",
            f"{self.method} takes no decoder supervision (its decoder is pre-trained otherwise or not at all); "
            "leave ssl.decoder.preset at none",
        )
        _check(
            spec.teacher or self.export_branch != "teacher",
            "ssl.export_branch",
            f"{self.method} has no teacher network (use auto or student)",
        )


def upgrade_ssl_keys(ssl: dict[str, Any]) -> tuple[dict[str, Any], set[str], list[str]]:
    """One source's ``ssl`` mapping with each flat-format key moved to its place (:data:`LEGACY_SSL_KEYS`); in the
    same source an old key wins over its new one. Returns the mapping, the moved keys' new names (relative to
    ``ssl``) and ``old -> new`` descriptions.

    Example:
        >>> upgrade_ssl_keys({"method": "slotcon", "teacher_temp": 0.04})[0]
        {'method': 'slotcon', 'slotcon': {'teacher_temp': 0.04}}
    """
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in ssl.items() if k not in LEGACY_SSL_KEYS}
    moved: set[str] = set()
    described: list[str] = []
    for old, value in ssl.items():
        if old not in LEGACY_SSL_KEYS:
            continue
        new = LEGACY_SSL_KEYS[old]
        section, key = new.split(".")
        if not isinstance(out.get(section), dict):
            out[section] = {}
        out[section][key] = value
        moved.add(new)
        described.append(f"ssl.{old} -> ssl.{new}")
    return out, moved, described


def resolve_ssl(ssl: dict[str, Any], moved: set[str]) -> tuple[dict[str, Any], list[str]]:
    """The merged ``ssl`` mapping after :func:`upgrade_ssl_keys`: an alias method becomes its method and decoder
    preset (decoder keys no source set keep the flat format's values), and the moved keys (``moved``) that do not
    apply are dropped: the other methods' keys, which the flat format shared, and the decoder keys of a run without
    decoder levels, which it ignored. Returns the mapping and the notes (empty when nothing old was read).

    Example:
        >>> resolve_ssl({"method": "decon_ml", "decoder": {"alpha": 0.0}}, set())[0]["decoder"]
        {'alpha': 0.0, 'preset': 'ml', 'levels': [-1], 'skip_dropout': 0.0}
    """
    registry = _registry()
    notes: list[str] = []
    method = ssl.get("method", SSLConfig.method)
    alias = registry.aliases().get(method) if isinstance(method, str) else None
    if alias is not None:
        decoder = ssl["decoder"] = dict(ssl.get("decoder") or {})
        decoder["preset"] = alias.preset
        kept = {k: v for k, v in LEGACY_DECODER_DEFAULTS.items() if k not in decoder}
        decoder.update(kept)
        ssl["method"] = method = alias.method
        unset = f" (unset {', '.join(f'{k} {v}' for k, v in kept.items())}, as before)" if kept else ""
        notes.append(
            f"ssl.method={alias.name} -> ssl.method={alias.method} + ssl.decoder.preset={alias.preset}{unset}"
        )
    dropped: list[str] = []
    for section in registry.methods():
        node = ssl.get(section)
        if section == method or not isinstance(node, dict):
            continue
        for key in [k for k in node if f"{section}.{k}" in moved]:
            del node[key]
            dropped.append(f"ssl.{section}.{key}")
        if not node:
            del ssl[section]
    decoder = ssl.get("decoder")
    if alias is None and isinstance(decoder, dict):
        levels_set = bool(decoder.get("levels")) and "decoder.levels" not in moved
        if decoder.get("preset", "none") == "none" and not levels_set:
            for key, ignored in (("levels", None), ("alpha", 1.0), ("skip_dropout", 0.0)):
                if (
                    f"decoder.{key}" in moved
                    and key in decoder
                    and (ignored is None or decoder[key] == ignored)
                ):
                    del decoder[key]
                    dropped.append(f"ssl.decoder.{key}")
    if dropped:
        old_names = {new: f"ssl.{old}" for old, new in LEGACY_SSL_KEYS.items()}
        dropped = [old_names.get(key.removeprefix("ssl."), key) for key in dropped]
        shown = ", ".join(dropped[:3]) + (f" and {len(dropped) - 3} more" if len(dropped) > 3 else "")
        notes.append(f"unused by {method}: {shown}")
    return ssl, notes


def old_format_note(where: str, described: list[str], notes: list[str]) -> str | None:
    """The one ``note:`` line of a load that read flat-format ``ssl`` settings (``None`` when it read none).

    Example:
        >>> old_format_note("a.yaml", ["ssl.alpha -> ssl.decoder.alpha"], [])
        'note: a.yaml: ssl settings in the flat format, read as the current keys: ssl.alpha -> ssl.decoder.alpha'
    """
    parts = list(notes)
    if described:
        shown = ", ".join(described[:3]) + (f" and {len(described) - 3} more" if len(described) > 3 else "")
        parts.insert(1 if notes and notes[0].startswith("ssl.method=") else 0, shown)
    if not parts:
        return None
    return f"note: {where}: ssl settings in the flat format, read as the current keys: {'; '.join(parts)}"


def upgrade_config(tree: dict[str, Any], where: str | None = None) -> dict[str, Any]:
    """A config mapping (a saved ``config.yaml``, a checkpoint's ``config``) with its ``ssl`` section in the
    current format; with ``where``, one ``note: WHERE: ...`` line on stderr when anything old was read.

    Example:
        >>> upgrade_config({"ssl": {"method": "decon_sl", "alpha": 0.5}})["ssl"]["decoder"]["preset"]
        'sl'
    """
    if not isinstance(tree, dict) or not isinstance(tree.get("ssl"), dict):
        return tree
    ssl, moved, described = upgrade_ssl_keys(tree["ssl"])
    ssl, notes = resolve_ssl(ssl, moved)
    line = old_format_note(where, described, notes) if where is not None else None
    if line:
        print(line, file=sys.stderr)
    return {**tree, "ssl": ssl}


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
        transfer: ``auto`` (``encoder`` with an init, ``random`` without; the saved config holds the result),
            ``random``, ``encoder`` (fresh decoder) or ``encoder_decoder`` (only the classifier is new). ``encoder``
            is the default with an init because it is what was measured to work: in the CPU studies a transferred
            DeCon decoder fine-tunes below encoder-only transfer, on both synthetic tasks (docs/validity.md).
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
    transfer: TransferChoice = "auto"
    fraction: float = 1.0
    transfer_bn: TransferBN = "keep"
    transfer_bn_affine: TransferBNAffine = "keep"
    reinit_decoder_blocks: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.transfer == "auto":
            self.transfer = "random" if self.init is None else "encoder"

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
        >>> cfg.ssl.method, cfg.ssl.decoder.preset, cfg.ssl.decoder.levels
        ('slotcon', 'ml', [0, 1, 2, 3, 4])
    """

    ssl: SSLConfig = field(default_factory=SSLConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def validate(self) -> None:
        super().validate()
        decoder = self.ssl.decoder
        if self.model.arch == "fcn" and decoder.levels:
            _check(
                decoder.preset != "ml",
                "ssl.decoder.preset",
                "model.arch=fcn has one decoder level, so ml (DeCon-ML, several levels) does not apply; use sl",
            )
            _check(
                all(level in (0, -1) for level in decoder.levels),
                "ssl.decoder.levels",
                f"model.arch=fcn has one decoder level (0 or -1), got {decoder.levels}",
            )
        check = _registry().get(self.ssl.method).check
        if check is not None:  # the method's rules between its settings and other sections
            check(self)


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
        >>> cfg.ssl.decoder.preset, cfg.data.modality
        ('ml', 'ct')

    ``ssl`` keys of the flat format (``ssl.teacher_temp``, ``ssl.method=decon_ml``) are read at their new places
    (:class:`SSLConfig`), with one ``note:`` line.
    """
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    raw: dict[str, Any] = {}
    old_format = _OldFormat()  # ssl keys of the flat format: moved per source, resolved once merged
    for file in paths:
        sections = _section_names()
        tree = {  # a section whose keys are all commented out is empty, not a reset of the section
            key: value for key, value in read_yaml(file).items() if not (key in sections and value is None)
        }
        if all(key in sections and value == {} for key, value in tree.items()):
            print(f"warning: {file} sets nothing", file=sys.stderr)  # e.g. every key commented out
        merge_into(raw, old_format.source(tree, str(file)))
    for item in overrides:
        key, value = parse_override(item)
        key, value = old_format.override(key, value)
        set_nested(raw, key, value)
    note = old_format.resolve(raw)
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
    _fill_channel_names(cfg)
    if note:  # only for a config that loads: a bad one is one error line
        print(note, file=sys.stderr)
    return cfg


class _OldFormat:
    """The ``ssl`` keys of the flat format met while :func:`load_config` merges its sources: each source's old keys
    are moved to their places before it is merged (so later sources still win), remembering which keys were last
    set by an old one; once merged, :func:`resolve_ssl` expands an alias and drops the old keys that do not apply,
    and one ``note:`` line names the sources."""

    def __init__(self) -> None:
        self.from_old: dict[str, bool] = {}  # key under ssl -> its last writer used the flat format
        self.sources: list[str] = []
        self.described: list[str] = []

    def _record(self, ssl: Any, moved: set[str], prefix: str = "") -> None:
        for key, value in ssl.items() if isinstance(ssl, dict) else ():
            if isinstance(value, dict) and value:
                self._record(value, moved, f"{prefix}{key}.")
            else:
                self.from_old[f"{prefix}{key}"] = f"{prefix}{key}" in moved

    def source(self, tree: dict[str, Any], name: str) -> dict[str, Any]:
        """``tree`` (a file's sections) with its ``ssl`` section in the current format."""
        ssl = tree.get("ssl")
        if not isinstance(ssl, dict):
            return tree
        ssl, moved, described = upgrade_ssl_keys(ssl)
        self._record(ssl, moved)
        if described or ssl.get("method") in _registry().aliases():
            self.sources.append(name)
            self.described += described
        return {**tree, "ssl": ssl}

    def override(self, key: str, value: Any) -> tuple[str, Any]:
        """A ``key=value`` override with an old ``ssl`` key renamed."""
        if key == "ssl" and isinstance(value, dict):
            return key, self.source({"ssl": value}, "overrides")["ssl"]
        if not key.startswith("ssl."):
            return key, value
        name = key[len("ssl.") :]
        if name in LEGACY_SSL_KEYS:
            self.from_old[LEGACY_SSL_KEYS[name]] = True
            self.sources.append("overrides")
            self.described.append(f"{key} -> ssl.{LEGACY_SSL_KEYS[name]}")
            return f"ssl.{LEGACY_SSL_KEYS[name]}", value
        self._record({name: value}, set())
        if name == "method" and isinstance(value, str) and value in _registry().aliases():
            self.sources.append("overrides")
        return key, value

    def resolve(self, raw: dict[str, Any]) -> str | None:
        """Expand an alias and drop old keys that do not apply, in the merged ``raw``; returns the ``note:`` line
        (``None`` when nothing old was read)."""
        if not self.sources or not isinstance(raw.get("ssl"), dict):
            return None
        moved = {key for key, old in self.from_old.items() if old}
        raw["ssl"], notes = resolve_ssl(raw["ssl"], moved)
        return old_format_note(", ".join(dict.fromkeys(self.sources)), self.described, notes)


def _fill_channel_names(cfg: Any) -> None:
    """``data.channel_names: null`` of an ``nnunet`` / ``datalist`` config, taken from the dataset's JSON (after
    ``data.channels``), so that the run's saved config records each channel's name and intensity handling."""
    data = getattr(cfg, "data", None)
    if isinstance(data, DataConfig) and data.channel_names is None and data.name in ("nnunet", "datalist"):
        from decon_med.data.layout_base import dataset_channel_names

        names = dataset_channel_names(data)
        data.channel_names = None if names is None else list(names)


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
    if hasattr(cls, "from_raw"):  # a section that reads itself (SSLConfig: the method's own section)
        return cls.from_raw(raw, prefix)
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
    """The config as plain YAML-safe Python data (the method's settings under ``ssl.<method>``)."""
    tree = dataclasses.asdict(cfg)
    if isinstance(cfg, SSLConfig):
        return cfg.as_tree(tree)
    if isinstance(getattr(cfg, "ssl", None), SSLConfig) and isinstance(tree.get("ssl"), dict):
        tree["ssl"] = cfg.ssl.as_tree(tree["ssl"])
    return tree


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
    if isinstance(tp, type) and hasattr(tp, "coerce_config"):  # a type that checks itself (MethodName)
        return tp.coerce_config(value, key)
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


def check(ok: bool, key: str, message: str) -> None:
    """Raise ``ConfigError("config key 'KEY': MESSAGE")`` unless ``ok``: the checks of a settings dataclass's
    ``validate()`` (a method's ``ssl.<method>`` section).

    Example:
        >>> check(0.1 > 0, "ssl.slotcon.teacher_temp", "must be > 0")
    """
    _check(ok, key, message)


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
