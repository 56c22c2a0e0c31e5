"""Noise schedules for the stage-1 DDPM, kept apart from the denoiser (diffusers style).

Glossary (letters as in docs/glossary.md)
    t   a diffusion timestep, an integer 0 .. num_timesteps - 1 (the schedule length is written
        ``num_timesteps``, never T: T is the tile side)
    B   batch size

Convention: ``alphas_cumprod[t] = prod_{j <= t} (1 - betas[j])``, so ``t = 0`` is the least noisy
step and ``t = num_timesteps - 1`` the noisiest. The forward process is
``x_t = sqrt(alphas_cumprod[t]) * x0 + sqrt(1 - alphas_cumprod[t]) * eps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["ScheduleConfig", "NoiseSchedule", "linear_betas", "cosine_betas"]


@dataclass(frozen=True)
class ScheduleConfig:
    kind: str = "cosine"  # "linear" | "cosine"
    num_timesteps: int = 1000
    # beta_start: linear only, for num_timesteps = 1000 (scaled by 1000 / num_timesteps, as in
    # Nichol & Dhariwal)
    beta_start: float = 1e-4
    beta_end: float = 0.02  # linear only
    cosine_s: float = 0.008  # cosine only: offset that keeps beta_0 from being vanishingly small
    max_beta: float = 0.999  # cosine only: clip that avoids a singularity at t = num_timesteps - 1

    def __post_init__(self):
        if self.kind not in ("linear", "cosine"):
            raise ValueError(f"schedule kind must be 'linear' or 'cosine', got {self.kind!r}")
        if self.num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {self.num_timesteps}")


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al. linear schedule, (num_timesteps,) float64; endpoints scaled by 1000 / num_timesteps
    so any schedule length is comparable."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal cosine schedule, (num_timesteps,) float64: alpha_bar(t) = f(t) / f(0),
    f(t) = cos^2(((t / num_timesteps) + s) / (1 + s) * pi / 2), betas clipped to ``max_beta``."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(min=0.0, max=max_beta)


def mix(x0: torch.Tensor, eps: torch.Tensor, sqrt_ab: torch.Tensor, sqrt_1mab: torch.Tensor) -> torch.Tensor:
    """The forward-process formula, the one place it is written: x_t = sqrt(ab)·x0 + sqrt(1-ab)·eps.

    x0, eps (B, ..., S, S); sqrt_ab, sqrt_1mab (B,) or of x0's leading dims, broadcast on the rest.
    """
    extra = x0.dim() - sqrt_ab.dim()
    shape = tuple(sqrt_ab.shape) + (1,) * extra
    return sqrt_ab.reshape(shape) * x0 + sqrt_1mab.reshape(shape) * eps


class NoiseSchedule:
    """Precomputed schedule tensors (float64 on CPU until ``to``), no learnable state.

    Attributes (all (num_timesteps,)): ``betas``, ``alphas_cumprod``, ``sqrt_alphas_cumprod``,
    ``sqrt_one_minus_alphas_cumprod``.
    """

    def __init__(self, config: ScheduleConfig | None = None, **overrides):
        config = config or ScheduleConfig()
        if overrides:
            config = ScheduleConfig(**{**config.__dict__, **overrides})
        if config.kind == "linear":
            betas = linear_betas(config.num_timesteps, config.beta_start, config.beta_end)
        else:
            betas = cosine_betas(config.num_timesteps, config.cosine_s, config.max_beta)
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must lie in (0, 1); check beta_start / beta_end for this T")
        self.config = config
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()

    @property
    def num_timesteps(self) -> int:
        return self.config.num_timesteps

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        """Move the tables to ``device`` (in place; returns self)."""
        for name in ("betas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def coefficients(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt_ab, sqrt_1mab), each (B,) ``dtype`` on ``t.device``, for integer timesteps t (B,)."""
        if t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"timesteps must be int64 (or int32), got {t.dtype}")
        idx = t.to(self.alphas_cumprod.device, torch.int64)
        a = self.sqrt_alphas_cumprod[idx].to(device=t.device, dtype=dtype)
        b = self.sqrt_one_minus_alphas_cumprod[idx].to(device=t.device, dtype=dtype)
        return a, b

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> torch.Tensor:
        """Uniform integer timesteps (B,) int64 in [0, num_timesteps), drawn on the generator's device."""
        gen_device = generator.device if generator is not None else torch.device("cpu")
        t = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=gen_device)
        return t.to(device) if device is not None else t

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Plain forward process (no masking): x0, eps (B, C, S, S), t (B,) -> x_t (B, C, S, S)."""
        a, b = self.coefficients(t, x0.dtype)
        return mix(x0, eps, a, b)

    def state_dict(self) -> dict:
        return {"config": dict(self.config.__dict__)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "NoiseSchedule":
        return cls(ScheduleConfig(**state["config"]))

    def __repr__(self) -> str:
        return f"NoiseSchedule(kind={self.config.kind!r}, T={self.num_timesteps})"
