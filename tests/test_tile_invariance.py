"""Tile invariance of the dense diffusion features: a pixel's features depend on the scene around
it, never on how the scene was cut into tiles (tile size, offset, halo >= R), and the receptive
radius R that the halo defaults to bounds the measured dependence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bdgf.diffusion.features import (LEVELS, FeatureSpec, aligned_halo, check_window, region_features,
                                     tile_features, window_features)
from bdgf.diffusion.schedules import NoiseSchedule
from bdgf.diffusion.unet import DenoiserUNet, UNetConfig
from bdgf.tiler import pad_block
from bdgf.tiler import TileGrid

C, M = 5, 2
CHANNEL_MODALITY = torch.tensor([0, 0, 0, 1, 1])


def _model(mults=(1, 2, 2), levels=(0, 1, 2), seed=0, std=None) -> DenoiserUNet:
    torch.manual_seed(seed)
    model = DenoiserUNet(UNetConfig(C, M, base_channels=8, channel_mults=mults, feature_levels=levels)).eval()
    if std is not None:  # larger weights than the init, so a far-reaching dependence cannot hide
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, std)
    return model


def _scene(h=70, w=62, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((C, h, w)).astype(np.float32)


def _reader(scene: np.ndarray):
    """read(r0, c0, h, w) -> (C, h, w): the scene reflect-padded past its grid, like Scene.read_window."""
    H, W = scene.shape[1:]

    def read(r0, c0, h, w):
        rr0, rr1, cc0, cc1 = max(r0, 0), min(r0 + h, H), max(c0, 0), min(c0 + w, W)
        block = scene[:, rr0:rr1, cc0:cc1]
        return pad_block(block, ((rr0 - r0, r0 + h - rr1), (cc0 - c0, c0 + w - cc1)), "reflect")
    return read


SPEC = FeatureSpec("test", (5, 120), 1, 7, tile_size=16, halo=28, reduce="concat")


def _stitch(model, schedule, scene, tile, offset, spec=SPEC, present=None):
    """Features of the whole scene from tiles of side ``tile`` whose grid starts at ``offset``
    (row, col): every tile computed on its own window, then pasted."""
    H, W = scene.shape[1:]
    read = _reader(scene)
    out = {}
    r_starts = list(range(offset[0] - tile, H, tile))
    c_starts = list(range(offset[1] - tile, W, tile))
    for r in r_starts:
        for c in c_starts:
            r0, c0 = max(r, 0), max(c, 0)
            r1, c1 = min(r + tile, H), min(c + tile, W)
            if r1 <= r0 or c1 <= c0:
                continue
            f = region_features(model, schedule, read, spec, r0, c0, r1 - r0, c1 - c0, present,
                                CHANNEL_MODALITY if present is not None else None)
            for name, v in f.items():
                out.setdefault(name, torch.zeros(v.shape[0], H, W))[:, r0:r1, c0:c1] = v
    return out


def test_receptive_radius_bounds_the_measured_dependence():
    """Perturb one input pixel: no feature pixel farther than R_l from it may change, at any
    stride phase, for several layouts; and R is tight enough that something at R_l - 4 changes."""
    torch.set_num_threads(1)
    for mults, levels in (((1, 2, 2), (0, 1, 2)), ((1, 2), (0, 1, 1)), ((1, 1, 2, 2), (0, 2, 3))):
        model = _model(mults, levels, std=0.3).double()
        radii = model.feature_radii()
        S = 128
        x = torch.randn(1, C, S, S, dtype=torch.float64)
        t, present = torch.tensor([10]), torch.ones(1, M)
        from bdgf.diffusion.features import level_maps

        base = level_maps(model.forward_with_features(x, t, present)[1], S)
        reach = {name: 0 for name in LEVELS}
        for col in range(60, 60 + model.config.tile_multiple):  # every stride phase
            x2 = x.clone()
            x2[..., 64, col] += 1.0
            moved = level_maps(model.forward_with_features(x2, t, present)[1], S)
            for name in LEVELS:
                changed = torch.nonzero((moved[name] - base[name]).abs().amax(dim=(0, 1)) > 1e-12)
                reach[name] = max(reach[name], int((changed - torch.tensor([64, col])).abs().max()))
        for name in LEVELS:
            assert reach[name] <= radii[name], (mults, name, reach, radii)
            assert reach[name] > radii[name] - 4 * model.config.tile_multiple, (mults, name, reach, radii)


@pytest.mark.parametrize("tile,offset", [(24, (0, 0)), (12, (5, 3)), (20, (1, 7)), (16, (2, 0))])
def test_features_do_not_depend_on_the_tiling(tile, offset):
    """Tilings of other tile sizes and offsets (not multiples of the stride) give the same
    features as the 16-px grid at the origin, to 1e-5, at every pixel (scene borders included)."""
    torch.set_num_threads(1)
    model, schedule, scene = _model(), NoiseSchedule(), _scene()
    ref = _stitch(model, schedule, scene, 16, (0, 0))
    other = _stitch(model, schedule, scene, tile, offset)
    for name in LEVELS:
        assert float((ref[name] - other[name]).abs().max()) < 1e-5, name


def test_absent_modality_features_do_not_depend_on_the_tiling():
    torch.set_num_threads(1)
    model, schedule, scene = _model(), NoiseSchedule(), _scene(40, 36)
    with torch.no_grad():
        model.mask_embedding.normal_()
    present = torch.tensor([1.0, 0.0])
    ref = _stitch(model, schedule, scene, 16, (0, 0), present=present)
    other = _stitch(model, schedule, scene, 12, (3, 5), present=present)
    full = _stitch(model, schedule, scene, 16, (0, 0))
    for name in LEVELS:
        assert float((ref[name] - other[name]).abs().max()) < 1e-5, name
        assert float((ref[name] - full[name]).abs().max()) > 1e-3, name  # absent really changes them


def test_tile_features_equal_region_features_and_any_batch():
    """The cache's path (tile_features on grid windows, batched) equals region_features."""
    torch.set_num_threads(1)
    model, schedule, scene = _model(), NoiseSchedule(), _scene(40, 36)
    grid = TileGrid(40, 36, SPEC.tile_size, SPEC.halo)
    read = _reader(scene)
    origins = grid.origins()
    corners = [grid.window(o)[:2] for o in origins]
    S = grid.window_size
    windows = torch.from_numpy(np.stack([read(r, c, S, S) for r, c in corners]))
    batched = tile_features(model, schedule, windows, corners, SPEC)
    for i, (r, c) in enumerate(origins):
        th, tw = grid.owned((r, c))
        alone = region_features(model, schedule, read, SPEC, int(r), int(c), th, tw)
        for name in LEVELS:
            diff = (batched[name][i, :, :th, :tw] - alone[name]).abs().max()
            assert float(diff) < 1e-5, (name, (r, c))


def test_a_halo_below_the_receptive_radius_or_off_phase_is_refused():
    model = _model()
    R, m = model.receptive_radius, model.config.tile_multiple
    assert aligned_halo(R, m) % m == 0 and aligned_halo(R, m) >= R
    with pytest.raises(ValueError, match="receptive radius"):
        check_window(model, aligned_halo(R, m) - m, 16)
    with pytest.raises(ValueError, match="multiples of 4"):
        check_window(model, R + 2 if (R + 2) % m else R + 1, 16)
    windows = torch.zeros(1, C, 16 + 2 * SPEC.halo, 16 + 2 * SPEC.halo)
    with pytest.raises(ValueError, match="stride phase"):
        window_features(model, NoiseSchedule(), windows, [(2, 0)], SPEC)


def test_the_old_design_was_not_tile_invariant():
    """The check above can fail: a window-wide statistic (GroupNorm-like, here a mean over the
    window added to the input) makes two tilings disagree by far more than 1e-5."""
    torch.set_num_threads(1)
    model, schedule, scene = _model(), NoiseSchedule(), _scene(40, 36)

    class WindowMean(torch.nn.Module):
        def forward(self, x):
            return x + x.mean(dim=(-2, -1), keepdim=True)

    model.conv_in = torch.nn.Sequential(WindowMean(), model.conv_in)
    ref = _stitch(model, schedule, scene, 16, (0, 0))
    other = _stitch(model, schedule, scene, 12, (3, 5))
    assert float((ref["low"] - other["low"]).abs().max()) > 1e-3
