"""Seeded random corruptions of images, masks and NIfTI volumes: never a traceback, never a hang.

Each of 300 corruptions (truncation at a random length, random bit flips, overwritten header bytes, and files
rewritten with another dtype, mode or shape) goes through ``check-data`` (in-process CLI: exit 0, or exit 2 with
one ``error:`` line) and through the reading + augmentation of a fine-tuning step (every training sample is
loaded; only a :class:`~decon_med.errors.DataError` naming a file may stop it). A few corruptions also run a
real one-iteration ``finetune``. Each case has a 30 s alarm, so a hang fails the test instead of blocking it.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from decon_med import cli
from decon_med.config import FinetuneConfig, load_config
from decon_med.data.datasets import build_dataset
from decon_med.errors import DeconError, find_error

N_PER_KIND = 100  # x 3 file kinds = 300 corruptions
IDS = ("c0", "c1", "c2", "c3", "c4")
SPLITS = '{"train": ["c0", "c1", "c2"], "val": ["c3"], "test": ["c4"]}'


def _png_tree(root: Path) -> None:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, name in enumerate(IDS):
        image = rng.integers(0, 255, (40 + i, 48, 3), dtype=np.uint8)
        mask = np.zeros((40 + i, 48), np.uint8)
        mask[5:20, 10:30] = 1
        Image.fromarray(image).save(root / "images" / f"{name}.png")
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    (root / "splits.json").write_text(SPLITS)


def _nifti_tree(root: Path) -> None:
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for name in IDS:
        volume = rng.normal(100, 30, (24, 24, 3)).astype(np.float32)
        labels = np.zeros((24, 24, 3), np.uint8)
        labels[4:12, 4:12] = 1
        nib.save(nib.Nifti1Image(volume, np.eye(4)), root / "images" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(labels, np.eye(4)), root / "masks" / f"{name}.nii.gz")
    (root / "splits.json").write_text(SPLITS)


# -- corruptions: (path, rng) -> None ------------------------------------------------------------------------------
def _truncate(path: Path, rng: np.random.Generator) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(rng.integers(0, len(data)))])


def _flip_bits(path: Path, rng: np.random.Generator) -> None:
    data = bytearray(path.read_bytes())
    for _ in range(int(rng.integers(1, 9))):
        position = int(rng.integers(0, len(data)))
        data[position] ^= 1 << int(rng.integers(0, 8))
    path.write_bytes(bytes(data))


def _overwrite_header(path: Path, rng: np.random.Generator) -> None:
    data = bytearray(path.read_bytes())
    start = int(rng.integers(0, min(64, len(data))))
    data[start : start + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def _rewrite_2d(path: Path, rng: np.random.Generator) -> None:
    """The same file name with another mode, dtype or shape."""
    h, w = Image.open(path).size[::-1]
    choice = int(rng.integers(0, 7))
    if choice == 0:
        Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16)).save(path)  # 16-bit
    elif choice == 1:
        Image.fromarray(np.zeros((1, 1), np.uint8)).save(path)  # 1 x 1
    elif choice == 2:
        Image.fromarray(rng.integers(0, 255, (h, w, 4), dtype=np.uint8)).save(path)  # RGBA
    elif choice == 3:
        Image.fromarray(rng.integers(0, 4, (h, w), dtype=np.uint8)).convert("P").save(path)  # palette
    elif choice == 4:
        Image.fromarray(rng.integers(0, 2, (h, w), dtype=np.uint8) * 255).convert("1").save(path)  # 1-bit
    elif choice == 5:
        Image.fromarray(rng.integers(0, 255, (w, h), dtype=np.uint8)).save(path)  # transposed
    else:
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            path, format="JPEG"
        )  # wrong format


def _rewrite_nifti(path: Path, rng: np.random.Generator) -> None:
    """The same file name with another dtype, shape or content."""
    choice = int(rng.integers(0, 7))
    shape = (24, 24, 3)
    if choice == 0:
        data = rng.normal(0, 1, shape).astype(np.complex64)
    elif choice == 1:
        data = rng.normal(0, 1, (24, 24, 3, 2)).astype(np.float32)  # 4D
    elif choice == 2:
        data = rng.normal(0, 1, (24,)).astype(np.float32)  # 1D
    elif choice == 3:
        data = np.full(shape, np.nan, np.float32)
    elif choice == 4:
        data = rng.integers(-128, 127, (20, 24, 3)).astype(np.int8)  # other shape
    elif choice == 5:
        data = rng.uniform(0, 2, shape).astype(np.float32)  # non-integer labels when it is a mask
    else:
        data = rng.integers(0, 2, shape).astype(np.uint8) * 7  # out-of-range labels when it is a mask
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)


CORRUPTIONS: dict[str, Callable[[Path, np.random.Generator], None]] = {
    "truncate": _truncate,
    "flip_bits": _flip_bits,
    "header": _overwrite_header,
}


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang("no answer within 30 s")


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    _png_tree(root / "png")
    _nifti_tree(root / "nifti")
    return {"png": root / "png", "nifti": root / "nifti"}


def _cases() -> list[tuple[str, int]]:
    return [(kind, index) for kind in ("image", "mask", "nifti") for index in range(N_PER_KIND)]


def _corrupt(tree: Path, kind: str, index: int) -> Path:
    rng = np.random.default_rng(1000 * ("image", "mask", "nifti").index(kind) + index)
    folder = "masks" if kind == "mask" or (kind == "nifti" and index % 2) else "images"
    target = (
        tree / folder / f"{IDS[int(rng.integers(0, len(IDS)))]}{'.nii.gz' if kind == 'nifti' else '.png'}"
    )
    rewrite = _rewrite_nifti if kind == "nifti" else _rewrite_2d
    methods = [*CORRUPTIONS.values(), rewrite]
    methods[index % len(methods)](target, rng)
    return target


def _argv(root: Path, kind: str) -> list[str]:
    overrides = [f"data.root={root}", "data.name=folder", "data.num_classes=2", "data.image_size=32"]
    overrides += ["data.num_workers=0", "data.min_foreground=0", "train.batch_size=2", "train.iters=1"]
    if kind == "nifti":
        overrides += ["data.modality=mr", "data.in_channels=1"]
    return overrides


def test_random_corruptions_give_one_line_or_pass(trees, tmp_path, capsys):
    previous = signal.signal(signal.SIGALRM, _alarm)
    outcomes = {"error": 0, "ok": 0}
    base = Path(__file__).resolve().parents[1] / "configs" / "finetune" / "isic.yaml"
    try:
        for kind, index in _cases():
            root = tmp_path / f"{kind}{index}"
            shutil.copytree(trees["nifti" if kind == "nifti" else "png"], root)
            target = _corrupt(root, kind, index)
            overrides = _argv(root, kind)
            signal.alarm(30)
            capsys.readouterr()
            status = cli.main(["check-data", str(base), *overrides, "--quiet"])
            out, err = capsys.readouterr()
            assert status in (0, 2) and "Traceback" not in out + err, (kind, index, err)
            if status == 2:
                assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), (kind, index, err)
                outcomes["error"] += 1
            else:
                outcomes["ok"] += 1
            try:  # what a fine-tuning step reads: every training sample, loaded and augmented
                cfg = load_config(base, overrides, schema=FinetuneConfig)
                dataset = build_dataset(cfg, "train", "train")
                for i in range(len(dataset)):
                    sample = dataset[i]
                    assert sample["image"].shape[-2:] == (32, 32)
            except Exception as exc:  # only a DeconError naming a file may stop it
                found = find_error(exc)
                assert isinstance(found, DeconError) and "\n" not in str(found), (kind, index, target, exc)
            signal.alarm(0)
            shutil.rmtree(root)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert (
        outcomes["error"] >= 100 and sum(outcomes.values()) == 3 * N_PER_KIND
    )  # most corruptions are caught


@pytest.mark.parametrize("kind,index", [("image", 0), ("mask", 4), ("nifti", 8)])  # truncations
def test_a_training_step_on_corrupt_files(trees, tmp_path, capsys, kind, index):
    root = tmp_path / "data"
    shutil.copytree(trees["nifti" if kind == "nifti" else "png"], root)
    target = _corrupt(root, kind, index)
    argv = ["finetune", str(Path(__file__).resolve().parents[1] / "configs" / "finetune" / "isic.yaml")]
    argv += [*_argv(root, kind), "model.encoder=resnet18", "model.arch=unet", f"out_dir={tmp_path / 'run'}"]
    status = cli.main([*argv, "--quiet"])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"error: {target}") or target.name in err
