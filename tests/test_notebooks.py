"""Every notebook runs top to bottom against a tiny run folder (``decon-med demo --quick``); none stores outputs."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_quickstart", "02_results", "03_pretraining", "04_predictions", "05_volumes"]


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory) -> Iterator[Path]:
    from decon_med.demo import run_demo

    out = tmp_path_factory.mktemp("notebook_demo") / "demo"
    run_demo(out, progress=False, quick=True)
    yield out
    shutil.rmtree(out.parent, ignore_errors=True)


def test_demo_grid_runs_keep_only_their_selected_weights(demo_folder):
    runs = sorted((demo_folder / "experiment" / "runs").iterdir())
    assert runs
    for run in runs:
        assert sorted(p.name for p in run.glob("*.ckpt")) == ["best.ckpt"], run
        assert not (run / "checkpoints").exists(), run


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_committed_without_outputs(name):
    book = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    assert book.cells[0].cell_type == "markdown"
    for cell in book.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom(name, demo_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("DECON_MED_EXPERIMENT", str(demo_folder / "experiment"))
    monkeypatch.setenv("DECON_MED_PRETRAIN", str(demo_folder / "pretrain" / "decon_ml"))
    monkeypatch.setenv("DECON_MED_QUICKSTART", str(tmp_path / "quickstart"))
    monkeypatch.setenv("DECON_MED_VOLUMES", str(tmp_path / "volumes"))
    book = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = NotebookClient(
        book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()  # raises CellExecutionError naming the failing cell
    outputs = [o for cell in book.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert images, "every notebook draws at least one figure"
    if name == "01_quickstart":
        assert (tmp_path / "quickstart" / "finetune" / "results.json").is_file()
    if name == "05_volumes":
        assert (tmp_path / "volumes" / "preview.png").is_file()
        assert len(list((tmp_path / "volumes" / "finetune" / "predictions_test").glob("*_seg.nii.gz"))) == 1
        assert len(list((tmp_path / "volumes" / "predictions").glob("*_seg_overlay.png"))) == 3
