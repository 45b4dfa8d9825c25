"""The cost report: exact FLOPs and saved bytes on a hand-countable net, linearity in the batch, the checkpointing
and decoder-head levers, the projected peak, the ``cost`` command and the benchmark script."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from decon_med.cli import main
from decon_med.config import PretrainConfig, load_config
from decon_med.cost import (
    GIB,
    at_batch,
    cost_report,
    count_step,
    fit,
    largest_batch,
    parameter_counts,
    projected_peak_gib,
    random_batch,
)
from decon_med.models.network import set_checkpointing
from decon_med.ssl import build_method
from decon_med.ssl.base import SSLMethod
from decon_med.ssl.ema import frozen_copy

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "pretrain"
TINY = ["model.encoder=resnet18", "data.image_size=64", "ssl.dim_hidden=32", "ssl.queue_size=64"]
TINY += ["train.amp=none", "train.batch_size=16"]


class _TwoConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.decoder = nn.Conv2d(4, 2, 3, padding=1, bias=False)

    def forward(self, x):
        return self.decoder(self.encoder(x))


class _TwoConvMethod(SSLMethod):
    """Student and EMA teacher of a 2-layer conv net; loss = sum(student(view1) * teacher(view2))."""

    def __init__(self):
        super().__init__()
        self.network = _TwoConvNet()
        self.teacher = frozen_copy(self.network)

    def forward(self, batch):
        with torch.no_grad():
            target = self.teacher(batch["view2"])
        return {"loss": (self.network(batch["view1"]) * target).sum()}

    def trainable_parameters(self):
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("teacher.")]


@pytest.mark.parametrize("b", [1, 3])
def test_flops_and_saved_bytes_of_a_two_conv_net_match_a_hand_count(b):
    count = count_step(_TwoConvMethod(), random_batch(b, 8))
    pixels = 8 * 8
    conv1 = 2 * 4 * 3 * 9 * pixels * b  # 2 FLOPs per multiply-add, 3x3 kernels, "same" padding
    conv2 = 2 * 2 * 4 * 9 * pixels * b
    # backward: conv1 needs only its weight gradient (the image needs none), conv2 both gradients
    assert count.flops == {"encoder": 2 * conv1, "decoder": 3 * conv2, "heads": 0, "teacher": conv1 + conv2}
    # kept for backward (fp32): the image (conv1's input), conv1's output (conv2's input), the teacher's output
    # (the other factor of the product); the weights are parameters and do not count
    assert count.saved_bytes == 4 * pixels * b * (3 + 4 + 2)
    assert count.grad_numel == 4 * 3 * 9 + 2 * 4 * 9 and count.grad_bytes == 4 * count.grad_numel
    assert count.largest_bytes == 4 * pixels * b * 4  # conv1's output is the largest per-image tensor
    assert parameter_counts(_TwoConvMethod()) == {"network": 180, "heads": 0, "teacher": 180}


def test_fit_is_the_least_squares_line():
    coef = fit([1, 2, 3], [10 + 3 * b for b in (1, 2, 3)])
    np.testing.assert_allclose(coef, [10, 3], atol=1e-9)
    assert at_batch(coef, 256) == pytest.approx(10 + 3 * 256)
    np.testing.assert_allclose(fit([1, 2, 3], [4, 8, 10]), [4 / 3, 3], atol=1e-9)  # mean 22/3 at B = 2
    np.testing.assert_allclose(fit([2], [8]), [0, 4])


@pytest.mark.parametrize("config", ["mim", "densecl"])
def test_flops_and_saved_bytes_grow_linearly_with_the_batch(config):
    method = build_method(load_config(CONFIGS / f"{config}.yaml", TINY, schema=PretrainConfig)).train()
    counts = [count_step(method, random_batch(b, 64)) for b in (1, 2, 3)]
    for part in counts[0].flops:
        assert [c.flops[part] for c in counts] == [b * counts[0].flops[part] for b in (1, 2, 3)]
    saved = [c.saved_bytes for c in counts]
    assert saved[2] - saved[1] == saved[1] - saved[0] > 0


def test_checkpointing_adds_the_recomputed_forward_and_keeps_fewer_bytes():
    method = build_method(load_config(CONFIGS / "slotcon.yaml", TINY, schema=PretrainConfig)).train()
    plain = count_step(method, random_batch(2, 64))
    set_checkpointing(method.network, "all")
    checkpointed = count_step(method, random_batch(2, 64))
    # the teacher runs the encoder forward once per view; recomputation repeats layer1 ... layer4 (not the stem)
    stem = 2 * 64 * 3 * 7 * 7 * 32 * 32 * 2 * 2  # 7x7 conv to 64 channels at 32 x 32, 2 images, 2 views
    assert checkpointed.flops["encoder"] - plain.flops["encoder"] == plain.flops["teacher"] - stem
    assert {k: checkpointed.flops[k] for k in ("decoder", "heads", "teacher")} == {
        k: plain.flops[k] for k in ("decoder", "heads", "teacher")
    }
    assert checkpointed.saved_bytes < 0.6 * plain.saved_bytes


def test_report_rows_the_projected_peak_and_the_decoder_head_width():
    cfg = load_config(CONFIGS / "decon_ml.yaml", TINY, schema=PretrainConfig)
    report = cost_report(cfg, checkpointing=("none", "all"))
    none, ckpt = report["none"], report["all"]
    assert none["gflop_per_image"]["total"] == pytest.approx(
        sum(none["gflop_per_image"][p] for p in ("encoder", "decoder", "heads", "teacher"))
    )
    assert ckpt["gflop_per_image"]["total"] > none["gflop_per_image"]["total"]
    assert ckpt["gflop_per_image"]["heads"] == pytest.approx(none["gflop_per_image"]["heads"])
    assert ckpt["activation_mib_per_image"] < none["activation_mib_per_image"]
    memory = none["memory_gib"]
    assert memory["peak"] == pytest.approx(sum(v for k, v in memory.items() if k != "peak"))
    assert memory["optimizer"] == pytest.approx(memory["grads"])  # LARS: one momentum buffer, fp32 grads
    assert projected_peak_gib(none, 16) == pytest.approx(memory["peak"])
    batch = largest_batch(none, 2.0)
    assert projected_peak_gib(none, batch) <= 2.0 < projected_peak_gib(none, batch + 1)

    narrow = cost_report(load_config(CONFIGS / "decon_ml.yaml", [*TINY, "ssl.dim_hidden_dec=8"]), ("none",))
    assert narrow["none"]["gflop_per_image"]["heads"] < none["gflop_per_image"]["heads"]
    assert narrow["none"]["gflop_per_image"]["encoder"] == none["gflop_per_image"]["encoder"]
    assert narrow["none"]["params"]["heads"] < none["params"]["heads"]


def test_dim_hidden_dec_sets_the_width_of_decoder_heads_only():
    cfg = load_config(CONFIGS / "decon_ml.yaml", [*TINY, "ssl.dim_hidden_dec=8"], schema=PretrainConfig)
    method = build_method(cfg)
    assert method.enc_head.projector.mlp[0].out_channels == 32
    assert {h.projector.mlp[0].out_channels for h in method.dec_heads} == {8}
    assert {h.predictor.mlp[0].out_features for h in method.dec_heads} == {8}
    default = build_method(load_config(CONFIGS / "decon_ml.yaml", TINY, schema=PretrainConfig))
    assert {h.projector.mlp[0].out_channels for h in default.dec_heads} == {32}


def test_cost_command_writes_json_and_rejects_bad_input(tmp_path, capsys):
    out = tmp_path / "cost.json"
    argv = ["cost", str(CONFIGS / "densecl.yaml"), *TINY, "--checkpointing", "none", "encoder"]
    assert main([*argv, "--batches", "1", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert list(report) == ["none", "encoder"] and report["encoder"]["fits"]["24"] > 0
    printed = capsys.readouterr().out
    assert "GFLOP / image" in printed and "projected peak" in printed
    assert main(["cost", str(CONFIGS / "densecl.yaml"), "train.checkpointing=some"]) == 2
    assert "train.checkpointing" in capsys.readouterr().err
    bad = ["cost", str(CONFIGS / "decon_ml.yaml"), *TINY, "model.arch=fpn", "--checkpointing", "decoder"]
    assert main(bad) == 2
    # TINY's flat ssl.queue_size is read with a note line, then the one error line
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: config key 'train.checkpointing'")


def test_benchmark_script_prints_the_table_and_the_fit_table(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("cost_report", ROOT / "benchmarks" / "cost_report.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "cost.json"
    argv = ["--methods", "slotcon", "mim", "--encoder", "resnet18", "--size", "64", "--batch-size", "8"]
    result = bench.main(
        [*argv, "--dim-hidden", "32", "--amp", "bf16", "--batches", "1", "2", "--json", str(out)]
    )
    rows = result["rows"]
    assert [(r["label"], r["checkpointing"]) for r in rows] == [
        ("slotcon", "none"),
        ("slotcon", "all"),
        ("mim", "none"),
        ("mim", "all"),
    ]
    assert rows[0]["vs_slotcon"] == 1.0 and rows[0]["amp"] == "bf16" and rows[0]["batch_size"] == 8
    assert all(set(r["fits"]) == {"24", "48", "80"} for r in rows)
    assert rows[0]["memory_gib"]["peak"] * GIB > rows[0]["memory_model"]["static_bytes"]
    assert json.loads(out.read_text())["rows"][3]["label"] == "mim"
    assert "largest batch that fits" in capsys.readouterr().out
