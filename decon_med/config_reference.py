"""The config reference: every key, its type, default and meaning, generated from the config dataclasses.

The meaning of a key is taken from the ``Attributes:`` section of its dataclass docstring, so the reference in the
README cannot drift from the code (a test regenerates it and compares). The ``ssl.<method>`` sections and the
values ``ssl.method`` takes come from the method registry (:mod:`decon_med.ssl.registry`): a registered method's
settings dataclass is listed like any section.

Example:
    >>> print(reference_markdown())                  # what `decon-med config-reference` prints
    >>> rows = reference_rows(PretrainConfig); rows[0]["key"]
    'data.name'
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, Literal, Union

from decon_med.config import Config, FinetuneConfig, PretrainConfig

#: README markers between which the generated reference sits.
BEGIN_MARKER = "<!-- config-reference:begin -->"
END_MARKER = "<!-- config-reference:end -->"

_ITEM_RE = re.compile(r"^(\s*)([A-Za-z_][A-Za-z0-9_]*): (.*)$")


def attribute_docs(cls: type) -> dict[str, str]:
    """``{field: description}`` from the ``Attributes:`` section of ``cls``'s docstring (continuations joined)."""
    doc = cls.__doc__ or ""
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return {}
    docs: dict[str, str] = {}
    item_indent: int | None = None
    current: str | None = None
    for line in lines[start + 1 :]:
        if not line.strip():
            if current is not None and item_indent is not None:
                break
            continue
        indent = len(line) - len(line.lstrip())
        match = _ITEM_RE.match(line)
        if match and (item_indent is None or indent == item_indent):
            item_indent = indent
            current = match.group(2)
            docs[current] = match.group(3).strip()
        elif current is not None and item_indent is not None and indent > item_indent:
            docs[current] += " " + line.strip()
        else:
            break
    return docs


def reference_rows(cls: type, prefix: str = "", seen: set[str] | None = None) -> list[dict[str, str]]:
    """One row per leaf key of config class ``cls``: ``{"key", "type", "default", "meaning"}``.

    Nested sections come first, in field order; keys already listed (``seen``) are skipped.
    """
    seen = set() if seen is None else seen
    hints = typing.get_type_hints(cls)
    docs = {k: v for base in reversed(cls.__mro__) for k, v in attribute_docs(base).items()}
    instance = cls()
    rows: list[dict[str, str]] = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        # the declared default, as written (``transfer: auto``), not what __post_init__ resolves it to
        value = f.default if f.default is not dataclasses.MISSING else getattr(instance, f.name)
        if f.metadata.get("method_section"):  # one section per registered method: ssl.<method>.*
            from decon_med.ssl import registry

            for name, spec in registry.methods().items():
                rows.extend(reference_rows(spec.settings, f"{prefix}{name}.", seen))
            continue
        if dataclasses.is_dataclass(value):
            rows.extend(reference_rows(type(value), f"{key}.", seen))
            continue
        if key in seen:
            continue
        seen.add(key)
        rows.append(
            {
                "key": key,
                "type": type_name(hints[f.name]),
                "default": format_value(value),
                "meaning": docs.get(f.name, ""),
            }
        )
    return rows


def type_name(tp: Any) -> str:
    """A short readable type: ``int``, ``float | null``, ``list[float]``, ``unet | fpn | fcn``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(tp, type) and hasattr(tp, "choices"):  # MethodName: the registry's names
        return " \\| ".join(tp.choices())
    if origin is Literal:
        return " \\| ".join(str(a) for a in args)
    if origin is Union or str(origin) == "<class 'types.UnionType'>":
        return " \\| ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin in (list, tuple):
        return f"list[{type_name(args[0])}]" if args else "list"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def format_value(value: Any) -> str:
    """A default as it would be written in YAML: ``null``, ``true``, ``[0.08, 1.0]``, ``1e-05``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, str):
        return value if value else '""'
    return str(value)


def reference_markdown() -> str:
    """The markdown reference of every pre-training and fine-tuning key (what the README embeds)."""
    seen: set[str] = set()
    sections = [
        ("Shared by every command", Config),
        ("Pre-training only (`decon-med pretrain`)", PretrainConfig),
        ("Fine-tuning only (`decon-med finetune`, `experiment`)", FinetuneConfig),
    ]
    tables = [(title, reference_rows(cls, seen=seen)) for title, cls in sections]
    tables.append(("Experiment grids (`decon-med experiment`)", _experiment_rows()))
    out: list[str] = []
    for title, rows in tables:
        out += [f"**{title}**", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        out += [f"| `{r['key']}` | {r['type']} | `{r['default']}` | {_cell(r['meaning'])} |" for r in rows]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _experiment_rows() -> list[dict[str, str]]:
    """Keys of an experiment YAML: the grid itself, then the keys of one init under ``inits.<label>``."""
    from decon_med.experiment import ExperimentConfig, InitSpec

    rows = reference_rows(ExperimentConfig)
    return rows + reference_rows(InitSpec, prefix="inits.<label>.")


def replace_between_markers(text: str, body: str) -> str:
    """``text`` with the part between :data:`BEGIN_MARKER` and :data:`END_MARKER` replaced by ``body``."""
    begin, end = text.index(BEGIN_MARKER) + len(BEGIN_MARKER), text.index(END_MARKER)
    return text[:begin] + "\n" + body + text[end:]


def _cell(text: str) -> str:
    text = re.sub(r":[a-z]+:`([^`]+)`", r"`\1`", text)
    return text.replace("|", "\\|").replace("``", "`")
