"""Initialise a segmentation network from pre-trained weights before fine-tuning.

``init`` may be any of:

* an export folder written by ``decon-med export`` (``export.json`` + ``encoder.safetensors`` /
  ``encoder_decoder.safetensors``; the file matching ``transfer`` is read);
* a ``.safetensors`` or torch ``.pth`` / ``.pt`` file holding an smp state dict (an encoder-only dict without the
  ``encoder.`` prefix is accepted too);
* a pre-training checkpoint ``.ckpt`` (its student network is read);
* an smp ``save_pretrained`` folder (``config.json`` + ``model.safetensors``).

``transfer`` picks what is copied: ``random`` nothing, ``encoder`` the ``encoder.*`` tensors (decoder and head
stay freshly initialised), ``encoder_decoder`` the ``encoder.*`` and ``decoder.*`` tensors (only the segmentation
head is new). A load is never partial: every copied tensor must exist in the network with the same shape, and
every tensor of the transferred part must be in the source (BatchNorm's ``num_batches_tracked`` counters
excepted), otherwise a :class:`~decon_med.errors.DeconError` names the file and a few keys. Where the source
records its encoder / arch / input channels (``export.json``, a checkpoint, smp's ``config.json``), they are
compared with the fine-tuning network first, for a clearer message: a network pre-trained on C input channels
transfers into a fine-tuning network of C channels only. Weights imported from an RGB model (``decon-med import``:
SlotCon, DenseCL, torchvision, timm; 3 channels) are the exception: their first convolution is adapted to the
fine-tuning channels as smp adapts ImageNet weights (:func:`~decon_med.models.network.adapt_first_conv`), and
the report lists it under ``adapted``.

Example:
    >>> net = build_network(ModelConfig(arch="fcn", encoder="resnet50"), in_channels=3, classes=2)
    >>> report = load_init(net, "weights/ml", transfer="encoder", arch="fcn", encoder="resnet50")
    >>> print(format_report(report))
    init: loaded 318 tensors (encoder) from weights/ml/encoder.safetensors; 14 freshly initialised, 0 unused
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from decon_med.engine.checkpoint import load_state_file
from decon_med.engine.export import OUTPUTS, recorded_channel_names
from decon_med.errors import ConfigError, DataError, DeconError

#: State-dict prefixes copied by each transfer mode.
PREFIXES: dict[str, tuple[str, ...]] = {
    "random": (),
    "encoder": ("encoder.",),
    "encoder_decoder": ("encoder.", "decoder."),
}

#: Keys quoted in an error message, at most.
SHOWN_KEYS = 3

_NETWORK_PREFIXES = ("encoder.", "decoder.", "segmentation_head.", "classification_head.")


def load_init(
    network: nn.Module,
    init: str | Path | None,
    transfer: str,
    arch: str,
    encoder: str,
    in_channels: int | None = None,
) -> dict[str, Any]:
    """Copy the pre-trained tensors selected by ``transfer`` from ``init`` into ``network``.

    Args:
        network: a freshly built smp network (e.g. :func:`decon_med.models.network.build_network`).
        init: export folder, weights file, pre-training checkpoint or smp folder; ignored for ``random``.
        transfer: ``random``, ``encoder`` or ``encoder_decoder``.
        arch: ``model.arch`` of ``network`` (compared with the recorded pre-training arch).
        encoder: ``model.encoder`` of ``network`` (compared with the recorded pre-training encoder).
        in_channels: ``data.in_channels`` of ``network``, compared with the recorded one when given.

    Returns:
        ``{"transfer", "init", "source", "pretrained", "loaded", "missing", "unexpected"}``: the file read,
        what it records about its network (arch / encoder / in_channels, where known), the network keys copied,
        the network keys left freshly initialised (both in the network's order) and the source keys not used
        (sorted); ``random`` with an ``init`` adds a ``note``.

    Raises:
        DataError: ``init`` (or the file an export folder should hold) is missing or unreadable.
        DeconError: the weights do not fit the network (the message names the file and some keys).

    Example:
        >>> report = load_init(net, "weights/ml", "encoder_decoder", arch="unet", encoder="resnet50")
        >>> [k for k in report["missing"] if not k.startswith("segmentation_head.")]
        []
    """
    if transfer not in PREFIXES:
        raise ConfigError(
            f"config key 'transfer': {transfer!r} is not one of {', '.join(map(repr, PREFIXES))}"
        )
    net_keys = list(network.state_dict())
    if transfer == "random":
        return _random_report(net_keys, init)
    if init is None:
        raise ConfigError(f"config key 'init': is required when transfer is '{transfer}'")
    path, recorded = resolve_source(init, transfer)
    check_recorded(recorded, path, transfer, arch=arch, encoder=encoder, in_channels=in_channels)
    state = _network_keys(load_state_file(path))
    selected = {k: v for k, v in state.items() if k.startswith(PREFIXES[transfer])}
    adapted: list[str] = []
    if _rgb_import(recorded) and in_channels not in (None, 3):
        from decon_med.models.network import adapt_rgb_weights

        selected, adapted = adapt_rgb_weights(network.state_dict(), selected)
    if transfer == "encoder_decoder" and not any(k.startswith("decoder.") for k in selected):
        raise DeconError(
            f"{path}: holds no decoder weights (encoder only), so transfer=encoder_decoder cannot be used; "
            "use transfer=encoder"
        )
    check_fit(network.state_dict(), selected, path, transfer, arch=arch, encoder=encoder)
    nn.Module.load_state_dict(network, selected, strict=False)  # smp's own loader drops mismatches silently
    report = {
        "transfer": transfer,
        "init": str(init),
        "source": str(path),
        "pretrained": recorded,
        "loaded": [k for k in net_keys if k in selected],
        "missing": [k for k in net_keys if k not in selected],
        "unexpected": sorted(k for k in state if k not in selected),
    }
    if adapted:
        report["adapted"] = [f"{k}: 3 -> {in_channels} input channels (smp's rule)" for k in adapted]
    return report


#: ``export.json`` ``format`` of weights ``decon-med import`` took from RGB models.
RGB_IMPORT_FORMATS = ("slotcon", "densecl", "torchvision", "timm")


def _rgb_import(recorded: dict[str, Any]) -> bool:
    return recorded.get("format") in RGB_IMPORT_FORMATS and recorded.get("in_channels") in (None, 3)


def format_report(report: dict[str, Any]) -> str:
    """One line: how many tensors were loaded, from where, and how many are fresh.

    Example:
        >>> format_report({"transfer": "random", "missing": ["a", "b"], "loaded": [], "unexpected": []})
        'init: random (all 2 tensors freshly initialised)'
    """
    if report["transfer"] == "random":
        line = f"init: random (all {len(report['missing'])} tensors freshly initialised)"
        return f"{line}; {report['note']}" if report.get("note") else line
    return (
        f"init: loaded {len(report['loaded'])} tensors ({report['transfer']}) from {report['source']}; "
        f"{len(report['missing'])} freshly initialised, {len(report['unexpected'])} unused"
    )


def resolve_source(init: str | Path, transfer: str) -> tuple[Path, dict[str, Any]]:
    """The weights file to read for ``transfer`` and what the source records about its network.

    Raises:
        DataError: ``init`` does not exist, or is a folder that is neither an export nor an smp folder.

    Example:
        >>> resolve_source("weights/ml", "encoder")
        (PosixPath('weights/ml/encoder.safetensors'), {'arch': 'unet', 'encoder': 'resnet50', 'in_channels': 3})
    """
    path = Path(init).expanduser()
    if not path.exists():
        raise DataError(
            path,
            "init weights not found (expected an export folder, a .safetensors / .pth file, "
            "a pre-training checkpoint or an smp save_pretrained folder)",
        )
    if path.is_dir():
        if (path / OUTPUTS["meta"]).is_file():
            return path / OUTPUTS[transfer], _export_meta(path / OUTPUTS["meta"])
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            return path / "model.safetensors", _smp_meta(path / "config.json")
        raise DataError(
            path,
            "not an export folder (no export.json) nor an smp save_pretrained folder "
            "(no config.json + model.safetensors)",
        )
    if path.suffix == ".safetensors":
        if (path.parent / OUTPUTS["meta"]).is_file():
            return path, _export_meta(path.parent / OUTPUTS["meta"])
        if path.name == "model.safetensors" and (path.parent / "config.json").is_file():
            return path, _smp_meta(path.parent / "config.json")
        return path, {}
    return path, _checkpoint_meta(path)


def check_recorded(
    recorded: dict[str, Any],
    path: Path,
    transfer: str,
    arch: str,
    encoder: str,
    in_channels: int | None = None,
) -> None:
    """Compare the recorded pre-training network with the fine-tuning one (unknown entries are skipped).

    Raises:
        DeconError: a different encoder, input channels, or (for ``encoder_decoder``) a different arch.
    """
    was = recorded.get("encoder")
    if was and was != encoder:
        raise DeconError(
            f"{path}: pre-trained with {was}, fine-tuning {encoder}; set model.encoder={was} "
            f"or use weights pre-trained with {encoder}"
        )
    channels = recorded.get("in_channels")
    if (
        in_channels is not None
        and channels is not None
        and channels != in_channels
        and not _rgb_import(recorded)
    ):
        names = recorded.get("channel_names")
        named = f" ({', '.join(map(str, names))})" if names else ""
        raise DeconError(
            f"{path}: pre-trained on {channels}-channel input{named}, fine-tuning on {in_channels}; "
            f"set data.in_channels={channels} with data of those channels, or pre-train on this data"
        )
    was_arch = recorded.get("arch")
    if transfer == "encoder_decoder" and was_arch and was_arch != arch:
        raise DeconError(
            f"{path}: decoder pre-trained as {was_arch}, fine-tuning {arch}; transfer=encoder_decoder needs "
            f"the same arch (set model.arch={was_arch}) or use transfer=encoder"
        )


def check_fit(
    net_state: dict[str, torch.Tensor],
    selected: dict[str, torch.Tensor],
    path: Path,
    transfer: str,
    arch: str,
    encoder: str,
) -> None:
    """Raise unless ``selected`` covers the transferred part of the network exactly, with the same shapes.

    Raises:
        DeconError: keys unknown to the network, shape mismatches, or transferred network keys the source lacks;
            the encoder is checked first, then the decoder.
    """
    for part in PREFIXES[transfer]:
        problems = _part_problems(net_state, selected, part)
        if not problems:
            continue
        what = ", ".join(problems)
        if part == "encoder.":
            raise DeconError(
                f"{path}: the pre-trained encoder does not fit model.encoder={encoder}: {what}; "
                "use weights pre-trained with the same encoder and input channels"
            )
        raise DeconError(
            f"{path}: the pre-trained decoder does not fit model.arch={arch}: {what}; "
            "use transfer=encoder, or fine-tune the arch the weights were pre-trained with"
        )


def _part_problems(
    net_state: dict[str, torch.Tensor], selected: dict[str, torch.Tensor], part: str
) -> list[str]:
    """Readable descriptions of what keeps ``selected``'s ``part`` from loading strictly into ``net_state``."""
    source = {k: v for k, v in selected.items() if k.startswith(part)}
    unknown = [k for k in source if k not in net_state]
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(net_state[k].shape)}"
        for k, v in source.items()
        if k in net_state and v.shape != net_state[k].shape
    ]
    absent = [
        k
        for k in net_state
        if k.startswith(part) and k not in source and not k.endswith("num_batches_tracked")
    ]
    problems = []
    for label, keys in (
        ("shape mismatches (weights vs network)", mismatched),
        ("keys the network lacks", unknown),
        ("network keys the weights lack", absent),
    ):
        if keys:
            problems.append(f"{len(keys)} {label}, e.g. {', '.join(keys[:SHOWN_KEYS])}")
    return problems


def _network_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip a DDP ``module.`` prefix; a dict with no smp prefix at all is taken as a bare encoder."""
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    if not any(k.startswith(_NETWORK_PREFIXES) for k in state):
        state = {f"encoder.{k}": v for k, v in state.items()}
    return state


def _random_report(net_keys: list[str], init: str | Path | None) -> dict[str, Any]:
    report: dict[str, Any] = {
        "transfer": "random",
        "init": None if init is None else str(init),
        "source": None,
        "pretrained": {},
        "loaded": [],
        "missing": list(net_keys),
        "unexpected": [],
    }
    if init is not None:
        report["note"] = f"init {init} ignored because transfer is 'random'"
    return report


def _read_json(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(path, f"not readable JSON ({exc})") from exc
    if not isinstance(record, dict):
        raise DataError(path, "expected a JSON object")
    return record


def _pick(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("arch", "encoder", "in_channels", "channel_names", "format")
    return {k: record[k] for k in keys if record.get(k) is not None}


def _export_meta(path: Path) -> dict[str, Any]:
    return _pick(_read_json(path))


def _smp_meta(path: Path) -> dict[str, Any]:
    """``config.json`` of smp's ``save_pretrained``: ``_model_class`` (e.g. ``Unet``), ``encoder_name``, ..."""
    record = _read_json(path)
    model_class = record.get("_model_class")
    return _pick(
        {
            "arch": model_class.lower() if isinstance(model_class, str) else None,
            "encoder": record.get("encoder_name"),
            "in_channels": record.get("in_channels"),
        }
    )


def _checkpoint_meta(path: Path) -> dict[str, Any]:
    """``network_meta`` (or ``config.model``) of a torch checkpoint, read memory-mapped; ``{}`` when absent."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # legacy / foreign formats: load_state_file reports real problems
        return {}
    if not isinstance(obj, dict):
        return {}
    meta = obj.get("network_meta")
    config = obj.get("config")
    data = config.get("data") if isinstance(config, dict) and isinstance(config.get("data"), dict) else {}
    names = recorded_channel_names(obj) if isinstance(config, dict) else None
    if isinstance(meta, dict):
        return _pick({"channel_names": names, **meta})
    if isinstance(config, dict) and isinstance(config.get("model"), dict):
        model = {k: v for k, v in config["model"].items() if k in ("arch", "encoder")}
        return _pick({**model, "in_channels": data.get("in_channels"), "channel_names": names})
    return {}
