"""The seeded pass stream: epoch orders, stream positions of optimiser steps, and one loader across epochs."""

import pytest
import torch
from torch.utils.data import DataLoader

from decon_med.data.stream import EpochPositions, PassStream, epoch_order


class Recorder(torch.utils.data.Dataset):
    """Returns (epoch set by set_epoch, index) for every item."""

    def __init__(self, size: int):
        self.size = size
        self.seeder = type("Seeder", (), {"epoch": -1})()

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[int, int]:
        return self.seeder.epoch, index


def test_epoch_order_depends_only_on_seed_and_epoch():
    assert epoch_order(0, 1, 8) == epoch_order(0, 1, 8)
    assert sorted(epoch_order(0, 1, 8)) == list(range(8))
    assert epoch_order(0, 1, 8) != epoch_order(0, 2, 8)
    assert epoch_order(0, 1, 8) != epoch_order(1, 1, 8)


def test_stream_fills_batches_from_a_tiny_subset():
    stream = PassStream(list(range(3)), seed=0)  # 3 images, batches of 4 straddle passes
    located = [stream.locate(position) for position in range(12)]
    assert [p for p, _ in located] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    for pass_index in range(4):
        assert sorted(i for p, i in located if p == pass_index) == [0, 1, 2]  # every image once per pass


def _per_epoch(start: int, stop: int, steps_per_epoch: int, batch_size: int, size: int, seed: int):
    """(epoch, index) of every image of steps start .. stop - 1, built epoch by epoch from the definition."""
    out = []
    for step in range(start, stop):
        epoch, batch = divmod(step, steps_per_epoch)
        order = epoch_order(seed, epoch, size)
        out += [(epoch, order[q]) for q in range(batch * batch_size, (batch + 1) * batch_size)]
    return out


@pytest.mark.parametrize("start, stop", [(0, 9), (4, 9), (5, 6), (3, 3)])
def test_epoch_positions_give_the_images_of_each_step(start, stop):
    size, batch_size, steps_per_epoch, seed = 11, 3, 3, 7  # 2 images per epoch are dropped
    positions = EpochPositions(start, stop, steps_per_epoch, batch_size, size)
    stream = PassStream(Recorder(size), seed)
    got = [stream[p] for p in positions]
    assert len(positions) == len(got) == (stop - start) * batch_size
    assert got == _per_epoch(start, stop, steps_per_epoch, batch_size, size, seed)


def test_one_loader_with_workers_serves_every_epoch_in_order():
    size, batch_size, steps_per_epoch = 10, 4, 2
    positions = EpochPositions(1, 6, steps_per_epoch, batch_size, size)
    loader = DataLoader(PassStream(Recorder(size), seed=3), batch_size=2, sampler=positions, num_workers=2)
    got = [(int(e), int(i)) for epochs, indices in loader for e, i in zip(epochs, indices, strict=True)]
    assert got == _per_epoch(1, 6, steps_per_epoch, batch_size, size, seed=3)
    assert {epoch for epoch, _ in got} == {0, 1, 2}
