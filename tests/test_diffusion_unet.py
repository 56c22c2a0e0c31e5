"""DenoiserUNet: shapes, decoder features, tile-size errors, conditioning on t and presence, and a
batch of one window equal to the same window in a batch of windows (no cross-sample statistics).
Tile invariance itself: tests/test_tile_invariance.py."""

import pytest
import torch

from bdgf.diffusion.unet import DenoiserUNet, UNetConfig


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: 1 thread beats 2 on a loaded 2-core box


def tiny(**kw):
    cfg = dict(in_channels=5, num_modalities=2, base_channels=16, channel_mults=(1, 2, 2))
    cfg.update(kw)
    torch.manual_seed(0)
    return DenoiserUNet(UNetConfig(**cfg)).eval()


def inputs(b=2, c=5, h=16, w=16, m=2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, c, h, w, generator=g), torch.tensor([3, 700][:b]), torch.ones(b, m)


def test_output_and_feature_shapes():
    net = tiny()
    x, t, p = inputs()
    y, feats = net.forward_with_features(x, t, p)
    assert y.shape == (2, 5, 16, 16)
    assert net.feature_channels == {"low": 16, "mid": 32, "high": 32}
    assert feats["low"].shape == (2, 16, 16, 16)
    assert feats["mid"].shape == (2, 32, 8, 8)
    assert feats["high"].shape == (2, 32, 4, 4)
    torch.testing.assert_close(net(x, t, p), y)
    assert net.mask_embedding.shape == (5,) and net.mask_embedding.requires_grad


def test_non_square_tile_and_deeper_net():
    net = tiny(channel_mults=(1, 1, 2, 2))
    x, t, p = inputs(h=16, w=24)
    y, feats = net.forward_with_features(x, t, p)
    assert y.shape == (2, 5, 16, 24)
    assert feats["high"].shape == (2, 32, 4, 6)  # default feature levels (0, 1, 2): 1/4 resolution


@pytest.mark.parametrize("hw", [(14, 16), (16, 18)])
def test_bad_tile_size_raises(hw):
    net = tiny()  # 3 levels: tiles must be multiples of 4
    x, t, p = inputs(h=hw[0], w=hw[1])
    with pytest.raises(ValueError, match="divisible by 4"):
        net(x, t, p)


def test_bad_shapes_raise():
    net = tiny()
    x, t, p = inputs()
    with pytest.raises(ValueError, match="x_t"):
        net(x[:, :4], t, p)
    with pytest.raises(ValueError, match="present"):
        net(x, t, torch.ones(2, 3))
    with pytest.raises(ValueError, match="even"):
        UNetConfig(in_channels=5, num_modalities=2, base_channels=13)


def test_presence_flags_and_timestep_change_output():
    net = tiny()
    x, t, p = inputs()
    with torch.no_grad():
        y_all = net(x, t, p)
        y_drop = net(x, t, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        y_t = net(x, torch.tensor([500, 10]), p)
    assert (y_all - y_drop).abs().amax(dim=(1, 2, 3)).min() > 1e-4  # every sample changes
    assert (y_all - y_t).abs().amax(dim=(1, 2, 3)).min() > 1e-4


def test_gradients_reach_every_parameter_but_mask_embedding():
    net = tiny().train()
    x, t, p = inputs()
    net(x, t, p).square().mean().backward()
    missing = [n for n, q in net.named_parameters() if q.grad is None and n != "mask_embedding"]
    assert missing == []


def test_torch_export():
    net = tiny()
    x, t, p = inputs()
    ep = torch.export.export(net, (x, t, p))
    torch.testing.assert_close(ep.module()(x, t, p), net(x, t, p))


def test_config_is_plain_data():
    import json
    from dataclasses import asdict

    cfg = tiny().config
    assert UNetConfig(**json.loads(json.dumps(asdict(cfg)))) == cfg
    with pytest.raises(ValueError, match="feature level"):
        UNetConfig(in_channels=5, num_modalities=2, channel_mults=(1, 2))  # no level 2 for "high"


def test_each_window_is_computed_on_its_own():
    """Per-pixel normalisation: a window's output does not depend on the other windows of the batch."""
    net = tiny()
    x, t, p = inputs()
    with torch.no_grad():
        together = net(x, t, p)
        alone = net(x[1:], t[1:], p[1:])
    torch.testing.assert_close(alone[0], together[1], atol=1e-5, rtol=1e-5)
