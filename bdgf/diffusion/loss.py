"""Stage-1 losses (DESIGN §1.2).

Glossary (letters as in docs/glossary.md)
    B   batch size
    M   number of modalities
    C   input bands, all modalities concatenated
    S   side of the windows the denoiser sees (pretraining tiles: S = T)

The per-modality errors (B, M) come from ``kernels.dispatch.balanced_mse`` (the mean squared error
over each modality's own channels and pixels); these functions only combine them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["balanced_loss", "concat_mse"]


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


def concat_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Plain MSE over the channel-wise concatenation (the ablation): pred, target (B, C, S, S) -> scalar.
    A modality with n bands gets n times the say of a 1-band one."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    return F.mse_loss(pred, target)
