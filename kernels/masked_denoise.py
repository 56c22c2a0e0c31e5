"""Masked denoising step of the balanced multimodal DDPM: noising + modality masking, and the
balanced per-modality loss.

Glossary (letters as in docs/glossary.md)
    B   batch of windows (tiles)
    C   input bands, all modalities concatenated (e.g. 144 HSI + 1 LiDAR)
    M   modalities
    S   window side (pretraining tiles: S = T); any two sides work, and the error messages and
        variables call them H, W
    t   diffusion timestep of each sample

Tensors
    x0, eps      (B, C, S, S)  clean window, Gaussian noise
    sqrt_ab      (B,)          sqrt(alpha_bar_t) per sample;  sqrt_1mab (B,): sqrt(1 - alpha_bar_t)
    present      (B, M)        bool or float/int 0/1; nonzero = modality present (not masked)
    mask_embed   (C,)          learned embedding that replaces a masked modality's channels
    channel_modality (C,)      int64 in [0, M): modality of each channel

The issue asked for noising, masking and the balanced loss fused in one kernel. The UNet runs
between noising and loss, so that is two fused kernels: (1) noise + mask (forward; backward gives
mask_embed its gradient, the sum of the upstream gradient over masked planes; x0/eps/schedule
gradients are also provided but are never needed in training) and (2) the balanced loss
reduction (forward: per-plane squared-error sums, then a (C, M) one-hot contraction; backward:
elementwise 2 (pred - target) g[b, m] / (count_m * S * S)).
"""

from __future__ import annotations

import torch

from . import _checks as ck

# ----------------------------------------------------------------------------- checks


def check_noise_and_mask(x0, eps, sqrt_ab, sqrt_1mab, present, mask_embed, channel_modality) -> None:
    ck.need_ndim("x0", x0, 4, "(B, C, H, W)")
    ck.need_float("x0", x0)
    ck.need_shape("eps", eps, x0.shape, "(B, C, H, W) like x0")
    ck.need_same_dtype("eps", eps, "x0", x0)
    B, C = x0.shape[0], x0.shape[1]
    for name, t in (("sqrt_ab", sqrt_ab), ("sqrt_1mab", sqrt_1mab)):
        ck.need_shape(name, t, (B,), "(B,)")
        ck.need_float(name, t)
    ck.need_ndim("present", present, 2, "(B, M)")
    if present.shape[0] != B:
        raise ValueError(f"present must have shape (B, M) with B = {B}, got {tuple(present.shape)}")
    if present.is_complex():
        raise ValueError(f"present must be bool or float/int 0/1, got {present.dtype}")
    ck.need_shape("mask_embed", mask_embed, (C,), "(C,)")
    ck.need_float("mask_embed", mask_embed)
    ck.need_shape("channel_modality", channel_modality, (C,), "(C,)")
    ck.need_integer("channel_modality", channel_modality)
    ck.need_same_device(dict(x0=x0, eps=eps, sqrt_ab=sqrt_ab, sqrt_1mab=sqrt_1mab, present=present,
                             mask_embed=mask_embed, channel_modality=channel_modality))


def check_balanced_mse(pred, target, channel_modality, num_modalities) -> None:
    ck.need_ndim("pred", pred, 4, "(B, C, H, W)")
    ck.need_float("pred", pred)
    ck.need_shape("target", target, pred.shape, "(B, C, H, W) like pred")
    ck.need_same_dtype("target", target, "pred", pred)
    ck.need_shape("channel_modality", channel_modality, (pred.shape[1],), "(C,)")
    ck.need_integer("channel_modality", channel_modality)
    if not isinstance(num_modalities, int) or num_modalities < 1:
        raise ValueError(f"num_modalities must be a positive int, got {num_modalities!r}")
    ck.need_same_device(dict(pred=pred, target=target, channel_modality=channel_modality))


def _check_channel_values(channel_modality: torch.Tensor, num_modalities: int) -> None:
    """Value check before a raw-pointer launch (one device sync; not done on the traced reference)."""
    lo, hi = int(channel_modality.min()), int(channel_modality.max())
    if lo < 0 or hi >= num_modalities:
        raise ValueError(f"channel_modality values must lie in [0, {num_modalities}), got [{lo}, {hi}]")


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- references


def noise_and_mask_ref(x0, eps, sqrt_ab, sqrt_1mab, present, mask_embed, channel_modality):
    """x_t (B, C, S, S), dtype of x0: sqrt_ab*x0 + sqrt_1mab*eps where the channel's modality is
    present, else mask_embed[c]. Computed in float32 (float64 for float64 input)."""
    check_noise_and_mask(x0, eps, sqrt_ab, sqrt_1mab, present, mask_embed, channel_modality)
    acc = _acc_dtype(x0)
    keep = (present != 0).index_select(1, channel_modality.long())[:, :, None, None]  # (B, C, 1, 1)
    noisy = sqrt_ab.to(acc)[:, None, None, None] * x0.to(acc) + sqrt_1mab.to(acc)[:, None, None, None] * eps.to(acc)
    return torch.where(keep, noisy, mask_embed.to(acc)[None, :, None, None]).to(x0.dtype)


def _modality_onehot(channel_modality, num_modalities, dtype):
    """(C, M) one-hot of channel_modality, and the channel count per modality (M,), at least 1."""
    ids = torch.arange(num_modalities, device=channel_modality.device)
    onehot = (channel_modality.long()[:, None] == ids[None, :]).to(dtype)
    return onehot, onehot.sum(0).clamp_min(1.0)


def balanced_mse_ref(pred, target, channel_modality, num_modalities):
    """(B, M) float32 (float64 for float64 input): per sample and modality, the mean squared
    error over that modality's channels and all pixels. A modality with no channel gives 0."""
    check_balanced_mse(pred, target, channel_modality, num_modalities)
    acc = _acc_dtype(pred)
    per_plane = (pred.to(acc) - target.to(acc)).square().mean(dim=(2, 3))  # (B, C)
    onehot, counts = _modality_onehot(channel_modality, num_modalities, acc)
    return (per_plane @ onehot) / counts


# ----------------------------------------------------------------------------- Triton


class _NoiseAndMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x0, eps, sqrt_ab, sqrt_1mab, keep, mask_embed, cm):
        from . import tl_masked_denoise as K
        from ._triton_util import interpreter_on

        B, C, H, W = x0.shape
        hw = H * W
        out = torch.empty_like(x0)
        blk = K.block_for(hw, interpreter_on())
        K.noise_mask_fwd[(B * C, -(-hw // blk))](
            x0, eps, sqrt_ab, sqrt_1mab, keep, mask_embed, cm, out, C, keep.shape[1], hw, BLOCK=blk
        )
        ctx.save_for_backward(x0, eps, sqrt_ab, sqrt_1mab, keep, cm)
        ctx.embed_dtype = mask_embed.dtype
        return out

    @staticmethod
    def backward(ctx, g):
        from . import tl_masked_denoise as K
        from ._triton_util import interpreter_on

        x0, eps, sqrt_ab, sqrt_1mab, keep, cm = ctx.saved_tensors
        g = g.contiguous()
        B, C, H, W = g.shape
        hw = H * W
        need = ctx.needs_input_grad
        gx0 = geps = gsab = gs1 = gemb = None
        if need[5]:
            part = torch.empty((B, C), device=g.device, dtype=torch.float32)
            K.masked_rowsum[(B * C,)](g, keep, cm, part, C, keep.shape[1], hw,
                                      BLOCK=K.block_for(hw, interpreter_on()))
            gemb = part.sum(0).to(ctx.embed_dtype)
        if any(need[:4]):  # never needed in training; plain torch
            kb = keep.index_select(1, cm.long())[:, :, None, None]  # (B, C, 1, 1) float 0/1
            gk = g.float() * kb
            if need[0]:
                gx0 = (gk * sqrt_ab.float()[:, None, None, None]).to(x0.dtype)
            if need[1]:
                geps = (gk * sqrt_1mab.float()[:, None, None, None]).to(eps.dtype)
            if need[2]:
                gsab = (gk * x0.float()).sum(dim=(1, 2, 3)).to(sqrt_ab.dtype)
            if need[3]:
                gs1 = (gk * eps.float()).sum(dim=(1, 2, 3)).to(sqrt_1mab.dtype)
        return gx0, geps, gsab, gs1, None, gemb, None


def noise_and_mask_triton(x0, eps, sqrt_ab, sqrt_1mab, present, mask_embed, channel_modality):
    """Triton version of :func:`noise_and_mask_ref` (same arguments, same result)."""
    check_noise_and_mask(x0, eps, sqrt_ab, sqrt_1mab, present, mask_embed, channel_modality)
    _check_channel_values(channel_modality, present.shape[1])
    keep = (present != 0).to(torch.float32).contiguous()
    cm = channel_modality.to(torch.int32).contiguous()
    return _NoiseAndMask.apply(x0.contiguous(), eps.contiguous(), sqrt_ab.contiguous(),
                               sqrt_1mab.contiguous(), keep, mask_embed.contiguous(), cm)


class _BalancedMSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target, cm, num_modalities):
        from . import tl_masked_denoise as K
        from ._triton_util import interpreter_on

        B, C, H, W = pred.shape
        hw = H * W
        sums = torch.empty((B, C), device=pred.device, dtype=torch.float32)
        K.sq_err_rowsum[(B * C,)](pred, target, sums, hw, BLOCK=K.block_for(hw, interpreter_on()))
        onehot, counts = _modality_onehot(cm, num_modalities, torch.float32)
        ctx.save_for_backward(pred, target, cm, counts)
        return (sums @ onehot) / (counts * hw)

    @staticmethod
    def backward(ctx, g):
        from . import tl_masked_denoise as K
        from ._triton_util import interpreter_on

        pred, target, cm, counts = ctx.saved_tensors
        B, C, H, W = pred.shape
        hw = H * W
        cml = cm.long()
        w = (2.0 * g.float() / (counts * hw)).index_select(1, cml).contiguous()  # (B, C)
        gp = torch.empty_like(pred)
        blk = K.block_for(hw, interpreter_on())
        K.sq_err_bwd[(B * C, -(-hw // blk))](pred, target, w, gp, hw, BLOCK=blk)
        gt = -gp if ctx.needs_input_grad[1] else None
        return gp, gt, None, None


def balanced_mse_triton(pred, target, channel_modality, num_modalities):
    """Triton version of :func:`balanced_mse_ref`: (B, M) float32, differentiable w.r.t. pred
    (and target)."""
    check_balanced_mse(pred, target, channel_modality, num_modalities)
    if pred.dtype == torch.float64:
        raise ValueError("balanced_mse_triton: pred must be float32/float16/bfloat16, got float64")
    _check_channel_values(channel_modality, num_modalities)
    return _BalancedMSE.apply(pred.contiguous(), target.contiguous(),
                              channel_modality.to(torch.int32).contiguous(), num_modalities)
