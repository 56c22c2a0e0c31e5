"""Dense diffusion features (DESIGN §1.3): the frozen denoiser over a tile's window.

Each tile of T×T pixels is seen through a window with a halo of h pixels on every side (cut by
:mod:`bdgf.tiler`), noised to a few timesteps with noise that depends only on the *global pixel
position* (so overlapping windows see the same noise and any batch size or worker count gives
the same features), passed once through the UNet, and the decoder activations at three depths
are upsampled to the window and cropped to the tile. One UNet pass serves every pixel of a tile;
never one pass per classified pixel. Where the features are kept (the scene store's cache) is
:mod:`bdgf.data.feature_cache`; the loop that fills it is :mod:`bdgf.engine.features`.

Glossary (letters as in docs/glossary.md)
    B   tiles in a batch                     C   input bands (all modalities)
    T   tile side                            h   halo
    S   T + 2h, the window side              F   stored channels of a level
    n_t timesteps                            n   n_t × draws noise inputs
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bdgf.diffusion.schedules import NoiseSchedule
from bdgf.diffusion.unet import DenoiserUNet
from bdgf.tiler import TileGrid, crop

LEVELS = ("low", "mid", "high")


@dataclass(frozen=True)
class FeatureSpec:
    checkpoint: str  # hash of the denoiser's weights
    timesteps: tuple[int, ...]
    draws: int
    noise_seed: int
    tile_size: int
    halo: int
    reduce: str  # "concat" | "mean"

    def channels(self, model: DenoiserUNet) -> dict[str, int]:
        per = model.feature_channels
        mult = len(self.timesteps) if self.reduce == "concat" else 1
        return {name: per[name] * mult for name in LEVELS}

    def as_dict(self) -> dict:
        d = asdict(self)
        d["timesteps"] = list(d["timesteps"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSpec":
        return cls(**{**d, "timesteps": tuple(int(t) for t in d["timesteps"])})

    def grid(self, height: int, width: int) -> TileGrid:
        """The tiles (side ``tile_size``, halo ``halo``) that partition an H×W grid."""
        return TileGrid(height, width, self.tile_size, self.halo)


# ----------------------------------------------------------------------------------------
# Position-keyed noise
# ----------------------------------------------------------------------------------------

_M32 = np.uint64(0xFFFFFFFF)


def _hash32(x: np.ndarray) -> np.ndarray:
    """A 32-bit integer mixer (xor-shift-multiply); x uint64 holding 32-bit values."""
    x = x & _M32
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & _M32
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & _M32
    x ^= x >> np.uint64(16)
    return x


def position_noise(seed: int, channels: int, row0: int, col0: int, height: int, width: int) -> np.ndarray:
    """Standard-normal noise (C, height, width) float32 for the window at global (row0, col0).

    A pure function of (seed, channel, row, column): the same pixel gets the same value in
    every tile that covers it. Box–Muller on two hashed uniforms.
    """
    off = np.uint64(1 << 20)  # rows/cols of reflect-padded halos may be negative
    c = np.arange(channels, dtype=np.uint64)[:, None, None]
    r = (np.arange(height, dtype=np.int64) + row0).astype(np.uint64)[None, :, None] + off
    q = (np.arange(width, dtype=np.int64) + col0).astype(np.uint64)[None, None, :] + off
    base = _hash32(_hash32(_hash32(np.uint64(seed & 0xFFFFFFFF) + c * np.uint64(0x9E3779B9)) + r) + q)
    u1 = (_hash32(base ^ np.uint64(0x68E31DA4)).astype(np.float64) + 0.5) / 4294967296.0
    u2 = (_hash32(base ^ np.uint64(0xB5297A4D)).astype(np.float64) + 0.5) / 4294967296.0
    return (np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)).astype(np.float32)


def draw_seed(spec: FeatureSpec, step_index: int, draw: int) -> int:
    """Seed of the position-keyed noise for timestep ``step_index`` and noise draw ``draw``."""
    return spec.noise_seed * 1_000_003 + step_index * 7919 + draw


def tile_noise(spec: FeatureSpec, channels: int, origins: Sequence[tuple[int, int]], size: int) -> np.ndarray:
    """(B, n, C, S, S) float32 noise, n = timesteps x draws (timestep-major), for the S×S windows
    whose global top-left corners are ``origins``."""
    return np.stack([
        np.stack([position_noise(draw_seed(spec, i, d), channels, r, c, size, size)
                  for i in range(len(spec.timesteps)) for d in range(spec.draws)])
        for r, c in origins
    ])


# ----------------------------------------------------------------------------------------
# One batch of tiles
# ----------------------------------------------------------------------------------------


def level_maps(feats: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """The decoder activations {level: (B, F_l, S/2^i, S/2^i)} upsampled (bilinear) to S×S."""
    out = {}
    for name in LEVELS:
        f = feats[name]
        if f.shape[-1] != size:
            f = F.interpolate(f, size=(size, size), mode="bilinear", align_corners=False)
        out[name] = f
    return out


@torch.no_grad()
def tile_features(model: DenoiserUNet, schedule: NoiseSchedule, windows: torch.Tensor,
                  origins: Sequence[tuple[int, int]], spec: FeatureSpec) -> dict[str, torch.Tensor]:
    """windows (B, C, S, S) clean normalised tiles with halo, origins their global top-left
    (row, col) -> {level: (B, F, T, T)} features of the tiles' centre T×T, float32."""
    B, C, S, _ = windows.shape
    device = windows.device
    h, T = spec.halo, spec.tile_size
    present = torch.ones(B, model.config.num_modalities, device=device)
    per_step = {name: [] for name in LEVELS}
    noise = torch.from_numpy(tile_noise(spec, C, origins, S)).to(device=device, dtype=windows.dtype)
    for i, step in enumerate(spec.timesteps):
        t = torch.full((B,), int(step), dtype=torch.int64, device=device)
        acc = {name: 0.0 for name in LEVELS}
        for d in range(spec.draws):
            x_t = schedule.add_noise(windows, noise[:, i * spec.draws + d], t)
            _, feats = model.forward_with_features(x_t, t, present)
            for name, f in level_maps(feats, S).items():
                acc[name] = acc[name] + crop(f, h, T) / spec.draws
        for name in LEVELS:
            per_step[name].append(acc[name])
    if spec.reduce == "concat":
        return {name: torch.cat(per_step[name], dim=1) for name in LEVELS}
    return {name: torch.stack(per_step[name]).mean(0) for name in LEVELS}
