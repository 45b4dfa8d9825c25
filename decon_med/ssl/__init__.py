"""Self-supervised pre-training methods, built by name from a pre-training config.

Example:
    >>> method = build_method(load_config("configs/pretrain/slotcon.yaml", ["model.encoder=resnet18"]))
"""

from __future__ import annotations

from collections.abc import Callable

from decon_med.config import PretrainConfig
from decon_med.errors import ConfigError
from decon_med.models.network import build_network
from decon_med.ssl.base import SSLMethod
from decon_med.ssl.decon import DeCon
from decon_med.ssl.slotcon import SlotConHead


def _slotcon_heads(cfg: PretrainConfig):
    s = cfg.ssl

    def factory(in_channels: int, is_decoder: bool) -> SlotConHead:
        return SlotConHead(
            in_channels,
            num_prototypes=s.num_prototypes_dec if is_decoder else s.num_prototypes,
            dim_hidden=s.dim_hidden,
            dim_out=s.dim_out,
            teacher_temp=s.teacher_temp,
            student_temp=s.student_temp,
            center_momentum=s.center_momentum,
            group_loss_weight=s.group_loss_weight,
            slot_temp=s.slot_temp,
        )

    return factory


def _build_slotcon_family(cfg: PretrainConfig) -> SSLMethod:
    s = cfg.ssl
    encoder_only = s.method == "slotcon"
    return DeCon(
        build_network(cfg.model, in_channels=cfg.data.in_channels, classes=1),
        _slotcon_heads(cfg),
        levels=() if encoder_only else s.levels,
        alpha=1.0 if encoder_only else s.alpha,
        skip_dropout=s.skip_dropout,
        dec_grid=s.dec_grid,
        in_channels=cfg.data.in_channels,
        teacher_momentum=s.teacher_momentum,
    )


#: Method name -> builder. Each builder returns an :class:`SSLMethod` whose ``network`` is the smp model.
METHODS: dict[str, Callable[[PretrainConfig], SSLMethod]] = {
    "slotcon": _build_slotcon_family,
    "decon_sl": _build_slotcon_family,
    "decon_ml": _build_slotcon_family,
}


def build_method(cfg: PretrainConfig) -> SSLMethod:
    """The pre-training method named by ``cfg.ssl.method``; an unknown name lists the valid ones."""
    if cfg.ssl.method not in METHODS:
        raise ConfigError(
            f"config key 'ssl.method': unknown method '{cfg.ssl.method}'; choose one of {', '.join(METHODS)}"
        )
    return METHODS[cfg.ssl.method](cfg)


__all__ = ["METHODS", "SSLMethod", "build_method"]
