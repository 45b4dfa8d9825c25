"""The cost of one pre-training step, independent of the hardware: FLOPs by part, parameters, activation bytes and
the projected peak memory at the config's batch size.

A step is counted on CPU on a few small batches (``batches``, default 1, 2 and 3 images), each holding one random
image pair repeated, with the config's autocast (bf16 tensors really are two bytes):

- **FLOPs** of forward + backward + teacher forward, by ``torch.utils.flop_counter`` (matmuls and convolutions,
  two per multiply-add), split into the student's *encoder* and *decoder*, the *heads* (everything else: the
  methods' projectors, predictors, prototypes, their EMA copies and the losses) and the *teacher* network. A
  backward op is charged to the part whose forward created its autograd node; recomputation under activation
  checkpointing is charged to the recomputed part.
- **Activation bytes**: every tensor autograd keeps for the backward pass (``saved_tensors_hooks``) plus the inputs
  a checkpointed module keeps, each storage once, parameters excluded. bf16 weight copies made by autocast are
  kept too; they do not grow with the batch.
- Both are fitted as ``c + a * B`` through the counts (least squares) and evaluated at the config's batch: the
  network's share is exactly linear (one image pair is repeated, so every image costs the same), ``c`` holds what
  does not grow with the batch (autocast's weight copies, a cloned queue). The heads' share depends on how many
  slots the images own (the slot predictor runs per owned slot), which varies between counts; and the slot
  InfoNCE of the SlotCon family compares every query slot with every key slot of the batch, so its logits grow
  with ``B**2``. That term is small at the counted batches and is not in the linear projection; docs/benchmarks.md
  bounds it.

**Projected peak** = weights (student, heads, teacher) + buffers (queues, BatchNorm statistics) + gradients of the
parameters that get one + optimiser state (LARS / SGD: one momentum buffer, AdamW: two) + kept activations at the
batch + an allowance for transients: two of the largest tensor of the step (an activation's gradient and its input's
gradient during backward) plus, under checkpointing, the activations of the largest recomputed module, which exist
again while it is recomputed. The allocator's caching and fragmentation are not modelled. :func:`measure_cuda`
measures the real peak and img/s of the same step on a GPU.

Example:
    >>> cfg = load_config("configs/pretrain/decon_ml.yaml", schema=PretrainConfig)
    >>> report = cost_report(cfg, checkpointing=("none", "all"))
    >>> report["all"]["memory_gib"]["peak"], report["all"]["gflop_per_image"]["total"]
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from decon_med.config import Checkpointing, PretrainConfig
from decon_med.engine.loop import autocast
from decon_med.errors import ConfigError
from decon_med.models import network as network_module
from decon_med.models.network import checkpointed_modules, set_checkpointing

#: The parts a step's FLOPs are split into.
PARTS = ("encoder", "decoder", "heads", "teacher")
#: Tensors of optimiser state per parameter.
OPTIMIZER_STATES = {"lars": 1, "sgd": 1, "adamw": 2}
GIB = 2**30
MIB = 2**20


@dataclass
class StepCount:
    """What one counted step at ``batch`` images holds.

    Attributes:
        batch: images in the step.
        flops: FLOPs per part (:data:`PARTS`).
        saved_bytes: bytes kept for the backward pass.
        segment_bytes: bytes one call of each checkpointable module keeps when it is not checkpointed (by
            module name; the largest is alive again while that module is recomputed).
        largest_bytes: the largest tensor made during the step.
        grad_bytes: bytes of the parameter gradients.
        grad_numel: elements of the parameters that got a gradient.
    """

    batch: int
    flops: dict[str, int]
    saved_bytes: int
    segment_bytes: dict[str, int] = field(default_factory=dict)
    largest_bytes: int = 0
    grad_bytes: int = 0
    grad_numel: int = 0


def random_batch(batch: int, size: int, in_channels: int = 3, seed: int = 0) -> dict:
    """One random image pair repeated ``batch`` times, with fixed overlap boxes and flips (a pre-training batch)."""
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(1, in_channels, size, size, generator=g).repeat(batch, 1, 1, 1) for _ in range(2)]
    return {
        "view1": views[0],
        "view2": views[1],
        "box1": torch.tensor([[0.1, 0.1, 0.9, 0.9]]).repeat(batch, 1),
        "box2": torch.tensor([[0.0, 0.2, 0.8, 1.0]]).repeat(batch, 1),
        "flip1": torch.zeros(batch, dtype=torch.bool),
        "flip2": torch.ones(batch, dtype=torch.bool),
    }


class _PartTracker:
    """Which part of the method runs: a stack kept by forward hooks, and the part of each autograd node."""

    def __init__(self, method: nn.Module):
        self.stack: list[str] = []
        self.node_parts: dict = {}
        self.handles = []
        teacher = getattr(method, "teacher", None)
        parts = {"encoder": [method.network.encoder], "decoder": [method.network.decoder]}
        parts["teacher"] = [teacher.encoder, teacher.decoder] if teacher is not None else []
        for part, modules in parts.items():
            for module in modules:
                self.handles.append(module.register_forward_pre_hook(self._push(part)))
                self.handles.append(module.register_forward_hook(self._pop))

    def _push(self, part: str):
        def hook(_module, _args):
            self.stack.append(part)

        return hook

    def _pop(self, _module, _args, _out):
        self.stack.pop()

    def current(self) -> str:
        """The part running now: in backward, the part of the node being run; in forward, the innermost part."""
        node = torch._C._current_autograd_node()
        if node is not None:
            return self.node_parts.get(node, "heads")
        return self.stack[-1] if self.stack else "heads"

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _NodeRecorder(torch.overrides.TorchFunctionMode):
    """Records the part of the autograd node of every tensor a forward function returns."""

    def __init__(self, tracker: _PartTracker):
        super().__init__()
        self.tracker = tracker

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch._C._current_autograd_node() is None:
            for leaf in tree_leaves(out):
                if isinstance(leaf, torch.Tensor) and leaf.grad_fn is not None:
                    self.tracker.node_parts.setdefault(leaf.grad_fn, self.tracker.current())
        return out


class _PartFlopCounter(FlopCounterMode):
    """``FlopCounterMode`` that also adds every count to the part running at the time."""

    def __init__(self, tracker: _PartTracker):
        super().__init__(display=False, depth=1)
        self.tracker = tracker
        self.parts = dict.fromkeys(PARTS, 0)

    def _count_flops(self, func_packet, out, args, kwargs):
        if func_packet in self.flop_registry:
            flops = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
            self.parts[self.tracker.current()] += flops
        return super()._count_flops(func_packet, out, args, kwargs)


class _LargestTensor(TorchDispatchMode):
    """The largest output of any op run under it that holds one row per image (weights and their copies, which do
    not grow with the batch, are left out)."""

    def __init__(self, batch: int):
        super().__init__()
        self.batch = batch
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.ndim >= 2 and leaf.shape[0] == self.batch:
                self.largest = max(self.largest, leaf.numel() * leaf.element_size())
        return out


class _SavedBytes:
    """Bytes of the distinct storages autograd keeps, parameters and buffers excluded, by checkpointable module."""

    def __init__(self, method: nn.Module, segments: dict[str, nn.Module]):
        self.excluded = {t.untyped_storage().data_ptr() for t in (*method.parameters(), *method.buffers())}
        self.seen: set[int] = set()
        self.total = 0
        self.segment_stack: list[str] = []
        self.segments = dict.fromkeys(segments, 0)
        self.calls = dict.fromkeys(segments, 0)
        self.handles = []
        for name, module in segments.items():
            self.handles.append(module.register_forward_pre_hook(self._enter(name)))
            self.handles.append(module.register_forward_hook(self._leave))

    def _enter(self, name: str):
        def hook(_module, _args):
            self.segment_stack.append(name)
            self.calls[name] += 1

        return hook

    def _leave(self, _module, _args, _out) -> None:
        self.segment_stack.pop()

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self.excluded or key in self.seen:
            return
        self.seen.add(key)
        self.total += storage.nbytes()
        if self.segment_stack:
            self.segments[self.segment_stack[-1]] += storage.nbytes()

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.add(tensor)
        return tensor

    def observe_checkpoint_inputs(self, args: tuple) -> None:
        for leaf in tree_leaves(args):
            if isinstance(leaf, torch.Tensor):
                self.add(leaf)

    def per_call(self) -> dict[str, float]:
        """Bytes kept by one call of each checkpointable module (a module runs once per view)."""
        return {name: total / max(self.calls[name], 1) for name, total in self.segments.items()}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@contextlib.contextmanager
def _observing_checkpoint_inputs(saved: _SavedBytes) -> Iterator[None]:
    observers = network_module.CHECKPOINT_INPUT_OBSERVERS
    observers.append(saved.observe_checkpoint_inputs)
    try:
        yield
    finally:
        observers.remove(saved.observe_checkpoint_inputs)


def _segments(method: nn.Module) -> dict[str, nn.Module]:
    """The student's checkpointable modules by name (empty when the network has none)."""
    names = {id(m): n for n, m in method.network.named_modules()}
    found: dict[str, nn.Module] = {}
    for mode in ("encoder", "decoder"):
        try:
            modules = checkpointed_modules(method.network, mode)
        except ConfigError:  # a network without stages / blocks of this kind
            continue
        found.update({names[id(m)]: m for m in modules})
    return found


def count_step(method: nn.Module, batch: dict, amp: str = "none", seed: int = 0) -> StepCount:
    """Count one forward + backward of ``method`` on ``batch`` (CPU) and clear the gradients again.

    ``method`` is an :class:`~decon_med.ssl.base.SSLMethod` whose ``network`` has an ``encoder`` and a ``decoder``
    (and, optionally, a ``teacher`` network with both); ``seed`` seeds the step's random draws (dropout, masks).
    """
    method.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    tracker = _PartTracker(method)
    saved = _SavedBytes(method, _segments(method))
    counter = _PartFlopCounter(tracker)
    largest = _LargestTensor(len(batch["view1"]))
    try:
        with counter, largest:
            with (
                _NodeRecorder(tracker),
                _observing_checkpoint_inputs(saved),
                torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t),
                autocast("cpu", amp),
            ):
                loss = method(batch)["loss"]
            loss.backward()
    finally:
        tracker.remove()
        saved.remove()
    grads = [p.grad for p in method.parameters() if p.grad is not None]
    count = StepCount(
        batch=len(batch["view1"]),
        flops=dict(counter.parts),
        saved_bytes=saved.total,
        segment_bytes=saved.per_call(),
        largest_bytes=largest.largest,
        grad_bytes=sum(g.numel() * g.element_size() for g in grads),
        grad_numel=sum(g.numel() for g in grads),
    )
    if sum(count.flops.values()) != counter.get_total_flops():
        raise RuntimeError("FLOPs by part do not add up to the total")
    method.zero_grad(set_to_none=True)
    return count


def fit(batches: Sequence[int], values: Sequence[float]) -> np.ndarray:
    """``(c, a)`` of the least-squares line ``c + a * B`` through the points (one point: a line through 0)."""
    x = np.asarray(batches, dtype=float)
    y = np.asarray(values, dtype=float)
    if len(x) == 1:
        return np.array([0.0, y[0] / x[0]])
    return np.polyfit(x, y, 1)[::-1]


def at_batch(coef: np.ndarray, batch: int) -> float:
    """Value of the fitted ``c + a * B`` at ``batch``."""
    return float(coef[0] + coef[1] * batch)


def parameter_counts(method: nn.Module) -> dict[str, int]:
    """Parameters of the student network (encoder + decoder, the segmentation head left out), of the heads and
    of the teacher (the EMA network and the heads' EMA copies: everything that does not train)."""
    trainable = dict(method.trainable_parameters())
    network = {id(p) for n, p in method.network.named_parameters() if not n.startswith("segmentation_head.")}
    counts = {"network": 0, "heads": 0, "teacher": 0}
    seen: set[int] = set()
    for name, p in method.named_parameters():
        if id(p) in seen or name.startswith("network.segmentation_head."):
            continue
        seen.add(id(p))
        part = "network" if id(p) in network else "heads" if name in trainable else "teacher"
        counts[part] += p.numel()
    return counts


def cost_report(
    cfg: PretrainConfig,
    checkpointing: Sequence[Checkpointing] = ("none", "all"),
    batches: Sequence[int] = (1, 2, 3),
    seed: int = 0,
) -> dict[str, dict]:
    """The cost of a step of ``cfg``'s method at ``cfg.train.batch_size`` for each checkpointing mode.

    Returns:
        ``{mode: row}``; a row holds ``gflop_per_image`` (by part and ``total``), ``params`` (by part),
        ``activation_mib_per_image`` (kept for backward, at the config's batch), ``memory_gib`` (``weights``,
        ``buffers``, ``grads``, ``optimizer``, ``activations``, ``allowance``, ``peak``) and the raw ``counts``.
    """
    from decon_med.ssl import build_method

    torch.manual_seed(seed)
    method = build_method(cfg).train()
    amp, size, channels = cfg.train.amp, cfg.data.image_size, cfg.data.in_channels
    batch_size = cfg.train.batch_size // cfg.train.accum_steps
    weights = sum(p.numel() * p.element_size() for p in method.parameters())
    buffers = sum(b.numel() * b.element_size() for b in method.buffers())
    params = parameter_counts(method)
    state = {k: v.clone() for k, v in method.state_dict().items()}
    report: dict[str, dict] = {}
    segment_bytes: dict[str, float] = {}
    for mode in ("none", *(m for m in checkpointing if m != "none")):
        set_checkpointing(method.network, mode)
        counts = []
        for b in batches:
            method.load_state_dict(state)  # every count starts from the same statistics, queues and centres
            counts.append(count_step(method, random_batch(b, size, channels, seed), amp, seed))
        if mode == "none":  # per image, from the largest count
            segment_bytes = {k: v / counts[-1].batch for k, v in counts[-1].segment_bytes.items()}
        report[mode] = _row(cfg, mode, batch_size, counts, params, weights, buffers, segment_bytes)
    method.load_state_dict(state)
    set_checkpointing(method.network, "none")
    return {m: report[m] for m in checkpointing}


def _row(
    cfg: PretrainConfig,
    mode: str,
    batch_size: int,
    counts: list[StepCount],
    params: dict[str, int],
    weights: int,
    buffers: int,
    segment_bytes: dict[str, float],
) -> dict:
    xs = [c.batch for c in counts]
    flops = {
        part: at_batch(fit(xs, [c.flops[part] for c in counts]), batch_size) / batch_size for part in PARTS
    }
    saved_fit = fit(xs, [c.saved_bytes for c in counts])
    saved = at_batch(saved_fit, batch_size)
    largest = counts[-1].largest_bytes / counts[-1].batch * batch_size
    prefixes = {
        "none": (),
        "encoder": ("encoder.",),
        "decoder": ("decoder.",),
        "all": ("encoder.", "decoder."),
    }
    recomputed = [v for n, v in segment_bytes.items() if n.startswith(prefixes[mode])]
    recomputed_bytes = max(recomputed, default=0.0) * batch_size
    grads = counts[-1].grad_bytes
    optimizer = OPTIMIZER_STATES[cfg.train.optimizer] * counts[-1].grad_numel * 4
    memory = {
        "weights": weights,
        "buffers": buffers,
        "grads": grads,
        "optimizer": optimizer,
        "activations": saved,
        "allowance": 2 * largest + recomputed_bytes,
    }
    memory["peak"] = sum(memory.values())
    static = weights + buffers + grads + optimizer
    allowance_per_image = (2 * largest + recomputed_bytes) / batch_size
    return {
        "method": cfg.ssl.label,  # decon_ml for slotcon + ssl.decoder.preset ml: a shipped config's name
        "checkpointing": mode,
        "batch_size": batch_size,
        "image_size": cfg.data.image_size,
        "encoder": cfg.model.encoder,
        "arch": cfg.model.arch,
        "amp": cfg.train.amp,
        "optimizer": cfg.train.optimizer,
        "dim_hidden": cfg.ssl.dim_hidden,
        "dim_hidden_dec": cfg.ssl.dim_hidden_dec,
        "gflop_per_image": {**{k: v / 1e9 for k, v in flops.items()}, "total": sum(flops.values()) / 1e9},
        "params": params,
        "activation_mib_per_image": saved / batch_size / MIB,
        "memory_gib": {k: v / GIB for k, v in memory.items()},
        "memory_model": {
            "static_bytes": static,
            "activation_fit_bytes": [float(v) for v in saved_fit],
            "allowance_bytes_per_image": allowance_per_image,
        },
        "counts": [c.__dict__ for c in counts],
    }


def projected_peak_gib(row: dict, batch: int) -> float:
    """The projected peak of a :func:`cost_report` row at another batch size (same model of memory)."""
    model = row["memory_model"]
    dynamic = at_batch(np.asarray(model["activation_fit_bytes"]), batch)
    return (model["static_bytes"] + dynamic + model["allowance_bytes_per_image"] * batch) / GIB


def largest_batch(row: dict, gib: float, limit: int = 8192) -> int:
    """The largest batch whose projected peak fits in ``gib`` GiB (0: not even one image)."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if projected_peak_gib(row, mid) <= gib:
            lo = mid
        else:
            hi = mid - 1
    return lo


def measure_cuda(
    cfg: PretrainConfig, mode: Checkpointing, warmup: int = 3, steps: int = 10, seed: int = 0
) -> dict[str, float]:
    """Real peak memory (``torch.cuda.max_memory_allocated``) and img/s of optimiser steps of ``cfg`` on the GPU.

    Runs the step as the engine does (config's optimiser, autocast, channels-last, teacher EMA) on random tensors;
    ``warmup`` steps first (cuDNN autotuning, lazy optimiser state), then the peak counter is reset and ``steps``
    timed steps run between two ``torch.cuda.synchronize()``.
    """
    from decon_med.engine.optim import build_optimizer, scaled_lr
    from decon_med.ssl import build_method

    device = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.manual_seed(seed)
    method = build_method(cfg).to(device).train()
    set_checkpointing(method.network, mode)
    if cfg.train.channels_last:
        method.to(memory_format=torch.channels_last)
    batch_size = cfg.train.batch_size // cfg.train.accum_steps
    optimizer = build_optimizer(
        cfg.train, method.trainable_parameters(), scaled_lr(cfg.train.lr, cfg.train.batch_size, world_size=1)
    )
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    batch = {
        k: (v.to(device).contiguous(memory_format=fmt) if v.ndim == 4 else v.to(device))
        for k, v in random_batch(batch_size, cfg.data.image_size, cfg.data.in_channels, seed).items()
    }
    # different images in the batch, as in training (random_batch repeats one pair for exact counting)
    batch["view1"].normal_()
    batch["view2"].normal_()

    def step(i: int) -> None:
        with autocast(device, cfg.train.amp):
            loss = method(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_step(i, 10_000)

    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "peak_gib": torch.cuda.max_memory_allocated() / GIB,
        "img_per_s": batch_size * steps / seconds,
        "device": torch.cuda.get_device_name(),
    }
