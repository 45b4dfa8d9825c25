"""torchrun-style training with 2 CPU processes (gloo): the same step as one process, rank-0-only files, resume.

BatchNorm normalises each process's half batch with its own statistics, so 2 x B/2 and 1 x B differ through the
batch statistics alone (SyncBatchNorm needs CUDA). The equivalence test therefore puts BatchNorm layers in eval
mode: what it checks is the rest — gathered keys in the queues, all-reduced centres, and DDP's gradient average.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from decon_med.config import PretrainConfig, load_config, save_config
from decon_med.engine.checkpoint import load_checkpoint
from tests.ssl.test_slotcon_decon import TINY, make_batch

BATCH = 4
METHOD_OVERRIDES = {
    "decon_sl_densecl": ["ssl.alpha=0.5", "ssl.queue_size=16", "ssl.dense_warmup_steps=0"],
    "slotcon": [],
    # Skip dropout draws other masks in each process; the equivalence is about everything else.
    "decon_ml": ["ssl.alpha=0.5", "ssl.levels=[0, 2, 4]", "ssl.skip_dropout=0.0"],
}


def _method(name: str):
    from decon_med.ssl import build_method

    cfg = load_config(None, [*TINY, f"ssl.method={name}", *METHOD_OVERRIDES[name]], schema=PretrainConfig)
    torch.manual_seed(0)
    method = build_method(cfg)
    method.train()
    for module in method.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    return method


def _step(method, model, batch: dict) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Loss parts (detached), gradients and the cross-process buffers after one forward and backward."""
    out = model(batch)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in method.named_buffers() if n.endswith(("queue_global", "center"))}
    return {k: v.detach() for k, v in out.items()}, grads, buffers


def _batch() -> dict:
    """A batch whose halves hold different numbers of slots: the last image is flat, so it owns one prototype."""
    batch = make_batch(BATCH)
    batch["view1"][-1] = 0.0
    batch["view2"][-1] = 0.0
    return batch


def _half(batch: dict, rank: int) -> dict:
    half = BATCH // 2
    return {k: v[rank * half : (rank + 1) * half] for k, v in batch.items()}


def _equivalence_worker(rank: int, store: str, name: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        method = _method(name)
        model = nn.parallel.DistributedDataParallel(method, find_unused_parameters=True)
        parts, grads, buffers = _step(method, model, _half(_batch(), rank))
        loss = parts["loss"].clone()
        dist.all_reduce(loss)
        if rank == 0:
            torch.save({"loss": loss / 2, "grads": grads, "buffers": buffers}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", list(METHOD_OVERRIDES))
def test_two_processes_with_half_batches_match_one_process(tmp_path, name):
    out = tmp_path / "ddp.pt"
    mp.spawn(_equivalence_worker, args=(str(tmp_path / "store"), name, str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    method = _method(name)
    parts, grads, buffers = _step(method, method, _batch())
    slot_terms = [v for k, v in parts.items() if k.endswith("slot")]
    assert all(v > 0 for v in slot_terms)  # the slot InfoNCE is part of the compared loss
    assert torch.allclose(ddp["loss"], parts["loss"], atol=1e-5)
    assert ddp["grads"].keys() == grads.keys() and len(grads) > 10
    for key, grad in grads.items():
        assert torch.allclose(ddp["grads"][key], grad, atol=1e-5, rtol=1e-3), key
    assert buffers  # queues (keys gathered in rank order) or centres (all-reduced) match
    for key, value in buffers.items():
        assert torch.allclose(ddp["buffers"][key], value, atol=1e-5), key


def _no_slot_worker(rank: int, store: str, out: str) -> None:
    """Rank 1 finds no slot present in both views: it must still join every collective of rank 0."""
    from decon_med.ssl import slotcon

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    try:
        if rank == 1:
            slotcon._owned_prototypes = lambda scores: torch.zeros(scores.shape[:2], dtype=torch.bool)
        method = _method("slotcon")
        model = nn.parallel.DistributedDataParallel(method, find_unused_parameters=True)
        parts, _, _ = _step(method, model, _half(_batch(), rank))
        torch.save(parts, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_a_process_without_slots_still_steps_with_the_others(tmp_path):
    out = tmp_path / "parts"
    mp.spawn(_no_slot_worker, args=(str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1))
    assert rank0["enc_slot"] > 0 and torch.isfinite(rank0["loss"])
    assert rank1["enc_slot"] == 0 and torch.isfinite(rank1["loss"])


def _shuffle_worker(rank: int, store: str, out: str) -> None:
    from decon_med.distributed import all_gather_no_grad, shuffle_batch, unshuffle_batch

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        own = torch.arange(4.0) + 4 * rank
        local, inverse = shuffle_batch(own)
        restored = unshuffle_batch(local * 10, inverse)
        torch.save({"local": local, "all": all_gather_no_grad(local), "restored": restored}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_shuffled_shares_cover_the_global_batch_and_come_back_in_order(tmp_path):
    out = tmp_path / "shuffle"
    mp.spawn(_shuffle_worker, args=(str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1)]
    assert sorted(ranks[0]["all"].tolist()) == list(range(8))  # a permutation of the global batch
    assert torch.equal(ranks[0]["all"], ranks[1]["all"])  # the same order on every process
    assert not torch.equal(ranks[0]["all"], torch.arange(8.0))  # actually shuffled
    for r, result in enumerate(ranks):
        assert torch.equal(result["restored"], (torch.arange(4.0) + 4 * r) * 10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_worker(rank: int, port: int, argv: list[str]) -> None:
    from decon_med.cli import main

    torch.set_num_threads(1)
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": 2, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    os.environ.update({k: str(v) for k, v in env.items()})
    if main(argv) != 0:
        raise SystemExit(f"rank {rank}: exit status not 0")


def _torchrun(argv: list[str]) -> None:
    mp.spawn(_cli_worker, args=(_free_port(), argv), nprocs=2, join=True)


def _torchrun_config(synth_root: Path, tmp_path: Path, method: str, out: Path) -> Path:
    cfg = load_config(
        None,
        [
            *TINY,
            f"ssl.method={method}",
            *METHOD_OVERRIDES[method],
            "data.name=isic2017",
            f"data.root={synth_root / 'isic'}",
            "data.num_workers=0",
            "train.batch_size=2",  # per process: global batch 4, 2 steps per epoch on 8 images
            "train.epochs=2",
            "train.log_every=1",
            "train.ckpt_every=2",
            f"out_dir={out}",
        ],
        schema=PretrainConfig,
    )
    config = tmp_path / f"{out.name}.yaml"
    save_config(cfg, config)
    return config


@pytest.mark.parametrize("method", ["slotcon", "decon_sl_densecl"])
def test_torchrun_pretrain_writes_once_and_resumes_exactly(synth_root, tmp_path, capsys, method):
    out = tmp_path / "run"
    config = _torchrun_config(synth_root, tmp_path, method, out)
    _torchrun(["pretrain", str(config), "--quiet", "--max-steps", "2"])
    state = load_checkpoint(out / "last.ckpt")
    assert state["step"] == 2 and state["world_size"] == 2 and len(state["rng_ranks"]) == 2
    assert not (out / "done.json").exists()

    _torchrun(["pretrain", str(config), "--quiet", "--resume"])
    done = load_checkpoint(out / "last.ckpt")
    assert done["step"] == 4 and (out / "done.json").is_file()
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]  # one writer, no duplicate rows
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_0000002.ckpt",
        "step_0000004.ckpt",
    ]
    # The same run without the interruption ends in the same state, bit for bit (RNG of every rank, queues,
    # the shuffled key batches of DenseCL).
    straight = tmp_path / "straight"
    _torchrun(["pretrain", str(_torchrun_config(synth_root, tmp_path, method, straight)), "--quiet"])
    uninterrupted = load_checkpoint(straight / "last.ckpt")["method"]
    assert uninterrupted.keys() == done["method"].keys()
    for key, value in uninterrupted.items():
        assert torch.equal(value, done["method"][key]), key

    from decon_med.cli import main

    capsys.readouterr()
    assert main(["pretrain", str(config), "train.epochs=3", "--quiet", "--resume"]) == 2
    assert "trained with 2 process(es) and 1 are running" in capsys.readouterr().err


def test_torchrun_finetune_runs_and_scores_once(synth_root, tmp_path):
    out = tmp_path / "ft"
    argv = [
        "finetune",
        str(Path(__file__).resolve().parents[2] / "configs" / "finetune" / "isic.yaml"),
        "data.name=isic2017",
        f"data.root={synth_root / 'isic'}",
        "data.image_size=64",
        "data.num_workers=0",
        "model.arch=unet",
        "model.encoder=resnet18",
        "train.batch_size=2",
        "train.iters=4",
        "train.val_every=2",
        "train.log_every=2",
        f"out_dir={out}",
        "--quiet",
    ]
    _torchrun(argv)
    results = (out / "results.json").read_text()
    assert '"test"' in results
    assert len((out / "val.csv").read_text().strip().splitlines()) == 3  # header + iterations 2 and 4
    assert load_checkpoint(out / "last.ckpt")["world_size"] == 2
