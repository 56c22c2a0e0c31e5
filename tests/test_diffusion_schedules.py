"""Noise schedules: expectations derived by hand from the schedule definitions."""

import math

import pytest
import torch

from bdgf.diffusion.schedules import NoiseSchedule, ScheduleConfig


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_alpha_bar_strictly_decreasing_in_unit_interval(kind):
    ab = NoiseSchedule(kind=kind).alphas_cumprod
    assert ab.shape == (1000,)
    assert bool((ab[1:] < ab[:-1]).all())
    assert bool(((ab > 0) & (ab < 1)).all())


def test_linear_boundaries():
    s = NoiseSchedule(kind="linear")
    assert s.betas[0].item() == pytest.approx(1e-4)
    assert s.betas[-1].item() == pytest.approx(0.02)
    assert s.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4)
    # log ab_{T-1} = sum log(1 - b) ≈ -sum b - sum b^2 / 2, sum b = 1000 * (1e-4 + 0.02) / 2 = 10.05,
    # sum b^2 ≈ 1000 * 0.02^2 / 3 = 0.133  ->  ab_{T-1} ≈ exp(-10.117) ≈ 4.0e-5.
    assert 3.5e-5 < s.alphas_cumprod[-1].item() < 4.5e-5


def test_linear_endpoints_scale_with_T():
    s = NoiseSchedule(kind="linear", num_timesteps=100)
    assert s.betas[0].item() == pytest.approx(1e-3)
    assert s.betas[-1].item() == pytest.approx(0.2)


def test_cosine_boundaries_and_midpoint():
    s = NoiseSchedule(kind="cosine")
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    # index t is step t + 1 of 1..T: ab[t] = f((t + 1) / T) / f(0)
    assert s.alphas_cumprod[0].item() == pytest.approx(f(0.001) / f(0), rel=1e-9)
    assert s.alphas_cumprod[499].item() == pytest.approx(f(0.5) / f(0), rel=1e-9)
    # the last beta would be 1 (f(1) = 0) and is clipped to 0.999: ab[T-1] = ab[T-2] * 0.001
    assert s.betas[-1].item() == pytest.approx(0.999)
    assert s.alphas_cumprod[-1].item() == pytest.approx(f(0.999) / f(0) * 1e-3, rel=1e-6)


def test_cosine_keeps_more_signal_than_linear_midway():
    lin, cos = NoiseSchedule(kind="linear"), NoiseSchedule(kind="cosine")
    # cosine: ab at T/2 ≈ cos^2(0.504 * pi / 2) ≈ 0.49; linear: exp(-(500 * 0.0051 + ...)) ≈ 0.08
    assert cos.alphas_cumprod[499].item() == pytest.approx(0.494, abs=0.01)
    assert lin.alphas_cumprod[499].item() < 0.1


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_coefficients(kind):
    s = NoiseSchedule(kind=kind)
    t = torch.tensor([0, 10, 999], dtype=torch.int64)
    a, b = s.coefficients(t)
    assert a.shape == b.shape == (3,) and a.dtype == torch.float32
    torch.testing.assert_close(a**2 + b**2, torch.ones(3))
    assert a[0].item() == pytest.approx(math.sqrt(s.alphas_cumprod[0].item()))
    with pytest.raises(ValueError, match="int64"):
        s.coefficients(t.float())


def test_sample_timesteps_range_and_determinism():
    s = NoiseSchedule(kind="cosine", num_timesteps=50)
    t1 = s.sample_timesteps(500, torch.Generator().manual_seed(3))
    t2 = s.sample_timesteps(500, torch.Generator().manual_seed(3))
    assert t1.dtype == torch.int64 and int(t1.min()) >= 0 and int(t1.max()) <= 49
    assert torch.equal(t1, t2)


def test_bad_kind_and_state_roundtrip():
    with pytest.raises(ValueError, match="linear"):
        NoiseSchedule(kind="quadratic")
    with pytest.raises(ValueError, match="kind"):
        ScheduleConfig(kind="quadratic")  # checked when the config is built, not only when used
    with pytest.raises(ValueError, match="betas"):
        NoiseSchedule(kind="linear", num_timesteps=10)  # scaled beta_end = 0.02 * 100 = 2 > 1
    s = NoiseSchedule(kind="linear", num_timesteps=50)
    s2 = NoiseSchedule.from_state_dict(s.state_dict())
    assert torch.equal(s.alphas_cumprod, s2.alphas_cumprod)
