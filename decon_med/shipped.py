"""The YAML configs shipped inside the package (``decon_med/configs``): listing them and resolving a name.

Every command that takes a config takes a path or the name of a shipped config. A file that exists wins; otherwise
``pretrain/decon_ml``, ``decon_ml``, ``decon_ml.yaml`` and ``configs/pretrain/decon_ml.yaml`` all name the shipped
``pretrain/decon_ml.yaml`` (the ``configs/...`` paths of the documentation therefore work from any folder, also
with a wheel install). A bare name that several folders hold (``folder``) needs its folder part
(``finetune/folder``).

Example:
    >>> resolve_config("decon_ml").relative_to(configs_root()).as_posix()
    'pretrain/decon_ml.yaml'
    >>> [c.name for c in shipped_configs()][:2]
    ['data/folder', 'data/inhouse_ct']
"""

from __future__ import annotations

import difflib
import functools
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from decon_med.errors import ConfigError

#: File name endings of YAML configs.
YAML_SUFFIXES = (".yaml", ".yml")
#: Prefixes a shipped name may carry: the repository's ``configs`` folder and the package's own.
NAME_PREFIXES = ("decon_med/configs/", "configs/")
#: Longest description :func:`describe` returns.
DESCRIPTION_WIDTH = 100


@dataclass(frozen=True)
class ShippedConfig:
    """One shipped config: ``name`` (``pretrain/decon_ml``) and its file."""

    name: str
    path: Path

    @property
    def stem(self) -> str:
        return self.name.rsplit("/", 1)[-1]


def configs_root() -> Path:
    """The package's ``configs`` folder, found through :mod:`importlib.resources` (wheel and editable installs)."""
    return Path(str(resources.files("decon_med") / "configs"))


@functools.lru_cache(maxsize=1)
def _scan(root: str) -> tuple[ShippedConfig, ...]:
    base = Path(root)
    files = sorted(p for p in base.rglob("*") if p.suffix in YAML_SUFFIXES and p.is_file())
    return tuple(ShippedConfig(p.relative_to(base).with_suffix("").as_posix(), p) for p in files)


def shipped_configs() -> list[ShippedConfig]:
    """Every shipped config, sorted by name."""
    return list(_scan(str(configs_root())))


def _key(text: str) -> str | None:
    """``text`` as a shipped name (``configs/pretrain/x.yaml`` -> ``pretrain/x``), or ``None`` for an absolute path."""
    name = str(text).replace("\\", "/").strip()
    if not name or name.startswith("/") or re.match(r"^[A-Za-z]:/", name):
        return None
    while name.startswith("./"):
        name = name[2:]
    for prefix in NAME_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    for suffix in YAML_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name or None


def find_shipped(text: str | Path) -> ShippedConfig | None:
    """The shipped config ``text`` names, or ``None``.

    Raises:
        ConfigError: a bare name that several shipped folders hold (the message lists them).
    """
    key = _key(str(text))
    if key is None:
        return None
    configs = shipped_configs()
    for config in configs:
        if config.name == key:
            return config
    if "/" in key:
        return None
    hits = [c for c in configs if c.stem == key]
    if len(hits) > 1:
        names = ", ".join(c.name for c in hits)
        raise ConfigError(f"{text}: names {len(hits)} shipped configs ({names}); give one of them")
    return hits[0] if hits else None


def resolve_config(path: str | Path) -> Path:
    """``path`` when it is a file; else the shipped config it names; else ``path`` unchanged (for the reader to
    report as missing, see :func:`not_found`).

    Raises:
        ConfigError: an ambiguous shipped name.
    """
    given = Path(path)
    if given.is_file():
        return given
    found = find_shipped(path)
    return found.path if found is not None else given


def close_names(text: str | Path, n: int = 3) -> list[str]:
    """Shipped names close to ``text`` (full names and bare file names are both compared; none for an absolute
    path)."""
    key = _key(str(text))
    if key is None:  # an absolute path is never a name
        return []
    configs = shipped_configs()
    candidates: dict[str, str] = {}
    for config in configs:
        candidates.setdefault(config.name, config.name)
        candidates.setdefault(config.stem, config.name)
    matches = difflib.get_close_matches(key, list(candidates), n=n * 2, cutoff=0.6)
    names: list[str] = []
    for match in matches:
        if candidates[match] not in names:
            names.append(candidates[match])
    return names[:n]


def not_found(path: str | Path, what: str = "config file") -> str:
    """One line for a config that is neither a file nor a shipped name, with the close shipped names."""
    close = close_names(path)
    is_name = Path(str(path)).suffix.lower() not in YAML_SUFFIXES
    if close:
        hint = f" (close shipped configs: {', '.join(close)}; `decon-med configs` lists them all)"
    elif is_name:
        hint = (
            ", nor a shipped config of that name (`decon-med configs` lists them); an override is key=value"
        )
    else:
        hint = ""
    return f"{path}: {what} not found{hint}"


def describe(path: Path, width: int = DESCRIPTION_WIDTH) -> str:
    """The first sentence of the comment block that opens a YAML file, shortened to ``width`` characters."""
    lines = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            break
        comment = stripped.lstrip("#").strip()
        if comment.startswith(("decon-med ", "Tiny CPU run", "Paper settings")):
            break
        lines.append(comment)
    block = " ".join(line for line in lines if line)
    sentence = re.split(r"(?<=[.;])\s+(?=[A-Z(])", block, maxsplit=1)[0] if block else ""
    if len(sentence) <= width:
        return sentence
    cut = sentence[: width - 3].rsplit(" ", 1)[0].rstrip(",;:")
    return cut + "..."
