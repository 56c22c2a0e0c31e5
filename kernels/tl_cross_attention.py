"""Triton flash-attention kernels for ``kernels.cross_attention`` (forward, dK/dV, dQ).

Glossary (letters as in docs/glossary.md)
    BH  B * Hh: one program column per (batch, head)
    Nq  query tokens
    Nk  key/value tokens
    Dh  head dim (the kernels' argument D), padded to BLOCK_D by masked loads

q/k/v/out are contiguous (B, Hh, Nq or Nk, Dh). The pointer arguments Q, K, V, O, LSE, DO, DQ,
DK, DV are tensor names, not dimension letters. Scores are kept in base 2:
s2 = (q . k) * scale * log2(e), and LSE (B, Hh, Nq) float32 stores log2 sum_j exp2(s2_j).
UPCAST (set only for bfloat16 under TRITON_INTERPRET, whose numpy tl.dot mishandles bfloat16)
casts the loaded tiles to float32. Masked key columns get s2 = -inf (p = 0); padded query rows load LSE = +inf (p = 0).
"""

from __future__ import annotations

import triton.language as tl

from ._triton_util import LazyJit


def _attn_fwd(Q, K, V, O, LSE, scale2, Nq, Nk, D,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
              UPCAST: tl.constexpr):
    """grid (cdiv(Nq, BLOCK_M), BH): O = softmax(q k^T scale) v for one query block."""
    bh = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_j = tl.arange(0, BLOCK_N)
    row_ok = offs_m < Nq
    q_msk = row_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + bh * Nq * D + offs_m[:, None] * D + offs_d[None, :], mask=q_msk, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    kv_base = bh * Nk * D
    for start in range(0, Nk, BLOCK_N):
        offs_n = start + offs_j
        col_ok = offs_n < Nk
        kv_off = kv_base + offs_n[:, None] * D + offs_d[None, :]
        kv_msk = col_ok[:, None] & (offs_d[None, :] < D)
        k = tl.load(K + kv_off, mask=kv_msk, other=0.0)
        v = tl.load(V + kv_off, mask=kv_msk, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale2
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every block has a valid column
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + bh * Nq * D + offs_m[:, None] * D + offs_d[None, :], acc.to(O.dtype.element_ty), mask=q_msk)
    tl.store(LSE + bh * Nq + offs_m, m_i + tl.log2(l_i), mask=row_ok)


def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, scale, scale2, Nq, Nk, D,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
              UPCAST: tl.constexpr):
    """grid (cdiv(Nk, BLOCK_N), BH): dV = P^T dO, dK = scale dS^T q for one key block."""
    bh = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_i = tl.arange(0, BLOCK_M)
    col_ok = offs_n < Nk
    kv_msk = col_ok[:, None] & (offs_d[None, :] < D)
    kv_off = bh * Nk * D + offs_n[:, None] * D + offs_d[None, :]
    k = tl.load(K + kv_off, mask=kv_msk, other=0.0)
    v = tl.load(V + kv_off, mask=kv_msk, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start in range(0, Nq, BLOCK_M):
        offs_m = start + offs_i
        row_ok = offs_m < Nq
        q_off = bh * Nq * D + offs_m[:, None] * D + offs_d[None, :]
        q_msk = row_ok[:, None] & (offs_d[None, :] < D)
        q = tl.load(Q + q_off, mask=q_msk, other=0.0)
        do = tl.load(DO + q_off, mask=q_msk, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + bh * Nq + offs_m, mask=row_ok, other=float("inf"))
        dlt = tl.load(DELTA + bh * Nq + offs_m, mask=row_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale2
        p = tl.where(col_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)  # (BLOCK_M, BLOCK_N)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - dlt[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    tl.store(DK + kv_off, (dk * scale).to(DK.dtype.element_ty), mask=kv_msk)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_msk)


def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, scale, scale2, Nq, Nk, D,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
              UPCAST: tl.constexpr):
    """grid (cdiv(Nq, BLOCK_M), BH): dQ = scale dS k for one query block."""
    bh = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_j = tl.arange(0, BLOCK_N)
    row_ok = offs_m < Nq
    q_off = bh * Nq * D + offs_m[:, None] * D + offs_d[None, :]
    q_msk = row_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + q_off, mask=q_msk, other=0.0)
    do = tl.load(DO + q_off, mask=q_msk, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + bh * Nq + offs_m, mask=row_ok, other=float("inf"))
    dlt = tl.load(DELTA + bh * Nq + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, Nk, BLOCK_N):
        offs_n = start + offs_j
        col_ok = offs_n < Nk
        kv_off = bh * Nk * D + offs_n[:, None] * D + offs_d[None, :]
        kv_msk = col_ok[:, None] & (offs_d[None, :] < D)
        k = tl.load(K + kv_off, mask=kv_msk, other=0.0)
        v = tl.load(V + kv_off, mask=kv_msk, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale2
        p = tl.where(col_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - dlt[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=q_msk)


attn_fwd = LazyJit(_attn_fwd)
attn_bwd_dkdv = LazyJit(_attn_bwd_dkdv)
attn_bwd_dq = LazyJit(_attn_bwd_dq)
