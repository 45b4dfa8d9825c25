"""Helpers behind the notebooks: tables, overlays, PCA, best / worst, and the plots on a real tiny run."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from decon_med.errors import DataError  # noqa: E402
from decon_med.viz import (  # noqa: E402
    CLASS_COLOURS,
    best_and_worst,
    feature_pca,
    find_data_root,
    loss_columns,
    nifti_grid,
    overlay,
    per_class_iou,
    plot_fraction_curves,
    plot_losses,
    plot_paired,
    plot_schedules,
    radiological_view,
    read_csv_table,
    read_results,
    results_table,
)


def _results() -> pd.DataFrame:
    rows = []
    for init, transfer in [("random", "random"), ("decon_ml", "encoder")]:
        for fraction in (0.05, 1.0):
            for seed, miou in enumerate((0.70, 0.74)):
                bump = 0.1 if init == "decon_ml" else 0.0
                rows.append(
                    {
                        "dataset": "isic2017",
                        "init": init,
                        "transfer": transfer,
                        "fraction": fraction,
                        "seed": seed,
                        "mIoU": miou + bump,
                        "IoU_background": 0.9,
                        "IoU_lesion": miou + bump - 0.1,
                        "run_dir": f"runs/x/experiment/runs/{init}-{transfer}-f{fraction}-s{seed}",
                    }
                )
    return pd.DataFrame(rows)


def test_results_table_is_mean_and_std_in_percent():
    table = results_table(_results())
    assert list(table.columns) == ["5 %", "100 %"]
    assert table.loc["random", "5 %"] == "72.00 ± 2.83"
    assert table.loc["decon_ml / encoder", "100 %"] == "82.00 ± 2.83"


def test_per_class_iou_averages_over_seeds():
    table = per_class_iou(_results())
    assert list(table.columns) == ["background", "lesion"]
    assert table.loc[("decon_ml", "encoder", 0.05), "lesion"] == pytest.approx(72.0)


def test_read_results_resolves_moved_run_folders(tmp_path):
    _results().to_csv(tmp_path / "results.csv", index=False)
    results = read_results(tmp_path)
    assert results["run_dir"].iloc[0] == str(tmp_path / "runs" / "random-random-f0.05-s0")
    with pytest.raises(DataError, match="missing.csv"):
        read_csv_table(tmp_path / "missing.csv")


def test_data_root_is_found_from_the_run_folder(tmp_path, monkeypatch):
    (tmp_path / "runs" / "demo" / "data").mkdir(parents=True)
    run = tmp_path / "runs" / "demo" / "pretrain" / "x"
    run.mkdir(parents=True)
    monkeypatch.chdir(run)  # somewhere the relative root does not exist
    assert find_data_root("runs/demo/data", run) == tmp_path / "runs" / "demo" / "data"
    assert find_data_root("/abs/missing", run) == Path("/abs/missing")
    assert find_data_root("nowhere", run) == Path("nowhere")


def test_overlay_tints_only_foreground_classes():
    image = np.full((2, 2, 3), 0.5)
    mask = np.array([[0, 1], [2, 0]])
    out = overlay(image, mask, alpha=0.5)
    assert np.allclose(out[0, 0], 0.5) and np.allclose(out[1, 1], 0.5)
    assert np.allclose(out[0, 1], 0.25 + 0.5 * CLASS_COLOURS[0])
    assert np.allclose(out[1, 0], 0.25 + 0.5 * CLASS_COLOURS[1])
    grey = overlay(np.zeros((2, 2, 1)), mask, alpha=1.0)
    assert grey.shape == (2, 2, 3) and np.allclose(grey[0, 1], CLASS_COLOURS[0])


def test_feature_pca_orders_components_by_variance():
    torch.manual_seed(0)
    maps = torch.zeros(2, 8, 4, 4)
    maps[:, 0] = torch.randn(2, 4, 4) * 10  # the dominant direction
    maps[:, 1] = torch.randn(2, 4, 4)
    rgb = feature_pca(maps)
    assert rgb.shape == (2, 4, 4, 3) and rgb.min() >= 0 and rgb.max() <= 1
    red = rgb[..., 0].ravel()
    channel0 = maps[:, 0].ravel().numpy()
    assert abs(np.corrcoef(red, channel0)[0, 1]) > 0.99  # first component = the high-variance channel


def test_best_and_worst_skip_nan_and_order():
    scores = pd.DataFrame({"id": list("abcde"), "IoU": [0.5, math.nan, 0.9, 0.1, 0.7]})
    best, worst = best_and_worst(scores, k=2)
    assert list(best["id"]) == ["c", "e"] and list(worst["id"]) == ["d", "a"]


def test_plots_draw_the_expected_artists():
    results = _results()
    fig, ax = plt.subplots()
    plot_fraction_curves(results, ax, reference={"random": [1.0, 2.0, 3.0]})
    assert len(ax.containers) == 2 and len(ax.lines) >= 3  # two error-bar series + the paper's line
    paired = pd.DataFrame(
        {"fraction": [0.05], "init": ["decon_ml"], "transfer": ["encoder"], "baseline": ["random"],
         "mean_diff": [10.0], "ci_low": [8.0], "ci_high": [12.0]}
    )  # fmt: skip
    fig, ax = plt.subplots()
    plot_paired(paired, ax)
    assert "random" in ax.get_xlabel()
    metrics = pd.DataFrame(
        {"step": [1, 2], "epoch": [0, 0], "loss": [2.0, 1.0], "enc": [1.0, 0.5], "enc_group": [0.1, 0.1],
         "dec0": [3.0, 2.0], "dec": [3.0, 2.0], "momentum": [0.99, 0.995], "lr": [0.1, 0.05], "img_s": [5, 5]}
    )  # fmt: skip
    assert loss_columns(metrics) == ["enc", "dec0", "dec"]
    fig, ax = plt.subplots()
    plot_losses(metrics, ax)
    assert [line.get_label() for line in ax.lines] == ["loss", "enc", "dec0", "dec"]
    fig, ax = plt.subplots()
    plot_schedules(metrics, ax)
    assert ax.get_ylabel() == "learning rate" and len(fig.axes) == 2
    plt.close("all")


def test_volume_slices_are_drawn_in_the_radiological_convention(tmp_path):
    """A marker at the patient's right and front shows top left (anterior up, right on the image's left),
    whether the file is stored RAS or LPS; the slices handed to the network stay in canonical order."""
    import nibabel as nib

    from decon_med.config import DataConfig, FinetuneConfig

    ras = np.zeros(
        (20, 16, 3), dtype=np.float32
    )  # x: 0 = patient's left .. 19 = right; y: 0 = back .. 15 = front
    ras[15:20, 12:16, :] = 1.0
    labels = (ras > 0).astype(np.uint8)
    lps_affine = np.array([[-1.0, 0, 0, 19], [0, -1.0, 0, 15], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(ras, np.eye(4)), tmp_path / "ras.nii.gz")
    nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / "ras_seg.nii.gz")
    nib.save(nib.Nifti1Image(ras[::-1, ::-1].copy(), lps_affine), tmp_path / "lps.nii.gz")
    nib.save(nib.Nifti1Image(labels[::-1, ::-1].copy(), lps_affine), tmp_path / "lps_seg.nii.gz")
    cfg = FinetuneConfig(data=DataConfig(name="folder", num_classes=2, in_channels=1, modality="mr"))
    grid = nifti_grid(tmp_path / "ras.nii.gz", tmp_path / "ras_seg.nii.gz", cfg, n=1, columns=1, tile=80)
    assert np.array_equal(
        grid, nifti_grid(tmp_path / "lps.nii.gz", tmp_path / "lps_seg.nii.gz", cfg, n=1, columns=1, tile=80)
    )
    # the 16 x 20 (rows x columns) slice fills the 80 px cell's width, 64 px high from row 8: 4 px per voxel
    rows, cols = np.nonzero(grid.any(axis=2))
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (8, 8 + 4 * 4 - 1, 0, 5 * 4 - 1)
    assert np.array_equal(radiological_view(np.array([[1, 2], [3, 4]])), [[4, 2], [3, 1]])
