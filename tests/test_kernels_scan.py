"""Selective scan: the chunked scan (eager and traced forms) against the step-by-step loop."""

from __future__ import annotations

import pytest
import torch

from kernels.selective_scan import _chunked_parallel, selective_scan_chunked, selective_scan_ref


def _inputs(Bt, L, Dm, N, dtype=torch.float64, seed=0, delta_scale=1.0, a_scale=3.0):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_()

    u, B, C, D = r(Bt, L, Dm), r(Bt, L, N), r(Bt, L, N), r(Dm)
    delta = (torch.rand(Bt, L, Dm, generator=g, dtype=torch.float64) * delta_scale).to(dtype).requires_grad_()
    A = (-torch.rand(Dm, N, generator=g, dtype=torch.float64) * a_scale - 0.05).to(dtype).requires_grad_()
    return u, delta, A, B, C, D


def _grads(y, ins, g):
    gs = torch.autograd.grad(y, ins, g, allow_unused=True)
    return [torch.zeros_like(t) if x is None else x for x, t in zip(gs, ins)]


def test_ref_loop_matches_closed_form_single_channel():
    """One channel, one state: y_t = sum_{s<=t} exp(A sum_{s<r<=t} delta_r) delta_s u_s B_s C_t + D u_t."""
    u, delta, A, B, C, D = (t.detach() for t in _inputs(1, 6, 1, 1))
    y = selective_scan_ref(u, delta, A, B, C, D)[0, :, 0]
    cs = torch.cumsum(delta[0, :, 0], 0)
    for t in range(6):
        want = sum(torch.exp(A[0, 0] * (cs[t] - cs[s])) * delta[0, s, 0] * u[0, s, 0] * B[0, s, 0]
                   for s in range(t + 1)) * C[0, t, 0] + D[0] * u[0, t, 0]
        torch.testing.assert_close(y[t], want)


@pytest.mark.parametrize("L", [1, 37, 64])
@pytest.mark.parametrize("chunk", [1, 3, 8, 32])
def test_chunked_matches_loop_forward_and_grads(L, chunk):
    ins = _inputs(2, L, 5, 4)
    ref = selective_scan_ref(*ins)
    g = torch.randn_like(ref)
    g_ref = _grads(ref, ins, g)
    out = selective_scan_chunked(*ins, chunk_size=chunk)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for name, a, b in zip("u delta A B C D".split(), _grads(out, ins, g), g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"grad {name}")
    par = _chunked_parallel(*ins, chunk)  # the form used inside torch.export / compile
    torch.testing.assert_close(par, ref, rtol=1e-10, atol=1e-10)
    for name, a, b in zip("u delta A B C D".split(), _grads(par, ins, g), g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"parallel grad {name}")


def test_gradcheck_ref_and_chunked():
    ins = _inputs(1, 5, 2, 3)
    assert torch.autograd.gradcheck(selective_scan_ref, ins)
    assert torch.autograd.gradcheck(lambda *a: selective_scan_chunked(*a, chunk_size=2), ins)


def test_no_grad_path_and_without_D():
    ins = _inputs(2, 19, 3, 2)
    ref = selective_scan_ref(*ins[:5])
    with torch.no_grad():
        out = selective_scan_chunked(*ins[:5], chunk_size=4)
    torch.testing.assert_close(out, ref.detach())
    only_u = [t.detach() for t in ins]
    only_u[0].requires_grad_()  # gradient w.r.t. one input only
    gu = torch.autograd.grad(selective_scan_chunked(*only_u, chunk_size=4).sum(), only_u[0])[0]
    torch.testing.assert_close(gu, torch.autograd.grad(selective_scan_ref(*ins).sum(), ins[0])[0])


def test_stable_under_strong_decay():
    """delta * A down to -800 per step: no inf/nan, same as the loop (a log-space cumsum of the
    inverse decay would overflow here)."""
    ins = _inputs(2, 50, 3, 4, dtype=torch.float32, delta_scale=50.0, a_scale=16.0)
    ref = selective_scan_ref(*ins)
    out = selective_scan_chunked(*ins, chunk_size=16)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    for a, b in zip(_grads(out, ins, g), _grads(ref, ins, g)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    ins = _inputs(2, 21, 4, 3, dtype=dtype)
    ref = selective_scan_ref(*[t.detach().double() for t in ins])
    out = selective_scan_chunked(*ins, chunk_size=8)
    assert out.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == t.dtype for t in ins)


def test_fp32_A_and_D_with_bf16_tokens():
    u, delta, A, B, C, D = (t.detach() for t in _inputs(1, 7, 3, 2, dtype=torch.float32))
    out = selective_scan_chunked(u.bfloat16(), delta.bfloat16(), A, B.bfloat16(), C.bfloat16(), D)
    assert out.dtype == torch.bfloat16


def test_bad_inputs_rejected():
    u, delta, A, B, C, D = (t.detach() for t in _inputs(2, 7, 3, 2, dtype=torch.float32))
    with pytest.raises(ValueError, match="delta"):
        selective_scan_chunked(u, delta[:, :6], A, B, C, D)
    with pytest.raises(ValueError, match="A must"):
        selective_scan_chunked(u, delta, A[:2], B, C, D)
    with pytest.raises(ValueError, match="C must"):
        selective_scan_chunked(u, delta, A, B, C[..., :1], D)
    with pytest.raises(ValueError, match="B has dtype"):
        selective_scan_chunked(u, delta, A, B.double(), C, D)
    with pytest.raises(ValueError, match="D must"):
        selective_scan_ref(u, delta, A, B, C, D[:2])
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan_chunked(u, delta, A, B, C, D, chunk_size=0)


def test_auto_chunk_size_and_default():
    from kernels.selective_scan import auto_chunk_size

    assert auto_chunk_size(64, 128, 16) == 4 and auto_chunk_size(4, 16, 8) == 32 and auto_chunk_size(512, 256, 16) == 2
    ins = _inputs(2, 40, 3, 2)
    torch.testing.assert_close(selective_scan_chunked(*ins), selective_scan_ref(*ins))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_on_cuda_matches_loop(dtype):
    """The scan on CUDA tensors (the path the Mamba branch takes on a GPU without mamba_ssm): the
    chunked scan against the step-by-step loop, both on the GPU, forward and gradients."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: this test runs the scan on a GPU")
    ins = [t.detach().to("cuda", dtype).requires_grad_() for t in _inputs(4, 121, 32, 16, dtype=torch.float32,
                                                                             delta_scale=0.1)]
    ref = selective_scan_ref(*ins)
    out = selective_scan_chunked(*ins)
    tol = 1e-4 if dtype == torch.float32 else 5e-2  # both scan in float32; bf16 only rounds the ends
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    g = torch.randn_like(ref)
    gtol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    for name, a, b in zip("u delta A B C D".split(), _grads(out, ins, g), _grads(ref, ins, g)):
        torch.testing.assert_close(a.float(), b.float(), **gtol, msg=f"grad {name}")
