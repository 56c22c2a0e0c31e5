"""One stage-1 training step (forward + loss + masking update), free of optimizer logic.

Glossary (letters as in docs/glossary.md)
    B   batch size
    C   input bands, all modalities concatenated
    M   number of modalities
    S   side of the clean windows x0 (pretraining tiles: S = T, no halo; the code's messages
        call the two sides H, W)
    t   diffusion timestep of each sample, (B,)

The same function serves a single-process loop and a Ray Train / DeepSpeed loop: the caller owns
the optimizer (``loss.backward(); opt.step()`` or ``engine.backward(loss); engine.step()``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from bdgf.diffusion.loss import balanced_loss, concat_mse
from bdgf.diffusion.masking import AdaptiveModalityMasking
from bdgf.diffusion.schedules import NoiseSchedule
from kernels.dispatch import balanced_mse, noise_and_mask

__all__ = ["diffusion_training_step", "unwrap_model"]

_LOSS_KINDS = ("balanced", "concat")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare denoiser inside a DDP / DeepSpeed engine (``.module``), or the model itself."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def diffusion_training_step(
    model: nn.Module,
    schedule: NoiseSchedule,
    masking: AdaptiveModalityMasking,
    x0: torch.Tensor,
    channel_modality: torch.Tensor,
    generator: torch.Generator | None = None,
    loss_kind: str = "balanced",
    modality_names: Sequence[str] | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Noise and mask a batch of clean tiles, denoise it, and return (loss, logs).

    model: a ``DenoiserUNet`` (or a wrapper with ``.module``), called as model(x_t, t, present).
    x0 (B, C, S, S): clean normalised tiles; channel_modality (C,) int64: modality index of each channel.
    generator: draws t, eps and the presence flags (on its own device; results moved to x0's).
    loss_kind: "balanced" (per-modality means averaged, DESIGN §1.2) or "concat" (plain MSE ablation).
    weights (M,) or None: modality weights of the balanced loss (None: 1/M each).

    Updates ``masking`` with the detached per-modality losses. logs (floats): "loss",
    "loss/<name>" (batch-mean per-modality MSE), "p_mask/<name>" (p after the update),
    "present/<name>" (share of the batch where the modality was present), "t_mean".
    """
    if loss_kind not in _LOSS_KINDS:
        raise ValueError(f"loss_kind must be one of {_LOSS_KINDS}, got {loss_kind!r}")
    if x0.ndim != 4:
        raise ValueError(f"x0 must be (B,C,H,W), got {tuple(x0.shape)}")
    M = masking.num_modalities
    channel_modality = channel_modality.to(device=x0.device, dtype=torch.int64)
    if channel_modality.shape != (x0.shape[1],):
        raise ValueError(f"channel_modality must be (C,) = ({x0.shape[1]},), got {tuple(channel_modality.shape)}")
    names = list(modality_names) if modality_names is not None else [str(m) for m in range(M)]
    if len(names) != M:
        raise ValueError(f"{len(names)} modality names for {M} modalities")

    B, device = x0.shape[0], x0.device
    gdev = generator.device if generator is not None else torch.device("cpu")
    t = schedule.sample_timesteps(B, generator).to(device)  # (B,)
    eps = torch.randn(x0.shape, generator=generator, device=gdev, dtype=x0.dtype).to(device)  # (B, C, S, S)
    present = masking.sample(B, generator, device)  # (B, M)
    sqrt_ab, sqrt_1mab = schedule.coefficients(t, x0.dtype)  # (B,), (B,)

    mask_embed = unwrap_model(model).mask_embedding  # (C,)
    x_t = noise_and_mask(x0, eps, sqrt_ab, sqrt_1mab, present, mask_embed, channel_modality)
    x0_hat = model(x_t, t, present)  # (B, C, S, S)

    per_mod = balanced_mse(x0_hat, x0, channel_modality, M)  # (B, M)
    loss = balanced_loss(per_mod, weights) if loss_kind == "balanced" else concat_mse(x0_hat, x0)

    per_mod_d = per_mod.detach()
    masking.update(per_mod_d, present)

    logs: dict[str, float] = {"loss": float(loss.detach()), "t_mean": float(t.float().mean())}
    mean_mod = per_mod_d.float().mean(0).cpu()
    share = present.float().mean(0).cpu()
    p = masking.probabilities
    for m, name in enumerate(names):
        logs[f"loss/{name}"] = float(mean_mod[m])
        logs[f"p_mask/{name}"] = float(p[m])
        logs[f"present/{name}"] = float(share[m])
    return loss, logs
