"""torch.distributed helpers that are plain identities when no process group is initialised.

The single-process path never needs torch.distributed; under ``torchrun`` the same calls gather and reduce.

Example:
    >>> all_gather_no_grad(torch.arange(3))      # one process: the tensor itself
    tensor([0, 1, 2])
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0: the process that logs and writes checkpoints."""
    return rank() == 0


@torch.no_grad()
def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every process along dim 0 (no gradient flows back)."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over processes (the tensor itself in one process)."""
    if not is_distributed():
        return tensor
    return all_reduce_sum(tensor) / world_size()


@torch.no_grad()
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over processes (the tensor itself in one process)."""
    if not is_distributed():
        return tensor
    out = tensor.clone()
    dist.all_reduce(out)
    return out


def launched_by_torchrun() -> bool:
    """True when the environment describes more than one process (``torchrun``, ``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    """This process's rank on its node (``LOCAL_RANK``; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def device() -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() if is_distributed() else torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """Initialise the process group for the duration of the block when launched by ``torchrun``.

    NCCL on CUDA (each process on ``cuda:LOCAL_RANK``), gloo on CPU. Without torchrun, or when a group already
    exists, nothing is done.

    Example:
        >>> with process_group():
        ...     pretrain(cfg)
    """
    if not launched_by_torchrun() or is_distributed():
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (no-op without a process group)."""
    if is_distributed():
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every process, in rank order (``[obj]`` without a process group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every process (``obj`` itself without a process group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` over processes (the tensor itself in one process)."""
    if not is_distributed():
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


@torch.no_grad()
def shuffle_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This process's share of the global batch in a random order shared by every process (MoCo's shuffle BN).

    Every process must hold the same number of samples. Returns the shuffled share and the inverse permutation
    for :func:`unshuffle_batch`; one process gets ``(x, None)``.

    Example:
        >>> local, inverse = shuffle_batch(images)      # the key encoder's BatchNorm sees a mixed batch
        >>> keys = unshuffle_batch(key_encoder(local), inverse)   # back in this process's own order
    """
    if not is_distributed():
        return x, None
    gathered = all_gather_no_grad(x)
    if rank() == 0:
        permutation = torch.randperm(len(gathered), device=x.device)
    else:
        permutation = torch.empty(len(gathered), dtype=torch.long, device=x.device)
    dist.broadcast(permutation, src=0)
    share = slice(rank() * len(x), (rank() + 1) * len(x))
    return gathered[permutation[share]], torch.argsort(permutation)


@torch.no_grad()
def unshuffle_batch(x: torch.Tensor, inverse: torch.Tensor | None) -> torch.Tensor:
    """Undo :func:`shuffle_batch` on a result computed from the shuffled share (the identity for ``None``)."""
    if inverse is None:
        return x
    share = slice(rank() * len(x), (rank() + 1) * len(x))
    return all_gather_no_grad(x)[inverse[share]]


def shard_batches(start: int, stop: int, batch_size: int) -> list[int]:
    """Positions of this process's share of global batches ``start .. stop - 1`` of a stream.

    Global batch ``i`` is positions ``i * B * W .. (i + 1) * B * W - 1`` (``B`` = per-process ``batch_size``, ``W`` =
    world size); process ``r`` takes the ``r``-th block of ``B`` of each. One process takes every position.

    Example:
        >>> shard_batches(1, 3, batch_size=2)       # one process
        [2, 3, 4, 5]
    """
    rank_, world = rank(), world_size()
    positions: list[int] = []
    for i in range(start, stop):
        first = (i * world + rank_) * batch_size
        positions.extend(range(first, first + batch_size))
    return positions
