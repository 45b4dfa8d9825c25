"""Outputs never land on inputs, a run folder is owned by its manifest, and one folder has one writer.

Each test reproduces a way a user's file used to be lost (or two processes used to interleave their files) and
checks that the command now stops with one ``error:`` line, exit 2, and every input byte-identical.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from decon_med import cli
from decon_med.data.synthetic import make_folder
from decon_med.folders import LOCK, RUN_MARKER, Manifest, atomic_write, record_written
from decon_med.locks import FolderLock
from tests.test_errors import one_line_error

FINETUNE = {
    "data": {"name": "folder", "root": "x", "image_size": 64, "num_workers": 0, "num_classes": 3},
    "model": {"arch": "unet", "encoder": "resnet18"},
    "train": {"batch_size": 2, "iters": 1, "val_every": 1, "optimizer": "sgd", "lr": 0.01, "log_every": 1},
}


def _digest(root: Path) -> dict[str, str]:
    """Path -> sha256 of every file under ``root``."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A folder-layout dataset (images/, masks/, splits.json), a fine-tuning config and a finished run."""
    root = tmp_path_factory.mktemp("safety")
    make_folder(root / "data", n=6, seed=0)
    config = root / "ft.yaml"
    config.write_text(yaml.safe_dump(FINETUNE))
    run = root / "run"
    argv = ["finetune", str(config), f"data.root={root / 'data'}", f"out_dir={run}", "--quiet"]
    assert cli.main(argv) == 0
    return {"root": root, "data": root / "data", "config": config, "run": run}


def _ft(world: dict[str, Path], out: Path, *more: str) -> list[str]:
    return [
        "finetune",
        str(world["config"]),
        f"data.root={world['data']}",
        f"out_dir={out}",
        "--quiet",
        *more,
    ]


# -- outputs never land on inputs ------------------------------------------------------------------------------
def test_predict_never_writes_over_the_ground_truth_or_its_inputs(world, capsys):
    data, before = world["data"], _digest(world["data"])
    images = str(data / "images")
    one_line_error(
        capsys,
        ["predict", str(world["run"]), images, "--out", str(data / "masks"), "--overwrite", "--quiet"],
        "lies inside the data root",
    )
    image = sorted((data / "images").iterdir())[0]
    one_line_error(
        capsys,
        ["predict", str(world["run"]), str(image), "--out", images, "--overwrite", "--quiet"],
        "--out holds the input",
    )
    one_line_error(
        capsys,
        ["predict", str(world["run"] / "best.ckpt"), str(image), "--out", str(world["run"]), "--quiet"],
        "--out holds the checkpoint",
    )
    assert _digest(data) == before


def test_check_data_never_writes_into_the_dataset(world, capsys):
    data, before = world["data"], _digest(world["data"])
    base = ["check-data", str(world["config"]), f"data.root={data}", "--quiet"]
    one_line_error(capsys, [*base, "--json", str(data / "splits.json")], "--json lies inside the data root")
    image = sorted((data / "images").iterdir())[0]
    one_line_error(capsys, [*base, "--preview", str(image)], "--preview lies inside the data root")
    one_line_error(capsys, [*base, "--json", str(world["config"])], "--json is the config file")
    assert _digest(data) == before


def test_a_run_folder_never_overlaps_its_inputs(world, tmp_path, capsys):
    data, before = world["data"], _digest(world["data"])
    one_line_error(capsys, _ft(world, data / "runs" / "x"), "out_dir lies inside the data root")
    one_line_error(capsys, _ft(world, data.parent, "--overwrite"), "out_dir holds the")  # data and config
    init = f"init={world['run'] / 'best.ckpt'}"
    one_line_error(
        capsys,
        _ft(world, world["run"], init, "transfer=encoder", "--overwrite"),
        "out_dir holds the init weights",
    )
    own = tmp_path / "cfg_run"  # a config file placed in the out_dir by the user is an input too
    own.mkdir()
    (own / "mine.yaml").write_text(world["config"].read_text())
    one_line_error(
        capsys,
        ["finetune", str(own / "mine.yaml"), f"data.root={data}", f"out_dir={own}", "--quiet"],
        "out_dir holds the config file",
    )
    assert _digest(data) == before and (world["run"] / "best.ckpt").is_file()
    # the run's own saved config.yaml is not an input it must avoid: --resume from it is fine
    saved = world["run"] / "config.yaml"
    assert cli.main(["finetune", str(saved), f"out_dir={world['run']}", "--resume", "--quiet"]) == 0


def test_evaluate_never_writes_into_the_data(world, capsys):
    data, before = world["data"], _digest(world["data"])
    one_line_error(
        capsys,
        ["evaluate", str(world["run"]), "--split", "val", "--out", str(data / "eval"), "--quiet"],
        "lies inside the data root",
    )
    assert _digest(data) == before


# -- ownership by manifest --------------------------------------------------------------------------------------
def test_resume_without_a_checkpoint_never_replaces_a_users_files(world, tmp_path, capsys):
    home = tmp_path / "home"  # a folder that got a run marker by accident, holding a user's files
    (home / "tb").mkdir(parents=True)
    (home / RUN_MARKER).write_text("")
    (home / "config.yaml").write_text("mine: 1\n")
    (home / "metrics.csv").write_text("a,b\n1,2\n")
    (home / "tb" / "events.mine").write_text("mine")
    (home / "notes.tmp").write_text("mine")
    before = _digest(home)
    one_line_error(
        capsys, _ft(world, home, "--resume"), "config.yaml, metrics.csv, which decon-med did not write"
    )
    one_line_error(
        capsys, _ft(world, home, "--overwrite"), "config.yaml, metrics.csv, which decon-med did not write"
    )
    assert _digest(home) == before


def test_overwrite_and_resume_remove_only_recorded_paths(world, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(_ft(world, run, "train.iters=2", "train.ckpt_every=1", "--max-iters", "1")) == 0
    mine = {
        "metrics_mine.csv": "mine",
        "predictions_mine/a.png": "mine",
        "checkpoints/step_copy.ckpt": "mine",
        "notes.tmp": "mine",
        "tb/my_notes.txt": "mine",
    }
    for rel, text in mine.items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text(text)
    (run / "last.ckpt.tmp").write_bytes(b"a killed write")
    assert cli.main(_ft(world, run, "train.iters=2", "train.ckpt_every=1", "--resume")) == 0
    assert not (run / "last.ckpt.tmp").exists()
    assert cli.main(_ft(world, run, "train.iters=2", "train.ckpt_every=1", "--overwrite")) == 0
    for rel, text in mine.items():
        assert (run / rel).read_text() == text, rel
    assert (run / "done.json").is_file()


def test_a_write_never_replaces_a_file_the_package_did_not_write(tmp_path):
    (tmp_path / RUN_MARKER).write_text("")
    (tmp_path / "results.json").write_text("mine")
    with pytest.raises(Exception, match="exists and decon-med did not write it"):
        atomic_write(tmp_path / "results.json", "{}")
    assert (tmp_path / "results.json").read_text() == "mine"
    atomic_write(tmp_path / "sub" / "new.json", "{}")  # recorded first, with the folder it creates
    assert {"sub/", "sub/new.json"} <= Manifest(tmp_path).entries()
    record_written(tmp_path / "sub" / "new.json")  # recorded paths may be written again
    atomic_write(tmp_path / "sub" / "new.json", "[]")
    assert (tmp_path / "sub" / "new.json").read_text() == "[]"


# -- one writer per folder --------------------------------------------------------------------------------------
HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from decon_med.locks import FolderLock
    FolderLock(Path(sys.argv[1])).acquire("finetune")
    print("ready", flush=True)
    time.sleep(120)
    """
)


def _hold(folder: Path) -> subprocess.Popen:
    """A second real process that takes the folder's lock and keeps it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path.cwd(),
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_a_second_writer_is_refused_and_a_stale_lock_is_taken_over(world, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(_ft(world, run)) == 0
    holder = _hold(run)
    try:
        before = _digest(run)
        for extra in (["--overwrite"], ["--resume"]):
            line = one_line_error(
                capsys, _ft(world, run, *extra), "another decon-med process is writing here"
            )
            assert f"pid {holder.pid}" in line and "finetune" in line
        one_line_error(
            capsys,
            ["evaluate", str(run), "--split", "val", "--save-predictions", "--quiet"],
            f"pid {holder.pid}",
        )
        assert {k: v for k, v in _digest(run).items() if k != LOCK} == {
            k: v for k, v in before.items() if k != LOCK
        }
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / LOCK).is_file()  # left behind by the killed holder
    capsys.readouterr()
    assert cli.main(_ft(world, run, "--overwrite")) == 0
    err = capsys.readouterr().err
    assert f"taking over the lock left by a process that ended (finetune, pid {holder.pid}" in err
    assert not (run / LOCK).exists()  # released at the end


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    first, second = FolderLock(tmp_path), FolderLock(tmp_path)
    first.acquire("pretrain")
    with pytest.raises(Exception, match="another decon-med process is writing here"):
        second.acquire("pretrain")
    first.release()
    second.acquire("pretrain")
    second.release()
    assert not (tmp_path / LOCK).exists()
