"""Stage-1 losses (DESIGN §1.2).

Glossary (letters as in docs/glossary.md)
    B   batch size
    M   number of modalities
    C   input bands, all modalities concatenated
    S   side of the windows the denoiser sees (pretraining tiles: S = T)

The per-modality errors (B, M) come from ``kernels.dispatch.balanced_mse`` (the mean squared error
over each modality's own channels and pixels). With a validity mask (B, S, S) the invalid pixels
(nodata) are left out: the kernel sees pred and target with 0 at invalid pixels (so they add 0) and
each row is rescaled by S·S / n_valid(row), which turns its mean over all pixels into the mean over
its valid ones; a row with no valid pixel gets weight 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["balanced_loss", "concat_mse", "per_modality_mse", "valid_row_scale"]


def valid_row_scale(valid: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """valid (B, S, S) bool/0-1 -> (B,) S·S / n_valid per row; 0 for a row with no valid pixel."""
    if valid.ndim != 3:
        raise ValueError(f"valid must be (B,S,S), got {tuple(valid.shape)}")
    n_valid = (valid > 0).sum(dim=(1, 2)).to(dtype)  # (B,)
    pixels = float(valid.shape[1] * valid.shape[2])
    return torch.where(n_valid > 0, pixels / n_valid.clamp_min(1.0), torch.zeros_like(n_valid))


def _check_valid(valid: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """valid (B, S, S) -> (B, 1, S, S) bool on pred's device."""
    if valid.shape != (pred.shape[0], *pred.shape[2:]):
        raise ValueError(f"valid must be (B,S,S) = ({pred.shape[0]},{pred.shape[2]},{pred.shape[3]}), "
                         f"got {tuple(valid.shape)}")
    return (valid.to(pred.device) > 0)[:, None]


def _zero_invalid(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x (B, C, S, S) with 0 where v (B, 1, S, S) is False (whatever was there, NaN included)."""
    return torch.where(v, x, torch.zeros((), dtype=x.dtype, device=x.device))


def per_modality_mse(pred: torch.Tensor, target: torch.Tensor, channel_modality: torch.Tensor,
                     num_modalities: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, M) float32 MSE of each modality over its own channels and the valid pixels of each row.

    pred, target (B, C, S, S); channel_modality (C,) int64; valid (B, S, S) or None (all valid)."""
    from kernels.dispatch import balanced_mse  # noqa: PLC0415 - bdgf.diffusion imports this module eagerly

    if valid is None:
        return balanced_mse(pred, target, channel_modality, num_modalities)
    v = _check_valid(valid, pred)
    per_mod = balanced_mse(_zero_invalid(pred, v), _zero_invalid(target, v), channel_modality, num_modalities)  # (B, M)
    return per_mod * valid_row_scale(valid, per_mod.dtype).to(per_mod.device)[:, None]


def balanced_loss(per_mod: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """L = mean_b Σ_m w_m · per_mod[b, m]; scalar.

    per_mod (B, M): each modality's mean squared error over its own channels and pixels.
    weights (M,) or None: None means w_m = 1/M (modalities averaged, each counts the same
    whatever its band count). Given weights are used as they are (not renormalised)."""
    if per_mod.ndim != 2:
        raise ValueError(f"per_mod must be (B,M), got {tuple(per_mod.shape)}")
    if weights is None:
        return per_mod.mean()
    weights = torch.as_tensor(weights, dtype=per_mod.dtype, device=per_mod.device)
    if weights.shape != (per_mod.shape[1],):
        raise ValueError(f"weights must be (M,) = ({per_mod.shape[1]},), got {tuple(weights.shape)}")
    return (per_mod * weights).sum(dim=1).mean()


def concat_mse(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Plain MSE over the channel-wise concatenation (the ablation): pred, target (B, C, S, S) -> scalar.
    A modality with n bands gets n times the say of a 1-band one. With valid (B, S, S): each row's
    mean over its valid pixels (rows rescaled as in the module docstring), averaged over rows."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if valid is None:
        return F.mse_loss(pred, target)
    v = _check_valid(valid, pred)
    per_row = (_zero_invalid(pred, v) - _zero_invalid(target, v)).pow(2).mean(dim=(1, 2, 3))  # (B,)
    return (per_row * valid_row_scale(valid, per_row.dtype).to(per_row.device)).mean()
