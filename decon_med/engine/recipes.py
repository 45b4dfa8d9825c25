"""Fine-tuning recipes for few labels: per-part learning rates, a frozen warm-up, and the handling of transferred
BatchNorm layers and decoder blocks. Every one is off by default, and off they change nothing.

* ``train.lr_mult`` (``{encoder, decoder, head}``): one pair of optimiser groups per part, each with its
  multiplier as ``lr_scale`` (:func:`decon_med.engine.optim.param_groups`); a multiplier of 0 freezes the part for
  the whole run (:class:`FreezeSchedule`).
* ``train.freeze`` (``{parts, iters}``, LP-FT): the parts are frozen for the first ``iters`` iterations: no
  gradient, no optimiser update (momentum and weight decay included) and their BatchNorm layers in eval mode, so
  weights and running statistics stay bit for bit as loaded. Which parts are frozen is a function of the iteration
  alone, applied before every iteration, so a resumed run freezes exactly as an uninterrupted one.
* ``transfer_bn`` (``keep``, ``reset``, ``recompute``) and ``transfer_bn_affine`` (``keep``, ``reset``): what the
  transferred BatchNorm layers (those whose statistics were loaded from ``init``) start from
  (:func:`apply_transfer_recipes`, :func:`recompute_bn_stats`).
* ``reinit_decoder_blocks``: the last K decoder blocks (:func:`decoder_blocks`) get back the weights they had
  before ``init`` was loaded, i.e. those of a ``transfer=random`` run with the same seed.

What was applied is recorded under ``recipes`` in the run's ``init_report.json`` (absent when nothing was).

Example:
    >>> schedule = FreezeSchedule(cfg.train)            # train.freeze: {parts: [encoder], iters: 100}
    >>> schedule.frozen(step=99), schedule.frozen(step=100)
    ({'encoder'}, set())
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import segmentation_models_pytorch as smp
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from decon_med.config import FinetuneConfig, TrainConfig
from decon_med.engine.optim import PARTS, part_of
from decon_med.errors import ConfigError
from decon_med.models.network import FCN


def lr_mult(train_cfg: TrainConfig) -> dict[str, float] | None:
    """``{part: multiplier}`` of ``train.lr_mult``, or ``None`` when every multiplier is 1 (one rate for all)."""
    mult = {part: float(getattr(train_cfg.lr_mult, part)) for part in PARTS}
    return None if all(value == 1.0 for value in mult.values()) else mult


class FreezeSchedule:
    """Which parts of the network are frozen at each iteration: those with ``train.lr_mult`` 0 always, those of
    ``train.freeze.parts`` during the first ``train.freeze.iters`` iterations.

    Example:
        >>> schedule = FreezeSchedule(TrainConfig(freeze=FreezeConfig(parts=["encoder"], iters=2)))
        >>> [sorted(schedule.frozen(step)) for step in range(3)]
        [['encoder'], ['encoder'], []]
    """

    def __init__(self, train_cfg: TrainConfig):
        self.always = {part for part in PARTS if getattr(train_cfg.lr_mult, part) == 0}
        self.parts = set(train_cfg.freeze.parts)
        self.iters = int(train_cfg.freeze.iters)

    @property
    def active(self) -> bool:
        """True when some part is ever frozen."""
        return bool(self.always) or (self.iters > 0 and bool(self.parts))

    @property
    def toggles(self) -> bool:
        """True when parts are unfrozen during the run (their ``requires_grad`` changes)."""
        return self.iters > 0 and bool(self.parts - self.always)

    def frozen(self, step: int) -> set[str]:
        """The parts frozen for the iteration that starts at ``step`` (0-based)."""
        return self.always | (self.parts if step < self.iters else set())

    def apply(self, network: nn.Module, step: int) -> list[nn.Parameter]:
        """Set ``requires_grad`` of every parameter and the mode of every BatchNorm layer for iteration ``step``:
        frozen parts get no gradient and their BatchNorm layers go to eval mode (the others follow
        ``network.training``). Returns the frozen parameters."""
        return freeze_parts(network, self.frozen(step))


def freeze_parts(network: nn.Module, frozen: set[str]) -> list[nn.Parameter]:
    """Freeze the parts named in ``frozen`` and unfreeze the others (see :meth:`FreezeSchedule.apply`)."""
    params = []
    for name, p in network.named_parameters():
        is_frozen = part_of(name) in frozen
        p.requires_grad_(not is_frozen)
        if is_frozen:
            params.append(p)
    for name, module in network.named_modules():
        if isinstance(module, _BatchNorm):
            module.train(network.training and part_of(name) not in frozen)
    return params


# -- transferred BatchNorm layers and decoder blocks ------------------------------------------------------------------
def decoder_blocks(network: nn.Module) -> list[tuple[str, ...]]:
    """The decoder blocks of an smp network, coarsest first, each as the state-dict prefixes of its modules.

    U-Net: ``decoder.blocks.<i>``. FPN: the four pyramid levels p5 ... p2, each with the segmentation block that
    reads it (``decoder.p5`` + ``decoder.seg_blocks.0``, ...). FCN: its two conv + BatchNorm layers.

    Example:
        >>> decoder_blocks(build_network(ModelConfig(arch="unet", encoder="resnet18")))[-1]
        ('decoder.blocks.4.',)
    """
    decoder = network.decoder
    if isinstance(network, smp.Unet):
        return [(f"decoder.blocks.{i}.",) for i in range(len(decoder.blocks))]
    if isinstance(network, smp.FPN):
        return [(f"decoder.p{5 - i}.", f"decoder.seg_blocks.{i}.") for i in range(len(decoder.seg_blocks))]
    if isinstance(network, FCN):
        convs = [i for i, m in enumerate(decoder.convs) if isinstance(m, nn.Conv2d)]
        return [(f"decoder.convs.{i}.", f"decoder.convs.{i + 1}.") for i in convs]
    raise ConfigError(
        f"config key 'reinit_decoder_blocks': no decoder blocks defined for {type(network).__name__}"
    )


def reinit_prefixes(network: nn.Module, count: int, arch: str) -> tuple[str, ...]:
    """State-dict prefixes of the last ``count`` decoder blocks (none for 0).

    Raises:
        ConfigError: the decoder has fewer blocks.
    """
    if count == 0:
        return ()
    blocks = decoder_blocks(network)
    if count > len(blocks):
        raise ConfigError(
            f"config key 'reinit_decoder_blocks': the {arch} decoder has {len(blocks)} blocks, got {count}"
        )
    return tuple(prefix for block in blocks[len(blocks) - count :] for prefix in block)


def fresh_tensors(network: nn.Module, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Copies of the state-dict tensors under ``prefixes`` (taken before ``init`` is loaded)."""
    if not prefixes:
        return {}
    return {k: v.detach().clone() for k, v in network.state_dict().items() if k.startswith(prefixes)}


def bn_layers(network: nn.Module, keys: Iterable[str]) -> list[str]:
    """Names of the BatchNorm layers whose ``running_mean`` is among ``keys`` (e.g. the loaded tensors)."""
    keys = set(keys)
    return [
        name
        for name, module in network.named_modules()
        if isinstance(module, _BatchNorm) and f"{name}.running_mean" in keys
    ]


@torch.no_grad()
def reset_bn_stats(network: nn.Module, names: Iterable[str]) -> None:
    """Running mean 0, running variance 1 and batch counter 0 for the BatchNorm layers ``names``."""
    modules = dict(network.named_modules())
    for name in names:
        module = modules[name]
        module.reset_running_stats()


@torch.no_grad()
def reset_bn_affine(network: nn.Module, names: Iterable[str]) -> None:
    """Weight 1 and bias 0 for the BatchNorm layers ``names``."""
    modules = dict(network.named_modules())
    for name in names:
        module = modules[name]
        if module.affine:
            module.weight.fill_(1.0)
            module.bias.zero_()


def apply_transfer_recipes(
    network: nn.Module, cfg: FinetuneConfig, report: dict[str, Any], fresh: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """After :func:`~decon_med.engine.transfer.load_init`: put the re-initialised decoder blocks back to
    ``fresh``, then reset the statistics / affine parameters of the transferred BatchNorm layers as configured.

    Args:
        network: the network ``init`` was loaded into.
        cfg: ``reinit_decoder_blocks``, ``transfer_bn`` and ``transfer_bn_affine`` are read.
        report: the report of ``load_init`` (its ``loaded`` keys say what was transferred).
        fresh: :func:`fresh_tensors` of the re-initialised blocks, taken before loading.

    Returns:
        What was applied (``{}`` when nothing was): the re-initialised keys, the BatchNorm layers reset, and for
        ``transfer_bn=recompute`` the layers whose statistics are still to be recomputed (``bn_recompute``).
    """
    applied: dict[str, Any] = {}
    loaded = set(report.get("loaded", []))
    if cfg.reinit_decoder_blocks:
        reloaded = [k for k in fresh if k in loaded]
        if reloaded:
            nn.Module.load_state_dict(network, {k: fresh[k] for k in reloaded}, strict=False)
        applied["reinit_decoder_blocks"] = cfg.reinit_decoder_blocks
        applied["reinitialised"] = reloaded
        loaded -= set(reloaded)
    layers = bn_layers(network, loaded)
    if cfg.transfer_bn == "reset":
        reset_bn_stats(network, layers)
        applied["transfer_bn"] = "reset"
        applied["transfer_bn_layers"] = layers
    elif cfg.transfer_bn == "recompute":
        applied["transfer_bn"] = "recompute"
        applied["transfer_bn_layers"] = layers
    if cfg.transfer_bn_affine == "reset":
        reset_bn_affine(network, layers)
        applied["transfer_bn_affine"] = "reset"
        applied["transfer_bn_affine_layers"] = layers
    return applied


@torch.no_grad()
def recompute_bn_stats(
    network: nn.Module, names: list[str], batches: Iterable[torch.Tensor]
) -> dict[str, int]:
    """Re-estimate the running statistics of the BatchNorm layers ``names`` from one pass over ``batches``.

    The network runs in training mode without gradients (BatchNorm layers not in ``names`` in eval mode, so
    their statistics do not move; nothing else is updated), the layers of ``names`` with ``momentum=None``.
    Each layer's running mean and variance become the exact per-channel mean and unbiased variance of its input
    over every pixel of every image (accumulated in float64, whatever the batching), and its counter the number
    of batches. Modes and momenta are restored afterwards.

    Returns:
        ``{"images", "batches", "layers"}``: what the pass saw and how many layers it set.

    Example:
        >>> recompute_bn_stats(net, bn_layers(net, report["loaded"]), (b["image"] for b in loader))
        {'images': 48, 'batches': 6, 'layers': 20}
    """
    modules = dict(network.named_modules())
    layers = [modules[name] for name in names]
    if not layers:
        return {"images": 0, "batches": 0, "layers": 0}
    chosen = set(map(id, layers))
    modes = [(m, m.training) for m in network.modules()]
    momenta = [(m, m.momentum) for m in layers]
    stats: dict[int, tuple[float, torch.Tensor, torch.Tensor]] = {}

    def accumulate(module: nn.Module, inputs: tuple) -> None:
        x = inputs[0].detach().to(torch.float64)
        dims = [0, *range(2, x.ndim)]
        n = x.numel() / x.shape[1]
        mean = x.mean(dims)
        m2 = (x - mean.view(1, -1, *([1] * (x.ndim - 2)))).square().sum(dims)
        if id(module) not in stats:
            stats[id(module)] = (n, mean, m2)
            return
        n0, mean0, m20 = stats[id(module)]  # Chan et al.'s parallel update
        delta = mean - mean0
        total = n0 + n
        stats[id(module)] = (total, mean0 + delta * (n / total), m20 + m2 + delta.square() * (n0 * n / total))

    hooks = [m.register_forward_pre_hook(accumulate) for m in layers]
    images = n_batches = 0
    try:
        network.train()
        for module in network.modules():
            if isinstance(module, _BatchNorm) and id(module) not in chosen:
                module.eval()
        for module in layers:
            module.momentum = None
        for batch in batches:
            network(batch)
            images += batch.shape[0]
            n_batches += 1
    finally:
        for hook in hooks:
            hook.remove()
        for module, momentum in momenta:
            module.momentum = momentum
        for module, mode in modes:
            module.training = mode
    for module in layers:
        if id(module) not in stats:
            continue
        count, mean, m2 = stats[id(module)]
        module.running_mean.copy_(mean.to(module.running_mean.dtype))
        module.running_var.copy_((m2 / max(count - 1, 1)).to(module.running_var.dtype))
        if module.num_batches_tracked is not None:
            module.num_batches_tracked.fill_(n_batches)
    return {"images": images, "batches": n_batches, "layers": len(layers)}


def format_recipes(applied: dict[str, Any]) -> str:
    """One line naming what :func:`apply_transfer_recipes` and the training recipes applied ('' for nothing).

    Example:
        >>> format_recipes({"transfer_bn": "reset", "transfer_bn_layers": ["encoder.bn1"]})
        'recipes: BatchNorm statistics reset in 1 transferred layers'
    """
    parts = []
    if "reinit_decoder_blocks" in applied:
        parts.append(
            f"last {applied['reinit_decoder_blocks']} decoder blocks re-initialised "
            f"({len(applied['reinitialised'])} tensors)"
        )
    if "transfer_bn" in applied:
        what = "recomputed" if applied["transfer_bn"] == "recompute" else "reset"
        parts.append(
            f"BatchNorm statistics {what} in {len(applied['transfer_bn_layers'])} transferred layers"
        )
    if "transfer_bn_affine" in applied:
        parts.append(f"BatchNorm weight / bias reset in {len(applied['transfer_bn_affine_layers'])} layers")
    if "lr_mult" in applied:
        parts.append("lr x " + ", ".join(f"{k} {v:g}" for k, v in applied["lr_mult"].items()))
    if "freeze" in applied:
        freeze = applied["freeze"]
        parts.append(f"{' + '.join(freeze['parts'])} frozen for {freeze['iters']} iterations")
    return f"recipes: {'; '.join(parts)}" if parts else ""
