"""The registry of pre-training methods: one :class:`MethodSpec` per method, registered by the method's module.

A method module (``decon_med/ssl/slotcon.py``, ``densecl.py``, ``mim.py``, or a new file of your own) declares
everything about its method in one place and registers it:

- its **name** (the value of ``ssl.method``);
- its **settings**: a dataclass whose fields are the keys of the ``ssl.<name>`` section, each documented in the
  ``Attributes:`` section of its docstring and range-checked once, in its ``validate()``;
- its **builder**: ``build(cfg) -> SSLMethod``; a method that puts one head per feature level on the network
  (SlotCon, DenseCL) builds it with :func:`decon_med.ssl.decon.build_decon`, which also gives it decoder
  supervision (``ssl.decoder``) for free;
- what it **exports** (``teacher`` or ``student``, the default of ``ssl.export_branch: auto``) and whether it has
  an EMA teacher at all.

Everything else is derived from the registry: the values ``ssl.method`` accepts (an unknown name is one error with
a did-you-mean), the ``ssl.<name>`` sections the config reads, the init methods of an experiment grid, the CLI
help and the config reference. Aliases (``decon_ml`` = ``slotcon`` with ``ssl.decoder.preset: ml``) keep the names
used before decoder supervision was its own setting.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class ToySettings:
    ...     \"\"\"Attributes:
    ...         weight: loss weight.\"\"\"
    ...     weight: float = 1.0
    ...     def validate(self) -> None: ...
    >>> register(MethodSpec("toy", ToySettings, build=build_toy, summary="a toy method"))
    >>> load_config(None, ["ssl.method=toy", "ssl.toy.weight=2"], schema=PretrainConfig).ssl.settings.weight
    2.0
    >>> unregister("toy")
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from decon_med.errors import ConfigError

if TYPE_CHECKING:
    from decon_med.config import PretrainConfig
    from decon_med.ssl.base import SSLMethod

#: Modules that register the built-in methods (imported on first use of the registry).
BUILTIN_MODULES: tuple[str, ...] = ("decon_med.ssl.slotcon", "decon_med.ssl.densecl", "decon_med.ssl.mim")

#: Keys of the ``ssl`` section itself: no method may take one of these names.
RESERVED_NAMES = frozenset(
    {"method", "decoder", "settings", "dim_hidden", "dim_out", "teacher_momentum", "momentum_schedule",
     "export_branch", "random", "none"}
)  # fmt: skip


@dataclass(frozen=True)
class MethodSpec:
    """Everything the package knows about one pre-training method.

    Attributes:
        name: the value of ``ssl.method``; also the name of the method's settings section ``ssl.<name>``.
        settings: dataclass of the ``ssl.<name>.*`` keys (defaults, ``Attributes:`` docs, ``validate()``).
        build: ``build(cfg) -> SSLMethod`` for a validated :class:`~decon_med.config.PretrainConfig`.
        summary: one line for the CLI help and the README table.
        export: network exported with ``ssl.export_branch: auto``: ``teacher`` (the EMA network) or ``student``.
        teacher: the method keeps an EMA teacher network (else ``ssl.export_branch: teacher`` is refused).
        decoder: the method takes decoder supervision (``ssl.decoder``; built with ``build_decon``).
        trains_decoder: the method pre-trains the decoder by itself (MIM), without ``ssl.decoder`` levels.
        check: optional ``check(cfg)`` for rules between the method's settings and other sections (raise
            :class:`~decon_med.errors.ConfigError` naming the key).
        config: the shipped config of the method (for the README table), e.g. ``pretrain/slotcon``.
    """

    name: str
    settings: type
    build: Callable[[PretrainConfig], SSLMethod]
    summary: str = ""
    export: Literal["teacher", "student"] = "student"
    teacher: bool = True
    decoder: bool = False
    trains_decoder: bool = False
    check: Callable[[PretrainConfig], None] | None = None
    config: str | None = None


@dataclass(frozen=True)
class Alias:
    """A method name kept from before decoder supervision was its own setting: ``method`` with
    ``ssl.decoder.preset: preset`` (``decon_ml`` = ``slotcon`` + ``ml``)."""

    name: str
    method: str
    preset: str
    config: str | None = None


_METHODS: dict[str, MethodSpec] = {}
_ALIASES: dict[str, Alias] = {}
_loaded = False


def _load_builtins() -> None:
    """Import the modules of the built-in methods once (they register themselves)."""
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module)


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry (a method module calls it once, at import).

    Raises:
        ValueError: the name is taken (by a method or an alias) or reserved, or ``settings`` is not a dataclass.

    Example:
        >>> register(MethodSpec("toy", ToySettings, build=build_toy, summary="a toy method"))
    """
    if not spec.name.isidentifier() or spec.name in RESERVED_NAMES:
        raise ValueError(f"method name {spec.name!r} is not an identifier or is reserved")
    if spec.name in _METHODS or spec.name in _ALIASES:
        raise ValueError(f"method {spec.name!r} is already registered")
    if not dataclasses.is_dataclass(spec.settings):
        raise ValueError(f"method {spec.name!r}: settings must be a dataclass, got {spec.settings!r}")
    _METHODS[spec.name] = spec
    return spec


def register_alias(alias: Alias) -> Alias:
    """Accept ``alias.name`` as ``ssl.method``, meaning ``alias.method`` with ``ssl.decoder.preset: alias.preset``."""
    if alias.name in _METHODS or alias.name in _ALIASES:
        raise ValueError(f"method {alias.name!r} is already registered")
    if not _METHODS[alias.method].decoder:
        raise ValueError(f"alias {alias.name!r}: {alias.method} takes no decoder supervision")
    _ALIASES[alias.name] = alias
    return alias


def unregister(name: str) -> None:
    """Remove a method (and the aliases of it) or an alias from the registry.

    Example:
        >>> unregister("toy")
    """
    _load_builtins()
    if name in _ALIASES:
        del _ALIASES[name]
        return
    if name not in _METHODS:
        raise KeyError(f"no method {name!r} is registered")
    del _METHODS[name]
    for alias in [a for a in _ALIASES.values() if a.method == name]:
        del _ALIASES[alias.name]


def methods() -> dict[str, MethodSpec]:
    """The registered methods by name, in registration order (a copy).

    Example:
        >>> list(methods())
        ['slotcon', 'densecl', 'mim']
    """
    _load_builtins()
    return dict(_METHODS)


def aliases() -> dict[str, Alias]:
    """The accepted aliases by name (``decon_sl``, ``decon_ml``, ``decon_sl_densecl``, ``decon_ml_densecl``)."""
    _load_builtins()
    return dict(_ALIASES)


def names(with_aliases: bool = True) -> list[str]:
    """Every value ``ssl.method`` accepts: the methods, then the aliases."""
    return [*methods(), *(aliases() if with_aliases else ())]


def get(name: str, key: str = "ssl.method") -> MethodSpec:
    """The spec of a registered method (an alias gives its method's spec).

    Raises:
        ConfigError: unknown name, naming ``key``, with a did-you-mean and the valid names.

    Example:
        >>> get("decon_ml").name
        'slotcon'
    """
    _load_builtins()
    if name in _ALIASES:
        name = _ALIASES[name].method
    if name not in _METHODS:
        raise ConfigError(unknown_message(name, key))
    return _METHODS[name]


def unknown_message(name: Any, key: str = "ssl.method", extra: tuple[str, ...] = ()) -> str:
    """``config key 'ssl.method': unknown method 'x' (did you mean ...?); choose one of ...``."""
    valid = [*extra, *names()]
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"config key '{key}': unknown method {name!r}{hint}; choose one of {', '.join(valid)}"


def help_text() -> str:
    """One line per method and alias, for the CLI help (``decon-med pretrain --help``)."""
    lines = [f"{name}: {spec.summary}" for name, spec in methods().items()]
    lines += [f"{a.name}: {a.method} + ssl.decoder.preset={a.preset}" for a in aliases().values()]
    return "; ".join(lines)
