"""CUDA checks of every pre-training method, the engine's precision and memory options, one-process NCCL with
SyncBatchNorm and evaluation, each against a reference on the same inputs and seed (tiny: U-Net ResNet-18, 64 px,
batch 4, 3 LARS steps).

The tests marked ``cuda`` need a GPU (``python -m pytest -m cuda tests/test_cuda.py``; without one they are
skipped). The helpers they use (k steps of a method on a device, the comparisons, the label-flip fraction) also run
on CPU in the unmarked tests, so that their CPU half is known to work before a GPU is at hand. With
``DECON_MED_CUDA_REPORT=path.json`` the measured differences are written there (``benchmarks/gpu_check.sh``).

CUDA comparisons run with TF32 off and deterministic cuDNN kernels (:func:`cuda_numerics`). Tolerances:

- **amp against the fp32 CPU loss**, per step: ``none`` rtol 1e-3 (fp32 on both; only the order of sums differs),
  ``fp16`` rtol 2e-2 (10-bit mantissa, unit roundoff 5e-4, through ~20 layers and the losses' soft-max),
  ``bf16`` rtol 5e-2 (7-bit mantissa, unit roundoff 4e-3); atol 1e-3 for all.
- **activation checkpointing**: loss bit-identical; gradients bit-identical wherever two runs without
  checkpointing are bit-identical to each other (some CUDA backward kernels add with atomics, whose order varies
  between runs: there the checkpointed gradient must lie within rtol 1e-4 / atol 1e-6 like a rerun does).
- **channels_last, torch.compile, one-process DDP + SyncBatchNorm against eager fp32 CUDA**: loss rtol 1e-3 / atol
  1e-5 (other kernels and fusions, the same fp32 arithmetic).
- **evaluation on CUDA against CPU** (fp32): predicted labels differ on < 0.1 % of pixels.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn

from decon_med.config import FinetuneConfig, PretrainConfig, load_config
from decon_med.engine.loop import TrainingSession, autocast
from decon_med.engine.optim import build_optimizer, scaled_lr
from decon_med.models.network import set_checkpointing
from tests.ssl.test_slotcon_decon import TINY, make_batch

# cuBLAS picks reproducible reductions only with a fixed workspace, read when its handle is made (first matmul).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()


def cuda(test):
    """Mark a test as a CUDA test, skipped without a CUDA device."""
    test = pytest.mark.skipif(
        not HAS_CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False)"
    )(test)
    return pytest.mark.cuda(test)


METHODS = ["slotcon", "decon_sl", "decon_ml", "densecl", "decon_sl_densecl", "decon_ml_densecl", "mim"]
#: Per method, on top of TINY. Skip dropout is off: its masks come from the device's RNG, which differs by device.
OVERRIDES = {
    "slotcon": [],
    "decon_sl": ["ssl.alpha=0.5", "ssl.levels=[-1]"],
    "decon_ml": ["ssl.alpha=0.5", "ssl.levels=[0, 2, 4]", "ssl.skip_dropout=0.0"],
    "densecl": ["ssl.queue_size=16", "ssl.dense_warmup_steps=0"],
    "decon_sl_densecl": ["ssl.alpha=0.5", "ssl.queue_size=16", "ssl.dense_warmup_steps=0"],
    "decon_ml_densecl": [
        "ssl.alpha=0.5",
        "ssl.levels=[0, 2, 4]",
        "ssl.queue_size=16",
        "ssl.dense_warmup_steps=0",
        "ssl.skip_dropout=0.0",
    ],
    "mim": ["ssl.mask_patch=16"],
}
BATCH = 4
STEPS = 3
#: (rtol, atol) of a step's loss under ``train.amp`` against the fp32 CPU loss (see the module docstring).
AMP_TOL = {"none": (1e-3, 1e-3), "fp16": (2e-2, 1e-3), "bf16": (5e-2, 1e-3)}
#: (rtol, atol) of fp32 CUDA variants (channels_last, compile, DDP + SyncBatchNorm) against eager fp32 CUDA.
SAME_MATH_TOL = (1e-3, 1e-5)
#: (rtol, atol) of a gradient whose kernels are not bit-reproducible on the device, against a plain run.
RERUN_TOL = (1e-4, 1e-6)
#: Largest fraction of pixels whose predicted label may differ between CUDA and CPU.
MAX_LABEL_FLIPS = 1e-3


@dataclass
class Steps:
    """What :func:`run_steps` saw: the loss of every step (CPU float32) and the first step's gradients (CPU,
    float32, unscaled)."""

    losses: torch.Tensor
    grads: dict[str, torch.Tensor]


def tiny_cfg(method: str, *overrides: str) -> PretrainConfig:
    return load_config(
        None,
        [
            *TINY,
            f"ssl.method={method}",
            *OVERRIDES[method],
            f"train.batch_size={BATCH}",
            "train.lr=0.1",
            *overrides,
        ],
        schema=PretrainConfig,
    )


def _masks_drawn_on_cpu(method: nn.Module) -> None:
    """MIM draws its masks with the RNG of the image's device; draw them on CPU so that every device masks alike."""
    plain = type(method).random_mask

    def random_mask(self, image: torch.Tensor) -> torch.Tensor:
        return plain(self, torch.empty(image.shape)).to(image.device)

    method.random_mask = types.MethodType(random_mask, method)


def run_steps(
    name: str,
    device: str | torch.device,
    steps: int = STEPS,
    amp: str = "none",
    checkpointing: str = "none",
    channels_last: bool = False,
    compile: bool = False,
    wrap=None,
    seed: int = 0,
) -> Steps:
    """``steps`` optimiser steps of method ``name`` on ``device`` as the engine runs them (autocast, fp16 gradient
    scaler, LARS, ``after_step``), from weights built on CPU with ``seed`` and batches ``make_batch(seed + i)``.

    ``wrap(method)`` returns the callable used for the forward pass (e.g. DDP), as the engine's ``wrap_model``.
    """
    from decon_med.ssl import build_method

    device = torch.device(device)
    cfg = tiny_cfg(name, f"train.amp={amp}", f"train.checkpointing={checkpointing}")
    torch.manual_seed(seed)
    method = build_method(cfg)
    if name == "mim":
        _masks_drawn_on_cpu(method)
    method = method.to(device).train()
    set_checkpointing(method.network, checkpointing)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        method.to(memory_format=torch.channels_last)
    model = method if wrap is None else wrap(method)
    if compile:
        model = torch.compile(model)
    optimizer = build_optimizer(cfg.train, method.trainable_parameters(), scaled_lr(cfg.train.lr, BATCH, 1))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    losses, grads = [], {}
    for i in range(steps):
        batch = {
            k: v.to(device).contiguous(memory_format=fmt) if v.ndim == 4 else v.to(device)
            for k, v in make_batch(BATCH, 64, seed=seed + i).items()
        }
        with autocast(device, amp):
            loss = model(batch)["loss"]
        scaler.scale(loss).backward()
        losses.append(loss.detach().float().cpu())
        if i == 0:
            scale = scaler.get_scale() if scaler.is_enabled() else 1.0
            grads = {
                n: (p.grad.float() / scale).cpu() for n, p in method.named_parameters() if p.grad is not None
            }
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        method.after_step(i, 10_000)
    return Steps(torch.stack(losses), grads)


@functools.cache
def cpu_reference(name: str) -> Steps:
    """The fp32 CPU run every device comparison is made against."""
    return run_steps(name, "cpu")


def relative_gap(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((got - ref).abs() / ref.abs().clamp_min(1e-12)).max())


def assert_losses_close(got: Steps, ref: Steps, rtol: float, atol: float) -> None:
    assert torch.isfinite(got.losses).all(), got.losses
    assert torch.allclose(got.losses, ref.losses, rtol=rtol, atol=atol), (
        got.losses.tolist(),
        ref.losses.tolist(),
    )


def check_checkpointing(name: str, device: str) -> dict:
    """One step with ``train.checkpointing=all`` against two without: the loss bit-identical, and every gradient
    bit-identical where the two plain runs are (else within :data:`RERUN_TOL`). Returns what it saw."""
    plain, again = run_steps(name, device, steps=1), run_steps(name, device, steps=1)
    ckpt = run_steps(name, device, steps=1, checkpointing="all")
    assert torch.equal(again.losses, plain.losses) and torch.equal(ckpt.losses, plain.losses)
    assert ckpt.grads.keys() == plain.grads.keys() == again.grads.keys() and len(plain.grads) > 10
    reproducible = [k for k in plain.grads if torch.equal(plain.grads[k], again.grads[k])]
    for key in plain.grads:
        if key in reproducible:
            assert torch.equal(ckpt.grads[key], plain.grads[key]), key
        else:
            assert torch.allclose(ckpt.grads[key], plain.grads[key], rtol=RERUN_TOL[0], atol=RERUN_TOL[1]), (
                key
            )
    return {"grads": len(plain.grads), "bit_reproducible_grads": len(reproducible)}


def one_process_group_step(
    name: str, device: str, backend: str, store: Path, sync_bn: bool
) -> tuple[Steps, int]:
    """One step inside a one-process group (``backend``), the method wrapped by the engine's ``wrap_model``
    (SyncBatchNorm with ``sync_bn``, then DDP). Returns the step and how many SyncBatchNorm layers it had."""
    cfg = tiny_cfg(name, f"train.sync_bn={str(sync_bn).lower()}")
    session = SimpleNamespace(cfg=cfg, device=torch.device(device))
    wrapped = []

    def wrap(method: nn.Module) -> nn.Module:
        model = TrainingSession.wrap_model(session, method, find_unused_parameters=True)
        wrapped.append(method)
        return model

    dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    try:
        steps = run_steps(name, device, steps=1, wrap=wrap)
    finally:
        dist.destroy_process_group()
    return steps, sum(isinstance(m, nn.SyncBatchNorm) for m in wrapped[0].modules())


def eval_cfg(synth_root: Path) -> FinetuneConfig:
    return load_config(
        None,
        [
            "data.name=isic2017",
            f"data.root={synth_root / 'isic'}",
            "data.image_size=64",
            "data.num_workers=0",
            "model.arch=unet",
            "model.encoder=resnet18",
            f"train.batch_size={BATCH}",
            "train.amp=none",
        ],
        schema=FinetuneConfig,
    )


def predicted_labels(synth_root: Path, folder: Path, device: str) -> dict[str, np.ndarray]:
    """Labels predicted by ``evaluate_network`` (written as PNGs at the original size) of a fixed random U-Net."""
    from decon_med.engine.evaluate import evaluate_network
    from decon_med.models.network import build_network

    cfg = eval_cfg(synth_root)
    torch.manual_seed(0)
    network = build_network(cfg.model, classes=2).to(device)
    evaluate_network(network, cfg, "train", 2, predictions=folder)
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def label_flip_fraction(synth_root: Path, tmp_path: Path, devices: tuple[str, str]) -> float:
    """Fraction of pixels whose predicted label differs between the two devices."""
    a, b = (predicted_labels(synth_root, tmp_path / f"pred_{i}_{d}", d) for i, d in enumerate(devices))
    assert a.keys() == b.keys() and len(a) > 0
    differ = sum(int((a[k] != b[k]).sum()) for k in a)
    return differ / sum(v.size for v in a.values())


@pytest.fixture(scope="module")
def report():
    """Measured differences, written to ``$DECON_MED_CUDA_REPORT`` (when set) after the module's tests."""
    measured: dict = {}
    yield measured
    path = os.environ.get("DECON_MED_CUDA_REPORT")
    if path and measured:
        Path(path).write_text(json.dumps(measured, indent=1, sort_keys=True))


@pytest.fixture
def cuda_numerics():
    """fp32 without TF32 and deterministic cuDNN kernels (deterministic algorithms where torch has them)."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[0], saved[1]
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]
        torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])


# -- on CUDA ----------------------------------------------------------------------------------------------------


@cuda
@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
@pytest.mark.parametrize("name", METHODS)
def test_cuda_steps_under_amp_match_the_fp32_cpu_loss(name, amp, cuda_numerics, report):
    got = run_steps(name, "cuda", amp=amp)
    ref = cpu_reference(name)
    report[f"amp/{name}/{amp}/max_rel_loss_gap"] = relative_gap(got.losses, ref.losses)
    assert_losses_close(got, ref, *AMP_TOL[amp])


@cuda
@pytest.mark.parametrize("name", METHODS)
def test_cuda_checkpointing_gives_the_same_loss_and_gradients_bit_for_bit(name, cuda_numerics, report):
    report[f"checkpointing/{name}"] = check_checkpointing(name, "cuda")


@cuda
@pytest.mark.parametrize("name", METHODS)
def test_cuda_channels_last_matches_eager(name, cuda_numerics, report):
    eager = run_steps(name, "cuda")
    got = run_steps(name, "cuda", channels_last=True)
    report[f"channels_last/{name}/max_rel_loss_gap"] = relative_gap(got.losses, eager.losses)
    assert_losses_close(got, eager, *SAME_MATH_TOL)


@cuda
@pytest.mark.parametrize("name", ["decon_ml", "mim"])
def test_cuda_compile_matches_eager(name, cuda_numerics, report):
    eager = run_steps(name, "cuda")
    torch._dynamo.reset()
    try:
        got = run_steps(name, "cuda", compile=True)
    finally:
        torch._dynamo.reset()
    report[f"compile/{name}/max_rel_loss_gap"] = relative_gap(got.losses, eager.losses)
    assert_losses_close(got, eager, *SAME_MATH_TOL)


@cuda
@pytest.mark.parametrize("name", ["decon_ml", "decon_sl_densecl"])
def test_cuda_one_process_nccl_group_with_sync_batchnorm_steps(name, tmp_path, cuda_numerics, report):
    """With one process SyncBatchNorm normalises like BatchNorm; what runs for real is the conversion, DDP on
    CUDA and the methods' NCCL collectives (queue gathers, shuffled key batches)."""
    torch.cuda.set_device(0)
    got, sync_layers = one_process_group_step(name, "cuda:0", "nccl", tmp_path / "store", sync_bn=True)
    plain = run_steps(name, "cuda:0", steps=1)
    report[f"nccl_sync_bn/{name}/max_rel_loss_gap"] = relative_gap(got.losses, plain.losses)
    assert sync_layers > 10
    assert_losses_close(got, plain, *SAME_MATH_TOL)
    assert got.grads.keys() == plain.grads.keys()


@cuda
def test_cuda_evaluation_labels_match_cpu(synth_root, tmp_path, cuda_numerics, report):
    fraction = label_flip_fraction(synth_root, tmp_path, ("cpu", "cuda"))
    report["evaluation/label_flip_fraction"] = fraction
    print(f"labels differing between CUDA and CPU: {fraction:.2e} of pixels")
    assert fraction < MAX_LABEL_FLIPS


# -- the CPU half of each comparison, without a GPU ----------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_reference_steps_are_deterministic_on_cpu(name):
    first, second = cpu_reference(name), run_steps(name, "cpu")
    assert first.losses.shape == (STEPS,) and torch.isfinite(first.losses).all()
    assert torch.equal(first.losses, second.losses)
    assert first.grads.keys() == second.grads.keys() and len(first.grads) > 10
    for key, grad in first.grads.items():
        assert torch.equal(grad, second.grads[key]), key
    assert any(bool(g.abs().sum() > 0) for g in first.grads.values())


def test_amp_comparison_runs_on_cpu():
    """bf16 autocast on CPU against the fp32 CPU reference, under the tolerance the CUDA test uses for bf16."""
    got = run_steps("slotcon", "cpu", amp="bf16")
    ref = cpu_reference("slotcon")
    assert not torch.equal(got.losses, ref.losses)  # bf16 really ran
    assert_losses_close(got, ref, *AMP_TOL["bf16"])


def test_checkpointing_comparison_runs_on_cpu():
    seen = check_checkpointing("decon_ml", "cpu")
    assert seen["bit_reproducible_grads"] == seen["grads"]  # CPU kernels are deterministic


def test_channels_last_comparison_runs_on_cpu():
    eager = cpu_reference("slotcon")
    assert_losses_close(run_steps("slotcon", "cpu", channels_last=True), eager, *SAME_MATH_TOL)


def test_one_process_group_step_runs_on_cpu_with_gloo(tmp_path):
    got, sync_layers = one_process_group_step(
        "decon_sl_densecl", "cpu", "gloo", tmp_path / "store", sync_bn=False
    )
    plain = run_steps("decon_sl_densecl", "cpu", steps=1)
    assert sync_layers == 0
    assert_losses_close(got, plain, *SAME_MATH_TOL)


def test_label_flip_fraction_is_zero_between_two_cpu_runs(synth_root, tmp_path):
    assert label_flip_fraction(synth_root, tmp_path, ("cpu", "cpu")) == 0.0


# -- benchmarks/gpu_check.sh, rehearsed on CPU -------------------------------------------------------------------


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_dry_run_prints_the_plan_and_runs_nothing():
    before = sorted((ROOT / "benchmarks" / "results").iterdir())
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == ["tests", "cost", "summary"]
    assert "-m pytest -m cuda -q" in steps[0] and "tests/test_cuda.py" in steps[0]
    cost = steps[1]
    assert "benchmarks/cost_report.py --cuda" in cost
    assert "--methods slotcon decon_sl decon_ml" in cost and "--encoder resnet50 --size 224" in cost
    assert "--checkpointing none all" in cost and "--measure-batches 64 fit" in cost
    assert "--projection benchmarks/results/cost_r50_224_decon_ml.json" in cost and "--deadline" in cost
    budgets = [int(s.split("(timeout ")[1].split("s)")[0]) for s in steps]
    assert all(b > 0 for b in budgets) and sum(budgets) <= 480
    assert any("benchmarks/results/gpu_<device>.json" in line for line in lines)
    assert sorted((ROOT / "benchmarks" / "results").iterdir()) == before
    if not HAS_CUDA:  # without --dry-run and without a GPU it stops at once, having run nothing
        real = subprocess.run(
            ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHON": sys.executable},
        )
        assert real.returncode == 2 and "no CUDA device" in real.stderr and real.stdout == ""
        assert sorted((ROOT / "benchmarks" / "results").iterdir()) == before


def test_cost_rows_record_an_out_of_memory_row_and_go_on(tmp_path, monkeypatch):
    bench = _load("cost_report")
    argv = ["--methods", "slotcon", "decon_ml", "--encoder", "resnet18", "--size", "64", "--batch-size", "8"]
    argv += ["--dim-hidden", "32", "--batches", "1", "2", "--checkpointing", "none"]
    counted = bench.main([*argv, "--json", str(tmp_path / "projection.json")])["rows"]

    calls = []

    def measure(cfg, mode, warmup, steps):
        calls.append((cfg.ssl.label, cfg.train.batch_size, mode))  # decon_ml: slotcon + ssl.decoder.preset ml
        if cfg.ssl.label == "decon_ml" and cfg.train.batch_size == 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"peak_gib": 1.5, "img_per_s": 100.0, "device": "fake"}

    monkeypatch.setattr(bench, "measure_cuda", measure)
    monkeypatch.setattr(bench, "cuda_memory_gib", lambda: 24.0)
    written = []
    args = bench.parse_args(
        [*argv, "--projection", str(tmp_path / "projection.json"), "--measure-batches", "4", "fit"]
    )
    args.cuda = True  # parse_args refuses --cuda without a GPU; the loop itself needs none
    rows = bench.report_rows(args, lambda rows: written.append([len(r.get("measured_at", [])) for r in rows]))
    fit = [bench.largest_batch(r, 24.0 - bench.RESERVE_GIB) for r in counted]
    assert calls == [("slotcon", 4, "none"), ("decon_ml", 4, "none"), ("slotcon", fit[0], "none"),
                     ("decon_ml", fit[1], "none")]  # fmt: skip
    status = [[(e["batch"], e["status"]) for e in r["measured_at"]] for r in rows]
    assert status == [[(4, "ok"), (fit[0], "ok")], [(4, "oom"), (fit[1], "ok")]]
    assert rows[1]["measured_at"][0]["error"] == "CUDA out of memory. Tried to allocate 2.00 GiB"
    assert rows[0]["measured_at"][0]["peak_gib"] == 1.5 and rows[0]["projection_from"].endswith(
        "projection.json"
    )
    assert written[-4:] == [[1, 0], [1, 1], [2, 1], [2, 2]]  # written after every measurement
    assert rows[0]["memory_model"] == counted[0]["memory_model"]  # the projection, not counted again

    calls.clear()
    args.deadline = time.time() - 1
    late = bench.report_rows(args)
    assert calls == [] and {e["status"] for r in late for e in r["measured_at"]} == {"skipped"}


def test_gpu_check_summary_writes_json_and_one_table(tmp_path, capsys):
    summary = _load("gpu_check")
    cost = {
        "rows": [
            {
                "label": "decon_ml",
                "checkpointing": "none",
                "measured_at": [
                    {"spec": "64", "batch": 64, "projected_peak_gib": 20.0, "status": "ok", "peak_gib": 18.0,
                     "img_per_s": 900.0, "device_gib": 139.8},
                    {"spec": "fit", "batch": 700, "projected_peak_gib": 138.0, "status": "oom",
                     "error": "CUDA out of memory", "device_gib": 139.8},
                ],
            }
        ]
    }  # fmt: skip
    (tmp_path / "cost.json").write_text(json.dumps(cost))
    (tmp_path / "tests.json").write_text(json.dumps({"evaluation/label_flip_fraction": 1e-5}))
    (tmp_path / "pytest.log").write_text("....\n3 passed, 1 failed in 12.0s\n")
    out = tmp_path / "gpu_fake.json"
    argv = [
        "--device",
        "Fake GPU",
        "--out",
        str(out),
        "--pytest-rc",
        "1",
        "--pytest-log",
        str(tmp_path / "pytest.log"),
    ]
    argv += [
        "--cuda-report",
        str(tmp_path / "tests.json"),
        "--cost",
        str(tmp_path / "cost.json"),
        "--cost-rc",
        "0",
    ]
    assert summary.main(argv) == 1  # a failed test fails the check
    result = json.loads(out.read_text())
    assert result["tests"]["summary"] == "3 passed, 1 failed in 12.0s"
    assert [(r["batch"], r["status"]) for r in result["rows"]] == [(64, "ok"), (700, "oom")]
    assert result["rows"][0]["measured_over_projected"] == pytest.approx(0.9)
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith("decon_ml")]
    assert len(table) == 2 and "oom" in table[1] and "900" in table[0]
    assert "tests: 3 passed, 1 failed" in printed
