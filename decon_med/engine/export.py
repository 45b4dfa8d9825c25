"""Export the pre-trained network of a checkpoint as plain weight files for fine-tuning.

The exported network is the method's choice (``ssl.export_branch``): the EMA teacher for the SlotCon family, as
its reference transfers, the student for the DenseCL family and MIM.

``export(ckpt, out)`` writes::

    encoder.safetensors           the encoder entries of the smp state dict (keys start with ``encoder.``)
    encoder_decoder.safetensors   encoder and decoder entries (the task-specific segmentation head is left out)
    smp/                          the whole network via smp's ``save_pretrained`` (config.json, model.safetensors)
    export.json                   arch, encoder, in_channels, channel_names (when the data names its channels),
                                  classes, branch (teacher or student), source checkpoint and step

Keys are those of the smp model, so ``model.load_state_dict(load_file("encoder.safetensors"), strict=False)``
loads the encoder of a fresh ``smp.create_model(arch, encoder_name=...)`` and reports only decoder and head keys
as missing.

Example:
    >>> files = export("runs/ml/last.ckpt", "weights/ml")
    >>> model = smp.create_model("unet", encoder_name="resnet50", encoder_weights=None, classes=3)
    >>> model.load_state_dict(load_file(files["encoder_decoder"]), strict=False).missing_keys[:1]
    ['segmentation_head.0.weight']
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from decon_med.config import ModelConfig
from decon_med.engine.checkpoint import exported_prefix, load_checkpoint, pretrained_network_state
from decon_med.errors import DataError, DeconError
from decon_med.folders import (
    EXPORT_MARKER,
    OwnedFolder,
    atomic_write,
    check_not_input,
    make_folder,
    record_written,
)

#: Output names, as returned by :func:`export`.
OUTPUTS: dict[str, str] = {
    "encoder": "encoder.safetensors",
    "encoder_decoder": "encoder_decoder.safetensors",
    "smp": "smp",
    "meta": "export.json",
}


def export(
    checkpoint_path: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False
) -> dict[str, Path]:
    """Write the pre-trained network of a checkpoint (teacher or student, as the run recorded) to ``out_dir``.

    Args:
        checkpoint_path: a checkpoint written by :func:`decon_med.engine.pretrain.pretrain`.
        out_dir: output folder; it must be empty or missing unless ``overwrite``.
        overwrite: replace the files of an earlier export in ``out_dir`` (other files are left alone).

    Returns:
        ``{"encoder", "encoder_decoder", "smp", "meta"}`` -> path.

    Raises:
        DataError: the checkpoint is missing, unreadable or not a pre-training checkpoint.
        DeconError: ``out_dir`` is not empty and ``overwrite`` is false.

    Example:
        >>> export("runs/ml/last.ckpt", "weights/ml")["encoder"]
        PosixPath('weights/ml/encoder.safetensors')
    """
    checkpoint_path = Path(checkpoint_path)
    checkpoint = load_checkpoint(checkpoint_path)
    meta = checkpoint_meta(checkpoint, checkpoint_path)
    network = rebuild_network(checkpoint, meta, checkpoint_path)
    out = _prepare_out(Path(out_dir).expanduser(), overwrite, checkpoint_path)
    paths = {name: out / filename for name, filename in OUTPUTS.items()}

    state = network.state_dict()
    atomic_write(paths["encoder"], save_safetensors(_select(state, ("encoder.",)), metadata={"format": "pt"}))
    atomic_write(
        paths["encoder_decoder"],
        save_safetensors(_select(state, ("encoder.", "decoder.")), metadata={"format": "pt"}),
    )
    _save_smp(network, paths["smp"])
    record = {
        **meta,
        "channel_names": recorded_channel_names(checkpoint),
        "branch": "teacher" if exported_prefix(checkpoint) == "teacher." else "student",
        "source": str(checkpoint_path.resolve()),
        "step": int(checkpoint.get("step", 0)),
    }
    atomic_write(paths["meta"], json.dumps(record, indent=1) + "\n")
    return paths


def _save_smp(network: torch.nn.Module, folder: Path) -> None:
    """smp's ``save_pretrained`` into a staging folder, then each file recorded and moved into ``folder`` (a
    foreign file of the same name there stops the export instead of being replaced)."""
    make_folder(folder)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".smp-staging-") as staging:
        network.save_pretrained(staging)
        for file in sorted(Path(staging).iterdir()):
            record_written(folder / file.name)
            os.replace(file, folder / file.name)


def checkpoint_meta(checkpoint: dict[str, Any], path: Path) -> dict[str, Any]:
    """``arch``, ``encoder``, ``in_channels`` and ``classes`` of the checkpoint's network."""
    if not isinstance(checkpoint.get("method"), dict):
        raise DataError(path, "not a pre-training checkpoint (it has no 'method' state)")
    meta = dict(checkpoint.get("network_meta") or {})
    config = checkpoint.get("config") or {}
    meta.setdefault("arch", config.get("model", {}).get("arch"))
    meta.setdefault("encoder", config.get("model", {}).get("encoder"))
    meta.setdefault("in_channels", config.get("data", {}).get("in_channels", 3))
    meta.setdefault("classes", 1)
    if not meta["arch"] or not meta["encoder"]:
        raise DataError(path, "the checkpoint does not record the network's arch and encoder")
    from decon_med.models.network import check_recorded_network

    return check_recorded_network(meta, path)  # an arch or encoder this installation lacks: one line


def recorded_channel_names(checkpoint: dict[str, Any]) -> list[str] | None:
    """The input channel names of the run (its config's ``data.channel_names``, else those its nnU-Net / datalist
    JSON gives, when still there), or ``None``.

    Example:
        >>> recorded_channel_names(load_checkpoint("runs/prostate_ml/last.ckpt"))
        ['T2', 'ADC']
    """
    data = (checkpoint.get("config") or {}).get("data") or {}
    if not isinstance(data, dict):
        return None
    if data.get("channel_names"):
        return [str(n) for n in data["channel_names"]]
    if data.get("name") not in ("nnunet", "datalist") or not data.get("root"):
        return None
    from decon_med.config import DataConfig
    from decon_med.data.layout_base import dataset_channel_names

    channels = data.get("channels")
    names = dataset_channel_names(DataConfig(name=data["name"], root=str(data["root"]), channels=channels))
    return None if names is None else list(names)


def rebuild_network(checkpoint: dict[str, Any], meta: dict[str, Any], path: Path) -> torch.nn.Module:
    """Build the smp network of ``meta`` and load the exported network's weights into it (strictly)."""
    from decon_med.models.network import build_network

    network = build_network(
        ModelConfig(arch=meta["arch"], encoder=meta["encoder"], encoder_weights=None),
        in_channels=meta["in_channels"],
        classes=meta["classes"],
    )
    state = pretrained_network_state(checkpoint)
    if not state:
        raise DataError(path, f"the method state holds no '{exported_prefix(checkpoint)}*' entries")
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        raise DataError(
            path, f"network weights do not match {meta['arch']}/{meta['encoder']}: {exc}"
        ) from exc
    return network.eval()


def _select(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Entries whose key starts with one of ``prefixes``, as contiguous CPU tensors of their own."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items() if k.startswith(prefixes)}


def _prepare_out(out: Path, overwrite: bool, checkpoint_path: Path) -> Path:
    """Make ``out`` a marked export folder (never one holding the source checkpoint); ``overwrite`` removes only
    the files an earlier export recorded, and a folder without the export marker is never overwritten."""
    check_not_input(out, [("source checkpoint", checkpoint_path)], "--out")
    if out.exists() and not out.is_dir():
        raise DeconError(f"{out}: exists and is not a folder")
    owned = OwnedFolder(out, EXPORT_MARKER)
    if not owned.is_empty():
        if not owned.is_marked():
            raise DeconError(
                f"{out}: folder is not empty and holds no export ({owned.describe_foreign()}); choose another --out"
            )
        if not overwrite:
            raise DeconError(f"{out}: folder is not empty; pass --overwrite to replace the export")
        owned.check_no_collisions()
        owned.clear(guard=True)
    owned.create()
    out.mkdir(parents=True, exist_ok=True)
    return out
