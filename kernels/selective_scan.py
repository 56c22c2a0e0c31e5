"""Selective scan (Mamba's diagonal state-space recurrence) in plain PyTorch.

Glossary
    Bt  batch of sequences      L  sequence length (tokens)      Dm  channels (d_inner)
    N   state size per channel  T  chunk length (chunked scan)   nc = ceil(L / T) chunks
    u, delta  (Bt, L, Dm)       A (Dm, N), negative real         B, C (Bt, L, N)
    D  (Dm,) or None            h  (Bt, Dm, N) state             y  (Bt, L, Dm)

Recurrence, t = 0 .. L-1, h_{-1} = 0:
    h_t = exp(delta_t A) * h_{t-1} + (delta_t u_t) B_t      (outer product over Dm x N)
    y_t = sum_n h_t[:, :, n] C_t[n] + D u_t

``selective_scan_ref`` is the step-by-step loop. ``selective_scan_chunked`` computes the same
thing with a chunked parallel scan: within each chunk of T steps a Hillis-Steele (log2 T levels)
scan of the pairs (decay a_t = exp(delta_t A) in (0, 1], input x_t), vectorised over all chunks at
once; then one short loop over chunks carries the state. Only products of decays <= 1 are formed
(no exp of a positive number, no division by a decay), so it is as stable as the loop.
"""

from __future__ import annotations

import torch

from . import _checks as ck


def check_selective_scan(u, delta, A, B, C, D=None) -> None:
    ck.need_ndim("u", u, 3, "(Bt, L, Dm)")
    ck.need_float("u", u)
    Bt, L, Dm = u.shape
    ck.need_shape("delta", delta, u.shape, "(Bt, L, Dm) like u")
    ck.need_ndim("A", A, 2, "(Dm, N)")
    if A.shape[0] != Dm:
        raise ValueError(f"A must have shape (Dm, N) with Dm = {Dm}, got {tuple(A.shape)}")
    N = A.shape[1]
    ck.need_shape("B", B, (Bt, L, N), "(Bt, L, N)")
    ck.need_shape("C", C, (Bt, L, N), "(Bt, L, N)")
    if D is not None:
        ck.need_shape("D", D, (Dm,), "(Dm,)")
    named = dict(delta=delta, A=A, B=B, C=C) | ({} if D is None else {"D": D})
    for name, t in named.items():
        ck.need_same_dtype(name, t, "u", u)
    ck.need_same_device(dict(u=u, **named))


def selective_scan_ref(u, delta, A, B, C, D=None):
    """y (Bt, L, Dm) by the step-by-step loop (the definition; slow)."""
    check_selective_scan(u, delta, A, B, C, D)
    Bt, L, Dm = u.shape
    decay = torch.exp(delta[..., None] * A)  # (Bt, L, Dm, N)
    x = (delta * u)[..., None] * B[:, :, None, :]  # (Bt, L, Dm, N)
    h = u.new_zeros(Bt, Dm, A.shape[1])
    ys = []
    for t in range(L):
        h = decay[:, t] * h + x[:, t]
        ys.append((h * C[:, t, None, :]).sum(-1))
    y = torch.stack(ys, dim=1)
    return y if D is None else y + D * u


def scan_states(a: torch.Tensor, x: torch.Tensor, chunk_size: int = 32) -> torch.Tensor:
    """All states h (Bt, L, Dm, N) of h_t = a_t h_{t-1} + x_t, h_{-1} = 0; a, x (Bt, L, Dm, N).

    Differentiable plain torch ops (no in-place), traceable by torch.export for a fixed L."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    Bt, L, Dm, N = a.shape
    T = min(chunk_size, L)
    nc = -(-L // T)
    pad = nc * T - L
    if pad:  # identity elements: decay 1, input 0
        a = torch.cat([a, a.new_ones(Bt, pad, Dm, N)], dim=1)
        x = torch.cat([x, x.new_zeros(Bt, pad, Dm, N)], dim=1)
    a = a.reshape(Bt, nc, T, Dm, N)
    x = x.reshape(Bt, nc, T, Dm, N)
    k = 1
    while k < T:  # after this level, x[t] sums the inputs of (t - 2k, t], a[t] the decays
        x = torch.cat([x[:, :, :k], x[:, :, k:] + a[:, :, k:] * x[:, :, :-k]], dim=2)
        a = torch.cat([a[:, :, :k], a[:, :, k:] * a[:, :, :-k]], dim=2)
        k *= 2
    # x: chunk-local states (zero state at chunk start); a: decay from chunk start to t.
    outs = [x[:, 0]]
    for c in range(1, nc):
        outs.append(x[:, c] + a[:, c] * outs[-1][:, -1:])
    h = torch.stack(outs, dim=1).reshape(Bt, nc * T, Dm, N)
    return h[:, :L] if pad else h


def selective_scan_chunked(u, delta, A, B, C, D=None, chunk_size: int = 32):
    """y (Bt, L, Dm), same as :func:`selective_scan_ref`, by a chunked parallel scan."""
    check_selective_scan(u, delta, A, B, C, D)
    decay = torch.exp(delta[..., None] * A)  # (Bt, L, Dm, N), in (0, 1] for A <= 0
    x = (delta * u)[..., None] * B[:, :, None, :]
    h = scan_states(decay, x, chunk_size)
    y = torch.einsum("bldn,bln->bld", h, C)
    return y if D is None else y + D * u
