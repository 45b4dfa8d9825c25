import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from decon_med.engine import checkpoint as ckpt
from decon_med.engine.checkpoint import (
    capture_rng_state,
    copy_checkpoint,
    load_checkpoint,
    load_state_file,
    restore_rng_state,
    save_checkpoint,
)
from decon_med.errors import DataError


def _draws() -> tuple:
    return torch.rand(4), np.random.rand(4), random.random(), np.random.standard_normal(), random.gauss(0, 1)


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_round_trip_with_rng_states_is_weights_only(tmp_path):
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's legacy state
    random.gauss(0, 1)  # and in Python's
    state = {
        "rng": capture_rng_state(),
        "tensor": torch.arange(3),
        "number": 2.5,
        "text": "x",
        "nested": {"list": [1, 2], "none": None},
    }
    expected = _draws()
    save_checkpoint(state, tmp_path / "a.ckpt")
    loaded = load_checkpoint(tmp_path / "a.ckpt")
    assert loaded["nested"] == {"list": [1, 2], "none": None} and torch.equal(
        loaded["tensor"], torch.arange(3)
    )
    _draws()  # move every generator on
    restore_rng_state(loaded["rng"])
    again = _draws()
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1])
    assert expected[2:] == again[2:]


def test_load_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="missing.ckpt: checkpoint not found"):
        load_checkpoint(tmp_path / "missing.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="bad.ckpt: not a readable checkpoint"):
        load_checkpoint(bad)
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"array": np.zeros(2)}, unsafe)  # numpy objects are refused by weights_only loading
    with pytest.raises(DataError, match="unsafe.ckpt"):
        load_checkpoint(unsafe)


def test_copy_checkpoint_is_independent_of_later_writes(tmp_path):
    first = save_checkpoint({"step": 1}, tmp_path / "step_1.ckpt")
    copy_checkpoint(first, tmp_path / "last.ckpt")
    save_checkpoint({"step": 2}, tmp_path / "last.ckpt")
    assert load_checkpoint(first)["step"] == 1 and load_checkpoint(tmp_path / "last.ckpt")["step"] == 2


def test_load_state_file_formats(tmp_path):
    sd = {"encoder.w": torch.randn(2, 2), "decoder.b": torch.zeros(3)}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "plain.pth")
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "wrapped.pt")
    torch.save({"model": {"network": sd}}, tmp_path / "nested.ckpt")
    method_state = {f"network.{k}": v for k, v in sd.items()} | {"teacher.encoder.w": torch.ones(2, 2)}
    torch.save({"method": method_state, "step": 5}, tmp_path / "pretrain.ckpt")
    for name in ("w.safetensors", "plain.pth", "wrapped.pt", "nested.ckpt", "pretrain.ckpt"):
        loaded = load_state_file(tmp_path / name)
        assert loaded.keys() == sd.keys(), name
        assert all(torch.equal(loaded[k], sd[k]) for k in sd), name


def test_load_state_file_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="nope.safetensors: weights file not found"):
        load_state_file(tmp_path / "nope.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(DataError, match="bad.safetensors: not a readable safetensors file"):
        load_state_file(tmp_path / "bad.safetensors")
    (tmp_path / "bad.pth").write_text("text")
    with pytest.raises(DataError, match="bad.pth: not a readable weights file"):
        load_state_file(tmp_path / "bad.pth")
    torch.save([torch.ones(1)], tmp_path / "list.pth")
    with pytest.raises(DataError, match="list.pth: holds no state dict"):
        load_state_file(tmp_path / "list.pth")
