"""bdgf.noise: the position-keyed noise is one numpy-only implementation (features.py re-exports
it), keeps the values it had before it moved there, and a package's NoiseSpec gives the same
noise as the run's FeatureSpec."""

from __future__ import annotations

import numpy as np

import bdgf.noise as noise
from bdgf.diffusion import features


def test_features_uses_the_one_implementation():
    for name in ("_hash32", "position_noise", "draw_seed", "tile_noise"):
        assert getattr(features, name) is getattr(noise, name), name


def test_values_are_those_of_before_the_move():
    """Written down from bdgf.diffusion.features before the noise moved (commit 301df99): the
    integer mixer exactly, the normals to float32 rounding (log/cos may differ in the last bit
    between numpy builds; a different hash or seed changes every value by O(1))."""
    got = noise._hash32(np.array([0, 1, 2, 0xFFFFFFFF, 123456789], np.uint64))
    assert got.tolist() == [0, 1753845952, 3507691905, 1734902346, 2834422664]
    want = np.array([[[-0.7067019, -0.92333686, -0.14753033], [0.07452344, 0.9310763, -0.80781734]],
                     [[0.91524535, 1.9805914, -0.038147785], [-1.3774413, 0.6526083, -0.47925484]]], np.float32)
    np.testing.assert_allclose(noise.position_noise(7, 2, -3, 5, 2, 3), want, rtol=1e-6, atol=1e-7)


def test_a_noise_spec_gives_the_feature_spec_noise_and_overlaps_agree():
    spec = features.FeatureSpec("x", (5, 100), 2, 7, 16, 32, "concat")
    key = noise.NoiseSpec((5, 100), 2, 7)
    corners = [(-32, -32), (16, 0)]  # windows over rows -32..47 / 16..95, cols -32..47 / 0..79
    a = noise.tile_noise(spec, 3, corners, 80)
    assert a.shape == (2, 4, 3, 80, 80) and a.dtype == np.float32
    np.testing.assert_array_equal(a, noise.tile_noise(key, 3, corners, 80))
    # scene rows 16..47, cols 0..47 lie in both windows and get the same values there
    np.testing.assert_array_equal(a[0, :, :, 48:80, 32:80], a[1, :, :, 0:32, 0:48])
    assert not np.array_equal(a[0, 0], a[0, 1])  # draws and timesteps differ
    assert abs(float(a.mean())) < 0.02 and abs(float(a.std()) - 1.0) < 0.02


def _reference_position_noise(seed, channels, row0, col0, height, width):
    """The first implementation (uint64 with 32-bit masks, bdgf/diffusion/features.py at 301df99),
    kept here as the definition the faster uint32 one must reproduce bit for bit."""
    m32 = np.uint64(0xFFFFFFFF)

    def h(x):
        x = x & m32
        x ^= x >> np.uint64(16)
        x = (x * np.uint64(0x7FEB352D)) & m32
        x ^= x >> np.uint64(15)
        x = (x * np.uint64(0x846CA68B)) & m32
        x ^= x >> np.uint64(16)
        return x

    off = np.uint64(1 << 20)
    c = np.arange(channels, dtype=np.uint64)[:, None, None]
    r = (np.arange(height, dtype=np.int64) + row0).astype(np.uint64)[None, :, None] + off
    q = (np.arange(width, dtype=np.int64) + col0).astype(np.uint64)[None, None, :] + off
    base = h(h(h(np.uint64(seed & 0xFFFFFFFF) + c * np.uint64(0x9E3779B9)) + r) + q)
    u1 = (h(base ^ np.uint64(0x68E31DA4)).astype(np.float64) + 0.5) / 4294967296.0
    u2 = (h(base ^ np.uint64(0xB5297A4D)).astype(np.float64) + 0.5) / 4294967296.0
    return (np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)).astype(np.float32)


def test_bit_for_bit_the_first_implementation():
    """Seeds past 32 bits (draw_seed of a large noise_seed), negative and far corners, odd sizes."""
    spec = features.FeatureSpec("x", (5, 50, 150), 2, 123_456_789, 64, 36, "concat")
    cases = [(noise.draw_seed(spec, 2, 1), 17, -36, -36, 136, 136), (0, 1, 0, 0, 1, 1),
             (7, 3, -(1 << 20) - 5, 5, 9, 11), (2**40 + 3, 2, 4_000_000_000, -77, 5, 8)]
    for args in cases:
        got, want = noise.position_noise(*args), _reference_position_noise(*args)
        assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
        assert got.tobytes() == want.tobytes(), args
