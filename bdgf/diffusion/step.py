"""One stage-1 training step (forward + loss + masking update), free of optimizer logic.

Glossary (letters as in docs/glossary.md)
    B   batch size
    C   input bands, all modalities concatenated
    M   number of modalities
    S   side of the clean windows x0 (pretraining tiles: S = T, no halo; the code's messages
        call the two sides H, W)
    t   diffusion timestep of each sample, (B,)
    N   pairs: samples of the batch denoised twice (the masking's dependence estimate)

The same function serves a single-process loop and a Ray Train / DeepSpeed loop: the caller owns
the optimizer (``loss.backward(); opt.step()`` or ``engine.backward(loss); engine.step()``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from bdgf.diffusion.loss import balanced_loss, concat_mse, fp32, per_modality_mse
from bdgf.diffusion.masking import AdaptiveModalityMasking
from bdgf.diffusion.schedules import NoiseSchedule
from kernels.dispatch import noise_and_mask

__all__ = ["diffusion_training_step", "paired_log_ratios", "unwrap_model"]

_LOSS_KINDS = ("balanced", "concat")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare denoiser inside a DDP / DeepSpeed engine (``.module``), or the model itself."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def paired_log_ratios(
    model: nn.Module,
    x0: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    sqrt_ab: torch.Tensor,
    sqrt_1mab: torch.Tensor,
    rows: torch.Tensor,
    pair_modality: torch.Tensor,
    channel_modality: torch.Tensor,
    num_modalities: int,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Denoise the same (x0, t, eps) of each paired row twice: modality m masked, and nothing masked.

    x0, eps (B, C, S, S); t, sqrt_ab, sqrt_1mab (B,); rows, pair_modality (N,) int64 (from
    ``masking.pair_plan``); valid (B, S, S) or None. One forward of 2P rows, under no_grad and in
    eval mode (dropout off, so the two halves differ only by the masking); the mode is restored.
    Returns (log_ratio (N, M), masked (N, M) one-hot float32): log_ratio[i, m_i] =
    log L_{¬m|m masked} − log L_{¬m|none} of pair i (losses floored at 1e-12), 0 elsewhere.
    """
    M, N, device = num_modalities, rows.shape[0], x0.device
    masked = torch.nn.functional.one_hot(pair_modality.to(device), M).to(torch.float32)  # (N, M)
    if N == 0:
        return torch.zeros(0, M, device=device), masked
    rows = rows.to(device)
    twice = lambda v: torch.cat([v[rows], v[rows]])  # noqa: E731 - (2P, ...): masked half, then unmasked half
    present = torch.cat([1.0 - masked, torch.ones_like(masked)])  # (2P, M)
    mask_embed = unwrap_model(model).mask_embedding  # (C,)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x_t = noise_and_mask(twice(x0), twice(eps), twice(sqrt_ab), twice(sqrt_1mab), present,
                                 mask_embed, channel_modality)
            x0_hat = model(x_t, twice(t), present)  # (2P, C, S, S)
            per_mod = per_modality_mse(x0_hat, twice(x0), channel_modality, M,
                                       None if valid is None else twice(valid)).float()  # (2P, M)
    finally:
        model.train(was_training)
    with fp32(device):  # the masking's statistics in float32 whatever the forward ran in
        others = 1.0 - masked  # (N, M): the modalities other than the masked one
        loss_masked = (per_mod[:N] * others).sum(1) / (M - 1)  # (N,) L_{¬m|m masked}
        loss_none = (per_mod[N:] * others).sum(1) / (M - 1)  # (N,) L_{¬m|none}
        log_ratio = loss_masked.clamp_min(1e-12).log() - loss_none.clamp_min(1e-12).log()  # (N,)
        return masked * log_ratio[:, None], masked


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
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Noise and mask a batch of clean tiles, denoise it, and return (loss, logs).

    model: a ``DenoiserUNet`` (or a wrapper with ``.module``), called as model(x_t, t, present).
    x0 (B, C, S, S): clean normalised tiles; channel_modality (C,) int64: modality index of each channel.
    generator: draws t, eps, the presence flags and the pair plan (on its own device; results
    moved to x0's).
    loss_kind: "balanced" (per-modality means averaged, docs/method.md, Stage 1) or "concat" (plain MSE ablation).
    weights (M,) or None: modality weights of the balanced loss (None: 1/M each).
    valid (B, S, S) bool/0-1 or None: valid pixels. Invalid pixels are set to 0 in x0 (the band
    mean, as the stores already have them; NaN there is fine too) and left out of every loss
    (see ``bdgf.diffusion.loss``).

    Precision: the forward may run under bf16 autocast (DeepSpeed ``torch_autocast`` or a caller's
    ``torch.autocast``); the losses, the logs and the masking's paired statistics are float32
    whatever it returns (x0_hat is upcast in ``bdgf.diffusion.loss``).

    The training loss covers the batch with the sampled presence flags. Separately, N rows
    (``masking.pair_plan``) are denoised twice without gradient (:func:`paired_log_ratios`) and
    ``masking`` is updated with their log loss ratios. logs (floats): "loss", "loss/<name>"
    (batch-mean per-modality MSE), "p_mask/<name>" (p after the update), "present/<name>" (share
    of the batch where the modality was present), "t_mean", and once D_m has a standard error,
    "dep/<name>" (D_m) and "dep_se/<name>" (se_m).
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
    if valid is not None:
        if valid.shape != (B, *x0.shape[2:]):
            raise ValueError(f"valid must be (B,H,W) = ({B},{x0.shape[2]},{x0.shape[3]}), got {tuple(valid.shape)}")
        valid = valid.to(device) > 0
        x0 = torch.where(valid[:, None], x0, torch.zeros((), dtype=x0.dtype, device=device))

    gdev = generator.device if generator is not None else torch.device("cpu")
    t = schedule.sample_timesteps(B, generator).to(device)  # (B,)
    eps = torch.randn(x0.shape, generator=generator, device=gdev, dtype=x0.dtype).to(device)  # (B, C, S, S)
    present = masking.sample(B, generator, device)  # (B, M)
    rows, pair_modality = masking.pair_plan(B, generator, device)  # (N,), (N,)
    sqrt_ab, sqrt_1mab = schedule.coefficients(t, x0.dtype)  # (B,), (B,)

    log_ratio, pair_masked = paired_log_ratios(model, x0, eps, t, sqrt_ab, sqrt_1mab, rows, pair_modality,
                                               channel_modality, M, valid)  # (N, M), (N, M)

    mask_embed = unwrap_model(model).mask_embedding  # (C,)
    x_t = noise_and_mask(x0, eps, sqrt_ab, sqrt_1mab, present, mask_embed, channel_modality)
    x0_hat = model(x_t, t, present)  # (B, C, S, S)

    per_mod = per_modality_mse(x0_hat, x0, channel_modality, M, valid)  # (B, M)
    loss = balanced_loss(per_mod, weights) if loss_kind == "balanced" else concat_mse(x0_hat, x0, valid)

    with fp32(device):
        masking.update(log_ratio.float(), pair_masked.float())

    logs: dict[str, float] = {"loss": float(loss.detach()), "t_mean": float(t.float().mean())}
    mean_mod = per_mod.detach().float().mean(0).cpu()
    share = present.float().mean(0).cpu()
    p = masking.probabilities
    dep, dep_se = masking.dependence, masking.dependence_se
    for m, name in enumerate(names):
        logs[f"loss/{name}"] = float(mean_mod[m])
        logs[f"p_mask/{name}"] = float(p[m])
        logs[f"present/{name}"] = float(share[m])
        if bool(torch.isfinite(dep_se[m])):
            logs[f"dep/{name}"] = float(dep[m])
            logs[f"dep_se/{name}"] = float(dep_se[m])
    return loss, logs
