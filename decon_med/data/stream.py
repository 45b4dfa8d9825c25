"""Seeded passes over a dataset as one endless stream, read by a single DataLoader for a whole training session.

Pass (epoch) ``p`` visits the dataset in the order :func:`epoch_order` ``(seed, p, n)`` with the augmentations of
epoch ``p``; stream position ``p * n + q`` is the ``q``-th image of that pass. A sampler of stream positions (from
:func:`epoch_positions` or :func:`decon_med.distributed.shard_batches`) therefore yields the batches of any step
range, e.g. after a resume, and the batch of a step depends only on (seed, step). Because one loader serves every
epoch, its workers start once per session instead of once per epoch and the prefetch queue never drains at an
epoch boundary.

Example:
    >>> stream = PassStream(dataset, seed=0)
    >>> sampler = EpochPositions(start=3, stop=10, steps_per_epoch=4, batch_size=8, size=len(dataset))
    >>> loader = DataLoader(stream, batch_size=8, sampler=sampler, num_workers=4)   # steps 3 .. 9
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset

from decon_med import distributed
from decon_med.data.datasets import set_epoch


def epoch_order(seed: int, epoch: int, size: int) -> list[int]:
    """The shuffled sample order of one epoch; it depends only on (seed, epoch)."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch))).tolist()


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed of one epoch's order."""
    return seed * 1_000_003 + epoch


class PassStream(Dataset):
    """Position ``s`` of the endless stream of seeded passes over ``dataset``.

    Position ``s`` is image ``epoch_order(seed, p, n)[s % n]`` of pass ``p = s // n``, augmented as in epoch
    ``p``; a sampler over ``range(start, stop)`` yields the stream from any point, e.g. after a resume.

    Example:
        >>> stream = PassStream(build_dataset(cfg, "train", "train", items=subset), seed=0)
        >>> loader = DataLoader(stream, batch_size=4, sampler=range(8, 16))   # fine-tuning iterations 2 and 3
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.size = len(dataset)
        self._order: tuple[int, list[int]] = (-1, [])

    def __len__(self) -> int:
        return self.size

    def locate(self, position: int) -> tuple[int, int]:
        """``(pass, index into dataset)`` of a stream position."""
        pass_index, offset = divmod(position, self.size)
        if self._order[0] != pass_index:
            self._order = (pass_index, epoch_order(self.seed, pass_index, self.size))
        return pass_index, self._order[1][offset]

    def __getitem__(self, position: int) -> dict:
        pass_index, index = self.locate(position)
        set_epoch(self.dataset, pass_index)
        return self.dataset[index]


class EpochPositions:
    """This process's stream positions for optimiser steps ``start .. stop - 1`` of epochs of whole global batches.

    Step ``t`` is batch ``t % steps_per_epoch`` of epoch ``t // steps_per_epoch``; the images an epoch cannot fill a
    global batch with are left out of that epoch (``drop_last``). Positions are generated lazily, so a run of
    millions of images holds no index list.

    Example:
        >>> list(EpochPositions(start=1, stop=3, steps_per_epoch=2, batch_size=2, size=5))   # one process
        [2, 3, 5, 6]
    """

    def __init__(self, start: int, stop: int, steps_per_epoch: int, batch_size: int, size: int):
        self.start, self.stop = start, stop
        self.steps_per_epoch, self.batch_size, self.size = steps_per_epoch, batch_size, size

    def __len__(self) -> int:
        return max(self.stop - self.start, 0) * self.batch_size

    def __iter__(self) -> Iterator[int]:
        step = self.start
        while step < self.stop:
            epoch, first = divmod(step, self.steps_per_epoch)
            last = min(self.steps_per_epoch, first + self.stop - step)
            offset = epoch * self.size
            for position in distributed.shard_batches(first, last, self.batch_size):
                yield offset + position
            step += last - first
