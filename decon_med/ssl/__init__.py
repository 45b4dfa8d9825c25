"""Self-supervised pre-training methods, built by name from a pre-training config.

Each method is one module that registers itself in :mod:`decon_med.ssl.registry` (``slotcon``, ``densecl``,
``mim``); :func:`build_method` builds the one ``ssl.method`` names.

Example:
    >>> method = build_method(load_config("configs/pretrain/slotcon.yaml", ["model.encoder=resnet18"]))
"""

from __future__ import annotations

from decon_med.config import PretrainConfig
from decon_med.ssl import registry
from decon_med.ssl.base import SSLMethod


def build_method(cfg: PretrainConfig) -> SSLMethod:
    """The pre-training method named by ``cfg.ssl.method`` (its registered builder); an unknown name is a
    :class:`~decon_med.errors.ConfigError` with a did-you-mean and the valid names.

    Example:
        >>> build_method(cfg).export_prefix
        'teacher.'
    """
    return registry.get(cfg.ssl.method).build(cfg)


__all__ = ["SSLMethod", "build_method", "registry"]
