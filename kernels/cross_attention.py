"""Cross-attention of the transformer branch (branch tokens attend to high-feature tokens).

Glossary (letters as in docs/glossary.md)
    B   batch (patches)
    Hh  attention heads
    Nq  query tokens
    Nk  key/value tokens
    Dh  head dim (<= 128); the code's variables and error messages call it D

Tensors
    q (B, Hh, Nq, Dh)    k, v (B, Hh, Nk, Dh)    out (B, Hh, Nq, Dh)    lse (B, Hh, Nq) float32

``cross_attention_ref`` is the plain formula softmax(q k^T * scale) v (scale = Dh ** -0.5 by
default). ``cross_attention_triton`` is a flash-attention kernel: online softmax over key blocks,
never an Nq x Nk matrix in memory; the backward recomputes the probabilities from the saved
log-sum-exp (one kernel for dK/dV, one for dQ, no atomics). Ragged Nq/Nk and any Dh <= 128 (the
block is padded to a power of two >= 16 by masked loads); float32, float16, bfloat16.
"""

from __future__ import annotations

import math

import torch

from . import _checks as ck

MAX_HEAD_DIM = 128


def check_cross_attention(q, k, v, scale=None) -> None:
    ck.need_ndim("q", q, 4, "(B, Hh, Nq, D)")
    ck.need_float("q", q)
    ck.need_ndim("k", k, 4, "(B, Hh, Nk, D)")
    Bq, H, _, D = q.shape
    if k.shape[0] != Bq or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"k must have shape (B, Hh, Nk, D) = ({Bq}, {H}, Nk, {D}) to match q, "
                         f"got {tuple(k.shape)}")
    ck.need_shape("v", v, k.shape, "(B, Hh, Nk, D) like k")
    ck.need_same_dtype("k", k, "q", q)
    ck.need_same_dtype("v", v, "q", q)
    ck.need_same_device(dict(q=q, k=k, v=v))
    if k.shape[2] == 0:
        raise ValueError("k and v need at least one key token (Nk >= 1)")
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a Python number or None, got {type(scale).__name__}")


def cross_attention_ref(q, k, v, scale=None):
    """out (B, Hh, Nq, Dh) = softmax(q k^T * scale) v, dtype of q; softmax in float32 for half
    inputs (float64 for float64)."""
    check_cross_attention(q, k, v, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)) * scale  # (B, Hh, Nq, Nk)
    return torch.matmul(torch.softmax(s, dim=-1), v.to(acc)).to(q.dtype)


# ----------------------------------------------------------------------------- Triton

_LOG2E = 1.4426950408889634


def _blocks(D: int, interpret: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps). Heuristic, not autotuned (no GPU to tune on)."""
    bd = max(16, 1 << (D - 1).bit_length())
    if interpret:
        return 16, 16, bd, 1
    return (64, 64, bd, 4) if bd <= 64 else (64, 32, bd, 4)


def _meta(q: torch.Tensor, D: int) -> dict:
    from ._triton_util import interpreter_on

    bm, bn, bd, nw = _blocks(D, interpreter_on())
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, PREC=_precision(q.dtype),
                UPCAST=interpreter_on() and q.dtype == torch.bfloat16, num_warps=nw)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # Triton's default; ignored for 16-bit inputs


class _FlashCrossAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        from . import tl_cross_attention as K

        B, H, Nq, D = q.shape
        Nk = k.shape[2]
        meta = _meta(q, D)
        out = torch.empty_like(q)
        lse = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
        K.attn_fwd[(triton_cdiv(Nq, meta["BLOCK_M"]), B * H)](
            q, k, v, out, lse, scale * _LOG2E, Nq, Nk, D, **meta)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        from . import tl_cross_attention as K

        q, k, v, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        B, H, Nq, D = q.shape
        Nk = k.shape[2]
        meta = _meta(q, D)
        delta = (dout.float() * out.float()).sum(-1)  # (B, Hh, Nq)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        K.attn_bwd_dkdv[(triton_cdiv(Nk, meta["BLOCK_N"]), B * H)](
            q, k, v, dout, lse, delta, dk, dv, ctx.scale, ctx.scale * _LOG2E, Nq, Nk, D, **meta)
        K.attn_bwd_dq[(triton_cdiv(Nq, meta["BLOCK_M"]), B * H)](
            q, k, v, dout, lse, delta, dq, ctx.scale, ctx.scale * _LOG2E, Nq, Nk, D, **meta)
        return dq, dk, dv, None


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def cross_attention_triton(q, k, v, scale=None):
    """Flash-attention version of :func:`cross_attention_ref` (same arguments and result)."""
    check_cross_attention(q, k, v, scale)
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"cross_attention_triton: dtype must be float32/float16/bfloat16, got {q.dtype}")
    D = q.shape[-1]
    if D > MAX_HEAD_DIM:
        raise ValueError(f"cross_attention_triton: head dim D must be <= {MAX_HEAD_DIM}, got {D}")
    scale = D ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if q.shape[2] == 0:
        return q.new_empty(q.shape)
    return _FlashCrossAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), scale)
