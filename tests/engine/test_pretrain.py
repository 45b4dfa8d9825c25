"""The pre-training engine and export, driven by a tiny BYOL-like method on synthetic ISIC images."""

import argparse
import copy
import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from torch import nn

from decon_med.config import DataConfig, ModelConfig, PretrainConfig, TrainConfig, to_dict
from decon_med.data.synthetic import make_isic
from decon_med.engine.checkpoint import load_checkpoint
from decon_med.engine.export import export
from decon_med.engine.pretrain import check_resumable, pretrain
from decon_med.errors import DeconError
from decon_med.folders import Manifest
from decon_med.models.network import build_network, features
from decon_med.ssl.base import SSLMethod
from decon_med.ssl.ema import cosine_momentum, frozen_copy, update_momentum


class TinyMethod(SSLMethod):
    """Cosine loss between a student and an EMA teacher on the last encoder level (dropout in the projector).

    ``fail_at`` raises in ``after_step`` of that step (a crash); ``nan_at`` returns a NaN loss from that step on.
    """

    def __init__(self, fail_at: int | None = None, nan_at: int | None = None):
        super().__init__()
        self.network = build_network(ModelConfig(arch="unet", encoder="resnet18"), in_channels=3, classes=1)
        self.projector = nn.Sequential(
            nn.Conv2d(512, 32, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.Dropout2d(0.3), nn.Conv2d(32, 16, 1)
        )
        self.teacher = frozen_copy(self.network)
        self.teacher_projector = frozen_copy(self.projector)
        self.fail_at, self.nan_at = fail_at, nan_at
        self.next_step = 1

    def _embed(self, network: nn.Module, projector: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return projector(features(network, x, decoder=False)[0][-1]).mean((2, 3))

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        student = self._embed(self.network, self.projector, batch["view1"])
        with torch.no_grad():
            teacher = self._embed(self.teacher, self.teacher_projector, batch["view2"])
        loss = 2 - 2 * F.cosine_similarity(student, teacher, dim=1).mean()
        if self.nan_at is not None and self.next_step >= self.nan_at:
            loss = loss * float("nan")
        return {"loss": loss, "enc": loss.detach()}

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> dict[str, float]:
        if self.fail_at is not None and step + 1 == self.fail_at:
            raise RuntimeError("simulated crash")
        momentum = cosine_momentum(step, total_steps, start=0.99)
        update_momentum(self.network, self.teacher, momentum)
        update_momentum(self.projector, self.teacher_projector, momentum)
        self.next_step = step + 2
        return {"momentum": momentum}

    def trainable_parameters(self):
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad and "teacher" not in n]


def tiny_method(**kwargs) -> TinyMethod:
    torch.manual_seed(0)
    return TinyMethod(**kwargs)


@pytest.fixture(scope="module")
def isic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("engine_data") / "isic"
    make_isic(root, n=8, seed=0)  # 8 training images: 2 steps per epoch at batch 4
    return root


def make_cfg(isic: Path, out: Path, **train) -> PretrainConfig:
    settings = {"batch_size": 4, "epochs": 3, "ckpt_every": 3, "log_every": 1, "lr": 0.5, "warmup_epochs": 1}
    settings.update(train)
    return PretrainConfig(
        data=DataConfig(name="isic2017", root=str(isic), image_size=64, num_workers=0),
        model=ModelConfig(arch="unet", encoder="resnet18"),
        train=TrainConfig(**settings),
        out_dir=str(out),
    )


def run(cfg: PretrainConfig, method: TinyMethod | None = None, **kwargs) -> Path:
    return pretrain(cfg, method=method or tiny_method(), progress=False, **kwargs)


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


_REFERENCES: dict[int, Path] = {}


@pytest.fixture(scope="module")
def reference(isic, tmp_path_factory):
    """Uninterrupted 6-step runs (3 epochs), one per accum_steps, made once."""

    def get(accum_steps: int) -> Path:
        if accum_steps not in _REFERENCES:
            out = tmp_path_factory.mktemp(f"reference_accum{accum_steps}")
            _REFERENCES[accum_steps] = run(make_cfg(isic, out, accum_steps=accum_steps, log_every=2))
        return _REFERENCES[accum_steps]

    yield get
    for run_dir in _REFERENCES.values():
        shutil.rmtree(run_dir, ignore_errors=True)
    _REFERENCES.clear()


def test_run_folder_contents(reference):
    run_dir = reference(1)
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".decon-manifest",
        ".decon-run",
        "checkpoints",
        "config.yaml",
        "done.json",
        "last.ckpt",
        "metrics.csv",
        "tb",
    ]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["log_every"] == 2
    on_disk = {
        p.relative_to(run_dir).as_posix() + ("/" if p.is_dir() else "")
        for p in run_dir.rglob("*")
        if not p.name.startswith(".decon-")
    }
    assert Manifest(run_dir).entries() >= on_disk  # every path the run wrote is recorded
    rows = read_metrics(run_dir)
    assert list(rows[0]) == ["step", "epoch", "loss", "enc", "momentum", "lr", "img_s"]
    assert [int(r["step"]) for r in rows] == [2, 4, 6] and [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert all(0.0 <= float(r["loss"]) <= 4.0 and float(r["img_s"]) > 0 for r in rows)
    assert float(rows[-1]["lr"]) == pytest.approx(0.0)  # the cosine ends at min_lr
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step_0000003.ckpt",
        "step_0000006.ckpt",
    ]
    done = json.loads((run_dir / "done.json").read_text())
    assert done["step"] == 6 and done["images"] == 24 and done["img_s"] > 0 and done["wall_time_s"] > 0

    state = load_checkpoint(run_dir / "last.ckpt")
    assert (state["step"], state["epoch"], state["batch_in_epoch"], state["metrics_rows"]) == (6, 3, 0, 3)
    assert state["network_meta"] == {
        "arch": "unet",
        "encoder": "resnet18",
        "in_channels": 3,
        "classes": 1,
        "state_prefix": "network.",  # the test method has no teacher: its student is exported
    }
    assert state["config"]["train"]["batch_size"] == 4 and state["scaler"] is None
    assert load_checkpoint(run_dir / "checkpoints" / "step_0000003.ckpt")["step"] == 3


def test_dataset_smaller_than_a_batch(isic, tmp_path):
    with pytest.raises(DeconError, match="fewer than one global batch"):
        run(make_cfg(isic, tmp_path / "run", batch_size=16))


def _assert_same_state(a: Path, b: Path) -> None:
    state_a, state_b = load_checkpoint(a / "last.ckpt"), load_checkpoint(b / "last.ckpt")
    assert state_a["step"] == state_b["step"] == 6
    method_a, method_b = state_a["method"], state_b["method"]
    assert method_a.keys() == method_b.keys()
    different = [k for k in method_a if not torch.equal(method_a[k], method_b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    moments_a = state_a["optimizer"]["state"]
    moments_b = state_b["optimizer"]["state"]
    assert all(torch.equal(moments_a[i]["mu"], moments_b[i]["mu"]) for i in moments_a)


@pytest.mark.parametrize(
    ("accum_steps", "kill"),
    [(1, "max_steps"), (1, "crash"), (2, "crash")],
    ids=["stop-at-4", "crash-at-5", "crash-at-5-accum2"],
)
def test_kill_and_resume_is_bit_exact(isic, tmp_path, reference, accum_steps, kill):
    cfg = make_cfg(isic, tmp_path / "run", accum_steps=accum_steps)
    if kill == "max_steps":
        run(cfg, max_steps=4)
        assert load_checkpoint(tmp_path / "run" / "last.ckpt")["step"] == 4
    else:
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(cfg, tiny_method(fail_at=5))
        assert load_checkpoint(tmp_path / "run" / "last.ckpt")["step"] == 3  # the step-5 crash lost steps 4-5
        assert [int(r["step"]) for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]
    assert not (tmp_path / "run" / "done.json").exists()
    run(cfg, resume=True)
    _assert_same_state(reference(accum_steps), tmp_path / "run")
    assert [int(r["step"]) for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]  # no duplicate rows
    assert json.loads((tmp_path / "run" / "done.json").read_text())["step"] == 6


def test_run_folder_guards(isic, tmp_path):
    out = tmp_path / "run"
    cfg = make_cfg(isic, out, epochs=1)
    run(cfg, max_steps=0)  # stopped before its first checkpoint: --resume starts from step 0
    assert not (out / "last.ckpt").exists() and (out / ".decon-run").is_file()
    run(cfg, resume=True, max_steps=1)
    assert load_checkpoint(out / "last.ckpt")["step"] == 1
    with pytest.raises(DeconError, match="unfinished run exists; pass --resume"):
        run(cfg)
    run(cfg, resume=True)
    assert json.loads((out / "done.json").read_text())["step"] == 2
    done = (out / "done.json").read_bytes()
    run(cfg, resume=True)  # finished: a no-op
    assert (out / "done.json").read_bytes() == done
    with pytest.raises(DeconError, match="finished run exists; pass --overwrite to replace it"):
        run(cfg)
    (out / "notes.txt").write_text("mine")  # foreign files stay; only what the run recorded goes
    (out / "notes.tmp").write_text("mine too")  # a user's *.tmp is not a stale write of the run
    (out / "metrics_mine.csv").write_text("mine")  # a run-like name does not make a file the run's
    (out / "checkpoints").mkdir(exist_ok=True)
    (out / "checkpoints" / "my_copy.ckpt").write_bytes(b"mine")
    (out / "last.ckpt.tmp").write_bytes(b"partial")  # a killed write of a recorded path
    run(cfg, overwrite=True)
    assert [int(r["step"]) for r in read_metrics(out)] == [1, 2]
    assert not (out / "last.ckpt.tmp").exists()
    for name, text in [("notes.txt", "mine"), ("notes.tmp", "mine too"), ("metrics_mine.csv", "mine")]:
        assert (out / name).read_text() == text
    assert (out / "checkpoints" / "my_copy.ckpt").read_bytes() == b"mine"
    for name in ("notes.txt", "notes.tmp", "metrics_mine.csv", "checkpoints/my_copy.ckpt"):
        (out / name).unlink()
    with pytest.raises(DeconError, match="either --resume or --overwrite"):
        run(cfg, resume=True, overwrite=True)

    other = tmp_path / "not_a_run"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DeconError, match="holds no run"):
        run(make_cfg(isic, other), overwrite=True)
    assert (other / "notes.txt").exists()


def test_resume_checks_the_config_and_may_extend_epochs(isic, tmp_path):
    out = tmp_path / "run"
    run(make_cfg(isic, out, epochs=1))
    with pytest.raises(DeconError, match=r"train\.lr \(0\.5 -> 0\.25\)") as info:
        run(make_cfg(isic, out, epochs=1, lr=0.25, weight_decay=0.0), resume=True)
    assert "train.weight_decay" in str(info.value) and "train.epochs" not in str(info.value)
    run(make_cfg(isic, out, epochs=2), resume=True)
    assert json.loads((out / "done.json").read_text())["step"] == 4
    assert [int(r["step"]) for r in read_metrics(out)] == [1, 2, 3, 4]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["epochs"] == 2
    with pytest.raises(DeconError, match="may only be extended"):
        run(make_cfg(isic, out, epochs=1), resume=True)


def test_a_key_newer_than_the_saved_run_is_no_difference_at_its_default(tmp_path):
    defaults = to_dict(PretrainConfig())
    saved = copy.deepcopy(defaults)
    del saved["ssl"]["decoder"]["grid"]  # a run written before the key existed
    check_resumable(saved, defaults, tmp_path, defaults=defaults)
    changed = copy.deepcopy(defaults)
    changed["ssl"]["decoder"]["grid"] = 3
    with pytest.raises(DeconError, match=r"ssl\.decoder\.grid \(None -> 3\)"):
        check_resumable(saved, changed, tmp_path, defaults=defaults)
    with pytest.raises(DeconError, match=r"ssl\.decoder\.grid \(None -> 7\)"):
        check_resumable(saved, defaults, tmp_path)  # without defaults a missing key is a difference


@pytest.mark.parametrize(("log_every", "detected_by"), [(1, "log"), (100, "checkpoint")])
def test_non_finite_loss_stops_the_run(isic, tmp_path, log_every, detected_by):
    out = tmp_path / "run"
    cfg = make_cfg(isic, out, ckpt_every=2, log_every=log_every)
    with pytest.raises(
        DeconError, match="non-finite loss at step 3; the last good checkpoint is .*last.ckpt"
    ):
        run(cfg, tiny_method(nan_at=3))
    state = load_checkpoint(out / "last.ckpt")
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["method"].values() if v.is_floating_point())
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002.ckpt"]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_on_cpu(isic, tmp_path, amp):
    out = run(make_cfg(isic, tmp_path / "run", amp=amp), max_steps=1)
    assert math.isfinite(float(read_metrics(out)[0]["loss"]))
    assert (load_checkpoint(out / "last.ckpt")["scaler"] is None) == (amp == "bf16")


def test_channels_last_clipping_and_adamw(isic, tmp_path):
    cfg = make_cfg(isic, tmp_path / "run", channels_last=True, clip_grad=1.0, optimizer="adamw", lr=1e-3)
    out = run(cfg, max_steps=2)
    assert [int(r["step"]) for r in read_metrics(out)] == [1, 2]


def test_export_loads_into_fresh_smp_models(reference, tmp_path):
    ckpt = reference(1) / "last.ckpt"
    files = export(ckpt, tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [
        ".decon-export",
        ".decon-manifest",
        "encoder.safetensors",
        "encoder_decoder.safetensors",
        "export.json",
        "smp",
    ]
    student = {
        k.removeprefix("network."): v
        for k, v in load_checkpoint(ckpt)["method"].items()
        if k.startswith("network.")
    }

    def fresh():
        return smp.create_model("unet", encoder_name="resnet18", encoder_weights=None, classes=3)

    model = fresh()
    # BatchNorm fills in a missing num_batches_tracked itself, so it never counts as missing
    all_keys = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    result = model.load_state_dict(load_file(files["encoder"]), strict=False)
    assert set(result.missing_keys) == {k for k in all_keys if not k.startswith("encoder.")}
    assert not result.unexpected_keys
    assert all(torch.equal(v, student[k]) for k, v in model.state_dict().items() if k.startswith("encoder."))

    model = fresh()
    result = model.load_state_dict(load_file(files["encoder_decoder"]), strict=False)
    assert set(result.missing_keys) == {k for k in all_keys if k.startswith("segmentation_head.")}
    assert not result.unexpected_keys
    assert all(
        torch.equal(v, student[k])
        for k, v in model.state_dict().items()
        if not k.startswith("segmentation_head.")
    )

    loaded = smp.from_pretrained(str(files["smp"]))
    assert isinstance(loaded, smp.Unet)
    assert loaded.state_dict().keys() == student.keys()
    assert all(torch.equal(v, student[k]) for k, v in loaded.state_dict().items())

    meta = json.loads(files["meta"].read_text())
    assert meta == {
        "arch": "unet",
        "encoder": "resnet18",
        "in_channels": 3,
        "channel_names": None,  # the data names no channels (an RGB folder)
        "classes": 1,
        "branch": "student",
        "source": str(ckpt.resolve()),
        "step": 6,
    }
    with pytest.raises(DeconError, match="folder is not empty; pass --overwrite"):
        export(ckpt, tmp_path / "export")
    (tmp_path / "export" / "smp" / "my_notes.txt").write_text("my notes")  # beside smp's own files
    assert export(ckpt, tmp_path / "export", overwrite=True) == files
    assert (tmp_path / "export" / "smp" / "my_notes.txt").read_text() == "my notes"
    with pytest.raises(DeconError, match="holds the source checkpoint"):
        export(ckpt, ckpt.parent, overwrite=True)  # never into the folder it reads from
    plain = tmp_path / "plain"  # an unmarked folder holding export-like files is never overwritten
    plain.mkdir()
    (plain / "export.json").write_text("{}")
    with pytest.raises(DeconError, match="holds no export"):
        export(ckpt, plain, overwrite=True)
    assert (plain / "export.json").read_text() == "{}"


def test_cli_commands(reference, isic, tmp_path, capsys):
    from decon_med.cli_train import add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", str(reference(1) / "last.ckpt"), "--out", str(tmp_path / "w")])
    assert args.func(args) == 0
    assert (tmp_path / "w" / "encoder.safetensors").is_file()
    assert "encoder_decoder" in capsys.readouterr().out

    config = tmp_path / "pretrain.yaml"
    config.write_text(yaml.safe_dump(to_dict(make_cfg(isic, tmp_path / "run"))))
    args = parser.parse_args(["pretrain", str(config), "train.epochs=1", "--quiet"])
    assert args.resume is False and args.overwrite is False and args.overrides == ["train.epochs=1"]
