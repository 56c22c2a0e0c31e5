"""Position-keyed noise, numpy only (no torch): feature extraction, the pipeline, export and every
back end of :mod:`bdgf.backends` draw it from here, so a window at the same place in the scene
sees the same noise whoever computes it, and the ONNX Runtime path runs without importing torch.

    spec = NoiseSpec(timesteps=(5, 100), draws=1, noise_seed=0)   # or a FeatureSpec: same fields
    noise = tile_noise(spec, C, corners, S)                       # (B, n, C, S, S) float32

A value is a pure function of (seed, channel, row, column) in the scene's pixel grid: the same
pixel gets the same value in every tile that covers it, at any batch size or worker count.
:func:`bdgf.diffusion.features.window_features` noises windows with it; the exported graph takes
it as its ``noise`` input (:mod:`bdgf.export`).

Glossary (letters as in docs/glossary.md): B batch of windows, C bands, S window side, n = n_t × draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

class NoiseKey(Protocol):
    """What the noise of a window depends on besides its position: :class:`NoiseSpec`, or
    :class:`bdgf.diffusion.features.FeatureSpec` (which has the same fields)."""

    timesteps: tuple[int, ...]
    draws: int
    noise_seed: int


@dataclass(frozen=True)
class NoiseSpec:
    """The noise fields of a FeatureSpec, for callers without torch (a package's manifest)."""

    timesteps: tuple[int, ...]
    draws: int
    noise_seed: int


def _mix32(x: np.ndarray) -> np.ndarray:
    """The 32-bit integer mixer (xor-shift-multiply), in place on a uint32 array (arithmetic mod 2^32)."""
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def _hash32(x: np.ndarray) -> np.ndarray:
    """The mixer of unsigned integers taken mod 2^32 -> a new uint32 array."""
    return _mix32(np.asarray(x).astype(np.uint32))


def position_noise(seed: int, channels: int, row0: int, col0: int, height: int, width: int) -> np.ndarray:
    """Standard-normal noise (C, height, width) float32 for the window at global (row0, col0).

    A pure function of (seed, channel, row, column): the same pixel gets the same value in
    every tile that covers it. Box–Muller on two hashed uniforms. The hashing is 32-bit integer
    arithmetic (uint32 arrays wrap mod 2^32, in place) and the Box–Muller float64, contiguous,
    in the order of the first version (uint64 with masks): the values are bit for bit those.
    """
    off = 1 << 20  # rows/cols of reflect-padded halos may be negative
    u32 = np.uint32
    c = np.arange(channels, dtype=u32)[:, None, None]
    r = (np.arange(height, dtype=np.int64) + (row0 + off)).astype(u32)[None, :, None]
    q = (np.arange(width, dtype=np.int64) + (col0 + off)).astype(u32)[None, None, :]
    base = _mix32(_mix32(_mix32(u32(seed & 0xFFFFFFFF) + c * u32(0x9E3779B9)) + r) + q)  # (C, H, W)
    u = np.empty((2, *base.shape), np.float64)  # two uniforms in (0, 1): (hash + 0.5) / 2^32
    np.add(_mix32(base ^ u32(0x68E31DA4)), 0.5, out=u[0])
    np.add(_mix32(base ^ u32(0xB5297A4D)), 0.5, out=u[1])
    u /= 4294967296.0
    radius = np.log(u[0])
    radius *= -2.0
    np.sqrt(radius, out=radius)
    angle = u[1]
    angle *= 2.0 * np.pi
    np.cos(angle, out=angle)
    radius *= angle
    return radius.astype(np.float32)


def draw_seed(spec: NoiseKey, step_index: int, draw: int) -> int:
    """Seed of the position-keyed noise for timestep ``step_index`` and noise draw ``draw``."""
    return spec.noise_seed * 1_000_003 + step_index * 7919 + draw


def tile_noise(spec: NoiseKey, channels: int, origins: Sequence[tuple[int, int]], size: int) -> np.ndarray:
    """(B, n, C, S, S) float32 noise, n = timesteps x draws (timestep-major), for the S×S windows
    whose global top-left corners are ``origins``."""
    return np.stack([
        np.stack([position_noise(draw_seed(spec, i, d), channels, r, c, size, size)
                  for i in range(len(spec.timesteps)) for d in range(spec.draws)])
        for r, c in origins
    ])


__all__ = ["NoiseKey", "NoiseSpec", "position_noise", "draw_seed", "tile_noise"]
