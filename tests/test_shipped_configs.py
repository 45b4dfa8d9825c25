"""The configs shipped inside the package: names in place of paths, ``decon-med configs``, and a wheel install.

The wheel tests build the wheel from a copy of the sources, install it into a fresh virtual environment that reuses
this environment's dependencies (a ``.pth`` file, nothing downloaded) and run ``decon-med`` from an empty folder
outside the checkout: ``configs``, ``configs copy``, a one-step ``pretrain`` of a shipped name and the full
``decon-med demo --quick``. The suite builds the wheel and checks its contents; the install runs (minutes on a
2-core CPU) only with ``DECON_MED_WHEEL_DEMO=1``, which ``.ci/run`` sets after the suite.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from decon_med.cli import main
from decon_med.config import PretrainConfig, load_config, split_config_args
from decon_med.errors import ConfigError
from decon_med.shipped import configs_root, describe, resolve_config, shipped_configs

REPO = Path(__file__).resolve().parents[1]
PACKAGE_CONFIGS = REPO / "decon_med" / "configs"


def test_shipped_configs_are_the_package_folder():
    assert configs_root().resolve() == PACKAGE_CONFIGS.resolve()
    names = {c.name for c in shipped_configs()}
    on_disk = {
        p.relative_to(PACKAGE_CONFIGS).with_suffix("").as_posix() for p in PACKAGE_CONFIGS.rglob("*.yaml")
    }
    assert names == on_disk and {"pretrain/decon_ml", "finetune/isic", "experiment/methods_isic"} <= names


def test_repository_configs_folder_is_the_package_one():
    """``configs/`` at the repository root (the paths of the documentation) is the shipped folder, not a copy."""
    root = REPO / "configs"
    assert root.resolve() == PACKAGE_CONFIGS.resolve()
    assert (root / "pretrain" / "decon_ml.yaml").read_bytes() == (
        PACKAGE_CONFIGS / "pretrain" / "decon_ml.yaml"
    ).read_bytes()


@pytest.mark.parametrize(
    "name",
    [
        "decon_ml",
        "decon_ml.yaml",
        "pretrain/decon_ml",
        "pretrain/decon_ml.yml",
        "configs/pretrain/decon_ml.yaml",
    ],
)
def test_a_name_resolves_to_the_shipped_file(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert resolve_config(name) == PACKAGE_CONFIGS / "pretrain" / "decon_ml.yaml"
    assert load_config(name, ["model.encoder=resnet18"], schema=PretrainConfig).ssl.decoder.preset == "ml"


def test_a_file_that_exists_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "decon_ml.yaml").write_text("ssl:\n  method: slotcon\n  alpha: 1.0\n")
    assert resolve_config("decon_ml.yaml") == Path("decon_ml.yaml")
    assert (
        load_config("decon_ml.yaml", ["model.encoder=resnet18"], schema=PretrainConfig).ssl.method
        == "slotcon"
    )
    # without the suffix the word names the shipped config: only an existing file wins
    assert resolve_config("decon_ml") == PACKAGE_CONFIGS / "pretrain" / "decon_ml.yaml"


def test_ambiguous_and_unknown_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ConfigError, match=r"folder: names 2 shipped configs \(data/folder, finetune/folder\)"
    ):
        resolve_config("folder")
    assert resolve_config("finetune/folder") == PACKAGE_CONFIGS / "finetune" / "folder.yaml"
    with pytest.raises(
        ConfigError, match=r"decon_mll: config file not found \(close shipped configs: pretrain/decon_ml"
    ):
        load_config("decon_mll")
    with pytest.raises(ConfigError, match=r"^/no/such/decon_ml\.yaml: config file not found$"):
        load_config("/no/such/decon_ml.yaml")  # an absolute path is never a name


def test_split_config_args_takes_names():
    files, overrides = split_config_args(["decon_ml", "finetune/isic", "data.root=x", "train.batch_size"])
    assert files == ["decon_ml", "finetune/isic"]
    assert overrides == ["data.root=x", "train.batch_size"]  # a dotted word stays an (invalid) override


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (
            ["pretrain", "decon_mll"],
            "decon_mll: config file not found (close shipped configs: pretrain/decon_ml",
        ),
        (["finetune", "folder"], "folder: names 2 shipped configs (data/folder, finetune/folder)"),
        (
            ["experiment", "table7"],
            "table7: experiment config not found (close shipped configs: experiment/table7_",
        ),
    ],
)
def test_cli_name_errors_are_one_line(argv, fragment, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and fragment in err


def test_experiment_and_its_finetune_config_by_name(tmp_path, monkeypatch):
    """``finetune: configs/finetune/folder.yaml`` inside a shipped grid finds the shipped file from any folder."""
    from decon_med.experiment import expand_grid, load_experiment

    monkeypatch.chdir(tmp_path)
    cfg = load_experiment("demo", ["inits.slotcon=null", "inits.decon_ml=null", "seeds=[0]"])
    assert cfg.finetune == "configs/finetune/folder.yaml" and not Path(cfg.finetune).exists()
    specs = expand_grid(cfg)
    assert specs and all(s.cfg.data.name == "folder" for s in specs)
    with pytest.raises(ConfigError, match="finetune"):
        load_experiment("demo", ["finetune=configs/finetune/nothing.yaml"])


def test_pretrain_cli_takes_a_name(tmp_path, monkeypatch):
    from decon_med.cli import build_parser

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["pretrain", "decon_ml", "model.encoder=resnet18", "--max-steps", "1"])
    files, overrides = split_config_args([args.config, *args.overrides])
    assert load_config(files, overrides, schema=PretrainConfig, require=("ssl",)).ssl.decoder.preset == "ml"


def test_configs_lists_every_shipped_config(capsys):
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    rows = {
        line.split()[0]: line for line in out.splitlines() if line[:1].isalpha() and "/" in line.split()[0]
    }
    assert set(rows) == {c.name for c in shipped_configs()}
    assert "DeCon-ML: SlotCon heads on every U-Net decoder level" in rows["pretrain/decon_ml"]
    assert str(configs_root()) in out
    assert main(["configs", "--paths"]) == 0
    paths = dict(line.split() for line in capsys.readouterr().out.splitlines())
    assert paths["finetune/isic"] == str(PACKAGE_CONFIGS / "finetune" / "isic.yaml")


def test_every_shipped_config_has_a_description():
    for config in shipped_configs():
        text = describe(config.path)
        assert text and len(text) <= 100 and not text.startswith("#"), config.name


def test_configs_copy(tmp_path, capsys):
    source = PACKAGE_CONFIGS / "finetune" / "isic.yaml"
    dest = tmp_path / "mine.yaml"
    assert main(["configs", "copy", "isic", str(dest)]) == 0
    assert dest.read_bytes() == source.read_bytes()
    dest.write_text("edited\n")
    assert main(["configs", "copy", "isic", str(dest)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and dest.read_text() == "edited\n"
    assert main(["configs", "copy", "finetune/isic", str(dest), "--overwrite"]) == 0
    assert dest.read_bytes() == source.read_bytes()
    assert (
        main(["configs", "copy", "pretrain/decon_ml", str(tmp_path)]) == 0
    )  # a folder: the config's file name
    assert (tmp_path / "decon_ml.yaml").read_bytes() == (
        PACKAGE_CONFIGS / "pretrain" / "decon_ml.yaml"
    ).read_bytes()
    capsys.readouterr()
    assert main(["configs", "copy", "decon_mll", str(tmp_path / "x.yaml")]) == 2
    assert "close: pretrain/decon_ml" in capsys.readouterr().err and not (tmp_path / "x.yaml").exists()
    assert main(["configs", "copy"]) == 2


@pytest.mark.parametrize("dest", ["pretrain/decon_ml.yaml", "pretrain/new.yaml", "pretrain"])
def test_configs_copy_never_writes_into_the_shipped_folder(dest, capsys):
    before = {p: p.read_bytes() for p in PACKAGE_CONFIGS.rglob("*.yaml")}
    for root in (PACKAGE_CONFIGS, REPO / "configs"):
        assert main(["configs", "copy", "finetune/isic", str(root / dest), "--overwrite"]) == 2
        assert "never writes where it reads" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in PACKAGE_CONFIGS.rglob("*.yaml")} == before


def test_demo_finds_its_configs_through_the_package(tmp_path, monkeypatch):
    from decon_med import demo

    monkeypatch.chdir(tmp_path)
    assert demo.CONFIGS == configs_root()
    exports = {m: tmp_path / "pretrain" / m / "export" for m in demo.METHOD_OVERRIDES}
    cfg = demo.demo_experiment(tmp_path, tmp_path / "data", exports, quick=True)
    assert Path(cfg.finetune) == configs_root() / "finetune" / "folder.yaml"


# ------------------------------------------------------------------------------------------------- the wheel


def _can_build_offline() -> bool:
    """setuptools here can build the wheel without build isolation (bdist_wheel is built in from 70.1)."""
    try:
        import setuptools
    except ImportError:
        return False
    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    if (major, minor) >= (70, 1):
        return True
    try:
        import wheel  # noqa: F401
    except ImportError:
        return False
    return major >= 64


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (the checkout gets no build/ folder)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(
        REPO / "decon_med", src / "decon_med", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-w", str(out), "-q"]
    if _can_build_offline():
        cmd += ["--no-build-isolation", "--no-index"]
    elif not os.environ.get("DECON_MED_WHEEL_DEMO"):  # .ci/run (online) builds with pip's build isolation
        pytest.skip("this environment's setuptools cannot build a wheel offline (needs >= 70.1, or wheel)")
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=src)
    assert done.returncode == 0, done.stderr[-3000:]
    (built,) = out.glob("decon_med-*.whl")
    return built


def test_wheel_holds_every_shipped_config(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = {n for n in zf.namelist() if n.startswith("decon_med/configs/")}
    expected = {
        f"decon_med/configs/{p.relative_to(PACKAGE_CONFIGS).as_posix()}"
        for p in PACKAGE_CONFIGS.rglob("*.yaml")
    }
    assert names == expected and len(expected) >= 20


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """A fresh virtual environment holding the wheel; its dependencies are this environment's (a .pth file)."""
    env_dir = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(env_dir)], check=True, capture_output=True)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    here = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "_decon_med_deps.pth").write_text("\n".join(sorted(here)) + "\n")
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return python


def _run(python: Path, args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    script = python.parent / ("decon-med.exe" if os.name == "nt" else "decon-med")
    cmd = [str(python), *args[1:]] if args[0] == "python" else [str(script), *args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
@pytest.mark.skipif(  # about a minute: .ci/run runs it after the suite, with the quick demo
    not os.environ.get("DECON_MED_WHEEL_DEMO"), reason="set DECON_MED_WHEEL_DEMO=1 (.ci/run does)"
)
def test_wheel_install_works_outside_the_checkout(installed, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    where = _run(installed, ["python", "-c", "import decon_med; print(decon_med.__file__)"], empty).stdout
    assert Path(where.strip()).is_relative_to(installed.parent.parent) and str(REPO) not in where
    listing = _run(installed, ["configs"], empty).stdout
    assert all(c.name in listing for c in shipped_configs())
    assert str(REPO) not in listing  # the configs come from the installed package
    _run(installed, ["configs", "copy", "finetune/isic", "mine.yaml"], empty)
    assert (empty / "mine.yaml").read_bytes() == (PACKAGE_CONFIGS / "finetune" / "isic.yaml").read_bytes()
    check = "from decon_med.demo import CONFIGS; print(CONFIGS); assert (CONFIGS / 'experiment' / 'demo.yaml').is_file()"
    assert str(REPO) not in _run(installed, ["python", "-c", check], empty).stdout
    _run(installed, ["synth", "--kind", "textures", "--out", "data", "--n", "4"], empty)
    tiny = ["model.encoder=resnet18", "data.image_size=64", "train.batch_size=4", "data.num_workers=0"]
    data = ["data.name=unlabeled", "data.root=data/unlabeled", "out_dir=run"]
    _run(installed, ["pretrain", "decon_ml", *tiny, *data, "--max-steps", "1", "--quiet"], empty)
    assert (empty / "run" / "last.ckpt").is_file()


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("DECON_MED_WHEEL_DEMO"), reason="set DECON_MED_WHEEL_DEMO=1 (.ci/run does)"
)
def test_wheel_install_runs_the_quick_demo(installed, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = _run(installed, ["demo", "--quick", "--quiet", "--out", "demo"], empty, timeout=1800)
    assert "demo finished" in done.stdout
    assert (empty / "demo" / "experiment" / "summary.csv").is_file()
