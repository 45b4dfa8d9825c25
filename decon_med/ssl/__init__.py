"""Self-supervised pre-training methods, built by name from a pre-training config.

Example:
    >>> method = build_method(load_config("configs/pretrain/slotcon.yaml", ["model.encoder=resnet18"]))
"""

from __future__ import annotations

from collections.abc import Callable

from decon_med.config import ENCODER_ONLY_METHODS, PretrainConfig
from decon_med.errors import ConfigError
from decon_med.models.network import build_network
from decon_med.ssl.base import SSLMethod
from decon_med.ssl.decon import DeCon, HeadFactory
from decon_med.ssl.densecl import DenseCLHead
from decon_med.ssl.slotcon import SlotConHead


def _hidden_width(cfg: PretrainConfig, is_decoder: bool) -> int:
    """``ssl.dim_hidden``, or ``ssl.dim_hidden_dec`` for a decoder level's head when it is set."""
    s = cfg.ssl
    return s.dim_hidden_dec if is_decoder and s.dim_hidden_dec is not None else s.dim_hidden


def _slotcon_heads(cfg: PretrainConfig) -> HeadFactory:
    s = cfg.ssl

    def factory(in_channels: int, is_decoder: bool) -> SlotConHead:
        return SlotConHead(
            in_channels,
            num_prototypes=s.num_prototypes_dec if is_decoder else s.num_prototypes,
            dim_hidden=_hidden_width(cfg, is_decoder),
            dim_out=s.dim_out,
            teacher_temp=s.teacher_temp,
            student_temp=s.student_temp,
            center_momentum=s.center_momentum,
            group_loss_weight=s.group_loss_weight,
            slot_temp=s.slot_temp,
        )

    return factory


def _densecl_heads(cfg: PretrainConfig) -> HeadFactory:
    s = cfg.ssl

    def factory(in_channels: int, is_decoder: bool) -> DenseCLHead:
        return DenseCLHead(
            in_channels,
            dim_hidden=_hidden_width(cfg, is_decoder),
            dim_out=s.dim_out,
            queue_size=s.queue_size,
            temperature=s.contrast_temp,
            dense_weight=s.dense_weight,
            warmup_steps=s.dense_warmup_steps,
        )

    return factory


def _build_slotcon_family(cfg: PretrainConfig) -> SSLMethod:
    # SlotCon's reference transfers the momentum (teacher) encoder.
    return _build_decon(cfg, _slotcon_heads(cfg), export_teacher=True)


def _build_densecl_family(cfg: PretrainConfig) -> SSLMethod:
    # DenseCL's reference extracts the query (student) encoder.
    return _build_decon(cfg, _densecl_heads(cfg), export_teacher=False, shuffle_bn=cfg.ssl.shuffle_bn)


def _build_mim(cfg: PretrainConfig) -> SSLMethod:
    from decon_med.ssl.mim import build_mim

    return build_mim(cfg)


def _build_decon(
    cfg: PretrainConfig, heads: HeadFactory, export_teacher: bool, shuffle_bn: bool = False
) -> SSLMethod:
    """The encoder method (``slotcon`` / ``densecl``) or its DeCon variant around the heads of ``heads``.

    ``export_teacher`` is the family's default for ``ssl.export_branch: auto``.
    """
    s = cfg.ssl
    if s.export_branch != "auto":
        export_teacher = s.export_branch == "teacher"
    encoder_only = s.method in ENCODER_ONLY_METHODS
    return DeCon(
        build_network(cfg.model, in_channels=cfg.data.in_channels, classes=1),
        heads,
        levels=() if encoder_only else s.levels,
        alpha=1.0 if encoder_only else s.alpha,
        skip_dropout=s.skip_dropout,
        dec_grid=s.dec_grid,
        in_channels=cfg.data.in_channels,
        teacher_momentum=s.teacher_momentum,
        momentum_schedule=s.momentum_schedule,
        shuffle_teacher_bn=shuffle_bn,
        export_teacher=export_teacher,
    )


#: Method name -> builder. Each builder returns an :class:`SSLMethod` whose ``network`` is the smp model.
METHODS: dict[str, Callable[[PretrainConfig], SSLMethod]] = {
    "slotcon": _build_slotcon_family,
    "decon_sl": _build_slotcon_family,
    "decon_ml": _build_slotcon_family,
    "densecl": _build_densecl_family,
    "decon_sl_densecl": _build_densecl_family,
    "decon_ml_densecl": _build_densecl_family,
    "mim": _build_mim,
}


def build_method(cfg: PretrainConfig) -> SSLMethod:
    """The pre-training method named by ``cfg.ssl.method``; an unknown name lists the valid ones."""
    if cfg.ssl.method not in METHODS:
        raise ConfigError(
            f"config key 'ssl.method': unknown method '{cfg.ssl.method}'; choose one of {', '.join(METHODS)}"
        )
    return METHODS[cfg.ssl.method](cfg)


__all__ = ["METHODS", "SSLMethod", "build_method"]
