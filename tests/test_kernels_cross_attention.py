"""Cross-attention: the reference by definition, the flash kernel (interpreter) vs the reference."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # Triton reads this when first imported: set it before that
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.cross_attention import cross_attention_ref, cross_attention_triton  # noqa: E402

import triton  # noqa: E402,F401 - installed on Linux; the kernels run under TRITON_INTERPRET=1

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}


@pytest.fixture
def interp(monkeypatch):
    from kernels._triton_util import interpreter_ready

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not interpreter_ready():
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set; run pytest with TRITON_INTERPRET=1")


def _qkv(B, H, Nq, Nk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq, D, generator=g).to(dtype).requires_grad_()
    k = torch.randn(B, H, Nk, D, generator=g).to(dtype).requires_grad_()
    v = torch.randn(B, H, Nk, D, generator=g).to(dtype).requires_grad_()
    return q, k, v


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
