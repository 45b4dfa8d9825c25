"""Values no run can use, and valid input, as the command line meets them.

Every refused value is one ``error:`` line naming the option, config key or file, and exit status 2: numeric
options out of range, config values past any sane bound or past this machine's memory, float / complex / badly
placed data files, weights holding NaN or inf, checkpoints that do not say which network they hold, methods the
network cannot run, ``train.compile`` without a GPU. Valid input is accepted: ``~`` in ``out_dir``, options and
``key=value`` words in any order; a config file that sets nothing is named in a warning.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from decon_med import cli
from decon_med.config import ModelConfig
from decon_med.engine.checkpoint import load_checkpoint, save_checkpoint
from decon_med.models.network import build_network
from tests.test_errors import FINETUNE, PRETRAIN, _yaml, one_line_error


@pytest.fixture(scope="module")
def bench(tmp_path_factory, synth_root) -> dict[str, Path]:
    """Configs for the synthetic ISIC tree and one fine-tuning run stopped after 1 of 2 iterations."""
    root = tmp_path_factory.mktemp("reliability")
    paths = {
        "isic": synth_root / "isic",
        "ft": Path(_yaml(root / "ft.yaml", FINETUNE)),
        "pt": Path(_yaml(root / "pt.yaml", PRETRAIN)),
        "run": root / "run",
    }
    argv = ["finetune", str(paths["ft"]), f"data.root={paths['isic']}", f"out_dir={paths['run']}", "--quiet"]
    assert cli.main([*argv, "--max-iters", "1"]) == 0
    return paths


def argparse_error(capsys, argv: list[str], fragment: str) -> str:
    """Run the CLI; assert argparse's exit status 2 and its ``error:`` line holding ``fragment``."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert "error:" in line and fragment in line, err
    return line


# -- 1. numeric options ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv,option",
    [
        (["pretrain", "p.yaml", "--max-steps", "-1"], "--max-steps"),
        (["pretrain", "p.yaml", "--max-steps", "0"], "--max-steps"),
        (["finetune", "f.yaml", "--max-iters", "0"], "--max-iters"),
        (["synth", "--kind", "folder", "--out", "OUT", "--n", "0"], "--n"),
        (["synth", "--kind", "folder", "--out", "OUT", "--n", "-5"], "--n"),
        (["synth", "--kind", "folder", "--out", "OUT", "--seed", "-1"], "--seed"),
        (["demo", "--out", "OUT", "--n", "-3"], "--n"),
        (["demo", "--out", "OUT", "--seed", "4294967296"], "--seed"),
        (["cost", "p.yaml", "--batches", "0"], "--batches"),
        (["cost", "p.yaml", "--batches", "-2"], "--batches"),
        (["predict", "run", "in", "--out", "OUT", "--batch-size", "0"], "--batch-size"),
    ],
)
def test_numeric_options_out_of_range_are_refused(tmp_path, capsys, argv, option):
    argv = [str(tmp_path / "out") if word == "OUT" else word for word in argv]
    line = argparse_error(capsys, argv, f"argument {option}")
    assert "must be an integer" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["synth", "--kind", "folder", "--out", "OUT", "--n", "2"], "--n: the folder kind needs at least 3"),
        (["demo", "--out", "OUT", "--n", "3"], "--n: the demo pre-trains on batches of 16"),
        (["cost", "PT", "--batches", "2", "2"], "--batches: give each batch size once"),
    ],
)
def test_numeric_options_no_command_can_use_are_one_line(bench, tmp_path, capsys, argv, fragment):
    argv = [str(tmp_path / "out") if w == "OUT" else str(bench["pt"]) if w == "PT" else w for w in argv]
    one_line_error(capsys, argv, fragment)
    assert not (tmp_path / "out").exists()


# -- 2. config values past any sane bound, or past this machine's memory -------------------------------------------
@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (["train.epochs=100000000000000000000000"], "'train.epochs': must be <= 100,000"),
        (["seed=4294967296"], "'seed': must be in [0, 2**32 - 1]"),
        (["train.warmup_epochs=1e308"], "'train.warmup_epochs': must be <= 100,000"),
        (["data.image_size=1048576"], "'data.image_size': input batches of 1048576 x 1048576 px"),
        (
            ["ssl.method=densecl", "ssl.queue_size=100000000000"],
            "'ssl.densecl.queue_size': the DenseCL queues",
        ),
        (["data.spacing=0.001"], "'data.spacing': 0.001 mm is finer than 0.01 mm"),
    ],
)
def test_absurd_config_values_are_one_line(bench, tmp_path, capsys, overrides, fragment):
    argv = ["pretrain", str(bench["pt"]), f"data.root={bench['isic']}", f"out_dir={tmp_path / 'r'}"]
    line = one_line_error(capsys, [*argv, *overrides, "--quiet"], f"config key {fragment}")
    if "queue" in fragment or "image_size" in fragment:
        assert "GiB, more than this machine's" in line
    assert not (tmp_path / "r").exists()


# -- 3. data files -------------------------------------------------------------------------------------------------
def _float_mask(root: Path) -> Path:
    mask = sorted((root / "masks").glob("*.png"))[0]
    values = np.asarray(Image.open(mask), dtype=np.float32) + 0.5  # 0.5 / 1.5 / 2.5
    mask.unlink()
    Image.fromarray(values, mode="F").save(mask.with_suffix(".tif"))
    return mask.with_suffix(".tif")


def _splits_folder(root: Path) -> Path:
    (root / "splits.json").unlink()
    (root / "splits.json").mkdir()
    return root / "splits.json"


def _nifti_with(path: Path, *, complex_data: bool = False, affine_value: float | None = None) -> Path:
    """Rewrite a NIfTI file with complex data, or with every entry of its affine's 3 x 4 part set to a value."""
    image = nib.load(path)
    data = np.asarray(image.dataobj)
    if complex_data:
        nib.save(nib.Nifti1Image((data + 1j * data).astype(np.complex64), image.affine), path)
        return path
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_data_dtype(data.dtype)
    for row in ("srow_x", "srow_y", "srow_z"):
        header[row] = affine_value
    header["sform_code"], header["qform_code"] = 1, 0
    nib.Nifti1Image(data, None, header=header).to_filename(path)
    return path


def _first_nifti(root: Path, folder: str = "") -> Path:
    return sorted((root / folder).rglob("*.nii.gz"))[0]


DATA_CASES = {
    "float_mask": ("folder", _float_mask, "mask holds non-integer values (e.g. 0.5)"),
    "splits_folder": ("folder", _splits_folder, "is not a file"),
    "complex_image": ("nifti", lambda r: _nifti_with(_first_nifti(r), complex_data=True), "complex-valued"),
    "zero_affine": ("nifti", lambda r: _nifti_with(_first_nifti(r), affine_value=0.0), "affine is all zero"),
    "nan_affine": ("nifti", lambda r: _nifti_with(_first_nifti(r), affine_value=np.nan), "affine holds NaN"),
    "zero_affine_label": (
        "folder_nifti",
        lambda r: _nifti_with(_first_nifti(r, "masks"), affine_value=0.0),
        "affine is all zero",
    ),
}


@pytest.mark.parametrize("kind", list(DATA_CASES))
def test_bad_data_files_are_one_line(bench, copy_of, capsys, kind):
    dataset, damage, problem = DATA_CASES[kind]
    root = copy_of(dataset)
    bad = damage(root)
    argv = ["check-data", str(bench["ft"]), f"data.root={root}", "--quiet"]
    if dataset == "nifti":
        argv += ["data.name=unlabeled", "data.modality=mr"]
    else:
        argv += ["data.name=folder", "data.num_classes=3"]
        if dataset == "folder_nifti":
            argv += ["data.modality=mr"]
    line = one_line_error(capsys, argv, str(bad))
    assert problem in line


def test_cache_dir_that_is_a_file_is_one_line(bench, copy_of, tmp_path, capsys):
    a_file = tmp_path / "cache"
    a_file.write_text("not a folder")
    argv = ["check-data", str(bench["ft"]), f"data.root={copy_of('nifti')}", "data.name=unlabeled"]
    argv += ["data.modality=mr", "data.cache_gb=1", f"data.cache_dir={a_file}", "--quiet"]
    line = one_line_error(capsys, argv, "config key 'data.cache_dir'")
    assert f"{a_file} exists and is not a folder" in line


# -- 4. weights holding NaN or inf -----------------------------------------------------------------------------------
def _poison(state: dict[str, torch.Tensor]) -> str:
    name = next(k for k in state if k.endswith("running_var"))
    state[name] = torch.full_like(state[name], float("nan"))
    return name


@pytest.mark.parametrize("use", ["export", "init", "resume"])
def test_non_finite_weights_are_refused(bench, tmp_path, capsys, use):
    ft = ["finetune", str(bench["ft"]), f"data.root={bench['isic']}", "--quiet"]
    if use == "resume":
        run = tmp_path / "run"
        shutil.copytree(bench["run"], run)
        checkpoint = load_checkpoint(run / "last.ckpt")
        name = _poison(checkpoint["network"])
        save_checkpoint(checkpoint, run / "last.ckpt")
        line = one_line_error(
            capsys, [*ft, f"out_dir={run}", "--resume"], "last.ckpt: holds non-finite values"
        )
        assert name in line
        return
    network = build_network(ModelConfig(arch="unet", encoder="resnet18"), in_channels=3, classes=1)
    state = network.state_dict()
    name = _poison(state)
    if use == "export":
        meta = {
            "arch": "unet",
            "encoder": "resnet18",
            "in_channels": 3,
            "classes": 1,
            "state_prefix": "network.",
        }
        method = {f"network.{k}": v for k, v in state.items()}
        path = save_checkpoint({"method": method, "network_meta": meta, "step": 1}, tmp_path / "nan.ckpt")
        argv = ["export", str(path), "--out", str(tmp_path / "w")]
    else:
        path = tmp_path / "encoder.safetensors"
        save_file({k: v for k, v in state.items() if k.startswith("encoder.")}, path)
        argv = [*ft, f"out_dir={tmp_path / 'w'}", f"init={path}", "transfer=encoder"]
    line = one_line_error(capsys, argv, f"{path.name}: holds non-finite values")
    assert name in line
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").glob("*.ckpt"))


# -- 5. ~ in out_dir ---------------------------------------------------------------------------------------------------
def test_tilde_in_out_dir_is_the_home_folder(bench, tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    argv = [
        "pretrain",
        str(bench["pt"]),
        f"data.root={bench['isic']}",
        "out_dir=~/runs/x",
        "--max-steps",
        "1",
    ]
    assert cli.main([*argv, "--quiet"]) == 0
    assert not (tmp_path / "~").exists()
    assert (home / "runs" / "x" / "last.ckpt").is_file()


# -- 6. a config file that sets nothing --------------------------------------------------------------------------------
def test_config_file_that_sets_nothing_is_named(bench, tmp_path, capsys):
    empty = tmp_path / "commented.yaml"
    empty.write_text("# data:\n#   image_size: 128\n")
    section = tmp_path / "section.yaml"
    section.write_text("data:\n#  image_size: 128\n")
    capsys.readouterr()
    argv = ["check-data", str(bench["ft"]), str(empty), str(section), f"data.root={bench['isic']}", "--quiet"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert f"warning: {empty} sets nothing" in err.splitlines()
    assert f"warning: {section} sets nothing" in err.splitlines()
    assert "error" not in err


# -- 7. DeCon-ML on FCN ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,single", [("decon_ml", "sl"), ("decon_ml_densecl", "sl")])
def test_multi_level_method_on_fcn_is_one_line(bench, tmp_path, capsys, method, single):
    argv = ["pretrain", str(bench["pt"]), f"data.root={bench['isic']}", f"out_dir={tmp_path / 'r'}"]
    argv += ["model.arch=fcn", f"ssl.method={method}", "ssl.alpha=0.5", "ssl.levels=[0]", "--quiet"]
    line = one_line_error(capsys, argv, "config key 'ssl.decoder.preset'")
    assert "fcn has one decoder level" in line and f"use {single}" in line
    assert not (tmp_path / "r").exists()


# -- 8. train.compile without CUDA ------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_compile_without_cuda_is_one_line(bench, tmp_path, capsys, monkeypatch, command):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = bench["pt"] if command == "pretrain" else bench["ft"]
    argv = [
        command,
        str(config),
        f"data.root={bench['isic']}",
        f"out_dir={tmp_path / 'r'}",
        "train.compile=true",
    ]
    one_line_error(capsys, [*argv, "--quiet"], "train.compile needs a CUDA device")
    assert not (tmp_path / "r").exists()


# -- 9. checkpoints that do not say which network they hold ------------------------------------------------------------
@pytest.mark.parametrize(
    "change,problem",
    [
        (lambda c: c.pop("network_meta"), "records no network_meta"),
        (
            lambda c: c["network_meta"].update(encoder="resnet999"),
            "encoder this smp installation does not have",
        ),
        (lambda c: c["network_meta"].update(arch="segformer"), "unknown arch 'segformer'"),
        (lambda c: c.pop("config"), "records no config"),
    ],
)
def test_checkpoint_without_a_known_network_is_one_line(bench, tmp_path, capsys, change, problem):
    checkpoint = load_checkpoint(bench["run"] / "last.ckpt")
    change(checkpoint)
    path = save_checkpoint(checkpoint, tmp_path / "odd.ckpt")
    line = one_line_error(capsys, ["evaluate", str(path), "--quiet"], f"{path}: ")
    assert problem in line


# -- 10. options and key=value words in any order -----------------------------------------------------------------------
def test_options_and_overrides_in_any_order(bench, tmp_path, capsys):
    argv = ["check-data", str(bench["ft"]), "--quiet", f"data.root={bench['isic']}", "--json"]
    assert cli.main([*argv, str(tmp_path / "s.json"), "data.num_workers=0"]) == 0
    assert json.loads((tmp_path / "s.json").read_text())
    argv = ["evaluate", str(bench["run"]), "--out", str(tmp_path / "ev"), "data.num_workers=0", "--quiet"]
    assert cli.main([*argv, f"data.root={bench['isic']}", "--split", "val"]) == 0
    assert any((tmp_path / "ev").glob("metrics_val*"))
    args = cli.build_parser().parse_args(["pretrain", "c.yaml", "out_dir=x", "--resume", "train.lr=0.3"])
    assert (args.config, args.overrides, args.resume) == ("c.yaml", ["out_dir=x", "train.lr=0.3"], True)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["pretrain", "--help"])
    assert "Options and key=value words may come in any order." in capsys.readouterr().out
