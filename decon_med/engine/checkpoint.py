"""Checkpoints: atomic writes, safe loading, random-number-generator states and weight files.

Checkpoints are read with ``torch.load(weights_only=True)``, so they hold only tensors, numbers, strings, ``None``
and lists / dicts of those; :func:`capture_rng_state` converts the numpy and Python generator states accordingly.

Example:
    >>> save_checkpoint({"step": 10, "rng": capture_rng_state(), "model": model.state_dict()}, "run/last.ckpt")
    >>> state = load_checkpoint("run/last.ckpt")
    >>> restore_rng_state(state["rng"])
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from decon_med.errors import DataError
from decon_med.folders import atomic_write, record_written

#: Entries of a checkpoint dict that may hold the network's state dict, tried in order by :func:`load_state_file`.
STATE_KEYS: tuple[str, ...] = ("network", "state_dict", "model")
#: Entries of a checkpoint that hold weights (the fine-tuned network, the pre-training method), checked for NaN /
#: inf by :func:`load_checkpoint`.
WEIGHT_KEYS: tuple[str, ...] = ("network", "method")


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` with ``torch.save`` atomically: a crash mid-write leaves any previous file intact.

    The data goes to ``<path>.tmp`` in the same folder, is flushed and fsynced, then renamed over ``path``.

    Example:
        >>> save_checkpoint({"step": 3}, "run/last.ckpt")
        PosixPath('run/last.ckpt')
    """
    path = atomic_write(Path(path), lambda f: torch.save(state, f))
    _fsync_dir(path.parent)
    return path


def copy_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Atomically make ``dst`` a copy of the finished file ``src`` (a hard link where the file system allows).

    Replacing ``dst`` later never changes ``src``: the rename swaps the directory entry, not the file.
    """
    src, dst = Path(src), Path(dst)
    record_written(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dst.parent)
    return dst


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` onto the CPU (``weights_only=True``).

    Raises:
        DataError: the file is missing, truncated, holds something other than plain data and tensors, or its
            weights (:data:`WEIGHT_KEYS`) hold NaN or inf (the message names the first such tensor).

    Example:
        >>> load_checkpoint("run/last.ckpt")["step"]
        3
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated / foreign files
        raise DataError(path, _load_problem(exc, "checkpoint")) from exc
    if not isinstance(state, dict):
        raise DataError(path, f"not a checkpoint: holds a {type(state).__name__}, not a dict")
    check_finite_state({key: state[key] for key in WEIGHT_KEYS if isinstance(state.get(key), dict)}, path)
    return state


def load_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a torch file (``.pth``, ``.pt``, ``.ckpt``, ...).

    A torch file may hold the state dict itself, a checkpoint dict with a ``network``, ``state_dict`` or
    ``model`` entry, or a pre-training checkpoint of this package, whose exported network (see
    :func:`pretrained_network_state`) is returned.

    Raises:
        DataError: the file is missing, unreadable, holds no state dict, or holds NaN / inf weights (the message
            names the file and the first such tensor).

    Example:
        >>> sd = load_state_file("weights/encoder.safetensors")
        >>> model.load_state_dict(sd, strict=False)
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as exc:
            raise DataError(path, f"not a readable safetensors file ({_first_line(exc)})") from exc
        check_finite_state(state, path)
        return state
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(path, _load_problem(exc, "weights file")) from exc
    state = _find_state_dict(obj)
    if state is None:
        raise DataError(
            path, "holds no state dict (expected tensors, or a 'network'/'state_dict'/'model' entry)"
        )
    check_finite_state(state, path)
    return state


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _load_problem(exc: BaseException, what: str) -> str:
    """One line saying why ``torch.load(weights_only=True)`` failed."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "weights only" in text.lower():
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            return (
                f"refused: the {what} holds a Python object ({found.group(1)}), not only tensors and plain data, and "
                "loading it could run code (only weights-only files are read)"
            )
        detail = [
            line.strip() for line in text.split("WeightsUnpickler error:")[-1].splitlines() if line.strip()
        ]
        reason = detail[0] if detail and "WeightsUnpickler" in text else "unpickling failed"
        return f"not a readable {what}: truncated or not a torch file ({reason})"
    return f"not a readable {what} ({_first_line(exc)})"


def nonfinite_tensors(state: Any, prefix: str = "") -> list[str]:
    """Dotted names of the floating-point tensors in a (nested) state holding NaN or inf.

    Example:
        >>> nonfinite_tensors({"bn.running_var": torch.tensor([1.0, float("inf")]), "step": 3})
        ['bn.running_var']
    """
    bad: list[str] = []
    if isinstance(state, torch.Tensor):
        if (state.is_floating_point() or state.is_complex()) and not bool(torch.isfinite(state).all()):
            bad.append(prefix.rstrip(".") or "<tensor>")
    elif isinstance(state, dict):
        for key, value in state.items():
            bad += nonfinite_tensors(value, f"{prefix}{key}.")
    elif isinstance(state, (list, tuple)):
        for index, value in enumerate(state):
            bad += nonfinite_tensors(value, f"{prefix}{index}.")
    return bad


def check_finite_state(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Raise a DataError naming ``path`` when a network state dict holds NaN or inf (weights or buffers).

    Example:
        >>> check_finite_state(load_checkpoint("run/last.ckpt")["network"], "run/last.ckpt")
    """
    bad = nonfinite_tensors(state)
    if bad:
        raise DataError(
            path,
            f"holds non-finite values in {len(bad)} tensor(s), e.g. {bad[0]}; the weights diverged and cannot "
            "be used (take an earlier checkpoint)",
        )


def exported_prefix(checkpoint: dict[str, Any]) -> str:
    """The method-state prefix of the network a pre-training checkpoint exports: ``teacher.`` or ``network.``, as
    its ``network_meta["state_prefix"]`` says (checkpoints without it: ``network.``)."""
    return (checkpoint.get("network_meta") or {}).get("state_prefix", "network.")


def pretrained_network_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The smp state dict of the network a pre-training checkpoint exports (see :func:`exported_prefix`).

    Example:
        >>> network.load_state_dict(pretrained_network_state(load_checkpoint("runs/ml/last.ckpt")))
    """
    prefix = exported_prefix(checkpoint)
    return {k.removeprefix(prefix): v for k, v in checkpoint["method"].items() if k.startswith(prefix)}


def _find_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if not isinstance(obj, dict):
        return None
    for key in STATE_KEYS:
        if isinstance(obj.get(key), dict):
            return _find_state_dict(obj[key])
    if isinstance(obj.get("method"), dict):
        return pretrained_network_state(obj) or None
    if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return dict(obj)
    return None


def capture_rng_state() -> dict[str, Any]:
    """The states of the torch (CPU and every CUDA device), numpy and Python generators, as plain data.

    Example:
        >>> state = capture_rng_state(); a = torch.rand(1)
        >>> restore_rng_state(state); torch.equal(a, torch.rand(1))
        True
    """
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": int(version), "state": list(internal), "gauss_next": gauss_next},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set every generator captured by :func:`capture_rng_state` back to that state.

    CUDA states are restored when CUDA is available and the saved number of devices matches.
    """
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["state"]), py_state["gauss_next"]))


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
