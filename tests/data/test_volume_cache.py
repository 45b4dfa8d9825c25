"""The persistent volume cache: bit-identical slices, invalidation, the size bound, atomic writes, index reuse."""

from __future__ import annotations

import os
import threading
import time

import nibabel as nib
import numpy as np
import pytest

from decon_med.config import DataConfig
from decon_med.data import volumes
from decon_med.data.layout_base import slice_options
from decon_med.data.layouts import get_layout
from decon_med.data.volume_cache import VolumeCache, cache_key, default_cache_dir
from decon_med.data.volumes import SliceOptions, load_label_slice, load_slice, scan_volume
from decon_med.errors import ConfigError

# 0.8 x 1.2 x 2.0 mm voxels stored L-P-S: reoriented (a non-contiguous view) and resampled on every axis.
AFFINE = np.diag([-0.8, -1.2, 2.0, 1.0])


def _forget() -> None:
    """Drop every per-process memo, as a new run or a new worker starts."""
    volumes._opened.cache_clear()
    volumes._cached_image.cache_clear()
    volumes._cached_label.cache_clear()
    volumes._TOO_BIG.clear()


@pytest.fixture(autouse=True)
def fresh_process():
    _forget()
    yield
    _forget()


def _volume(seed: int, shape=(20, 16, 10)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.normal(500.0, 150.0, shape).astype(np.float32)
    data[:, :, :2] = 0.0  # two empty slices along axis 2, skipped in pre-training
    return data


def _write(path, data, affine=AFFINE) -> str:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def _scan_folder(tmp_path, n: int = 2):
    folder = tmp_path / "scans"
    folder.mkdir()
    paths = [_write(folder / f"s{i}.nii.gz", _volume(i)) for i in range(n)]
    return folder, paths


def _count_decodes(monkeypatch) -> list[str]:
    calls: list[str] = []
    decode = volumes._decode

    def counting(path):
        calls.append(str(path))
        return decode(path)

    monkeypatch.setattr(volumes, "_decode", counting)
    return calls


@pytest.mark.parametrize(
    ("axis", "extra"),
    [
        (2, {}),
        (0, {"mr_normalisation": "zscore"}),
        (1, {"modality": "ct", "ct_window": ((40.0, 400.0), (0.0, 900.0)), "channels": 2}),
    ],
)
def test_cached_slices_are_bit_identical_to_uncached(tmp_path, axis, extra):
    image = _write(tmp_path / "img.nii.gz", _volume(0))
    labels = np.zeros((20, 16, 10), dtype=np.int16)
    labels[4:12, 3:9, 2:8] = 1
    labels[6:9, 5:7, 4:6] = 2
    label = _write(tmp_path / "img_seg.nii.gz", labels)
    plain = SliceOptions(axis=axis, **extra)
    cached = SliceOptions(axis=axis, cache_dir=str(tmp_path / "cache"), cache_gb=1.0, **extra)

    reference = scan_volume(image, plain, skip_empty=False)
    for opts in (cached, cached):  # first pass fills the cache, second reads it back in a fresh process
        _forget()
        items = scan_volume(image, opts, skip_empty=False)
        assert items == reference
        for item in items:
            item_ref = dict(item, label=label)
            got, want = load_slice(item, opts), load_slice(item, plain)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert np.array_equal(got, want)
            assert np.array_equal(load_label_slice(item_ref, opts), load_label_slice(item_ref, plain))
    assert len(list((tmp_path / "cache" / "volumes").glob("*.vol.npy"))) == 2  # image and label
    assert len(list((tmp_path / "cache" / "index").glob("*.index.json"))) == 1


def test_a_changed_file_is_decoded_again(tmp_path, monkeypatch):
    path = _write(tmp_path / "img.nii.gz", _volume(0))
    opts = SliceOptions(axis=2, cache_dir=str(tmp_path / "cache"), cache_gb=1.0)
    calls = _count_decodes(monkeypatch)
    first = scan_volume(path, opts)
    _forget()
    assert scan_volume(path, opts) == first and len(calls) == 1

    _write(path, _volume(1))  # new content and a new modification time
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    _forget()
    second = scan_volume(path, opts)
    assert len(calls) == 2
    assert second[0]["range"] != first[0]["range"]
    assert np.array_equal(load_slice(second[0], opts), load_slice(second[0], SliceOptions(axis=2)))
    assert len(calls) == 3  # the uncached reference decodes once more

    os.utime(path, ns=(2_000_000_000, 2_000_000_000))  # same bytes, new mtime: a new key
    _forget()
    assert scan_volume(path, opts) == second and len(calls) == 4


def test_the_size_bound_evicts_least_recently_used_and_only_own_files(tmp_path):
    array = np.arange(25_000, dtype=np.float32)  # 100 kB
    cache = VolumeCache(tmp_path, max_gb=2.5 * array.nbytes / 1e9)
    foreign = tmp_path / "volumes" / "notes.npy"
    keys = [f"{i:032x}" for i in range(4)]
    for i, key in enumerate(keys[:2]):
        assert cache.store_array(key, array + i, {"axis": 0})
        for path in cache._volume(key):
            os.utime(path, (1000 + i, 1000 + i))
    foreign.write_bytes(b"x" * 500_000)
    assert cache.load_array(keys[0]) is not None  # a hit refreshes key 0: key 1 is now the oldest
    assert cache.store_array(keys[2], array + 2, {"axis": 0})
    assert cache.load_array(keys[1]) is None
    assert np.array_equal(cache.load_array(keys[0])[0], array)
    assert np.array_equal(cache.load_array(keys[2])[0], array + 2)
    assert cache.size_bytes() <= cache.max_bytes and foreign.exists()
    assert not cache.store_array(keys[3], np.zeros(100_000, np.float32), {})  # larger than the bound
    assert cache.load_array(keys[3]) is None


def test_disabled_cache_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "decon-med"
    path = _write(tmp_path / "img.nii.gz", _volume(0))
    items = scan_volume(path, SliceOptions(cache_gb=0.0))
    assert load_slice(items[0], SliceOptions()).shape[2] == 1
    assert not (tmp_path / "xdg").exists()
    assert not VolumeCache(tmp_path, 0).store_json("0" * 32, {"a": 1})


def test_concurrent_writers_never_expose_a_partial_file(tmp_path):
    array = np.random.default_rng(0).normal(size=(8, 64, 64)).astype(np.float32)
    cache = VolumeCache(tmp_path, max_gb=1.0)
    key = "ab" * 16
    seen, errors = [], []
    stop = threading.Event()

    def write():
        for _ in range(5):
            assert cache.store_array(key, array, {"axis": 0})
            cache.store_json(key, {"keep": list(range(50))})

    def read():
        while not stop.is_set():
            try:
                hit = cache.load_array(key)
                index = cache.load_json(key)
            except Exception as exc:  # noqa: BLE001 - any error is a failure here
                errors.append(exc)
                return
            if hit is not None:
                seen.append(np.array_equal(hit[0], array))
            if index is not None:
                seen.append(index == {"keep": list(range(50))})

    readers = [threading.Thread(target=read) for _ in range(2)]
    writers = [threading.Thread(target=write) for _ in range(3)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert not errors and all(seen)
    assert np.array_equal(cache.load_array(key)[0], array)
    names = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert names == [f"{key}.index.json", f"{key}.vol.json", f"{key}.vol.npy"]  # no temporary file left


def test_stale_temporary_files_are_removed(tmp_path):
    cache = VolumeCache(tmp_path, max_gb=1.0)
    (tmp_path / "volumes").mkdir()
    stale = tmp_path / "volumes" / f".{'1' * 32}.{'2' * 32}.tmp"
    fresh = tmp_path / "volumes" / f".{'3' * 32}.{'4' * 32}.tmp"
    for path in (stale, fresh):
        path.write_bytes(b"partial")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    cache.store_array("5" * 32, np.zeros(4, np.float32), {})
    assert not stale.exists() and fresh.exists()


def test_the_slice_index_is_reused_by_a_second_run(tmp_path, monkeypatch):
    folder, paths = _scan_folder(tmp_path, n=2)
    cfg = DataConfig(
        name="unlabeled",
        root=str(folder),
        modality="mr",
        in_channels=1,
        image_size=64,
        cache_gb=1.0,
        cache_dir=str(tmp_path / "cache"),
    )
    cfg.validate()
    opts = slice_options(cfg)
    assert (opts.cache_gb, opts.cache_dir) == (1.0, str(tmp_path / "cache"))
    calls = _count_decodes(monkeypatch)
    first = get_layout(cfg).items("train", labeled=False)
    assert sorted(calls) == sorted(paths)
    assert len(first) == 2 * 8  # two empty slices of ten skipped per volume

    _forget()  # a second run of the grid
    layout = get_layout(cfg)
    second = layout.items("train", labeled=False)
    assert second == first and len(calls) == 2
    assert sum(layout.stats["train"]["skipped"].values()) == 4
    for item in second:
        load_slice(item, opts)
    assert len(calls) == 2  # every slice of the epoch came from the cache

    _forget()
    cfg_off = DataConfig(name="unlabeled", root=str(folder), modality="mr", in_channels=1, image_size=64)
    assert get_layout(cfg_off).items("train", labeled=False) == first and len(calls) == 4


def test_cache_key_depends_on_options_and_files(tmp_path):
    path = _write(tmp_path / "a.nii.gz", _volume(0))
    base = cache_key("image", [path], orientation="RAS", axis=2)
    assert base == cache_key("image", [path], axis=2, orientation="RAS")
    assert base != cache_key("image", [path], orientation="none", axis=2)
    assert base != cache_key("label", [path], orientation="RAS", axis=2)
    assert len(base) == 32 and int(base, 16) >= 0


def test_negative_cache_gb_is_refused():
    with pytest.raises(ConfigError, match="data.cache_gb"):
        DataConfig(cache_gb=-1.0).validate()
    with pytest.raises(ValueError, match="cache_gb"):
        SliceOptions(cache_gb=-0.5)
