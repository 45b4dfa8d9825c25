"""Named encoder weights (``model.encoder_weights: imagenet``, or any name smp lists for the encoder).

segmentation-models-pytorch (0.5 and later) keeps its encoder weights on the Hugging Face Hub: the encoder's
``pretrained_settings[name]`` gives a ``repo_id`` (e.g. ``smp-hub/resnet50.imagenet``) and a pinned ``revision``
(a commit hash), and ``hf_hub_download`` stores ``model.safetensors`` in the Hub cache as::

    <hub cache>/models--smp-hub--resnet50.imagenet/snapshots/<revision>/model.safetensors

where ``<hub cache>`` is ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
``~/.cache/huggingface/hub`` (read when the weights are needed, so the variables may change at run time). A cached
file is read directly, without any network access; a missing one is downloaded once when the machine is online
(unless ``HF_HUB_OFFLINE`` is set) and otherwise stops the command with one line naming the file to place there.

Example:
    >>> cached_weights_file("resnet50", "imagenet")      # doctest: +SKIP
    PosixPath('/root/.cache/huggingface/hub/models--smp-hub--resnet50.imagenet/snapshots/00cb74e.../model.safetensors')
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from decon_med.errors import DeconError

#: The file smp reads from each weights repository.
WEIGHTS_FILE = "model.safetensors"


def weight_names(encoder: str) -> list[str]:
    """The weights names smp lists for ``encoder`` (``[]`` for an unknown encoder or a ``tu-`` timm encoder)."""
    import segmentation_models_pytorch as smp

    entry = smp.encoders.encoders.get(encoder)
    if not isinstance(entry, dict):
        return []
    return list(entry.get("pretrained_settings") or {})


def is_weight_name(encoder: str, value: str | None) -> bool:
    """``value`` is one of smp's weights names for ``encoder`` and not an existing local file."""
    return bool(value) and value in weight_names(encoder) and not Path(value).is_file()


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache, resolved from the environment as huggingface_hub does."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def weights_settings(encoder: str, name: str) -> dict[str, Any]:
    """smp's ``pretrained_settings[name]`` of ``encoder`` (``repo_id``, ``revision``, ...)."""
    import segmentation_models_pytorch as smp

    names = weight_names(encoder)
    if name not in names:
        listed = ", ".join(names) if names else "none"
        raise DeconError(
            f"model.encoder_weights: '{name}' is not a weights name smp lists for {encoder} (it lists: {listed})"
        )
    return dict(smp.encoders.encoders[encoder]["pretrained_settings"][name])


def cached_weights_file(encoder: str, name: str) -> Path:
    """Where the Hub cache keeps (or would keep) the weights file of ``encoder`` / ``name``."""
    settings = weights_settings(encoder, name)
    folder = "models--" + settings["repo_id"].replace("/", "--")
    return hub_cache_dir() / folder / "snapshots" / str(settings["revision"]) / WEIGHTS_FILE


def download_weights(repo_id: str, revision: str, cache_dir: Path) -> str:
    """``hf_hub_download`` of the weights file into ``cache_dir`` (the one place that may reach the network)."""
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id, filename=WEIGHTS_FILE, revision=revision, cache_dir=str(cache_dir))


def resolve_weights_file(encoder: str, name: str) -> Path:
    """The local weights file of ``encoder`` / ``name``: the cached one, else downloaded into the cache.

    Raises:
        DeconError: one line naming the cache path and the file to place there, when the file is not cached and
            cannot be downloaded (offline, ``HF_HUB_OFFLINE`` set, or any download error).
    """
    path = cached_weights_file(encoder, name)
    if path.is_file():
        return path
    settings = weights_settings(encoder, name)
    repo_id, revision = settings["repo_id"], str(settings["revision"])
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    problem = "HF_HUB_OFFLINE is set"
    if not offline:
        try:
            return Path(download_weights(repo_id, revision, hub_cache_dir()))
        except Exception as exc:  # offline, proxy, HTTP error: all end in the same instruction
            problem = f"download failed: {type(exc).__name__}"
    raise DeconError(
        f"model.encoder_weights: '{name}' weights of {encoder} are not cached and cannot be downloaded "
        f"({problem}); place {WEIGHTS_FILE} of the Hugging Face repository {repo_id} (revision {revision}) "
        f"at {path}"
    )


def load_named_weights(net: nn.Module, encoder: str, name: str, in_channels: int) -> Path:
    """Load smp's ``name`` weights into ``net.encoder`` as ``smp.create_model(encoder_weights=name)`` would.

    The file is loaded strictly into a 3-channel encoder, whose first convolution smp then adapts to
    ``in_channels`` (``set_in_channels(pretrained=True)``), and that state is copied strictly into ``net.encoder``.

    Returns:
        The weights file read.
    """
    from safetensors.torch import load_file
    from segmentation_models_pytorch.encoders import get_encoder

    path = resolve_weights_file(encoder, name)
    depth = getattr(net.encoder, "_depth", 5)
    source = get_encoder(encoder, in_channels=3, depth=depth, weights=None)
    try:
        state = load_file(str(path), device="cpu")
        source.load_state_dict(state)  # smp's own loader (it drops a classifier where the file has one)
    except Exception as exc:
        raise DeconError(
            f"model.encoder_weights: {path} does not hold {encoder} weights ({str(exc).splitlines()[0][:200]})"
        ) from exc
    source.set_in_channels(in_channels, pretrained=True)
    with torch.no_grad():
        nn.Module.load_state_dict(net.encoder, source.state_dict(), strict=True)
    return path
