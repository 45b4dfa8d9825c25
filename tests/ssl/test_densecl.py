"""DenseCL heads: queues, dense correspondence, the lambda warm-up, and the DeCon variants around them."""

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from decon_med.config import PretrainConfig, load_config
from decon_med.engine.export import export
from decon_med.engine.pretrain import pretrain
from decon_med.ssl import build_method
from decon_med.ssl.densecl import DenseCLHead, enqueue, info_nce, match_locations
from tests.ssl.test_pretrain_methods import cfg_for
from tests.ssl.test_pretrain_methods import isic as isic  # noqa: F401  (module fixture)
from tests.ssl.test_slotcon_decon import TINY, make_batch


def densecl_cfg(method: str, *extra: str) -> PretrainConfig:
    overrides = [*TINY, f"ssl.method={method}", "ssl.queue_size=16", "ssl.dense_warmup_steps=2", *extra]
    return load_config(None, overrides, schema=PretrainConfig)


def test_enqueue_wraps_around_the_ring_buffer():
    queue = torch.zeros(2, 5)
    ptr = torch.zeros((), dtype=torch.long)
    keys = torch.arange(1.0, 15.0).view(7, 2)  # key i = [2i+1, 2i+2]
    enqueue(queue, ptr, keys[:3])  # slots 0, 1, 2
    assert int(ptr) == 3
    enqueue(queue, ptr, keys[3:6])  # slots 3, 4, then wraps to 0
    assert int(ptr) == 1
    assert torch.equal(queue.t(), torch.stack([keys[5], keys[1], keys[2], keys[3], keys[4]]))
    enqueue(queue, ptr, keys)  # more keys than slots: the last five, continuing from the pointer
    assert int(ptr) == (1 + 5) % 5
    assert torch.equal(queue[:, 1], keys[2]) and torch.equal(queue[:, 0], keys[6])


def test_correspondence_finds_the_true_match_on_a_permuted_copy():
    torch.manual_seed(0)
    query = torch.randn(3, 16, 4, 5)
    perm = torch.randperm(20)
    key = query.flatten(2)[:, :, perm].view(3, 16, 4, 5)  # key location j holds query location perm[j]
    match = match_locations(query, key)
    # query location i sits at key location j with perm[j] == i
    assert torch.equal(perm[match], torch.arange(20).expand(3, -1))


def test_info_nce_matches_its_formula_and_is_high_against_a_copy_in_the_queue():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(4, 8), dim=1)
    k = F.normalize(q + 0.3 * torch.randn(4, 8), dim=1)
    queue = F.normalize(torch.randn(8, 6), dim=0)
    pos = torch.exp((q * k).sum(1) / 0.2)
    neg = torch.exp(q @ queue / 0.2).sum(1)
    assert torch.allclose(info_nce(q, k, queue, 0.2), (-torch.log(pos / (pos + neg))).mean())
    near = q.t().clone()
    assert info_nce(q, q, near, 0.2) > 0.6  # the positive is tied with a negative: at least log 2


def test_lambda_is_zero_during_warmup_then_dense_weight():
    head = DenseCLHead(8, dim_hidden=8, dim_out=4, queue_size=8, dense_weight=0.5, warmup_steps=2)
    seen = []
    for _ in range(4):
        seen.append(float(head.loss_lambda))
        head.update_teacher(0.999)
    assert seen == [0.0, 0.0, 0.5, 0.5]
    restored = DenseCLHead(8, dim_hidden=8, dim_out=4, queue_size=8, dense_weight=0.5, warmup_steps=2)
    restored.load_state_dict(head.state_dict())  # the step count travels with the checkpoint
    assert float(restored.loss_lambda) == 0.5 and int(restored.steps_done) == 4


def test_head_loss_mixes_global_and_dense_and_fills_the_queues():
    torch.manual_seed(0)
    head = DenseCLHead(8, dim_hidden=16, dim_out=4, queue_size=10, dense_weight=0.5, warmup_steps=1)
    s1, t2 = torch.randn(3, 8, 4, 4, requires_grad=True), torch.randn(3, 8, 4, 4)
    before = head.queue_global.clone()
    out = head(s1, None, None, t2)
    assert torch.allclose(out["loss"], out["global"])  # warm-up: lambda 0
    out["loss"].backward()
    assert s1.grad is not None and s1.grad.abs().sum() > 0
    assert int(head.ptr_global) == 3 and int(head.ptr_dense) == 3
    assert not torch.equal(head.queue_global[:, :3], before[:, :3])
    assert torch.equal(head.queue_global[:, 3:], before[:, 3:])
    head.update_teacher(0.999)
    out = head(s1, None, None, t2)
    assert torch.allclose(out["loss"], 0.5 * out["global"] + 0.5 * out["dense"])
    head.eval()
    head(s1, None, None, t2)
    assert int(head.ptr_global) == 6  # evaluation does not enqueue


def test_densecl_runs_one_view_per_encoder_and_trains_the_encoder_only():
    method = build_method(
        densecl_cfg("densecl", "ssl.momentum_schedule=constant", "ssl.teacher_momentum=0.999")
    )
    assert not method.symmetric and len(method.dec_heads) == 0
    calls = []
    method.network.encoder.register_forward_hook(lambda *_: calls.append("student"))
    method.teacher.encoder.register_forward_hook(lambda *_: calls.append("teacher"))
    out = method(make_batch())
    assert calls == ["student", "teacher"]  # no wasted pass
    out["loss"].backward()
    grads = {n for n, p in method.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("network.encoder.") for n in grads)
    assert not any(n.startswith(("network.decoder.", "teacher.")) for n in grads)
    assert method.after_step(0, 100)["momentum"] == pytest.approx(0.999)  # constant schedule
    assert method.after_step(99, 100)["momentum"] == pytest.approx(0.999)


def test_decon_densecl_levels_have_their_own_heads_and_queues():
    method = build_method(densecl_cfg("decon_ml_densecl", "ssl.alpha=0.5", "ssl.levels=[0, 4]"))
    heads = [method.enc_head, *method.dec_heads]
    assert len(heads) == 3
    assert len({id(h.queue_global) for h in heads}) == 3
    assert [h.global_head[2].in_features for h in heads] == [512, 256, 16]
    out = method(make_batch())
    for key in ("enc", "enc_global", "enc_dense", "dec0", "dec4", "dec"):
        assert key in out and torch.isfinite(out[key])
    assert torch.allclose(out["loss"], 0.5 * out["enc"] + 0.5 * (out["dec0"] + out["dec4"]) / 2)
    out["loss"].backward()
    assert method.network.decoder.blocks[0].conv1[0].weight.grad.abs().sum() > 0
    assert all(int(h.ptr_dense) == 4 for h in heads)


def test_a_queue_as_large_as_an_epoch_is_reported_once():
    method = build_method(
        densecl_cfg("decon_ml_densecl", "ssl.alpha=0.5", "ssl.levels=[0, 4]", "ssl.queue_size=16")
    )
    assert method.check_data(17) == []
    (message,) = method.check_data(16)  # three heads hold such a queue: one warning
    assert "ssl.densecl.queue_size 16" in message and "16 images" in message


def test_exported_decon_densecl_weights_load_into_smp(isic, tmp_path, capsys):  # noqa: F811
    run = pretrain(cfg_for(isic, tmp_path / "run", "decon_sl_densecl"), progress=False, max_steps=1)
    assert "warning" not in capsys.readouterr().err  # 6 keys per queue, 8 images per epoch
    pretrain(
        cfg_for(isic, tmp_path / "big", "decon_sl_densecl", "ssl.queue_size=8"), progress=False, max_steps=1
    )
    assert "warning: ssl.densecl.queue_size 8 is not smaller than the 8 images" in capsys.readouterr().err
    files = export(run / "last.ckpt", tmp_path / "export")
    model = smp.create_model("unet", encoder_name="resnet18", encoder_weights=None, classes=2)
    result = model.load_state_dict(load_file(files["encoder_decoder"]), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.startswith("segmentation_head.") for k in result.missing_keys)


def test_similarities_stay_fp32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    queries = F.normalize(torch.randn(64, 128, generator=g), dim=1)
    keys = F.normalize(queries + 0.3 * torch.randn(64, 128, generator=g), dim=1)
    queue = F.normalize(torch.randn(128, 512, generator=g), dim=0)
    maps = torch.randn(2, 32, 5, 5, generator=g)
    reference = info_nce(queries, keys, queue, 0.2), match_locations(maps, maps.flip(-1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, match = info_nce(queries, keys, queue, 0.2), match_locations(maps, maps.flip(-1))
    assert loss.dtype == torch.float32 and torch.allclose(loss, reference[0], rtol=0.0, atol=1e-6)
    assert torch.equal(match, reference[1])
