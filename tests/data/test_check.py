"""check-data: a clean summary for good trees, one clear error naming the file for each bad case."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from decon_med.cli import main
from decon_med.data.check import check_dataset, format_summary
from decon_med.errors import DataError
from tests.conftest import make_cfg


def test_summary_of_a_good_isic_tree(synth_root):
    summary = check_dataset(make_cfg("isic2017", synth_root / "isic"), progress=False)
    assert {k: v["n_items"] for k, v in summary["splits"].items()} == {"train": 8, "val": 2, "test": 2}
    train = summary["splits"]["train"]
    assert train["classes_present"] == ["background", "lesion"]
    assert set(train["mask_histogram"]) == {0, 255}
    assert train["height"][0] <= train["height"][1]
    text = format_summary(summary)
    assert "train" in text and "lesion" in text and "counts differ from the official release" in text


def test_summary_of_refuge_and_nifti(synth_root):
    refuge = check_dataset(make_cfg("refuge", synth_root / "refuge"), progress=False)
    assert refuge["splits"]["train"]["classes_present"] == ["background", "disc", "cup"]
    assert set(refuge["splits"]["train"]["mask_histogram"]) == {0, 128, 255}
    scans = check_dataset(make_cfg("unlabeled", synth_root / "nifti", modality="mr"), progress=False)
    assert list(scans["splits"]) == ["train"]
    assert scans["splits"]["train"]["n_scans"] == 3
    assert scans["splits"]["train"]["n_items"] > 3


def test_fraction_is_reported(synth_root):
    summary = check_dataset(make_cfg("isic2017", synth_root / "isic", fraction=0.25), progress=False)
    assert summary["fraction"]["n_images"] == 2


def _first(path, pattern):
    return sorted(path.rglob(pattern))[0]


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _bad_isic_cases():
    def missing_root(root):
        shutil.rmtree(root)
        return root, "dataset root not found"

    def empty_root(root):
        shutil.rmtree(root)
        root.mkdir()
        return root, "dataset root is empty"

    def empty_split(root):
        folder = root / "ISIC-2017_Validation_Data"
        shutil.rmtree(folder)
        folder.mkdir()
        return folder, "is empty"

    def truncated_image(root):
        path = _first(root / "ISIC-2017_Training_Data", "ISIC_*[0-9].jpg")
        _truncate(path)
        return path, "unreadable or truncated image"

    def image_without_mask(root):
        mask = _first(root / "ISIC-2017_Test_v2_Part1_GroundTruth", "*.png")
        image = root / "ISIC-2017_Test_v2_Data" / (mask.name.replace("_segmentation.png", ".jpg"))
        mask.unlink()
        return image, "image has no mask"

    def mask_without_image(root):
        mask = _first(root / "ISIC-2017_Training_Part1_GroundTruth", "*.png")
        image = root / "ISIC-2017_Training_Data" / (mask.name.replace("_segmentation.png", ".jpg"))
        image.unlink()
        return mask, "mask has no matching image"

    def mask_values(root):
        mask = _first(root / "ISIC-2017_Training_Part1_GroundTruth", "*.png")
        arr = np.asarray(Image.open(mask)).copy()
        arr[0, :5] = 17
        Image.fromarray(arr).save(mask)
        return mask, "mask values [17] outside the expected set [0, 255]"

    def size_mismatch(root):
        mask = _first(root / "ISIC-2017_Validation_Part1_GroundTruth", "*.png")
        img = Image.open(mask)
        img.resize((img.width + 3, img.height)).save(mask)
        return mask, "differs from image size"

    return [
        missing_root,
        empty_root,
        empty_split,
        truncated_image,
        image_without_mask,
        mask_without_image,
        mask_values,
        size_mismatch,
    ]


@pytest.mark.parametrize("case", _bad_isic_cases(), ids=lambda f: f.__name__)
def test_bad_isic_input_is_one_clear_error(case, copy_of, tmp_path, capsys):
    root = copy_of("isic")
    bad_path, fragment = case(root)
    with pytest.raises(DataError) as info:
        check_dataset(make_cfg("isic2017", root), progress=False)
    assert str(info.value).startswith(str(bad_path)), str(info.value)
    assert fragment in str(info.value)
    # the CLI turns it into one line on stderr, status 2, and writes nothing
    config = tmp_path / "cfg.yaml"
    config.write_text(f"data: {{name: isic2017, root: '{root}', num_workers: 0}}\n")
    out_json = tmp_path / "summary.json"
    status = main(["check-data", str(config), "--quiet", "--json", str(out_json)])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err.startswith(f"error: {bad_path}") and fragment in err
    assert len(err.splitlines()) == 1 or err.count("error:") == 1
    assert not out_json.exists()


def test_truncated_nifti_is_named(copy_of):
    root = copy_of("nifti")
    volume = _first(root, "*.nii.gz")
    _truncate(volume)
    with pytest.raises(DataError) as info:
        check_dataset(make_cfg("unlabeled", root, modality="mr"), progress=False)
    assert volume.name in str(info.value)


def test_refuge_mask_values_outside_greys(copy_of):
    root = copy_of("refuge")
    mask = _first(root / "REFUGE-Validation400-GT", "*.bmp")
    arr = np.asarray(Image.open(mask)).copy()
    arr[:2, :2] = 64
    Image.fromarray(arr).save(mask)
    with pytest.raises(DataError, match=r"mask values \[64\] outside the expected set \[0, 128, 255\]"):
        check_dataset(make_cfg("refuge", root), progress=False)


def test_fraction_selecting_no_image(copy_of):
    root = copy_of("folder")
    splits = json.loads((root / "splits.json").read_text())
    splits["train"] = []
    (root / "splits.json").write_text(json.dumps(splits))
    with pytest.raises(DataError, match="split 'train' has no images"):
        check_dataset(make_cfg("folder", root, fraction=0.05, num_classes=3), progress=False)


def test_cli_check_data_success_writes_json(synth_root, tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text(
        f"data: {{name: refuge, root: '{synth_root / 'refuge'}', num_workers: 0}}\nfraction: 0.5\n"
    )
    out_json = tmp_path / "summary.json"
    assert main(["check-data", str(config), "--quiet", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "ok:" in out and "selects 4 training images" in out
    assert json.loads(out_json.read_text())["splits"]["val"]["n_items"] == 2


def test_cli_config_error_is_one_line(tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text("data: {name: isic2017, bogus: 1}\n")
    assert main(["check-data", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown config key 'data.bogus'")
