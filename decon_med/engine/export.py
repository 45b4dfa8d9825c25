"""Export the pre-trained network of a checkpoint as plain weight files for fine-tuning.

The exported network is the method's choice (``ssl.export_branch``): the EMA teacher for the SlotCon family, as
its reference transfers, the student for the DenseCL family and MIM.

``export(ckpt, out)`` writes::

    encoder.safetensors           the encoder entries of the smp state dict (keys start with ``encoder.``)
    encoder_decoder.safetensors   encoder and decoder entries (the task-specific segmentation head is left out)
    smp/                          the whole network via smp's ``save_pretrained`` (config.json, model.safetensors)
    export.json                   arch, encoder, in_channels, classes, branch (teacher or student), source
                                  checkpoint and step

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
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from decon_med.config import ModelConfig
from decon_med.engine.checkpoint import exported_prefix, load_checkpoint, pretrained_network_state
from decon_med.errors import DataError, DeconError

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
    out = _prepare_out(Path(out_dir), overwrite)
    paths = {name: out / filename for name, filename in OUTPUTS.items()}

    state = network.state_dict()
    save_file(_select(state, ("encoder.",)), str(paths["encoder"]), metadata={"format": "pt"})
    save_file(
        _select(state, ("encoder.", "decoder.")), str(paths["encoder_decoder"]), metadata={"format": "pt"}
    )
    network.save_pretrained(str(paths["smp"]))
    record = {
        **meta,
        "branch": "teacher" if exported_prefix(checkpoint) == "teacher." else "student",
        "source": str(checkpoint_path.resolve()),
        "step": int(checkpoint.get("step", 0)),
    }
    paths["meta"].write_text(json.dumps(record, indent=1) + "\n")
    return paths


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
    return {key: meta[key] for key in ("arch", "encoder", "in_channels", "classes")}


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


def _prepare_out(out: Path, overwrite: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise DeconError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DeconError(f"{out}: folder is not empty; pass --overwrite to replace the export")
        for name in OUTPUTS.values():
            target = out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out
