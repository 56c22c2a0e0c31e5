"""Cross-attention: the reference by definition, the flash kernel vs the reference: under Triton's
interpreter on CPU (its own 16-wide blocks, and the 64-wide blocks a GPU runs), and compiled on
CUDA tensors (marked `gpu`; skipped with a reason where no CUDA device can launch Triton)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # Triton reads this when first imported: set it before that
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.cross_attention import cross_attention_ref, cross_attention_triton  # noqa: E402

import triton  # noqa: E402,F401 - installed on Linux; the kernels run under TRITON_INTERPRET=1

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}


def _gpu_blocks(monkeypatch):
    """Make the interpreter run the block configuration a GPU runs (64-wide query/key blocks)."""
    ca = sys.modules["kernels.cross_attention"]
    gpu = ca._blocks
    monkeypatch.setattr(ca, "_blocks", lambda D, interpret: gpu(D, False))
    return gpu


def _qkv(B, H, Nq, Nk, D, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq, D, generator=g).to(device, dtype).requires_grad_()
    k = torch.randn(B, H, Nk, D, generator=g).to(device, dtype).requires_grad_()
    v = torch.randn(B, H, Nk, D, generator=g).to(device, dtype).requires_grad_()
    return q, k, v


def _check_against_ref(q, k, v, tol, scale=None):
    ref = cross_attention_ref(q, k, v, scale)
    out = cross_attention_triton(q, k, v, scale)
    assert out.dtype == q.dtype and out.shape == q.shape and out.device == q.device
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(ref.device, ref.dtype)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a.float(), b.float(), atol=2 * tol, rtol=2 * tol, msg=lambda m: f"d{name}: {m}")


def test_ref_is_softmax_attention():
    q, k, v = _qkv(2, 3, 5, 7, 8, torch.float32)
    torch.testing.assert_close(cross_attention_ref(q, k, v), F.scaled_dot_product_attention(q, k, v))
    s = torch.softmax(q @ k.transpose(-1, -2) * 0.3, dim=-1)
    torch.testing.assert_close(cross_attention_ref(q, k, v, scale=0.3), s @ v)


def test_ref_gradcheck():
    q, k, v = (t.detach().double().requires_grad_() for t in _qkv(1, 2, 3, 4, 5, torch.float32))
    assert torch.autograd.gradcheck(cross_attention_ref, (q, k, v))


# (B, Hh, Nq, Nk, D): ragged token counts (not multiples of the 16-wide interpreter blocks),
# a single key, and head dims that need padding (24) or not (16, 32)
SHAPES = [(2, 2, 37, 45, 16), (1, 1, 5, 1, 24), (1, 2, 17, 33, 32)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_ref(interp, dtype, shape):
    q, k, v = _qkv(*shape, dtype)
    ref = cross_attention_ref(q, k, v)
    out = cross_attention_triton(q, k, v)
    assert out.dtype == dtype and out.shape == q.shape
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a.float(), b.float(), atol=2 * tol, rtol=2 * tol)


def test_triton_custom_scale_and_noncontiguous(interp):
    q, k, v = _qkv(1, 2, 9, 20, 16, torch.float32)
    kt = k.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()  # same values, other strides
    assert not kt.is_contiguous()
    ref = cross_attention_ref(q, kt, v, scale=0.7)
    out = cross_attention_triton(q, kt, v, scale=0.7)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), kt)[0], torch.autograd.grad(ref.sum(), kt)[0],
                               atol=4e-5, rtol=4e-5)


def test_bad_inputs_rejected():
    q, k, v = _qkv(1, 2, 4, 6, 16, torch.float32)
    with pytest.raises(ValueError, match="k must have shape"):
        cross_attention_triton(q, k[:, :1], v)
    with pytest.raises(ValueError, match="v must have shape"):
        cross_attention_triton(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="dtype"):
        cross_attention_triton(q, k.half(), v)
    with pytest.raises(ValueError, match="head dim"):
        big = torch.randn(1, 1, 2, 160)
        cross_attention_triton(big, big, big)
    with pytest.raises(ValueError, match="float64"):
        cross_attention_triton(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="4-D"):
        cross_attention_ref(q[0], k, v)


# Shapes for the 64-wide blocks a GPU runs (kernels.cross_attention._blocks(D, interpret=False)):
# Nq/Nk ragged against 64 and 32, more than one block in each direction, head dims padded to 128
# (80 -> 64x32 key blocks) or not (32, 64); the BDGF transformer branch's 122 x 121 tokens.
GPU_SHAPES = [(1, 2, 130, 70, 80), (2, 1, 65, 121, 32), (1, 2, 122, 121, 64), (1, 1, 3, 200, 128)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_triton_gpu_block_configs_interpreted(interp, monkeypatch, dtype, shape):
    """The GPU's block configuration (not the interpreter's 16-wide one) under the interpreter."""
    gpu = _gpu_blocks(monkeypatch)
    bm, bn, bd, _ = gpu(shape[-1], False)
    assert bm == 64 and bn in (32, 64) and bd >= shape[-1]
    _check_against_ref(*_qkv(*shape, dtype), TOL[dtype])


GPU_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES + GPU_SHAPES)
def test_triton_on_cuda_matches_ref(cuda_triton, dtype, shape):
    """Compiled kernels on CUDA tensors at the block sizes a GPU runs, forward and backward."""
    _check_against_ref(*_qkv(*shape, dtype, device=cuda_triton), GPU_TOL[dtype])


@pytest.mark.gpu
def test_triton_on_cuda_custom_scale_and_dispatch(cuda_triton, monkeypatch):
    """On CUDA, BDGF_KERNELS=auto picks Triton and gives the reference's result and gradients."""
    import kernels
    from kernels import dispatch

    monkeypatch.delenv("BDGF_KERNELS", raising=False)
    monkeypatch.setattr(dispatch, "_broken", set())
    q, k, v = _qkv(2, 4, 122, 121, 32, torch.bfloat16, device=cuda_triton)
    assert kernels.backend_for("cross_attention", q, k, v) == "triton"
    _check_against_ref(q, k, v, GPU_TOL[torch.bfloat16], scale=0.3)
    out, ref = kernels.cross_attention(q, k, v), cross_attention_ref(q, k, v)
    torch.testing.assert_close(out.float(), ref.float(), atol=4e-2, rtol=4e-2)
    out.float().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad.float()).all()
    assert "cross_attention" not in dispatch._broken
