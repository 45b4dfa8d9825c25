import json

import pytest

from decon_med.data.splits import fraction_size, read_split, split_fraction, write_split
from decon_med.errors import DataError


def _items(n, slices=1):
    return [{"id": f"img{i:03d}_{s}", "group": f"img{i:03d}"} for i in range(n) for s in range(slices)]


def test_sizes_round_up_and_never_zero():
    assert [fraction_size(2000, f) for f in (0.05, 0.25, 1.0)] == [100, 500, 2000]
    assert [fraction_size(400, f) for f in (0.05, 0.25, 1.0)] == [20, 100, 400]
    assert fraction_size(10, 0.05) == 1
    assert fraction_size(7, 0.5) == 4
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError):
            fraction_size(10, bad)


def test_reproducible_and_seed_dependent():
    items = _items(200)
    a = split_fraction(items, 0.25, seed=0)
    assert a == split_fraction(items, 0.25, seed=0)
    assert {i["id"] for i in a} != {i["id"] for i in split_fraction(items, 0.25, seed=1)}
    # the input order does not matter
    assert {i["id"] for i in split_fraction(items[::-1], 0.25, seed=0)} == {i["id"] for i in a}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nested_across_fractions(seed):
    items = _items(137)
    subsets = [{i["id"] for i in split_fraction(items, f, seed)} for f in (0.05, 0.25, 1.0)]
    assert [len(s) for s in subsets] == [7, 35, 137]
    assert subsets[0] < subsets[1] < subsets[2]


def test_slices_of_a_volume_stay_together():
    items = _items(20, slices=5)
    subset = split_fraction(items, 0.25, seed=0)
    groups = {i["group"] for i in subset}
    assert len(groups) == 5 and len(subset) == 25


def test_empty_split_is_an_error():
    with pytest.raises(DataError, match="selects 0 images"):
        split_fraction([], 0.5, seed=0)


def test_write_and_read(tmp_path):
    subset = split_fraction(_items(40), 0.25, seed=3)
    path = tmp_path / "run" / "train_ids.json"
    write_split(subset, path, fraction=0.25, seed=3, n_total=40)
    record = json.loads(path.read_text())
    assert record["fraction"] == 0.25 and record["seed"] == 3 and record["n_images"] == 10
    assert read_split(path) == sorted(i["group"] for i in subset)
    assert not list(path.parent.glob("*.tmp"))
