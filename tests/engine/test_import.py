"""``decon-med import``: published ResNet checkpoints in their official layouts become export folders.

Each test builds a checkpoint in an official layout from a randomly initialised ResNet (no download), imports it,
compares every tensor of the imported encoder with the source (exactly), and loads the folder with ``init=``.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file

from decon_med.cli import main
from decon_med.cli_import import FORMATS as CLI_FORMATS
from decon_med.config import ModelConfig
from decon_med.engine.importer import FORMATS, import_weights
from decon_med.engine.transfer import load_init
from decon_med.errors import DataError
from decon_med.folders import EXPORT_MARKER
from decon_med.models.network import build_network


def _resnet(arch: str, seed: int) -> dict[str, torch.Tensor]:
    """A torchvision ResNet state dict with every float tensor random (BN statistics included)."""
    torch.manual_seed(seed)
    state = getattr(torchvision.models, arch)(weights=None).state_dict()
    for tensor in state.values():
        if tensor.is_floating_point():
            tensor.normal_()
    return {k: v.clone() for k, v in state.items()}


def _backbone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Without the classifier (fc), as the self-supervised encoders are saved."""
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def _check_import(out, expected: dict[str, torch.Tensor], encoder: str, arch: str = "unet"):
    """The imported encoder equals ``expected`` tensor for tensor, and loads with init= into a fresh network."""
    assert (out / EXPORT_MARKER).is_file()
    meta = json.loads((out / "export.json").read_text())
    assert meta["encoder"] == encoder and meta["in_channels"] == 3
    saved = load_file(str(out / "encoder.safetensors"))
    assert sorted(saved) == sorted(f"encoder.{k}" for k in expected)
    for key, tensor in expected.items():
        assert saved[f"encoder.{key}"].dtype == tensor.dtype
        assert torch.equal(saved[f"encoder.{key}"], tensor), key
    net = build_network(ModelConfig(arch=arch, encoder=encoder), in_channels=3, classes=2)
    report = load_init(net, out, "encoder", arch=arch, encoder=encoder, in_channels=3)
    loaded = net.encoder.state_dict()
    for key, tensor in expected.items():
        assert torch.equal(loaded[key], tensor), key
    assert len(report["loaded"]) == len(expected)
    return meta


def test_cli_lists_the_importer_formats():
    assert CLI_FORMATS == FORMATS


def test_slotcon_full_checkpoint_imports_the_teacher(tmp_path):
    # Layout of CVMI-Lab/SlotCon main_pretrain.py save_checkpoint: {'args', 'model': DDP state dict, 'optimizer',
    # 'scheduler', 'epoch', 'scaler'}; models/slotcon.py names the student encoder_q and the EMA teacher encoder_k
    # (ResNet with head_type='early_return': no fc), and transfer/segmentation/convert_pretrain_to_mm.py keeps the
    # 'module.encoder_k.' entries.
    student, teacher = _backbone(_resnet("resnet50", 0)), _backbone(_resnet("resnet50", 1))
    model = {f"module.encoder_q.{k}": v for k, v in student.items()}
    model |= {f"module.encoder_k.{k}": v for k, v in teacher.items()}
    model |= {
        "module.center": torch.zeros(1, 256),
        "module.projector_q.mlp.0.weight": torch.randn(64, 2048, 1, 1),
        "module.projector_k.mlp.0.weight": torch.randn(64, 2048, 1, 1),
        "module.grouping_k.slot_embed.weight": torch.randn(256, 256),
        "module.predictor_slot.mlp.0.weight": torch.randn(64, 256),
    }
    ckpt = {
        "args": argparse.Namespace(arch="resnet50", dataset="COCO", epochs=800, fp16=True),
        "model": model,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "scheduler": {"last_epoch": 10},
        "epoch": 800,
        "scaler": {"scale": 65536.0, "_growth_tracker": 0},
    }
    src = tmp_path / "ckpt_epoch_800.pth"
    torch.save(ckpt, src)
    files = import_weights(src, tmp_path / "slotcon")
    assert "encoder_decoder" not in files
    meta = _check_import(tmp_path / "slotcon", teacher, "resnet50")
    assert meta["format"] == "slotcon" and meta["branch"] == "teacher" and meta["arch"] is None


def test_slotcon_backbone_only_file(tmp_path):
    # convert_pretrain_to_mm.py writes {'state_dict': {<encoder_k keys without the prefix>}}
    teacher = _backbone(_resnet("resnet18", 2))
    src = tmp_path / "slotcon_backbone.pth"
    torch.save({"state_dict": teacher}, src)
    import_weights(src, tmp_path / "out", fmt="slotcon")
    meta = _check_import(tmp_path / "out", teacher, "resnet18")
    assert meta["branch"] == "teacher"


def test_densecl_openselfsup_checkpoint_imports_the_student(tmp_path):
    # Layout of WXinlong/DenseCL openselfsup/models/densecl.py (encoder_q = Sequential(backbone, neck),
    # encoder_k likewise, self.backbone = encoder_q[0], queues as buffers) saved by mmcv as {'meta', 'state_dict',
    # 'optimizer'}; tools/extract_backbone_weights.py keeps the 'backbone' entries.
    student, key_encoder = _backbone(_resnet("resnet50", 3)), _backbone(_resnet("resnet50", 4))
    state = {f"encoder_q.0.{k}": v for k, v in student.items()}
    state |= {
        "encoder_q.1.mlp.0.weight": torch.randn(64, 2048),
        "encoder_q.1.mlp2.0.weight": torch.randn(64, 2048, 1, 1),
    }
    state |= {f"encoder_k.0.{k}": v for k, v in key_encoder.items()}
    state |= {f"backbone.{k}": v for k, v in student.items()}
    state |= {
        "queue": torch.randn(128, 16),
        "queue_ptr": torch.zeros(1, dtype=torch.long),
        "queue2": torch.randn(128, 16),
    }
    src = tmp_path / "epoch_800.pth"
    torch.save(
        {"meta": {"epoch": 800, "iter": 1000, "mmcv_version": "1.0"}, "state_dict": state, "optimizer": {}},
        src,
    )
    import_weights(src, tmp_path / "out")
    meta = _check_import(tmp_path / "out", student, "resnet50")
    assert meta["format"] == "densecl" and meta["branch"] == "student"


def test_densecl_extracted_backbone(tmp_path):
    # tools/extract_backbone_weights.py: dict(state_dict=<backbone keys without 'backbone.'>, author="DenseCL")
    student = _backbone(_resnet("resnet18", 5))
    src = tmp_path / "densecl_r18.pth"
    torch.save({"state_dict": student, "author": "DenseCL"}, src)
    import_weights(src, tmp_path / "out")
    assert _check_import(tmp_path / "out", student, "resnet18", arch="fcn")["format"] == "densecl"


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_state_dict_drops_fc(tmp_path, arch):
    state = _resnet(arch, 6)
    src = tmp_path / f"{arch}.pth"
    torch.save(state, src)
    import_weights(src, tmp_path / "out", fmt="torchvision")
    meta = _check_import(tmp_path / "out", _backbone(state), arch)
    assert meta["branch"] is None


def test_timm_resnet_state_dict(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(7)
    state = {k: v.clone() for k, v in timm.create_model("resnet18", pretrained=False).state_dict().items()}
    src = tmp_path / "timm_resnet18.safetensors"
    save_file(state, str(src))
    import_weights(src, tmp_path / "out", fmt="timm")
    assert _check_import(tmp_path / "out", _backbone(state), "resnet18")["format"] == "timm"


def test_decon_export_folder_is_copied_with_its_decoder(tmp_path):
    torch.manual_seed(8)
    net = build_network(ModelConfig(arch="unet", encoder="resnet18"), classes=2)
    state = net.state_dict()
    src = tmp_path / "export"
    src.mkdir()
    save_file({k: v for k, v in state.items() if k.startswith("encoder.")}, str(src / "encoder.safetensors"))
    both = {k: v.contiguous() for k, v in state.items() if k.startswith(("encoder.", "decoder."))}
    save_file(both, str(src / "encoder_decoder.safetensors"))
    (src / "export.json").write_text(json.dumps({"arch": "unet", "encoder": "resnet18", "in_channels": 3}))
    files = import_weights(src, tmp_path / "out")
    assert set(files) == {"encoder", "encoder_decoder", "meta"}
    copied = load_file(str(files["encoder_decoder"]))
    assert set(copied) == set(both) and all(torch.equal(copied[k], both[k]) for k in both)
    fresh = build_network(ModelConfig(arch="unet", encoder="resnet18"), classes=2)
    report = load_init(fresh, tmp_path / "out", "encoder_decoder", arch="unet", encoder="resnet18")
    assert all(torch.equal(fresh.state_dict()[k], both[k]) for k in both)
    assert report["missing"] and all(k.startswith("segmentation_head.") for k in report["missing"])


def test_unknown_layout_is_refused_with_its_first_keys(tmp_path):
    src = tmp_path / "vit.pth"
    torch.save(
        {"model": {"cls_token": torch.zeros(1, 1, 8), "blocks.0.attn.qkv.weight": torch.zeros(24, 8)}}, src
    )
    with pytest.raises(DataError) as info:
        import_weights(src, tmp_path / "out")
    message = str(info.value)
    assert message.startswith(str(src)) and "model.cls_token" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_extra_keys_are_refused(tmp_path):
    state = _backbone(_resnet("resnet18", 9)) | {"layer5.0.conv1.weight": torch.zeros(1)}
    src = tmp_path / "odd.pth"
    torch.save(state, src)
    with pytest.raises(DataError, match=r"keys the encoder lacks: layer5\.0\.conv1\.weight"):
        import_weights(src, tmp_path / "out")


def test_pickled_code_is_not_loaded(tmp_path):
    src = tmp_path / "unsafe.pth"
    torch.save({"model": _backbone(_resnet("resnet18", 10)), "extra": torch.nn.ReLU()}, src)
    with pytest.raises(DataError, match="weights_only"):
        import_weights(src, tmp_path / "out")


def test_cli_import_and_errors(tmp_path, capsys):
    state = _resnet("resnet18", 11)
    src = tmp_path / "r18.pth"
    torch.save(state, src)
    assert main(["import", str(src), "--out", str(tmp_path / "out")]) == 0
    assert "encoder=resnet18" in capsys.readouterr().out
    _check_import(tmp_path / "out", _backbone(state), "resnet18")
    assert main(["import", str(src), "--out", str(tmp_path / "out")]) == 2  # not empty, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["import", str(src), "--out", str(tmp_path / "out"), "--overwrite"]) == 0
    # a plain backbone is read as DenseCL's extracted file when the format says so
    assert main(["import", str(src), "--out", str(tmp_path / "x"), "--format", "densecl"]) == 0
    assert main(["import", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "y")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
