"""Shared fixtures: small synthetic datasets in the official layouts, generated once per test session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: one torch thread per worker, never N x cores threads
    torch.set_num_threads(1)

from decon_med.config import Config, DataConfig, FinetuneConfig
from decon_med.data.synthetic import make_folder, make_isic, make_nifti, make_refuge


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    make_isic(root / "isic", n=8, seed=0)
    make_refuge(root / "refuge", n=8, seed=0)
    make_folder(root / "folder", n=10, seed=0)
    make_folder(root / "folder_nifti", n=5, seed=0, fmt="nifti")
    make_nifti(root / "nifti", n=3, seed=0, modality="mr")
    return root


@pytest.fixture
def copy_of(synth_root, tmp_path):
    """A writable copy of one synthetic dataset, for tests that break it."""

    def _copy(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(synth_root / name, dst)
        return dst

    return _copy


def make_cfg(name: str, root: Path, fraction: float | None = None, **data) -> Config:
    """A config for a dataset at ``root`` (a fine-tuning config when a fraction is given)."""
    data_cfg = DataConfig(name=name, root=str(root), image_size=64, num_workers=0, **data)
    if fraction is None:
        return Config(data=data_cfg)
    return FinetuneConfig(data=data_cfg, fraction=fraction)
