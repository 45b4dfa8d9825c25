"""Import a published ResNet checkpoint as an export folder of this package (``decon-med import``).

The folder has the layout :func:`decon_med.engine.export.export` writes, so ``init=<folder>`` fine-tunes from it::

    encoder.safetensors           the encoder as smp keys (``encoder.conv1.weight``, ``encoder.layer1.0.conv1.weight``)
    encoder_decoder.safetensors   only when the source has a decoder (an export of this package)
    export.json                   arch (null: no decoder), encoder, in_channels, branch, source, format

Layouts (``--format``; ``auto`` recognises each from its keys):

* ``slotcon``: SlotCon's ``ckpt_epoch_*.pth`` (``main_pretrain.py`` saves ``{'args', 'model', 'optimizer',
  'scheduler', 'epoch', 'scaler'}``, ``model`` being the DDP state dict with ``module.encoder_q.*`` (student) and
  ``module.encoder_k.*`` (EMA teacher)); the teacher is imported, as SlotCon's own
  ``transfer/segmentation/convert_pretrain_to_mm.py`` does. A converted / backbone-only file (``{'state_dict':
  {conv1.weight, ...}}``) is read as a plain ResNet.
* ``densecl``: an OpenSelfSup / mmcv checkpoint of DenseCL (``state_dict`` with ``backbone.*`` = ``encoder_q.0.*``,
  the student, which DenseCL's ``tools/extract_backbone_weights.py`` keeps), or that tool's output
  (``{'state_dict': {conv1.weight, ...}, 'author': 'DenseCL'}``).
* ``torchvision`` / ``timm``: a ResNet state dict (``conv1``, ``bn1``, ``layer1`` ... ``layer4``, ``fc``; ``fc`` is
  dropped), bare or under ``state_dict`` / ``model``; smp's own encoder files (``model.safetensors``) read the same.
* ``decon``: an export folder or a pre-training checkpoint of this package (the latter is exported).

The encoder (``resnet18`` ... ``resnet152``, ``resnext*``) is the smp ResNet encoder whose keys and shapes the
weights match exactly; a key the encoder lacks stops the import with one line naming the file and the first such
keys. Files are read with ``torch.load(weights_only=True)`` (``argparse.Namespace`` allowed, for SlotCon's
``args``) or safetensors; tensors are copied unchanged.

Example:
    >>> import_weights("downloads/slotcon_checkpoint.pth", "weights/slotcon_coco")["encoder"]
    PosixPath('weights/slotcon_coco/encoder.safetensors')
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from decon_med.engine.checkpoint import _find_state_dict
from decon_med.engine.export import OUTPUTS, _prepare_out
from decon_med.errors import DataError, DeconError
from decon_med.folders import atomic_write

#: ``--format`` choices.
FORMATS = ("auto", "slotcon", "densecl", "torchvision", "timm", "decon")

#: Keys quoted in an error line, at most.
SHOWN = 4

_CLASSIFIER = ("fc.",)


def import_weights(
    source: str | os.PathLike, out_dir: str | os.PathLike, fmt: str = "auto", overwrite: bool = False
) -> dict[str, Path]:
    """Convert ``source`` into an export folder ``out_dir``.

    Args:
        source: checkpoint / weights file (``.pth``, ``.pt``, ``.pth.tar``, ``.safetensors``) or an export folder.
        out_dir: output folder; it must be empty or missing unless ``overwrite``.
        fmt: one of :data:`FORMATS`.
        overwrite: replace an earlier export / import in ``out_dir``.

    Returns:
        ``{"encoder", "meta"}`` -> path, plus ``"encoder_decoder"`` where the source has a decoder.

    Raises:
        DataError: ``source`` is missing or unreadable, or its layout is not ``fmt`` / not a known one.
        DeconError: ``out_dir`` is not empty and ``overwrite`` is false.
    """
    if fmt not in FORMATS:
        raise DeconError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    src = Path(source).expanduser()
    if not src.exists():
        raise DataError(src, "checkpoint not found")
    if src.is_dir() or _is_package_checkpoint(src, fmt):
        return _import_decon(src, Path(out_dir).expanduser(), fmt, overwrite)
    if fmt == "decon" and not (src.suffix == ".safetensors"):
        raise DataError(
            src, "not an export folder nor a pre-training checkpoint of decon-med (--format decon)"
        )
    obj = read_checkpoint(src)
    layout, branch, state = encoder_state(obj, src, fmt)
    encoder, in_channels = match_encoder(state, src)
    tensors = {f"encoder.{k}": v.detach().cpu().contiguous() for k, v in state.items()}
    record = {
        "arch": None,
        "encoder": encoder,
        "in_channels": in_channels,
        "branch": branch,
        "source": str(src.resolve()),
        "format": layout,
    }
    return _write(Path(out_dir).expanduser(), src, overwrite, tensors, None, record)


def read_checkpoint(path: Path) -> Any:
    """The object in a safetensors or torch file, read safely (tensors and plain data only)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise DataError(path, f"not a readable safetensors file ({_first_line(exc)})") from exc
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(
            path,
            f"cannot be read safely with torch.load(weights_only=True) ({_first_line(exc)}); "
            "use the published backbone-only file, or save just the state dict",
        ) from exc


def encoder_state(obj: Any, path: Path, fmt: str = "auto") -> tuple[str, str | None, dict[str, torch.Tensor]]:
    """``(layout, branch, encoder state dict in torchvision ResNet keys without fc)`` of a loaded checkpoint.

    Raises:
        DataError: the object is not in layout ``fmt`` (``auto``: in no known layout); the line names the file and
            its first keys.
    """
    attempts = [fmt] if fmt != "auto" else ["slotcon", "densecl", "torchvision"]
    for layout in attempts:
        found = _LAYOUTS[layout if layout in _LAYOUTS else "torchvision"](obj, fmt != "auto")
        if found is not None:
            branch, state = found
            state = {k: v for k, v in state.items() if not k.startswith(_CLASSIFIER)}
            if state:
                return layout, branch, state
    wanted = (
        "a known layout (slotcon, densecl, torchvision, timm, decon)"
        if fmt == "auto"
        else f"a {fmt} checkpoint"
    )
    raise DataError(path, f"not {wanted}: its first keys are {', '.join(_first_keys(obj))}")


def match_encoder(state: dict[str, torch.Tensor], path: Path) -> tuple[str, int]:
    """The smp ResNet encoder whose keys and shapes ``state`` matches exactly, and the input channels.

    Raises:
        DataError: naming the file, the keys no ResNet encoder has, or the mismatches against the closest one.
    """
    conv1 = state.get("conv1.weight")
    if conv1 is None or conv1.dim() != 4:
        raise DataError(
            path, f"holds no ResNet stem (conv1.weight); first keys {', '.join(list(state)[:SHOWN])}"
        )
    in_channels = int(conv1.shape[1])
    best: tuple[int, str, list[str]] | None = None
    for name in _resnet_encoders():
        expected = _encoder_shapes(name, in_channels)
        unknown = [k for k in state if k not in expected]
        absent = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
        mismatched = [
            f"{k} {tuple(v.shape)} vs {expected[k]}"
            for k, v in state.items()
            if k in expected and tuple(v.shape) != expected[k]
        ]
        if not unknown and not absent and not mismatched:
            return name, in_channels
        problems = [
            f"{len(keys)} {label}: {', '.join(keys[:SHOWN])}"
            for label, keys in (
                ("keys the encoder lacks", unknown),
                ("shape mismatches", mismatched),
                ("encoder keys the file lacks", absent),
            )
            if keys
        ]
        score = len(unknown) + len(absent) + len(mismatched)
        if best is None or score < best[0]:
            best = (score, name, problems)
    assert best is not None
    raise DataError(path, f"matches no smp ResNet encoder (closest {best[1]}: {'; '.join(best[2])})")


# ---------------------------------------------------------------------------------------------------- layouts


def _slotcon(obj: Any, explicit: bool) -> tuple[str, dict] | None:
    """SlotCon's full checkpoint: the teacher ``encoder_k`` (``module.`` prefix from DDP, or without it); with
    ``--format slotcon``, also a converted backbone-only file."""
    model = obj.get("model") if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
    state = _tensors(model)
    for prefix in ("module.encoder_k.", "encoder_k."):
        picked = _plain_resnet(_strip(state, prefix))
        if picked:
            return "teacher", picked
    if explicit and isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # backbone only
        plain = _plain_resnet(_tensors(obj["state_dict"]))
        if plain:
            return "teacher", plain
    return None


def _densecl(obj: Any, explicit: bool) -> tuple[str, dict] | None:
    """DenseCL (OpenSelfSup): ``backbone.*`` / ``encoder_q.0.*`` (the student), or the extracted backbone."""
    inner = (
        obj.get("state_dict") if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) else obj
    )
    state = _tensors(inner)
    if not state:
        return None
    state = _strip(state, "module.") or state
    for prefix in ("backbone.", "encoder_q.0."):
        picked = _plain_resnet(_strip(state, prefix))
        if picked:
            return "student", picked
    if isinstance(obj, dict) and (explicit or obj.get("author") == "DenseCL"):
        plain = _plain_resnet(state)
        if plain:
            return "student", plain
    return None


def _torchvision(obj: Any, explicit: bool) -> tuple[None, dict] | None:
    """A plain ResNet state dict (torchvision / timm / smp keys), bare or under ``state_dict`` / ``model``; an smp
    state dict (``encoder.*`` keys, e.g. an export's ``encoder.safetensors``) gives its encoder."""
    state = _find_state_dict(obj) if isinstance(obj, dict) else None
    if not state:
        return None
    state = _strip(state, "module.") or state
    state = _strip(state, "encoder.") or state
    plain = _plain_resnet(state)
    return (None, plain) if plain else None


_LAYOUTS = {"slotcon": _slotcon, "densecl": _densecl, "torchvision": _torchvision}


def _plain_resnet(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """``state`` when it is in torchvision ResNet keys (a stem and ``layer1``), else ``None``."""
    if "conv1.weight" in state and any(k.startswith("layer1.") for k in state):
        return dict(state)
    return None


# ---------------------------------------------------------------------------------------------------- decon


def _is_package_checkpoint(path: Path, fmt: str) -> bool:
    """A pre-training checkpoint of this package (``method`` state): it is exported, not converted."""
    if fmt not in ("auto", "decon") or path.suffix == ".safetensors":
        return False
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    return isinstance(obj, dict) and isinstance(obj.get("method"), dict)


def _import_decon(src: Path, out: Path, fmt: str, overwrite: bool) -> dict[str, Path]:
    if fmt not in ("auto", "decon"):
        raise DataError(src, f"is an export folder or checkpoint of decon-med, not a {fmt} checkpoint")
    if src.is_file():
        from decon_med.engine.export import export

        return export(src, out, overwrite=overwrite)
    meta_path = src / OUTPUTS["meta"]
    if not meta_path.is_file():
        raise DataError(src, "not an export folder (no export.json)")
    from decon_med.engine.checkpoint import load_state_file

    try:
        record = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(meta_path, f"not readable JSON ({exc})") from exc
    encoder = load_state_file(src / OUTPUTS["encoder"])
    bare = {k.removeprefix("encoder."): v for k, v in encoder.items() if k.startswith("encoder.")}
    if len(bare) != len(encoder):
        extra = [k for k in encoder if not k.startswith("encoder.")]
        raise DataError(
            src / OUTPUTS["encoder"], f"holds keys outside the encoder: {', '.join(extra[:SHOWN])}"
        )
    name = record.get("encoder")
    if name in _resnet_encoders():
        match_encoder(bare, src / OUTPUTS["encoder"])
    both = src / OUTPUTS["encoder_decoder"]
    decoder = load_state_file(both) if both.is_file() else None
    record = {**record, "source": str(src.resolve()), "format": "decon"}
    return _write(out, src, overwrite, dict(encoder), decoder, record)


# ---------------------------------------------------------------------------------------------------- writing


def _write(
    out: Path,
    src: Path,
    overwrite: bool,
    encoder: dict[str, torch.Tensor],
    encoder_decoder: dict[str, torch.Tensor] | None,
    record: dict[str, Any],
) -> dict[str, Path]:
    """The export folder: marked and owned as :func:`decon_med.engine.export.export` does, each file atomically."""
    out = _prepare_out(out, overwrite, src)
    paths = {"encoder": out / OUTPUTS["encoder"]}
    atomic_write(paths["encoder"], save_safetensors(encoder, metadata={"format": "pt"}))
    if encoder_decoder is not None:
        paths["encoder_decoder"] = out / OUTPUTS["encoder_decoder"]
        atomic_write(paths["encoder_decoder"], save_safetensors(encoder_decoder, metadata={"format": "pt"}))
    paths["meta"] = out / OUTPUTS["meta"]
    atomic_write(paths["meta"], json.dumps(record, indent=1) + "\n")
    return paths


# ---------------------------------------------------------------------------------------------------- helpers


def _tensors(obj: Any) -> dict[str, torch.Tensor]:
    """The tensor entries of a dict (``{}`` for anything else)."""
    if not isinstance(obj, dict):
        return {}
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _first_keys(obj: Any) -> list[str]:
    if not isinstance(obj, dict):
        return [type(obj).__name__]
    keys = [str(k) for k in obj]
    for entry in ("model", "state_dict"):  # the keys that tell the layout are one level down
        if isinstance(obj.get(entry), dict):
            keys = [f"{entry}.{k}" for k in list(obj[entry])[:SHOWN]]
            break
    return keys[:SHOWN] or ["(empty)"]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _resnet_encoders() -> list[str]:
    """smp's ResNet-family encoders (torchvision ResNet keys), smallest first."""
    import segmentation_models_pytorch as smp
    from segmentation_models_pytorch.encoders.resnet import ResNetEncoder

    return [name for name, entry in smp.encoders.encoders.items() if entry["encoder"] is ResNetEncoder]


_SHAPES: dict[tuple[str, int], dict[str, tuple[int, ...]]] = {}


def _encoder_shapes(name: str, in_channels: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a fresh smp encoder ``name`` (built on the meta device: no memory, no initialisation)."""
    key = (name, in_channels)
    if key not in _SHAPES:
        from segmentation_models_pytorch.encoders import get_encoder

        with torch.device("meta"):
            encoder = get_encoder(name, in_channels=in_channels, weights=None)
        _SHAPES[key] = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    return _SHAPES[key]
