"""Nodata in stage 1: tiles mostly nodata are never sampled, the validity travels with each tile
(through the flips and rotations), and the denoiser's loss ignores whatever sits in invalid pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bdgf.config import RunConfig
from bdgf.data.scene import Scene, write_scene
from bdgf.data.synthetic import make_scene
from bdgf.data.tiles import TileDataset, random_augment_with_valid
from bdgf.diffusion.masking import AdaptiveModalityMasking
from bdgf.diffusion.schedules import NoiseSchedule
from bdgf.diffusion.step import diffusion_training_step
from bdgf.engine.pretrain import build_denoiser, tile_batches, tile_loader
from bdgf.errors import InputError
from bdgf.tiler import cover_origins

pytestmark = pytest.mark.usefixtures("one_thread")

TILE, THRESHOLD = 16, 0.5
CFG = RunConfig().with_overrides({
    "pretrain.tile_size": TILE, "pretrain.batch_size": 6, "pretrain.steps": 20,
    "pretrain.min_valid_fraction": THRESHOLD,
    "pretrain.unet": {"base_channels": 8, "channel_mults": [1, 2, 2]},
}).pretrain


def nodata_mask(h: int, w: int) -> np.ndarray:
    """(h, w) bool, True = nodata: a 3-px border, the top-right 20x20 corner and a disc inside."""
    rr, cc = np.mgrid[:h, :w]
    disc = (rr - 30) ** 2 + (cc - 18) ** 2 <= 6**2
    return (rr < 3) | (cc < 3) | (rr >= h - 3) | (cc >= w - 3) | ((rr < 20) & (cc >= w - 20)) | disc


def write_store(path, mask) -> str:
    scene = make_scene("tiny", 0)  # 48 x 48, HSI 16 + LiDAR 1
    for mod in scene.modalities.values():
        mod.data = mod.data.astype(np.float32)
        mod.data[:, mask] = np.nan
    write_scene(scene, path)
    return str(path)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    mask = nodata_mask(48, 48)
    return write_store(tmp_path_factory.mktemp("nodata") / "s.zarr", mask), mask


def test_tiles_under_the_threshold_are_never_sampled(store):
    path, mask = store
    origins = cover_origins(48, 48, TILE, TILE // 2)
    share = np.array([1 - mask[r : r + TILE, c : c + TILE].mean() for r, c in origins])
    assert (share < THRESHOLD).sum() >= 3 and (share >= THRESHOLD).sum() >= 3  # the threshold matters here

    data = TileDataset(path, TILE, min_valid_fraction=THRESHOLD)
    assert {tuple(o) for o in data.origins} == {tuple(o) for o, s in zip(origins, share) if s >= THRESHOLD}
    assert data.skipped == int((share < THRESHOLD).sum())
    for i in range(len(data)):  # each item carries its own validity, and the data is 0 where invalid
        r, c = data.origins[i]
        item = data[i]
        np.testing.assert_array_equal(item["valid"].numpy(), ~mask[r : r + TILE, c : c + TILE])
        assert item["tile"].shape == (17, TILE, TILE) and (item["tile"][:, ~item["valid"]] == 0).all()

    loader, generator = tile_batches([path], CFG, micro_batch=6)
    n = 0
    for batch in loader:
        x0, valid = random_augment_with_valid(batch["tile"], batch["valid"], generator)
        assert valid.dtype == torch.bool and valid.shape == (6, TILE, TILE)
        assert bool((valid.float().mean(dim=(1, 2)) >= THRESHOLD).all())
        # the same flip/rotation for both: the data is still 0 exactly where the validity says nodata
        assert (x0.permute(1, 0, 2, 3)[:, ~valid] == 0).all() and (x0.abs().sum(1)[valid] > 0).all()
        n += 1
    assert n == CFG.steps


class ZeroDenoiser(nn.Module):
    """Predicts x0 = 0 everywhere, so the per-modality loss is the mean of x0² (computable by hand)."""

    def __init__(self, channels: int):
        super().__init__()
        self.mask_embedding = nn.Parameter(torch.zeros(channels))

    def forward(self, x_t, t, present):
        return torch.zeros_like(x_t)


def _step(model, x0, valid, loss_kind="balanced"):
    mk = AdaptiveModalityMasking(2, warmup_steps=0)
    loss, logs = diffusion_training_step(model, NoiseSchedule(kind="cosine", num_timesteps=1000), mk, x0,
                                         torch.tensor([0] * 16 + [1]), torch.Generator().manual_seed(1),
                                         loss_kind=loss_kind, valid=valid)
    return loss.detach(), logs, mk


def test_the_loss_ignores_whatever_sits_in_invalid_pixels(store):
    path, _ = store
    batch = next(iter(tile_loader(path, CFG, num_samples=6, seed=2)))
    x0, valid = batch["tile"], batch["valid"]
    assert (~valid).any()  # some invalid pixels in the batch
    junk = x0.clone()
    noise = torch.randn(int((~valid).sum()), generator=torch.Generator().manual_seed(0))
    junk.permute(1, 0, 2, 3)[:, ~valid] = 50 * noise  # every band of every invalid pixel
    junk[0, :, ~valid[0]] = float("nan")
    torch.manual_seed(0)
    model, _, _ = build_denoiser(CFG, [16, 1])
    for kind in ("balanced", "concat"):
        loss, logs, mk = _step(model, x0, valid, kind)
        loss_junk, logs_junk, mk_junk = _step(model, junk, valid, kind)
        assert torch.equal(loss, loss_junk) and logs == logs_junk
        assert torch.equal(mk.dependence, mk_junk.dependence)
    # without the validity the junk counts (so the check above could fail)
    assert not torch.isclose(_step(model, junk.nan_to_num(0.0), None)[0], loss)


def test_the_loss_is_the_mean_over_valid_pixels(store):
    path, _ = store
    batch = next(iter(tile_loader(path, CFG, num_samples=6, seed=3)))
    x0, valid = batch["tile"].double().numpy(), batch["valid"].numpy()
    _, logs, _ = _step(ZeroDenoiser(17), batch["tile"], batch["valid"])
    hsi = np.mean([(x0[b, :16][:, valid[b]] ** 2).mean() for b in range(6)])
    lidar = np.mean([(x0[b, 16:][:, valid[b]] ** 2).mean() for b in range(6)])
    assert logs["loss/0"] == pytest.approx(hsi, rel=1e-5) and logs["loss/1"] == pytest.approx(lidar, rel=1e-5)
    assert logs["loss"] == pytest.approx((hsi + lidar) / 2, rel=1e-5)
    concat = np.mean([(x0[b][:, valid[b]] ** 2).mean() for b in range(6)])
    _, logs, _ = _step(ZeroDenoiser(17), batch["tile"], batch["valid"], "concat")
    assert logs["loss"] == pytest.approx(concat, rel=1e-5)


def test_a_store_with_no_usable_tile_is_refused(store, tmp_path):
    rr, cc = np.mgrid[:48, :48]
    path = write_store(tmp_path / "sparse.zarr", (cc % 4) != 0)  # every tile is 25 % valid
    assert Scene.open(path).valid.mean() == pytest.approx(0.25)
    with pytest.raises(InputError, match=r"sparse\.zarr.*50%.*min_valid_fraction = 0\.5"):
        tile_loader(path, CFG, num_samples=6, seed=0)
    with pytest.raises(InputError, match="min_valid_fraction"):
        tile_batches([store[0], path], CFG, micro_batch=2)
    # a lower threshold accepts it
    assert len(TileDataset(path, TILE, min_valid_fraction=0.2)) == 25
