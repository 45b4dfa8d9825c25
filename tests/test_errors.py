"""Bad input as a user meets it: every case is one ``error: <file>: <problem>`` line, exit 2, no traceback.

The matrix drives each kind of bad file (truncated JPEG, truncated PNG mask, zero-byte file, wrong mask values,
image/mask size mismatch, colour mask) through ``check-data``, ``finetune``, ``pretrain`` (0 and 1 DataLoader
workers) and ``evaluate``, then the config, folder, checkpoint and prediction cases: 58 bad inputs tried, 58 handled
(one line naming the file, exit 2; ``predict`` with skipped inputs exits 3 with a count). The same files are
never deleted: ``--overwrite`` refuses folders holding files the package did not write. A run forced to diverge
keeps a finite ``last.ckpt`` that ``evaluate`` scores as before the divergence.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from decon_med import cli
from decon_med.data.synthetic import make_isic, make_nifti
from decon_med.engine import finetune as finetune_module
from decon_med.engine.checkpoint import load_checkpoint, save_checkpoint
from decon_med.errors import DataError, DeconError, error_line, find_error
from decon_med.folders import Manifest

FINETUNE = {
    "data": {"name": "isic2017", "root": "x", "image_size": 64, "num_workers": 0},
    "model": {"arch": "unet", "encoder": "resnet18"},
    "train": {
        "batch_size": 2,
        "iters": 2,
        "val_every": 2,
        "optimizer": "sgd",
        "lr": 0.01,
        "ckpt_every": 2,
        "log_every": 1,
    },
}
PRETRAIN = {
    "data": {"name": "isic2017", "root": "x", "image_size": 64, "num_workers": 0},
    "model": {"arch": "unet", "encoder": "resnet18"},
    "train": {
        "batch_size": 2,
        "epochs": 1,
        "optimizer": "sgd",
        "lr": 0.05,
        "warmup_epochs": 0,
        "log_every": 1,
    },
    "ssl": {"method": "slotcon", "dim_hidden": 32, "dim_out": 16, "slotcon": {"num_prototypes": 8}},
}


def _yaml(path: Path, tree: dict) -> str:
    path.write_text(yaml.safe_dump(tree))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A clean ISIC tree (4 train, 2 val, 2 test), configs, and a fine-tuned run folder."""
    root = tmp_path_factory.mktemp("errors")
    make_isic(root / "isic", n=4, seed=0)
    paths = {
        "root": root,
        "isic": root / "isic",
        "ft": Path(_yaml(root / "ft.yaml", FINETUNE)),
        "pt": Path(_yaml(root / "pt.yaml", PRETRAIN)),
        "run": root / "run",
    }
    assert (
        cli.main(
            ["finetune", str(paths["ft"]), f"data.root={paths['isic']}", f"out_dir={paths['run']}", "--quiet"]
        )
        == 0
    )
    pretrain = [
        "pretrain",
        str(paths["pt"]),
        f"data.root={paths['isic']}",
        f"out_dir={root / 'pre'}",
        "--quiet",
    ]
    assert cli.main(pretrain) == 0
    return paths


def one_line_error(capsys, argv: list[str], fragment: str, status: int = 2) -> str:
    """Run the CLI in-process; assert exit ``status``, exactly one ``error:`` line holding ``fragment``, and no
    traceback anywhere."""
    capsys.readouterr()
    assert cli.main(argv) == status
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert fragment in lines[0], lines[0]
    if status == 2:
        assert err.strip().splitlines() == lines, err  # nothing but the one line
    return lines[0]


# -- bad files, through every command that reads them -----------------------------------------------------------
def _first(root: Path, pattern: str) -> Path:
    return sorted(root.rglob(pattern))[0]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _colour_mask(path: Path) -> None:
    mask = np.array(Image.open(path))
    rgb = np.stack([mask, np.zeros_like(mask), 255 - mask], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def _wrong_values(path: Path) -> None:
    mask = np.array(Image.open(path))
    mask[:4, :4] = 77
    Image.fromarray(mask).save(path)


def _size_mismatch(path: Path) -> None:
    mask = Image.open(path)
    mask.resize((mask.width // 2, mask.height // 2), Image.NEAREST).save(path)


#: kind -> (file pattern inside a split's folders, corruption, words of the expected problem)
BAD_FILES = {
    "truncated_jpeg": ("Data/ISIC_*.jpg", _truncate, "truncated"),
    "zero_byte": ("Data/ISIC_*.jpg", lambda p: p.write_bytes(b""), "unreadable"),
    "truncated_mask": ("GroundTruth/ISIC_*.png", _truncate, "truncated"),
    "wrong_values": ("GroundTruth/ISIC_*.png", _wrong_values, "outside the expected set"),
    "size_mismatch": ("GroundTruth/ISIC_*.png", _size_mismatch, "differs from image size"),
    "colour_mask": ("GroundTruth/ISIC_*.png", _colour_mask, "colour"),
}
SPLIT_DIR = {"train": "ISIC-2017_Training_", "test": "ISIC-2017_Test_v2_"}


def corrupt(world, tmp_path: Path, kind: str, split: str) -> tuple[Path, Path]:
    """A copy of the ISIC tree with one file of ``split`` corrupted; returns (root, bad file)."""
    root = tmp_path / "isic"
    shutil.copytree(world["isic"], root)
    pattern, damage, _ = BAD_FILES[kind]
    folder, name = pattern.split("/")
    target = _first(root / f"{SPLIT_DIR[split]}{folder}" if folder == "Data" else root, name)
    if folder == "GroundTruth":
        target = _first(root / f"{SPLIT_DIR[split]}Part1_GroundTruth", name)
    damage(target)
    return root, target


@pytest.mark.parametrize("kind", list(BAD_FILES))
@pytest.mark.parametrize("command", ["check-data", "finetune", "evaluate"])
def test_bad_file_is_one_line(world, tmp_path, capsys, kind, command):
    split = "test" if command == "evaluate" else "train"
    root, bad = corrupt(world, tmp_path, kind, split)
    if command == "check-data":
        argv = ["check-data", str(world["ft"]), f"data.root={root}", "--quiet"]
    elif command == "finetune":
        argv = ["finetune", str(world["ft"]), f"data.root={root}", f"out_dir={tmp_path / 'run'}", "--quiet"]
    else:
        argv = ["evaluate", str(world["run"]), f"data.root={root}", "--out", str(tmp_path / "ev"), "--quiet"]
    line = one_line_error(capsys, argv, bad.name)
    assert BAD_FILES[kind][2] in line
    if command == "finetune":
        assert "--resume" in line  # says how to continue once the file is fixed


@pytest.mark.parametrize("kind,workers", [("truncated_jpeg", 0), ("zero_byte", 0), ("truncated_jpeg", 1)])
def test_bad_file_in_pretraining_is_one_line(world, tmp_path, capsys, kind, workers):
    root, bad = corrupt(world, tmp_path, kind, "train")
    argv = ["pretrain", str(world["pt"]), f"data.root={root}", f"data.num_workers={workers}"]
    line = one_line_error(capsys, [*argv, f"out_dir={tmp_path / 'run'}", "--quiet"], bad.name)
    assert "--resume" in line


def test_run_stopped_by_bad_data_keeps_its_checkpoint_and_resumes(world, tmp_path, capsys):
    root = tmp_path / "isic"
    shutil.copytree(world["isic"], root)
    out = tmp_path / "run"
    base = ["finetune", str(world["ft"]), f"data.root={root}", f"out_dir={out}", "train.iters=4", "--quiet"]
    assert cli.main([*base, "--max-iters", "2"]) == 0
    saved = load_checkpoint(out / "last.ckpt")["step"]
    masks = sorted((root / "ISIC-2017_Validation_Part1_GroundTruth").glob("*.png"))
    _size_mismatch(masks[0])  # met at the next validation (iteration 4)
    line = one_line_error(capsys, [*base, "--resume"], masks[0].name)
    assert "last checkpoint" in line and "--resume" in line
    assert load_checkpoint(out / "last.ckpt")["step"] == saved == 2
    (out / "last.ckpt.tmp").write_bytes(b"partial write of a killed run")
    shutil.copy(world["isic"] / masks[0].relative_to(root), masks[0])  # fixed
    assert cli.main([*base, "--resume"]) == 0
    assert json.loads((out / "done.json").read_text())["step"] == 4 and not (out / "last.ckpt.tmp").exists()


# -- configs -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override,fragment",
    [
        ("train.lr=.inf", "train.lr': must be a finite number"),
        ("train.lr=.nan", "train.lr': must be a finite number"),
        ("init=/does/not/exist", "/does/not/exist"),  # transfer: auto = encoder, so the init is read
        ("data.class_names=[a,b,c]", "data.class_names': has 3 names"),
        ("train.lr=1e-3x", "train.lr': expected float"),
    ],
)
def test_config_values_are_one_line(world, tmp_path, capsys, override, fragment):
    argv = ["finetune", str(world["ft"]), f"data.root={world['isic']}", f"out_dir={tmp_path / 'r'}", override]
    one_line_error(capsys, argv, fragment)
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").glob("*.ckpt"))


def test_config_files_are_one_line(world, tmp_path, capsys):
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("data:\n  name: isic2017  # caf\xe9\n".encode("latin-1"))
    one_line_error(capsys, ["check-data", str(latin)], "latin1.yaml: not UTF-8 text")
    twice = tmp_path / "twice.yaml"
    twice.write_text("data:\n  name: isic2017\n  image_size: 64\n  image_size: 128\n")
    one_line_error(capsys, ["check-data", str(twice)], "twice.yaml: not valid YAML at line 4")
    tag = tmp_path / "tag.yaml"
    tag.write_text("data: !!python/object/apply:os.system ['true']\n")
    one_line_error(capsys, ["check-data", str(tag)], "tag.yaml: not valid YAML")
    data_only = _yaml(tmp_path / "data.yaml", {"data": FINETUNE["data"]})
    one_line_error(capsys, ["pretrain", data_only], "data.yaml: no 'ssl' section")
    one_line_error(capsys, ["finetune", data_only], "data.yaml: no 'train' section")
    one_line_error(
        capsys, ["check-data", str(tmp_path / "missing.yaml")], "missing.yaml: config file not found"
    )


def test_numbers_as_users_write_them(world, tmp_path):
    from decon_med.config import FinetuneConfig, load_config

    lr = tmp_path / "lr.yaml"
    lr.write_text("train:\n  lr: 1e-3\n  weight_decay: 1E-4\n  momentum: .5\n")
    cfg = load_config([world["ft"], lr], ["train.min_lr=1e-5", "train.clip_grad=1E6"], schema=FinetuneConfig)
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.momentum) == (0.001, 0.0001, 0.5)
    assert (cfg.train.min_lr, cfg.train.clip_grad, cfg.train.iters) == (
        1e-5,
        1e6,
        2,
    )  # iters from the first file


# -- data sets -----------------------------------------------------------------------------------------------------
def test_dataset_problems_are_one_line(world, tmp_path, capsys):
    folder = tmp_path / "folder"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for i in range(4):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(folder / "images" / f"c{i}.png")
        Image.fromarray(np.eye(32, dtype=np.uint8)).save(folder / "masks" / f"c{i}.png")
    splits = folder / "splits.json"
    splits.write_text(json.dumps({"train": ["c0", "c1", "c2"], "val": ["c3"], "test": ["c2"]}))
    base = ["check-data", str(world["ft"]), f"data.root={folder}", "data.name=folder", "data.num_classes=2"]
    one_line_error(capsys, [*base, "--quiet"], "splits.json: ids listed in both 'train' and 'test'")
    splits.write_text(json.dumps({"train": ["c0", "c1", "c1"], "val": ["c3"], "test": ["c2"]}))
    one_line_error(capsys, [*base, "--quiet"], "splits.json: 'train' lists ids more than once")

    scans = tmp_path / "scans"
    make_nifti(scans, n=1, seed=0)
    constant = scans / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 8), np.float32), np.eye(4)), constant)
    argv = ["check-data", str(world["pt"]), f"data.root={scans}", "data.name=unlabeled", "data.modality=mr"]
    one_line_error(capsys, [*argv, "--quiet"], "flat.nii.gz: yields no 2D slice")
    nib.save(nib.Nifti1Image(np.full((16, 16, 8), np.nan, np.float32), np.eye(4)), constant)
    one_line_error(capsys, [*argv, "--quiet"], "flat.nii.gz: yields no 2D slice")
    argv = ["check-data", str(world["ft"]), f"data.root={world['isic']}", "data.class_names=[a,b,c]"]
    one_line_error(capsys, [*argv, "--quiet"], "data.class_names': has 3 names")


# -- paths the user owns -------------------------------------------------------------------------------------------
def test_unusable_out_dirs_are_one_line(world, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    ft = ["finetune", str(world["ft"]), f"data.root={world['isic']}"]
    one_line_error(capsys, [*ft, f"out_dir={a_file}"], "a_file: exists and is not a folder")
    one_line_error(capsys, [*ft, f"out_dir={a_file / 'run'}"], "a_file")
    pt = ["pretrain", str(world["pt"]), f"data.root={world['isic']}"]
    one_line_error(capsys, [*pt, f"out_dir={a_file / 'run'}"], "a_file")
    one_line_error(capsys, [*pt, f"out_dir={world['isic']}"], "out_dir is the data root")
    image = _first(world["isic"] / "ISIC-2017_Test_v2_Data", "ISIC_*.jpg")
    one_line_error(
        capsys, ["predict", str(world["run"]), str(image), "--out", str(a_file / "p"), "--quiet"], "a_file"
    )
    pre = str(world["root"] / "pre" / "last.ckpt")
    one_line_error(capsys, ["export", pre, "--out", str(a_file)], "a_file: exists and is not a folder")
    one_line_error(capsys, ["export", pre, "--out", str(a_file / "w")], "a_file")


def test_overwrite_never_deletes_foreign_files(world, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(world["run"], out)
    (out / "notes.txt").write_text("mine")
    (out / "mydata").mkdir()
    (out / "mydata" / "x.csv").write_text("1")
    ft = ["finetune", str(world["ft"]), f"data.root={world['isic']}"]
    quick = ["train.iters=1", "train.val_every=1", "--quiet"]
    assert cli.main([*ft, f"out_dir={out}", *quick, "--overwrite"]) == 0  # only what the run recorded goes
    assert (out / "notes.txt").read_text() == "mine" and (out / "mydata" / "x.csv").read_text() == "1"
    assert json.loads((out / "done.json").read_text())["step"] == 1

    unmarked = tmp_path / "unmarked"  # another tool's best.ckpt + config.yaml: not a run, whatever it holds
    shutil.copytree(world["run"], unmarked)
    (unmarked / ".decon-run").unlink()
    before = sorted(p.name for p in unmarked.iterdir())
    one_line_error(capsys, [*ft, f"out_dir={unmarked}", "--overwrite"], "holds no run")
    assert sorted(p.name for p in unmarked.iterdir()) == before

    legacy = tmp_path / "legacy"  # marked without a manifest: it owns nothing, so nothing is replaced
    shutil.copytree(world["run"], legacy)
    (legacy / ".decon-manifest").unlink()
    before = {p.name: p.read_bytes() for p in legacy.iterdir() if p.is_file()}
    one_line_error(capsys, [*ft, f"out_dir={legacy}", *quick, "--overwrite"], "which decon-med did not write")
    assert {p.name: p.read_bytes() for p in legacy.iterdir() if p.is_file()} == before
    assert not Manifest(legacy).entries()

    user = tmp_path / "user"
    user.mkdir()
    (user / "config.yaml").write_text("mine: 1\n")  # a user's file that a run would also write
    (user / "metrics.csv").write_text("a,b\n")
    one_line_error(capsys, [*ft, f"out_dir={user}", "--overwrite"], "holds no run")
    assert (user / "config.yaml").read_text() == "mine: 1\n"

    monkeypatch.chdir(tmp_path)
    shutil.copytree(world["run"], tmp_path / "here")
    monkeypatch.chdir(tmp_path / "here")
    one_line_error(capsys, [*ft, "out_dir=.", "--overwrite"], "current folder")
    one_line_error(capsys, [*ft, f"out_dir={tmp_path}", "--overwrite"], "holds no run")
    assert (tmp_path / "here" / "last.ckpt").is_file()
    (tmp_path / "here" / "notes.txt").write_text("mine")
    one_line_error(
        capsys,
        ["synth", "--kind", "folder", "--out", ".", "--n", "4", "--overwrite"],
        "holds no synthetic dataset",
    )
    assert (tmp_path / "here" / "notes.txt").is_file() and (tmp_path / "here" / "last.ckpt").is_file()


# -- checkpoints ---------------------------------------------------------------------------------------------------
def test_checkpoint_problems_are_one_line(world, tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (shutil.rmtree, ("/nonexistent",))

    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"kind": "finetune", "network": Payload()}, unsafe)
    line = one_line_error(capsys, ["evaluate", str(unsafe)], "unsafe.ckpt: refused")
    assert "shutil.rmtree" in line
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x80\x02not a checkpoint")
    one_line_error(capsys, ["evaluate", str(garbage)], "garbage.ckpt: not a readable checkpoint")
    one_line_error(capsys, ["evaluate", str(tmp_path / "none.ckpt")], "none.ckpt: checkpoint not found")
    state = load_checkpoint(world["run"] / "last.ckpt")
    name = next(k for k in state["network"] if k.endswith("running_var"))
    state["network"][name] = torch.full_like(state["network"][name], float("inf"))
    poisoned = save_checkpoint(state, tmp_path / "poisoned.ckpt")
    line = one_line_error(capsys, ["evaluate", str(poisoned)], "poisoned.ckpt: holds non-finite values")
    assert name in line
    image = _first(world["isic"] / "ISIC-2017_Test_v2_Data", "ISIC_*.jpg")
    one_line_error(
        capsys,
        ["predict", str(poisoned), str(image), "--out", str(tmp_path / "p")],
        "poisoned.ckpt: holds non",
    )


def test_predict_with_skipped_inputs_exits_3(world, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for image in sorted((world["isic"] / "ISIC-2017_Test_v2_Data").glob("ISIC_*.jpg")):
        shutil.copy(image, inputs / image.name)
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n")
    line = one_line_error(
        capsys,
        ["predict", str(world["run"]), str(inputs), "--out", str(tmp_path / "p"), "--quiet"],
        "skipped 1 of 3",
        status=3,
    )
    assert "inputs" in line and len(list((tmp_path / "p").glob("*.png"))) == 2
    for image in inputs.glob("ISIC_*"):
        image.unlink()
    one_line_error(
        capsys,
        ["predict", str(world["run"]), str(inputs), "--out", str(tmp_path / "q"), "--quiet"],
        "broken.png",
    )


# -- divergence ----------------------------------------------------------------------------------------------------
def test_diverging_run_keeps_a_finite_checkpoint_that_scores_as_before(world, tmp_path, capsys, monkeypatch):
    real = finetune_module.poly_schedule

    def explode_after_two(lr, iters, **kwargs):  # a sane learning rate for 2 iterations, then 1e6
        schedule = np.asarray(real(lr, iters, **kwargs), dtype=np.float64)
        schedule[2:] = 1e6
        return schedule

    monkeypatch.setattr(finetune_module, "poly_schedule", explode_after_two)
    out = tmp_path / "run"
    argv = ["finetune", str(world["ft"]), f"data.root={world['isic']}", f"out_dir={out}", "train.iters=8"]
    line = one_line_error(capsys, [*argv, "--quiet"], "non-finite")
    assert str(out / "last.ckpt") in line
    for name in ("last.ckpt", "best.ckpt"):
        state = load_checkpoint(out / name)
        assert 2 <= state["step"] < 8
        assert not [
            k for k, v in state["network"].items() if v.is_floating_point() and not v.isfinite().all()
        ]
    rows = [line.split(",") for line in (out / "val.csv").read_text().splitlines()[1:]]
    val_before = {int(r[0]): float(r[1]) for r in rows}
    from decon_med.engine.evaluate import evaluate

    step = load_checkpoint(out / "last.ckpt")["step"]
    score = evaluate(out / "last.ckpt", split="val", progress=False)["mIoU"]
    assert score == pytest.approx(val_before[step], abs=1e-12)


def test_weight_guard_refuses_non_finite_buffers(world, tmp_path):
    from decon_med.config import FinetuneConfig, load_config

    cfg = load_config(
        world["ft"], [f"data.root={world['isic']}", f"out_dir={tmp_path / 'r'}"], schema=FinetuneConfig
    )
    real = finetune_module._Run._optimizer_step

    def poison(self, batches):
        result = real(self, batches)
        if self.step == 2:
            bn = next(m for m in self.network.modules() if isinstance(m, torch.nn.BatchNorm2d))
            bn.running_var.fill_(float("inf"))  # finite loss, broken statistics
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(finetune_module._Run, "_optimizer_step", poison)
        with pytest.raises(
            DeconError, match=r"non-finite weights at iteration 2 \(1 tensor\(s\), e.g. .*running_var"
        ):
            finetune_module.finetune(cfg, progress=False)
    assert not (tmp_path / "r" / "last.ckpt").exists() and not (tmp_path / "r" / "best.ckpt").exists()


# -- the unwrapping itself -----------------------------------------------------------------------------------------
def test_error_line_unwraps_monai_and_worker_errors():
    import pickle

    from torch._utils import ExceptionWrapper

    error = DataError("/d/a.png", "unreadable or truncated image")
    assert pickle.loads(pickle.dumps(error)).path == "/d/a.png"
    try:
        try:
            raise error
        except DataError as exc:
            raise RuntimeError("applying transform <LoadSample>") from exc
    except RuntimeError as exc:
        wrapped = exc
        worker = ExceptionWrapper(where="in DataLoader worker process 0")
    assert error_line(wrapped) == "/d/a.png: unreadable or truncated image"
    with pytest.raises(RuntimeError) as info:
        worker.reraise()
    found = find_error(info.value)
    assert isinstance(found, DataError) and str(found) == "/d/a.png: unreadable or truncated image"
    assert (
        error_line(FileNotFoundError(2, "No such file or directory", "/x/y"))
        == "/x/y: No such file or directory"
    )
    assert error_line(ValueError("a bug")) is None


def test_a_wrapped_ctrl_c_is_an_interruption(monkeypatch, capsys):
    def stopped(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:  # as torch.save wraps it
            raise RuntimeError("[enforce fail at inline_container.cc] . unexpected pos") from exc

    monkeypatch.setattr(cli, "_cmd_config_reference", stopped)
    assert cli.main(["config-reference"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
