"""Triton kernels for the masked denoising step (launched by ``kernels.masked_denoise``).

Glossary (letters as in docs/glossary.md)
    B   batch
    C   input bands, all modalities concatenated
    M   modalities
    HW  pixels of one channel plane (S * S for an S x S window)

row = b*C + c indexes one channel plane of one sample; tensors are contiguous (B, C, S, S). The
pointer arguments (X0, EPS, KEEP, ..., and P = pred, T = target, W = weights, G = gradient) are
tensor names, not dimension letters. All arithmetic is float32; outputs are cast to the storage
dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._triton_util import LazyJit


def _noise_mask_fwd(X0, EPS, SAB, S1MAB, KEEP, EMB, CM, OUT, C, M, HW, BLOCK: tl.constexpr):
    """OUT[row, p] = KEEP[b, CM[c]] ? SAB[b]*X0 + S1MAB[b]*EPS : EMB[c]. grid (B*C, cdiv(HW, BLOCK))."""
    row = tl.program_id(0)
    b = row // C
    c = row % C
    keep = tl.load(KEEP + b * M + tl.load(CM + c))
    sab = tl.load(SAB + b).to(tl.float32)
    s1 = tl.load(S1MAB + b).to(tl.float32)
    emb = tl.load(EMB + c).to(tl.float32)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < HW
    base = row.to(tl.int64) * HW
    live = offs < tl.where(keep != 0, HW, 0)  # a masked plane never reads x0/eps
    x = tl.load(X0 + base + offs, mask=live, other=0.0).to(tl.float32)
    e = tl.load(EPS + base + offs, mask=live, other=0.0).to(tl.float32)
    y = tl.where(live, sab * x + s1 * e, emb)
    tl.store(OUT + base + offs, y.to(OUT.dtype.element_ty), mask=inside)


def _masked_rowsum(G, KEEP, CM, OUT, C, M, HW, BLOCK: tl.constexpr):
    """OUT[row] = sum_p G[row, p] if the plane was masked else 0 (float32). grid (B*C,)."""
    row = tl.program_id(0)
    b = row // C
    c = row % C
    keep = tl.load(KEEP + b * M + tl.load(CM + c))
    base = row.to(tl.int64) * HW
    limit = tl.where(keep == 0, HW, 0)  # a kept plane reads nothing and sums to 0
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, HW, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(G + base + offs, mask=offs < limit, other=0.0).to(tl.float32)
    tl.store(OUT + row, tl.sum(acc, axis=0))


def _sq_err_rowsum(P, T, OUT, HW, BLOCK: tl.constexpr):
    """OUT[row] = sum_p (P - T)^2 in float32. grid (B*C,)."""
    row = tl.program_id(0)
    base = row.to(tl.int64) * HW
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, HW, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < HW
        d = tl.load(P + base + offs, mask=inside, other=0.0).to(tl.float32) - tl.load(
            T + base + offs, mask=inside, other=0.0
        ).to(tl.float32)
        acc += d * d
    tl.store(OUT + row, tl.sum(acc, axis=0))


def _sq_err_bwd(P, T, W, GP, HW, BLOCK: tl.constexpr):
    """GP[row, p] = (P - T) * W[row], W = 2 g[b, m] / (count_m * HW). grid (B*C, cdiv(HW, BLOCK))."""
    row = tl.program_id(0)
    w = tl.load(W + row)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < HW
    base = row.to(tl.int64) * HW
    d = tl.load(P + base + offs, mask=inside, other=0.0).to(tl.float32) - tl.load(
        T + base + offs, mask=inside, other=0.0
    ).to(tl.float32)
    tl.store(GP + base + offs, (d * w).to(GP.dtype.element_ty), mask=inside)


noise_mask_fwd = LazyJit(_noise_mask_fwd)
masked_rowsum = LazyJit(_masked_rowsum)
sq_err_rowsum = LazyJit(_sq_err_rowsum)
sq_err_bwd = LazyJit(_sq_err_bwd)


def block_for(hw: int, interpret: bool) -> int:
    """Elementwise block: one power of two covering up to 1024 pixels (interpreter: up to 4096)."""
    cap = 4096 if interpret else 1024
    return min(cap, max(16, triton.next_power_of_2(hw)))
