"""Selective scan (Mamba's diagonal state-space recurrence) in plain PyTorch.

Glossary (letters as in docs/glossary.md)
    Bt   batch of sequences
    L    sequence length (tokens)
    Dm   channels (d_inner; E when called by the Mamba branch)
    N_s  state size per channel (d_state; the code's variables and error messages call it N)
    Q    chunk length (``chunk_size``; the code's local variable T, which is not the tile side)
    nc   number of chunks, ceil(L / Q)

Tensors (Mamba's names: A, B, C, D and the state h are tensors, not dimension letters)
    u, delta  (Bt, L, Dm)       A (Dm, N_s), negative real       B, C (Bt, L, N_s)
    D  (Dm,) or None            h  (Bt, Dm, N_s) state           y  (Bt, L, Dm)

Recurrence over the token positions l = 0 .. L-1, h_{-1} = 0:
    h_l = exp(delta_l A) * h_{l-1} + (delta_l u_l) B_l      (outer product over Dm x N_s)
    y_l = sum_n h_l[:, :, n] C_l[n] + D u_l

``selective_scan_ref`` is the step-by-step loop under autograd (the definition; slow backward).
``selective_scan_chunked`` (the default everywhere) gives the same result in two forms:

* eager: a custom autograd.Function that walks the sequence chunk by chunk (Q steps), keeping
  only that chunk's (Q, Bt, Dm, N_s) decays/inputs/states in memory, updating the state in place
  and saving just the chunk-boundary states (Bt, nc, Dm, N_s). Its backward recomputes each
  chunk's states from the saved boundary and runs the adjoint recurrence backwards
  (dh_l = C_l dy_l + a_{l+1} dh_{l+1}), then forms every gradient with a few einsums.
* traced (torch.export / torch.compile / ONNX): a parallel formulation of plain differentiable
  ops, :func:`scan_states`: within every chunk a Hillis-Steele scan of (decay, input) pairs
  (log2 Q levels, vectorised over all chunks), then one short loop over chunks carries the
  state. It gives a compact graph.

Both only ever multiply decays a_l = exp(delta_l A) in (0, 1] (no exp of a positive number, no
division by a decay), so they are as stable as the loop. Half-precision inputs are computed in
float32 and the result is cast back.

Measured on a 2-core CPU (benchmarks/bench_kernels.py): the parallel formulation does several
times the loop's arithmetic over working sets that leave the cache, and loses to the in-place
sequential update per chunk; hence the eager form. Its gains over the autograd loop: far less
memory (boundary states instead of every step's tensors), and fewer launches at small sizes;
at BDGF's larger sizes both are memory-bound and run at similar speed.
"""

from __future__ import annotations

import torch

from . import _checks as ck


def check_selective_scan(u, delta, A, B, C, D=None) -> None:
    """u, delta, B, C share one dtype; A and D may be float32 beside half-precision u (autocast)."""
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
    for name, t in (("delta", delta), ("B", B), ("C", C)):
        ck.need_same_dtype(name, t, "u", u)
    ck.need_float("A", A)
    if D is not None:
        ck.need_shape("D", D, (Dm,), "(Dm,)")
        ck.need_float("D", D)
    ck.need_same_device(dict(u=u, delta=delta, A=A, B=B, C=C) | ({} if D is None else {"D": D}))


def _acc_dtype(*ts) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def selective_scan_ref(u, delta, A, B, C, D=None):
    """y (Bt, L, Dm), dtype of u, by the step-by-step loop (the definition; slow)."""
    check_selective_scan(u, delta, A, B, C, D)
    acc = _acc_dtype(u, A, D)
    u_, delta_, A_, B_, C_ = (t.to(acc) for t in (u, delta, A, B, C))
    Bt, L, Dm = u.shape
    h = u_.new_zeros(Bt, Dm, A.shape[1])
    ys = []
    # unbind (not indexing [:, t]): its backward stacks the L step gradients once instead of
    # materialising a full (Bt, L, ...) gradient per step
    for u_t, d_t, b_t, c_t in zip(u_.unbind(1), delta_.unbind(1), B_.unbind(1), C_.unbind(1)):
        h = torch.exp(d_t[..., None] * A_) * h + (d_t * u_t)[..., None] * b_t[:, None, :]
        ys.append((h * c_t[:, None, :]).sum(-1))
    y = torch.stack(ys, dim=1)
    return (y if D is None else y + D.to(acc) * u_).to(u.dtype)


# ----------------------------------------------------------------------------- parallel (traced)


def scan_states(a: torch.Tensor, x: torch.Tensor, chunk_size: int = 32) -> torch.Tensor:
    """All states h (Bt, L, Dm, N_s) of h_l = a_l h_{l-1} + x_l, h_{-1} = 0; a, x (Bt, L, Dm, N_s).

    Parallel formulation of differentiable plain ops (no in-place), traceable for a fixed L."""
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
    # T here is the chunk length Q (not the tile side).
    while k < T:  # after this level, x[l] sums the inputs of (l - 2k, l], a[l] the decays
        x = torch.cat([x[:, :, :k], x[:, :, k:] + a[:, :, k:] * x[:, :, :-k]], dim=2)
        a = torch.cat([a[:, :, :k], a[:, :, k:] * a[:, :, :-k]], dim=2)
        k *= 2
    # x: chunk-local states (zero state at chunk start); a: decay from chunk start to t.
    outs = [x[:, 0]]
    for c in range(1, nc):
        outs.append(x[:, c] + a[:, c] * outs[-1][:, -1:])
    h = torch.stack(outs, dim=1).reshape(Bt, nc * T, Dm, N)
    return h[:, :L] if pad else h


def _chunked_parallel(u, delta, A, B, C, D, chunk_size):
    decay = torch.exp(delta[..., None] * A)  # (Bt, L, Dm, N_s), in (0, 1] for A <= 0
    x = (delta * u)[..., None] * B[:, :, None, :]
    y = torch.einsum("bldn,bln->bld", scan_states(decay, x, chunk_size), C)
    return y if D is None else y + D * u


# ----------------------------------------------------------------------------- eager (chunk loop)


def _tm(t, t0, t1):
    """Steps [t0, t1) of a (Bt, L, ...) tensor, time-major and contiguous: (Q, Bt, ...). Keeping
    every operand contiguous time-major makes the full-size (Q, Bt, Dm, N_s) results contiguous too."""
    return t[:, t0:t1].transpose(0, 1).contiguous()


def _chunk_inputs(u, delta, A, B, t0, t1):
    """Time-major decays a and inputs x of steps [t0, t1): (Q, Bt, Dm, N_s) each, contiguous."""
    dl = _tm(delta, t0, t1)  # (Q, Bt, Dm)
    a = torch.exp(dl[..., None] * A)
    x = (dl * _tm(u, t0, t1))[..., None] * _tm(B, t0, t1)[:, :, None, :]
    return a, x


def _chunk_states(a, x, h):
    """States (Q, Bt, Dm, N_s) of the chunk from the state h (Bt, Dm, N_s) before it; in place on x."""
    for t in range(a.shape[0]):
        h = x[t].addcmul_(a[t], h)
    return x


def _contract_n(s, v):
    """sum_n s[l, b, d, n] v[l, b, n] -> (Q, Bt, Dm); v (Q, Bt, N_s). Batched matvec."""
    T, Bt, Dm, N = s.shape
    return torch.matmul(s.reshape(T * Bt, Dm, N), v.reshape(T * Bt, N, 1)).view(T, Bt, Dm)


def _contract_d(w, s):
    """sum_d w[l, b, d] s[l, b, d, n] -> (Bt, Q, N_s); w (Q, Bt, Dm). Batched vecmat."""
    T, Bt, Dm, N = s.shape
    return torch.matmul(w.reshape(T * Bt, 1, Dm), s.reshape(T * Bt, Dm, N)).view(T, Bt, N).transpose(0, 1)


def _forward_chunks(u, delta, A, B, C, chunk_size):
    """y (Bt, L, Dm) without D, and the state before each chunk (nc, Bt, Dm, N_s)."""
    Bt, L, Dm = u.shape
    y = u.new_empty(Bt, L, Dm)
    h = u.new_zeros(Bt, Dm, A.shape[1])
    starts = []
    for t0 in range(0, L, chunk_size):
        t1 = min(t0 + chunk_size, L)
        starts.append(h)
        a, x = _chunk_inputs(u, delta, A, B, t0, t1)
        hs = _chunk_states(a, x, h)
        y[:, t0:t1] = _contract_n(hs, _tm(C, t0, t1)).transpose(0, 1)
        h = hs[-1]  # a view into this chunk's buffer, which is not reused
    return y, torch.stack(starts)


class _ChunkedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, chunk_size):
        y, starts = _forward_chunks(u, delta, A, B, C, chunk_size)
        ctx.save_for_backward(u, delta, A, B, C, starts)
        ctx.chunk_size = chunk_size
        return y

    @staticmethod
    def backward(ctx, dy):
        u, delta, A, B, C, starts = ctx.saved_tensors
        T = ctx.chunk_size
        L = u.shape[1]
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dB, dC = torch.empty_like(B), torch.empty_like(C)
        dA = torch.zeros_like(A)
        carry = torch.zeros_like(starts[0])  # a_{l+1} dh_{l+1} flowing into the chunk's last step
        for c in reversed(range(starts.shape[0])):
            t0, t1 = c * T, min(c * T + T, L)
            a, x = _chunk_inputs(u, delta, A, B, t0, t1)
            hs = _chunk_states(a, x, starts[c])  # (Q, Bt, Dm, N_s)
            dyc = _tm(dy, t0, t1)  # (Q, Bt, Dm)
            dh = dyc[..., None] * _tm(C, t0, t1)[:, :, None, :]  # C_l dy_l
            for t in reversed(range(t1 - t0)):  # dh_l = C_l dy_l + a_{l+1} dh_{l+1} (l: the loop's t)
                torch.mul(a[t], dh[t].add_(carry), out=carry)
            dC[:, t0:t1] = _contract_d(dyc, hs)
            dlog = a.mul_(dh)  # gradient w.r.t. delta_l A: dh_l * h_{l-1} * a_l
            dlog[1:].mul_(hs[:-1])
            dlog[0].mul_(starts[c])
            dlt, uc = _tm(delta, t0, t1), _tm(u, t0, t1)
            dA += (dlog * dlt[..., None]).sum(dim=(0, 1))
            dxb = _contract_n(dh, _tm(B, t0, t1))  # gradient w.r.t. delta_l u_l, (Q, Bt, Dm)
            ddelta[:, t0:t1] = ((dlog * A).sum(-1) + dxb * uc).transpose(0, 1)
            du[:, t0:t1] = (dxb * dlt).transpose(0, 1)
            dB[:, t0:t1] = _contract_d(dlt * uc, dh)
        return du, ddelta, dA, dB, dC, None


def _tracing() -> bool:
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)()
    return bool(torch.compiler.is_compiling() or exporting or torch.jit.is_tracing()
                or torch.onnx.is_in_onnx_export())


def auto_chunk_size(Bt: int, Dm: int, N: int) -> int:
    """Q such that a chunk's (Q, Bt, Dm, N_s) float32 tensors stay near 2 MiB (cache-sized),
    a power of two in [2, 32]. Measured on CPU: Q = 4 at (Bt, Dm, N_s) = (64, 128, 16) ran 1.3x
    faster than Q = 16; at small sizes Q = 16-32 is best (fewer launches)."""
    t = max(1, (1 << 19) // max(1, Bt * Dm * N))
    return min(32, max(2, 1 << (t.bit_length() - 1)))


def selective_scan_chunked(u, delta, A, B, C, D=None, chunk_size: int | None = None):
    """y (Bt, L, Dm), dtype of u: same as :func:`selective_scan_ref`, chunk by chunk (Q =
    chunk_size, default :func:`auto_chunk_size`); the parallel formulation inside a trace (see
    the module docstring)."""
    check_selective_scan(u, delta, A, B, C, D)
    if chunk_size is None:
        # Inside a trace the batch is symbolic: a chunk size computed from it would pin the
        # exported graph to one batch size, so traces use a fixed one.
        symbolic = any(isinstance(d, torch.SymInt) for d in u.shape)
        chunk_size = 16 if (symbolic or _tracing()) else auto_chunk_size(u.shape[0], u.shape[2], A.shape[1])
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    acc = _acc_dtype(u, A, D)
    u_, delta_, A_, B_, C_ = (t.to(acc) for t in (u, delta, A, B, C))
    if _tracing():
        y = _chunked_parallel(u_, delta_, A_, B_, C_, None, chunk_size)
    elif torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C)):
        y = _ChunkedScan.apply(u_.contiguous(), delta_.contiguous(), A_.contiguous(), B_.contiguous(),
                               C_.contiguous(), chunk_size)
    else:
        with torch.no_grad():
            y = _forward_chunks(u_, delta_, A_, B_, C_, chunk_size)[0]
    return (y if D is None else y + D.to(acc) * u_).to(u.dtype)
