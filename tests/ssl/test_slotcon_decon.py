import pytest
import torch

from decon_med.config import PretrainConfig, load_config
from decon_med.errors import ConfigError
from decon_med.ssl import build_method
from decon_med.ssl.decon import DeCon
from decon_med.ssl.ema import cosine_momentum
from decon_med.ssl.slotcon import SlotConHead, align_to_overlap

TINY = [
    "model.encoder=resnet18",
    "data.image_size=64",
    "ssl.dim_hidden=64",
    "ssl.dim_out=32",
    "ssl.num_prototypes=16",
    "ssl.num_prototypes_dec=24",
    "ssl.dec_grid=8",
]


def tiny(method: str, *overrides: str) -> PretrainConfig:
    extra = [] if method == "slotcon" else ["ssl.alpha=0.5", "ssl.levels=[0, 1, 2, 3]"]
    return load_config(None, [f"ssl.method={method}", *TINY, *extra, *overrides], schema=PretrainConfig)


def make_batch(b: int = 4, size: int = 64, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "view1": torch.randn(b, 3, size, size, generator=g),
        "view2": torch.randn(b, 3, size, size, generator=g),
        "box1": torch.tensor([[0.1, 0.2, 0.9, 0.8]] * b),
        "box2": torch.tensor([[0.0, 0.1, 0.7, 1.0]] * b),
        "flip1": torch.tensor([True, False] * (b // 2)),
        "flip2": torch.tensor([False, True] * (b // 2)),
    }


def same_views(batch: dict) -> dict:
    out = dict(batch)
    out["view2"], out["box2"], out["flip2"] = batch["view1"], batch["box1"], batch["flip1"]
    return out


def test_align_to_overlap_undoes_flip_and_crop():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(2, 1, 1, 1)
    x[1] = x[1].flip(-1)  # second map is a mirrored view of the same content
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    aligned = align_to_overlap(x, full, torch.tensor([False, True]))
    torch.testing.assert_close(aligned[0], aligned[1])
    # the left half box resamples the left two columns to the full width
    half = align_to_overlap(x[:1], torch.tensor([[0.0, 0.0, 0.5, 1.0]]), torch.tensor([False]))
    assert half[0, 0, :, 0].tolist() < half[0, 0, :, -1].tolist()
    # one bilinear sample at each bin centre: the box spans map columns -0.5 .. 1.5 (pixel-centre coordinates)
    assert half[0, 0, 0].tolist() == pytest.approx([0.0, 0.25, 0.75, 1.25])


def test_identical_views_give_equal_aligned_score_maps():
    torch.manual_seed(0)
    head = SlotConHead(32, num_prototypes=8, dim_hidden=32, dim_out=16).eval()
    feats = torch.randn(2, 32, 6, 6)
    boxes = torch.tensor([[0.2, 0.1, 0.8, 0.9], [0.0, 0.0, 1.0, 1.0]])
    flips = torch.tensor([True, False])
    _, scores = head.grouping(head.projector(feats))
    torch.testing.assert_close(align_to_overlap(scores, boxes, flips), align_to_overlap(scores, boxes, flips))
    # a mirrored copy of the features with the flip flag set aligns to the same maps
    _, scores_flipped = head.grouping(head.projector(feats.flip(-1)))
    torch.testing.assert_close(
        align_to_overlap(scores, boxes, torch.tensor([False, False])),
        align_to_overlap(scores_flipped, boxes, torch.tensor([True, True])),
        atol=1e-5,
        rtol=1e-5,
    )


def test_slotcon_loss_parts_and_center():
    torch.manual_seed(0)
    method = build_method(tiny("slotcon")).train()
    assert isinstance(method, DeCon) and len(method.dec_heads) == 0
    out = method(make_batch())
    assert set(out) == {"loss", "enc", "enc_group", "enc_slot"}
    w = 0.5
    torch.testing.assert_close(out["loss"], w * out["enc_group"] + (1 - w) * out["enc_slot"])
    # group loss is a cross-entropy over 16 prototypes: about 2 * log(16) at initialisation
    assert 0.5 * 2 * torch.log(torch.tensor(16.0)) < out["enc_group"] < 2.5 * torch.log(torch.tensor(16.0))
    assert method.enc_head.center.abs().sum() > 0  # the centre moved


def test_decon_ml_parts_and_level_heads():
    torch.manual_seed(0)
    method = build_method(tiny("decon_ml", "ssl.skip_dropout=0.5")).train()
    out = method(make_batch())
    for level in (0, 1, 2, 3):
        assert {f"dec{level}", f"dec{level}_group", f"dec{level}_slot"} <= set(out)
    levels = torch.stack([out[f"dec{lv}"] for lv in range(4)])
    torch.testing.assert_close(out["dec"], levels.mean())
    torch.testing.assert_close(out["loss"], 0.5 * out["enc"] + 0.5 * out["dec"])
    assert [h.grouping.prototypes.num_embeddings for h in method.dec_heads] == [24] * 4
    assert method.enc_head.grouping.prototypes.num_embeddings == 16
    assert [h.projector.mlp[0].in_channels for h in method.dec_heads] == [256, 128, 64, 32]


def test_alpha_one_equals_encoder_only_loss():
    torch.manual_seed(0)
    slotcon = build_method(tiny("slotcon")).train()
    torch.manual_seed(0)
    decon = DeCon(
        build_method(tiny("slotcon")).network,
        lambda ch, is_dec: SlotConHead(ch, 24 if is_dec else 16, 64, 32),
        levels=[0, 1],
        alpha=1.0,
    ).train()
    decon.load_state_dict(slotcon.state_dict(), strict=False)
    batch = make_batch()
    torch.testing.assert_close(decon(batch)["loss"], slotcon(batch)["loss"])


def test_alpha_zero_gives_encoder_heads_no_gradient():
    torch.manual_seed(0)
    method = build_method(tiny("decon_ml", "ssl.alpha=0", "ssl.skip_dropout=0.5")).train()
    out = method(make_batch())
    assert "enc" not in out
    out["loss"].backward()
    assert all(p.grad is None for p in method.enc_head.parameters())
    assert method.network.encoder.conv1.weight.grad.abs().sum() > 0  # the encoder learns through the decoder
    assert all(p.grad is not None for p in method.dec_heads[0].projector.parameters())


def test_teacher_gets_no_gradient_and_moves_by_ema():
    torch.manual_seed(0)
    method = build_method(tiny("decon_sl", "ssl.levels=[-1]")).train()
    assert all(not p.requires_grad for p in method.teacher.parameters())
    assert not any(name.startswith("teacher.") for name, _ in method.trainable_parameters())
    assert not any("_t." in name for name, _ in method.trainable_parameters())
    before_t = method.teacher.encoder.conv1.weight.clone()
    optimizer = torch.optim.SGD([p for _, p in method.trainable_parameters()], lr=0.5)
    method(make_batch())["loss"].backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    optimizer.step()
    student = method.network.encoder.conv1.weight.detach().clone()
    info = method.after_step(step=0, total_steps=10)
    assert info["momentum"] == pytest.approx(0.99)
    torch.testing.assert_close(method.teacher.encoder.conv1.weight, 0.99 * before_t + 0.01 * student)
    head = method.dec_heads[0]
    torch.testing.assert_close(
        head.grouping_t.prototypes.weight.data.shape, head.grouping.prototypes.weight.shape
    )


def test_teacher_runs_without_dropout():
    torch.manual_seed(0)
    method = build_method(tiny("decon_ml", "ssl.skip_dropout=0.5")).train()
    from decon_med.models.network import features

    x = torch.randn(2, 3, 64, 64)
    method.teacher.eval()  # deterministic BN so that only dropout could make a difference
    calls = []
    hook = method.skip_dropout.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        features(method.teacher, x)
    assert calls == []
    method(make_batch())
    assert len(calls) > 0  # the student's skips go through it
    hook.remove()


def test_momentum_schedule():
    assert cosine_momentum(0, 100) == pytest.approx(0.99)
    assert cosine_momentum(50, 100) == pytest.approx(0.995)
    assert cosine_momentum(100, 100) == pytest.approx(1.0)
    values = [cosine_momentum(s, 100) for s in range(101)]
    assert values == sorted(values)


@pytest.mark.parametrize("method_name", ["slotcon", "decon_sl", "decon_ml"])
def test_loss_falls_when_overfitting_one_batch(method_name):
    torch.manual_seed(0)
    overrides = ["ssl.teacher_momentum=0.9"]
    if method_name == "decon_sl":
        overrides.append("ssl.levels=[-1]")
    if method_name == "decon_ml":
        overrides.append("ssl.skip_dropout=0.25")
    method = build_method(tiny(method_name, *overrides)).train()
    batch = make_batch(b=4, seed=1)
    optimizer = torch.optim.AdamW([p for _, p in method.trainable_parameters()], lr=1e-3)
    losses = []
    for step in range(12):
        out = method(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        method.after_step(step, 1000)
        losses.append(out["loss"].item())
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["ssl.method=byol"], "config key 'ssl.method': unknown method 'byol'"),
        (["ssl.method=decon_ml", "ssl.alpha=0.5", "ssl.levels=[0, 7]"], "level 7 is out of range for Unet"),
        (["ssl.method=decon_ml", "ssl.alpha=0.5", "ssl.skip_dropout=1.0"], "ssl.decoder.skip_dropout"),
        (["ssl.method=decon_ml", "ssl.alpha=0.5", "ssl.skip_dropout=-0.1"], "ssl.decoder.skip_dropout"),
        (["ssl.method=decon_sl", "ssl.alpha=1.0"], "config key 'ssl.decoder.alpha': must be < 1"),
        (["ssl.method=decon_sl", "ssl.alpha=0.5", "ssl.levels=[0, 1]"], "exactly one decoder level"),
        (["ssl.method=slotcon", "ssl.skip_dropout=0.5"], "ssl.decoder.skip_dropout"),
        (["ssl.method=decon_ml", "ssl.alpha=0.5", "ssl.levels=[1, -4]"], "names the same level twice"),
    ],
)
def test_bad_ssl_config_is_a_clear_error(overrides, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        cfg = load_config(None, [*TINY, *overrides], schema=PretrainConfig)
        build_method(cfg)
    assert fragment in str(info.value)
