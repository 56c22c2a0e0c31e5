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

_M32 = np.uint64(0xFFFFFFFF)


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
