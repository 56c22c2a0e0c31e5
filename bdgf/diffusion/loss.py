"""Stage-1 losses (docs/method.md, Stage 1).

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

Precision: every loss here is computed in float32 (float64 if an input is float64) whatever the
forward ran in: under bf16 autocast (DeepSpeed's ``torch_autocast``, or ``torch.autocast``) the
denoiser returns bf16 while the target stays float32; both are upcast and autocast is switched
off inside, so the reductions (the kernel's per-modality matmul included) are not done in bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["balanced_loss", "concat_mse", "fp32", "loss_dtype", "per_modality_mse", "valid_row_scale"]


def loss_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the losses are computed in: float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def fp32(device: torch.device | str):
    """A context with autocast switched off on ``device``'s type (ops run in their inputs' dtype)."""
    return torch.autocast(torch.device(device).type, enabled=False)


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

    acc = loss_dtype(pred, target)
    with fp32(pred.device):
        pred, target = pred.to(acc), target.to(acc)  # a bf16 forward's output against the fp32 target
        if valid is None:
            return balanced_mse(pred, target, channel_modality, num_modalities)
        v = _check_valid(valid, pred)
        per_mod = balanced_mse(_zero_invalid(pred, v), _zero_invalid(target, v), channel_modality, num_modalities)
        return per_mod * valid_row_scale(valid, per_mod.dtype).to(per_mod.device)[:, None]  # (B, M)


def balanced_loss(per_mod: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """L = mean_b Σ_m w_m · per_mod[b, m]; scalar.

    per_mod (B, M): each modality's mean squared error over its own channels and pixels.
    weights (M,) or None: None means w_m = 1/M (modalities averaged, each counts the same
    whatever its band count). Given weights are used as they are (not renormalised)."""
    if per_mod.ndim != 2:
        raise ValueError(f"per_mod must be (B,M), got {tuple(per_mod.shape)}")
    with fp32(per_mod.device):
        per_mod = per_mod.to(loss_dtype(per_mod))
        if weights is None:
            return per_mod.mean()
        weights = torch.as_tensor(weights, device=per_mod.device).to(per_mod.dtype)
        if weights.shape != (per_mod.shape[1],):
            raise ValueError(f"weights must be (M,) = ({per_mod.shape[1]},), got {tuple(weights.shape)}")
        return (per_mod * weights).sum(dim=1).mean()


def concat_mse(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Plain MSE over the channel-wise concatenation (the ablation): pred, target (B, C, S, S) -> scalar.
    A modality with n bands gets n times the say of a 1-band one. With valid (B, S, S): each row's
    mean over its valid pixels (rows rescaled as in the module docstring), averaged over rows."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    acc = loss_dtype(pred, target)
    with fp32(pred.device):
        pred, target = pred.to(acc), target.to(acc)
        if valid is None:
            return F.mse_loss(pred, target)
        v = _check_valid(valid, pred)
        per_row = (_zero_invalid(pred, v) - _zero_invalid(target, v)).pow(2).mean(dim=(1, 2, 3))  # (B,)
        return (per_row * valid_row_scale(valid, per_row.dtype).to(per_row.device)).mean()
