import pytest
import segmentation_models_pytorch as smp
import torch
from torch import nn

from decon_med.config import ModelConfig
from decon_med.errors import ConfigError
from decon_med.models.heads import MLP, MLP2d, SemanticGrouping
from decon_med.models.network import FCN, build_network, features, level_channels

EXPECTED = {
    # arch: (decoder channels, decoder spatial sizes at 64 px)
    "unet": ([256, 128, 64, 32, 16], [4, 8, 16, 32, 64]),
    "fpn": ([256, 256, 256, 256, 128], [2, 4, 8, 16, 16]),
    "fcn": ([256], [4]),
}


@pytest.mark.parametrize("arch", ["unet", "fpn", "fcn"])
def test_feature_shapes(arch):
    torch.manual_seed(0)
    net = build_network(ModelConfig(arch=arch, encoder="resnet18"), in_channels=3, classes=2)
    enc, dec = features(net, torch.randn(2, 3, 64, 64))
    assert [f.shape[1] for f in enc] == [64, 64, 128, 256, 512]
    enc_sizes = [f.shape[-1] for f in enc]
    assert enc_sizes == ([32, 16, 8, 4, 2] if arch != "fcn" else [32, 16, 8, 4, 4])  # FCN: dilated, stride 16
    channels, sizes = EXPECTED[arch]
    assert [f.shape[1] for f in dec] == channels
    assert [f.shape[-1] for f in dec] == sizes
    assert level_channels(net) == ([64, 64, 128, 256, 512], channels)
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 2, 64, 64)


def test_last_decoder_level_feeds_the_head():
    torch.manual_seed(0)
    for arch in ("unet", "fpn", "fcn"):
        net = build_network(ModelConfig(arch=arch, encoder="resnet18"), classes=3).eval()
        x = torch.randn(1, 3, 64, 64)
        _, dec = features(net, x)
        torch.testing.assert_close(net.segmentation_head(dec[-1]), net(x))


def test_features_do_not_keep_hooks():
    net = build_network(ModelConfig(arch="unet", encoder="resnet18"))
    features(net, torch.randn(1, 3, 64, 64))
    assert all(not block._forward_hooks for block in net.decoder.blocks)


@pytest.mark.parametrize("arch", ["unet", "fpn"])
def test_skip_dropout_touches_only_skips(arch):
    torch.manual_seed(0)
    net = build_network(ModelConfig(arch=arch, encoder="resnet18")).train()
    x = torch.randn(2, 3, 64, 64)
    drop = nn.Dropout2d(0.5)
    state = torch.random.get_rng_state()
    enc_plain, dec_plain = features(net, x)
    torch.random.set_rng_state(state)
    enc_drop, dec_drop = features(net, x, skip_dropout=drop)
    # the encoder path and the deepest level (the decoder's input) are never dropped
    for a, b in zip(enc_plain, enc_drop, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if arch == "fpn":  # p5 sees only the deepest level: unchanged
        torch.testing.assert_close(dec_plain[0], dec_drop[0], rtol=0, atol=0)
    # every level fed by a skip connection changes
    assert not torch.allclose(dec_plain[-1], dec_drop[-1])
    # in eval mode dropout is inactive
    net.eval()
    drop.eval()
    _, dec_eval = features(net, x)
    _, dec_eval_drop = features(net, x, skip_dropout=drop)
    torch.testing.assert_close(dec_eval[-1], dec_eval_drop[-1], rtol=0, atol=0)


def test_fcn_is_an_smp_model_that_round_trips(tmp_path):
    torch.manual_seed(0)
    model = FCN("resnet18", classes=3).eval()
    model.save_pretrained(tmp_path / "fcn")
    again = smp.from_pretrained(tmp_path / "fcn").eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model(x), again(x))
    convs = [m for m in model.decoder.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.dilation) for c in convs] == [(256, (6, 6)), (256, (6, 6))]


def test_local_encoder_weights(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = build_network(ModelConfig(arch="unet", encoder="resnet18"))
    weights = {f"encoder.{k}": v.contiguous() for k, v in source.encoder.state_dict().items()}
    save_file(weights, tmp_path / "enc.safetensors")
    net = build_network(
        ModelConfig(arch="fpn", encoder="resnet18", encoder_weights=str(tmp_path / "enc.safetensors"))
    )
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(net.encoder.state_dict()[key], value)
    wrong = build_network(ModelConfig(arch="unet", encoder="resnet34"))
    save_file(
        {k: v.contiguous() for k, v in wrong.encoder.state_dict().items()}, tmp_path / "r34.safetensors"
    )
    with pytest.raises(ConfigError, match="does not match encoder"):
        build_network(
            ModelConfig(arch="unet", encoder="resnet18", encoder_weights=str(tmp_path / "r34.safetensors"))
        )


def test_heads_shapes_and_grouping():
    torch.manual_seed(0)
    assert MLP(32, 64, 16)(torch.randn(5, 32)).shape == (5, 16)
    assert MLP2d(32, 64, 16)(torch.randn(2, 32, 3, 3)).shape == (2, 16, 3, 3)
    grouping = SemanticGrouping(num_prototypes=8, dim=16, temp=0.07)
    x = torch.randn(2, 16, 5, 5)
    slots, scores = grouping(x)
    assert slots.shape == (2, 8, 16) and scores.shape == (2, 8, 5, 5)
    assert scores.abs().max() <= 1.0 + 1e-5  # cosine similarities
    # a slot is a convex combination of pixel features: inside their range
    assert (slots.amax(1) <= x.flatten(2).amax(-1) + 1e-5).all()
