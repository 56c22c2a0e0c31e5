"""Mamba block and branch: shapes, the centre-out scan order, causality, bidirectionality."""
import pytest
import torch

from bdgf.errors import InputError
from bdgf.models import MambaBlock, MambaBranch, MambaConfig, centre_out_order
from bdgf.models.mamba import BiMambaLayer

CFG = MambaConfig(d_model=8, n_layers=1, d_state=4, expand=2, d_conv=3, groups=2, gate_hidden=8)


def test_block_shape_and_bad_width():
    torch.manual_seed(0)
    blk = MambaBlock(8, d_state=4, expand=2, d_conv=3)
    assert blk(torch.randn(2, 9, 8)).shape == (2, 9, 8)
    with pytest.raises(InputError):
        blk(torch.randn(2, 9, 7))


@pytest.mark.parametrize("P", [1, 3, 5, 11])
def test_scan_order_is_centre_out_permutation(P):
    order = centre_out_order(P)
    assert sorted(order.tolist()) == list(range(P * P))
    c = P // 2
    assert order[0].item() == c * P + c
    d2 = [(i // P - c) ** 2 + (i % P - c) ** 2 for i in order.tolist()]
    assert d2 == sorted(d2)                                   # distance to the centre never decreases


def test_scan_order_ties_and_even_grid():
    # 3x3, flat indices 0..8, centre 4; then E(5), N(1), W(3), S(7), then NE(2), NW(0), SW(6), SE(8).
    assert centre_out_order(3).tolist() == [4, 5, 1, 3, 7, 2, 0, 6, 8]
    # 4x4 (the token grid of P = 9 at stride 2): the four cells around the centre first, NE, NW, SW, SE.
    order = centre_out_order(4).tolist()
    assert order[:4] == [6, 5, 9, 10] and sorted(order) == list(range(16))
    assert order[-4:] == [3, 0, 12, 15]                       # the corners last, NE, NW, SW, SE
    with pytest.raises(InputError):
        centre_out_order(0)


@pytest.mark.parametrize("P,stride,side", [(5, 1, 5), (5, 2, 2), (7, 2, 3), (11, 2, 5), (9, 2, 4)])
def test_token_grid_sides(P, stride, side):
    br = MambaBranch(3, 5, P, MambaConfig(d_model=8, n_layers=1, d_state=4, groups=2, gate_hidden=8,
                                          token_stride=stride))
    assert br.tokens(torch.randn(2, 3, P, P)).shape == (2, side * side, 8)


def test_token_stride_that_does_not_tile_the_patch_raises():
    with pytest.raises(InputError, match="token_stride"):
        MambaBranch(3, 5, 7, MambaConfig(d_model=8, groups=2, token_stride=3))   # (7 - 5) % 3 != 0
    with pytest.raises(InputError, match="token_stride"):
        MambaBranch(3, 5, 7, MambaConfig(d_model=8, groups=2, token_stride=0))


def _dep(f, x, src, dst):
    """Does output token dst change when input token src changes?"""
    x2 = x.clone()
    x2[:, src] += torch.randn(x.shape[-1])
    return not torch.equal(f(x)[:, dst], f(x2)[:, dst])


def test_block_is_causal_and_layer_is_bidirectional():
    torch.manual_seed(0)
    x = torch.randn(1, 6, 8)
    blk = MambaBlock(8, d_state=4, expand=2, d_conv=3)
    with torch.no_grad():
        assert _dep(blk, x, 0, 5) and not _dep(blk, x, 5, 0)   # one direction only
        layer = BiMambaLayer(CFG)
        assert _dep(layer, x, 0, 5) and _dep(layer, x, 5, 0)   # both directions


def test_branch_centre_token_sees_corners_and_mid_gates():
    torch.manual_seed(0)
    br = MambaBranch(3, 5, 5, CFG)
    patch, mid = torch.randn(2, 3, 5, 5), torch.randn(2, 5, 5, 5)
    with torch.no_grad():
        z = br(patch, mid)
        assert z.shape == (2, 8)
        p2 = patch.clone()
        p2[:, :, 0, 0] += 1.0                                   # last-but-few in the scan
        assert not torch.allclose(z, br(p2, mid), atol=1e-6)
        g = br.gates(mid)
        assert g.shape == (2, 1, 8) and torch.equal(g[..., :4], g[..., :1].expand(-1, -1, 4))
        assert not torch.allclose(z, br(patch, mid + 1.0), atol=1e-6)
    with pytest.raises(InputError):
        br(patch, torch.randn(2, 4, 5, 5))
    with pytest.raises(InputError):
        MambaBranch(3, 5, 5, MambaConfig(d_model=8, groups=3))


def test_centre_and_mean_equals_the_full_layer_output():
    """The last layer projects only the two rows z reads; that is exact."""
    torch.manual_seed(0)
    layer = BiMambaLayer(CFG).double()
    x = torch.randn(3, 9, 8, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x)
        rows = layer.centre_and_mean(x)
    torch.testing.assert_close(rows[:, 0], full[:, 0])
    torch.testing.assert_close(rows[:, 1], full.mean(dim=1))


def test_block_under_bf16_autocast_and_bf16_params():
    torch.manual_seed(0)
    blk = MambaBlock(8, d_state=4, expand=2, d_conv=3)
    x = torch.randn(2, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(blk(x)).all()
    assert blk.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16
