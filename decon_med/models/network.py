"""The segmentation network: an smp model whose encoder and decoder levels can be read out.

``build_network`` creates the model with ``smp.create_model`` (``unet``, ``fpn``) or as :class:`FCN`, the paper's
fine-tuning decoder written as an smp ``SegmentationModel`` so it saves and loads the same way.
``features(network, x, skip_dropout)`` returns every encoder level and every decoder level; the decoder levels are
collected with forward hooks on smp's own decoder blocks, so smp's forward code runs unchanged.
``set_checkpointing(network, mode)`` recomputes the encoder stages and / or U-Net decoder blocks in the backward pass
instead of keeping their activations (``train.checkpointing``); losses, gradients and BatchNorm statistics are
unchanged bit for bit.

Example:
    >>> net = build_network(ModelConfig(arch="unet", encoder="resnet18"), in_channels=3, classes=2)
    >>> enc, dec = features(net, torch.randn(2, 3, 64, 64))
    >>> [f.shape[1] for f in enc], [f.shape[-1] for f in dec]
    ([64, 64, 128, 256, 512], [4, 8, 16, 32, 64])
"""

from __future__ import annotations

import contextlib
import functools
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
import torch.utils.checkpoint
from segmentation_models_pytorch.base import SegmentationHead, SegmentationModel
from segmentation_models_pytorch.encoders import get_encoder
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from decon_med.config import Arch, Checkpointing, ModelConfig
from decon_med.errors import ConfigError, DataError


class FCNDecoder(nn.Module):
    """FCN head on the last encoder level: ``num_convs`` 3x3 convs (dilated), BN, ReLU (mmseg ``FCNHead``)."""

    def __init__(self, in_channels: int, channels: int = 256, num_convs: int = 2, dilation: int = 6):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(num_convs):
            layers += [
                nn.Conv2d(
                    in_channels if i == 0 else channels,
                    channels,
                    3,
                    padding=dilation,
                    dilation=dilation,
                    bias=False,
                ),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            ]
        self.convs = nn.Sequential(*layers)
        self.out_channels = channels

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.convs(features[-1])


class FCN(SegmentationModel):
    """ResNet + FCN head, the paper's fine-tuning network (mmseg ``fcn_d6_r50-d16``), as an smp model.

    The encoder is dilated to ``encoder_output_stride`` (16), the head is two 3x3 convolutions with 256 channels
    and dilation 6, each followed by BN and ReLU, then a 1x1 classifier upsampled to the input size.

    Example:
        >>> model = FCN("resnet50", encoder_weights=None, classes=3)
        >>> model(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 3, 64, 64])
    """

    requires_divisible_input_shape = True

    def __init__(
        self,
        encoder_name: str = "resnet50",
        encoder_depth: int = 5,
        encoder_weights: str | None = None,
        encoder_output_stride: int = 16,
        decoder_channels: int = 256,
        decoder_dilation: int = 6,
        in_channels: int = 3,
        classes: int = 1,
        activation: str | None = None,
    ):
        super().__init__()
        self.encoder = get_encoder(
            encoder_name, in_channels=in_channels, depth=encoder_depth, weights=encoder_weights
        )
        if encoder_output_stride != 32:
            self.encoder.make_dilated(encoder_output_stride)
        self.decoder = FCNDecoder(self.encoder.out_channels[-1], decoder_channels, dilation=decoder_dilation)
        self.segmentation_head = SegmentationHead(
            decoder_channels, classes, activation=activation, kernel_size=1, upsampling=encoder_output_stride
        )
        self.classification_head = None
        self.name = f"fcn-{encoder_name}"
        self.initialize()


# ``smp.from_pretrained`` looks the class up on the smp module; make FCN folders loadable the same way.
if not hasattr(smp, "FCN"):
    smp.FCN = FCN


def check_recorded_network(meta: object, path: str | Path) -> dict:
    """The ``arch``, ``encoder``, ``in_channels`` and ``classes`` a checkpoint records (its ``network_meta``),
    checked so that :func:`build_network` can rebuild it.

    Raises:
        DataError: naming ``path``: no ``network_meta``, a missing entry, or an arch / encoder this installation
            does not know.
    """
    keys = ("arch", "encoder", "in_channels", "classes")
    if not isinstance(meta, dict):
        raise DataError(
            path, f"records no network_meta ({', '.join(keys)}), so its network cannot be rebuilt"
        )
    missing = [key for key in keys if key not in meta]
    if missing:
        raise DataError(path, f"network_meta lacks {', '.join(missing)}, so its network cannot be rebuilt")
    arches = typing.get_args(Arch)
    if meta["arch"] not in arches:
        raise DataError(path, f"names an unknown arch {meta['arch']!r} (expected one of {', '.join(arches)})")
    if meta["encoder"] not in smp.encoders.get_encoder_names():
        raise DataError(path, f"names an encoder this smp installation does not have: {meta['encoder']!r}")
    return {key: meta[key] for key in keys}


def build_network(cfg: ModelConfig, in_channels: int = 3, classes: int = 1) -> SegmentationModel:
    """The smp model of ``cfg`` with random weights, or the encoder weights of a local file.

    Args:
        cfg: ``arch``, ``encoder`` and ``encoder_weights`` (``None``, a local ``.pth`` / ``.safetensors`` file
            holding an encoder state dict, with or without an ``encoder.`` prefix, or a weights name smp lists
            for the encoder, see :mod:`decon_med.models.encoder_weights`).
        in_channels: input channels.
        classes: output classes of the segmentation head.
    """
    if cfg.arch == "fcn":
        net = FCN(cfg.encoder, encoder_weights=None, in_channels=in_channels, classes=classes)
    else:
        # smp's FPN ends in Dropout2d(0.2); switched off so that no level of a teacher is ever dropped.
        extra = {"decoder_dropout": 0.0} if cfg.arch == "fpn" else {}
        net = smp.create_model(
            cfg.arch,
            encoder_name=cfg.encoder,
            encoder_weights=None,
            in_channels=in_channels,
            classes=classes,
            **extra,
        )
    if cfg.encoder_weights:
        from decon_med.models.encoder_weights import is_weight_name, load_named_weights

        if is_weight_name(
            cfg.encoder, cfg.encoder_weights
        ):  # e.g. imagenet: smp's weights, from the Hub cache
            load_named_weights(net, cfg.encoder, cfg.encoder_weights, in_channels)
        else:
            load_encoder_file(net, cfg.encoder_weights, cfg.encoder)
    return net


def load_encoder_file(net: SegmentationModel, path: str | Path, encoder: str | None = None) -> None:
    """Load an encoder state dict from a local file strictly into ``net.encoder``.

    Weights of a 3-channel (RGB) encoder load into an encoder of other input channels with the first convolution
    adapted as smp adapts its own ImageNet weights (:func:`adapt_first_conv`).
    """
    from decon_med.engine.checkpoint import load_state_file

    state = load_state_file(path)
    state = {
        k.removeprefix("encoder."): v
        for k, v in state.items()
        if not k.startswith(("decoder.", "segmentation_head."))
    }
    state, _ = adapt_rgb_weights(net.encoder.state_dict(), state)
    name = encoder or getattr(net.encoder, "name", "?")
    # nn.Module's own loader: some smp encoders override load_state_dict and return nothing
    try:
        result = nn.Module.load_state_dict(net.encoder, state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        problem = str(exc).strip().splitlines()[-1].strip()[:200]
        raise ConfigError(f"model.encoder_weights: {path} does not fit encoder '{name}' ({problem})") from exc
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(
            f"model.encoder_weights: {path} does not match encoder '{name}' "
            f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})"
        )


def adapt_first_conv(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """A convolution weight ``(out, 3, kh, kw)`` made for RGB input, for ``channels`` input channels, by smp's rule
    (``patch_first_conv``): summed over RGB for 1 channel, else the RGB filters repeated cyclically and scaled by
    ``3 / channels``.

    Example:
        >>> adapt_first_conv(torch.ones(64, 3, 7, 7), 4).shape, float(adapt_first_conv(torch.ones(1, 3, 1, 1), 4).sum())
        (torch.Size([64, 4, 7, 7]), 3.0)
    """
    if weight.ndim != 4 or weight.shape[1] != 3:
        raise ValueError(f"expected a (out, 3, kh, kw) weight, got {tuple(weight.shape)}")
    if channels == 1:
        return weight.sum(1, keepdim=True)
    index = torch.arange(channels) % 3
    return weight[:, index] * (3 / channels)


def adapt_rgb_weights(
    target: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state`` with every 4D weight that has 3 input channels where ``target`` has the same tensor with another
    number (the first convolution) adapted by :func:`adapt_first_conv`; also returns the keys adapted.

    Example:
        >>> state, keys = adapt_rgb_weights(build_network(cfg, in_channels=4).state_dict(), rgb_state)
        >>> keys
        ['encoder.conv1.weight']
    """
    out, adapted = dict(state), []
    for key, value in state.items():
        want = target.get(key)
        if (
            want is not None
            and value.ndim == 4
            and want.ndim == 4
            and value.shape[1] == 3
            and want.shape[1] != 3
            and value.shape[0] == want.shape[0]
            and value.shape[2:] == want.shape[2:]
        ):
            out[key] = adapt_first_conv(value, int(want.shape[1])).to(value.dtype)
            adapted.append(key)
    return out, adapted


def decoder_level_modules(net: SegmentationModel) -> list[nn.Module]:
    """The decoder modules whose outputs are the decoder levels, coarsest first.

    U-Net: every decoder block. FPN: the pyramid maps p5, p4, p3, p2, then the merged decoder output.
    FCN: the head's output. The last level is always the decoder output that feeds the segmentation head.
    """
    decoder = net.decoder
    if isinstance(net, smp.Unet):
        return list(decoder.blocks)
    if isinstance(net, smp.FPN):
        return [decoder.p5, decoder.p4, decoder.p3, decoder.p2, decoder]
    if isinstance(net, FCN):
        return [decoder]
    raise ValueError(f"no decoder levels defined for {type(net).__name__}")


def features(
    net: SegmentationModel, x: torch.Tensor, skip_dropout: nn.Module | None = None, decoder: bool = True
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every encoder level and every decoder level of ``net`` for input ``x``.

    Args:
        net: an smp model built by :func:`build_network`.
        x: input batch (B, C, H, W).
        skip_dropout: applied to the encoder levels only where they enter the decoder through skip connections;
            the encoder's own path and the deepest level (the decoder's input) are never dropped.
        decoder: ``False`` runs the encoder only and returns no decoder levels.

    Returns:
        ``(encoder_levels, decoder_levels)``: encoder outputs at strides 2, 4, 8, 16, 32 (the input itself is not a
        level); decoder levels coarsest first, the last one feeding the segmentation head.
    """
    feats = net.encoder(x)
    encoder_levels = list(feats[1:])
    if not decoder:
        return encoder_levels, []
    if skip_dropout is not None:
        feats = [feats[0], *(skip_dropout(f) for f in feats[1:-1]), feats[-1]]
    outputs: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for m in decoder_level_modules(net)
    ]
    try:
        net.decoder(feats)
    finally:
        for h in hooks:
            h.remove()
    return encoder_levels, outputs


@torch.no_grad()
def level_channels(net: SegmentationModel, in_channels: int = 3) -> tuple[list[int], list[int]]:
    """Channel counts of the encoder and decoder levels (one small forward pass in eval mode)."""
    was_training = net.training
    net.eval()
    try:
        enc, dec = features(net, torch.zeros(1, in_channels, 64, 64, device=next(net.parameters()).device))
    finally:
        net.train(was_training)
    return [f.shape[1] for f in enc], [f.shape[1] for f in dec]


#: Called with the tensor arguments of every checkpointed call that builds a graph: a checkpoint keeps its inputs
#: outside autograd's saved tensors, so the cost report (``decon_med.cost``) counts them through this list.
CHECKPOINT_INPUT_OBSERVERS: list[Callable[[tuple], None]] = []


def checkpointed_modules(net: SegmentationModel, mode: Checkpointing) -> list[nn.Module]:
    """The modules that ``mode`` recomputes in the backward pass: the encoder stages (``layer1`` ... ``layer4`` of
    a ResNet-style encoder) for ``encoder`` / ``all``, the U-Net decoder blocks for ``decoder`` / ``all``.

    Raises:
        ConfigError: the encoder has no ResNet-style stages, or the decoder is not a U-Net's.
    """
    modules: list[nn.Module] = []
    if mode in ("encoder", "all"):
        stages = [getattr(net.encoder, f"layer{i}", None) for i in range(1, 5)]
        if any(stage is None for stage in stages):
            raise ConfigError(
                f"config key 'train.checkpointing': {mode} needs a ResNet-style encoder (layer1 ... layer4); "
                f"{type(net.encoder).__name__} has none"
            )
        modules += stages
    if mode in ("decoder", "all"):
        if not isinstance(net, smp.Unet):
            raise ConfigError(
                f"config key 'train.checkpointing': {mode} checkpoints U-Net decoder blocks; "
                f"{type(net).__name__} is not a U-Net (use encoder or none)"
            )
        modules += list(net.decoder.blocks)
    return modules


def set_checkpointing(net: SegmentationModel, mode: Checkpointing) -> None:
    """Recompute the modules of :func:`checkpointed_modules` in the backward pass instead of keeping their
    activations (``torch.utils.checkpoint``, non-reentrant); ``none`` switches it off again.

    Only calls that build a graph are checkpointed (a teacher or an evaluation under ``no_grad`` runs plainly).
    The recomputation restores the RNG state (dropout is redrawn identically) and leaves BatchNorm running
    statistics as the forward pass left them, so loss, gradients and statistics equal the run without it. The
    state dict is unchanged; ``net.checkpointing`` records the mode.

    Example:
        >>> net = build_network(ModelConfig(arch="unet", encoder="resnet18"))
        >>> set_checkpointing(net, "all")     # encoder stages and decoder blocks
    """
    for module in net.modules():
        if getattr(module.__dict__.get("forward"), "__func__", None) is _checkpointed_forward:
            del module.forward
    if mode != "none":
        for module in checkpointed_modules(net, mode):
            # a bound method (not a closure), so a deep copy of the network (the EMA teacher) binds its own copy
            module.forward = types.MethodType(_checkpointed_forward, module)
    net.checkpointing = mode


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    plain = type(self).forward
    if not torch.is_grad_enabled():
        return plain(self, *args, **kwargs)
    for observer in CHECKPOINT_INPUT_OBSERVERS:
        observer(args)
    return torch.utils.checkpoint.checkpoint(
        plain,
        self,
        *args,
        use_reentrant=False,
        context_fn=functools.partial(_recompute_contexts, self),
        **kwargs,
    )


def _recompute_contexts(module: nn.Module) -> tuple[contextlib.AbstractContextManager, ...]:
    return contextlib.nullcontext(), _keep_running_stats(module)


@contextlib.contextmanager
def _keep_running_stats(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers in train mode update their running statistics on every call; the recomputation is a
    second call of the same batch, so the statistics the forward pass left are put back after it."""
    norms = [
        m for m in module.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats
    ]
    kept = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(norms, kept, strict=True):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
