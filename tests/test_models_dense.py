"""Dense stage-2 inference: every branch's ``dense`` and ``BDGFClassifier.predict_dense`` equal the
patch-wise path at EVERY pixel of a random tile (float64, 1e-5), for odd P, both token strides and
chunk sizes that do not divide the tile; the per-tile intermediates stay far below the unfolded
patches; shape errors are InputErrors."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from bdgf.errors import InputError
from bdgf.models import BDGFClassifier, ClassifierConfig, CNNConfig, MambaConfig, TransformerConfig
from helpers import C, FH, FL, FM, K

T = 8  # tile side of most tests


def _model(P, stride=2, branches=("cnn", "mamba", "transformer"), depth=2, num_blocks=1, in_channels=C):
    cfg = ClassifierConfig(
        in_channels=in_channels, feature_channels={"low": FL, "mid": FM, "high": FH}, num_classes=K,
        patch_size=P, branches=branches,
        cnn=CNNConfig(width=8, low_width=4, num_blocks=num_blocks),
        mamba=MambaConfig(d_model=8, n_layers=2, d_state=4, expand=2, d_conv=3, groups=2, gate_hidden=8,
                          token_stride=stride),
        transformer=TransformerConfig(dim=8, depth=depth, heads=2, mlp_ratio=2, token_stride=stride),
    )
    torch.manual_seed(P * 10 + stride)
    return BDGFClassifier(cfg).double().eval()


def _region(P, rows=T, cols=T, batch=2, seed=0, in_channels=C):
    """(region, low, mid, high) of a tile of rows x cols pixels: (batch, channels, rows+2r, cols+2r)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, c, rows + P - 1, cols + P - 1, generator=g, dtype=torch.float64)
                 for c in (in_channels, FL, FM, FH))


def _patches(x, P):
    """(B, channels, rows, cols) -> (B * windows, channels, P, P), windows row-major: the P x P
    patch centred on every pixel of the tile, cut independently of the code under test."""
    B, Ch, rows, cols = x.shape
    out = [x[b, :, i : i + P, j : j + P] for b in range(B) for i in range(rows - P + 1) for j in range(cols - P + 1)]
    return torch.stack(out)


def _as_map(values, B, rows, cols):
    """(B * rows * cols, channels) row-major -> (B, channels, rows, cols)."""
    return values.view(B, rows, cols, -1).permute(0, 3, 1, 2)


FEATURE = {"cnn": 1, "mamba": 2, "transformer": 3}


@pytest.mark.parametrize("P,stride", [(5, 2), (7, 2), (5, 1), (7, 1), (9, 2)])
@pytest.mark.parametrize("branch", ["cnn", "mamba", "transformer"])
def test_branch_dense_equals_patchwise_at_every_pixel(branch, P, stride):
    model = _model(P, stride)
    br = model.branches[branch]
    x = _region(P)
    f = x[FEATURE[branch]]
    with torch.no_grad():
        want = _as_map(br(_patches(x[0], P), _patches(f, P)), 2, T, T)
        got = br.dense(x[0], f) if branch == "cnn" else br.dense(x[0], f, chunk_pixels=7)  # 7 does not divide 64
    assert got.shape == (2, br.out_dim, T, T)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 13, 64, 1000])
@pytest.mark.parametrize("P", [5, 7])
def test_predict_dense_equals_predict_at_every_pixel(P, chunk):
    model = _model(P)
    x = _region(P, seed=P)
    with torch.no_grad():
        want = _as_map(model.predict(*(_patches(t, P) for t in x)), 2, T, T)
        got = model.predict_dense(*x, chunk_pixels=chunk)
    assert got.shape == (2, K, T, T)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.sum(1), torch.ones(2, T, T, dtype=torch.float64))


def test_predict_dense_non_square_region_and_branch_subset_in_float32():
    P = 7
    model = _model(P, branches=("mamba", "transformer")).float()
    x = tuple(t.float() for t in _region(P, rows=5, cols=9, batch=1, seed=3))
    with torch.no_grad():
        want = _as_map(model.predict(*(_patches(t, P) for t in x)), 1, 5, 9)
        got = model.predict_dense(x[0], None, x[2], x[3], chunk_pixels=10)
    assert got.shape == (1, K, 5, 9)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cnn_window_pooling_with_v_greater_than_one():
    """P = 9 and one block leave a V = 5 window: the dense form's pooling is a real 5 x 5 average
    (not the identity), and it equals the patch-wise mean at every pixel."""
    P = 9
    model = _model(P, branches=("cnn",), num_blocks=1)
    cnn = model.branches["cnn"]
    V = P - 2 * (1 + len(cnn.blocks))
    assert V == 5
    x = _region(P, seed=5)
    with torch.no_grad():
        unpooled = cnn._maps(x[0], x[1])                     # (2, D, T+V-1, T+V-1) before pooling
        dense = cnn.dense(x[0], x[1])
        want = _as_map(cnn(_patches(x[0], P), _patches(x[1], P)), 2, T, T)
    assert unpooled.shape[-1] == T + V - 1
    torch.testing.assert_close(dense, want, rtol=1e-5, atol=1e-5)
    # the pooled value differs from the window's centre value: pooling is not the identity
    centre = unpooled[..., V // 2 : V // 2 + T, V // 2 : V // 2 + T]
    assert not torch.allclose(dense, centre, atol=1e-3)
    torch.testing.assert_close(dense[..., 2, 3], unpooled[..., 2 : 2 + V, 3 : 3 + V].mean(dim=(-2, -1)))


def test_transformer_last_block_class_token_only_is_exact():
    """The last block computes the class token alone; the full block's class row is the same."""
    br = _model(7).branches["transformer"]
    block = br.blocks[-1]
    g = torch.Generator().manual_seed(4)
    L = br.grid_side ** 2
    x = torch.randn(3, L + 1, 8, generator=g, dtype=torch.float64)
    h = torch.randn(3, L, 8, generator=g, dtype=torch.float64)
    pos = torch.cat([torch.zeros(1, 8, dtype=torch.float64), br.pos])
    with torch.no_grad():
        full = block(x, block.self_qkv(x), block.high_kv(h), pos, br.high_pos)
        cls = block(x, block.self_qkv(x, 1), block.high_kv(h), pos, br.high_pos, cls_only=True)
    assert full.shape == (3, L + 1, 8) and cls.shape == (3, 1, 8)
    torch.testing.assert_close(cls[:, 0], full[:, 0])


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _largest_intermediate(model, x, chunk):
    with torch.no_grad(), _LargestTensor() as rec:
        model.predict_dense(*x, chunk_pixels=chunk)
    return rec.largest


def test_per_tile_memory_is_bounded_by_the_chunk_not_by_patches():
    P, bands, tile = 7, 40, 16
    model = _model(P, in_channels=bands)
    x = _region(P, rows=tile, cols=tile, batch=1, in_channels=bands)
    unfolded = tile * tile * bands * P * P                   # what the patch-wise path feeds in
    small, large = _largest_intermediate(model, x, 16), _largest_intermediate(model, x, tile * tile)
    assert small < unfolded / 8, (small, unfolded)
    assert small < large                                     # the chunk, not the tile, bounds the mixing


def test_dense_shape_errors_are_input_errors():
    P = 5
    model = _model(P)
    region, low, mid, high = _region(P)
    bad = [
        (region[:, :2], low, mid, high),                     # wrong band count
        (region, low[:, :2], mid, high),                     # wrong feature channels
        (region, low, mid[..., :-1], high),                  # feature map not the region's size
        (region, low, mid, high[:1]),                        # batch mismatch
        (region[..., :4, :4], low[..., :4, :4], mid[..., :4, :4], high[..., :4, :4]),  # smaller than P
        (region[0], low, mid, high),                         # missing batch axis
        (region, None, mid, high),                           # a used branch without its features
    ]
    for args in bad:
        with pytest.raises(InputError):
            model.predict_dense(*args)
    with pytest.raises(InputError, match="chunk_pixels"):
        model.predict_dense(region, low, mid, high, chunk_pixels=0)
