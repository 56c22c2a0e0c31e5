"""Masked denoising kernels: references by definition, Triton vs reference: under Triton's
interpreter on CPU (its own blocks, and the 1024-wide cap a GPU runs), and compiled on CUDA
tensors (marked `gpu`; skipped with a reason where no CUDA device can launch Triton)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton reads this when first imported: set it before that
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.masked_denoise import (balanced_mse_ref, balanced_mse_triton, noise_and_mask_ref,
                                    noise_and_mask_triton)

import triton  # noqa: E402,F401 - installed on Linux; the kernels run under TRITON_INTERPRET=1

CM = torch.tensor([0, 0, 0, 0, 1, 2, 2])  # 4-band, 1-band, 2-band modalities
M = 3
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
PRESENT = {  # (B=3, M=3) patterns
    "all": [[1, 1, 1]] * 3,
    "one_masked": [[1, 0, 1], [0, 1, 1], [1, 1, 0]],
    "all_but_one": [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
}


def _inputs(dtype, B=3, H=5, W=7, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, len(CM), H, W, generator=g).to(device, dtype)
    eps = torch.randn(B, len(CM), H, W, generator=g).to(device, dtype)
    sab = torch.rand(B, generator=g).to(device)
    return x0, eps, sab, (1 - sab**2).sqrt()


def _check_both_against_ref(dtype, hw, pattern, device="cpu", tol=None):
    """noise_and_mask (value, d mask_embed, d sqrt_ab) and balanced_mse (value, d pred) vs the references."""
    tol = TOL[dtype] if tol is None else tol
    cm = CM.to(device)
    x0, eps, sab, s1 = _inputs(dtype, H=hw[0], W=hw[1], device=device)
    present = torch.tensor(PRESENT[pattern], dtype=torch.float32, device=device)
    emb = torch.randn(len(CM), device=device, requires_grad=True)
    sab = sab.requires_grad_()
    ref = noise_and_mask_ref(x0, eps, sab, s1, present, emb, cm)
    out = noise_and_mask_triton(x0, eps, sab, s1, present, emb, cm)
    assert out.dtype == dtype and out.shape == x0.shape and out.device == x0.device
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5)).to(device, dtype)
    for a, b in zip(torch.autograd.grad(out, (emb, sab), g), torch.autograd.grad(ref, (emb, sab), g)):
        torch.testing.assert_close(a, b, atol=5e-4 * hw[0] * hw[1] / 35, rtol=tol)
    pred = x0.detach().clone().requires_grad_()
    ref = balanced_mse_ref(pred, eps, cm, M)
    out = balanced_mse_triton(pred, eps, cm, M)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    w = torch.rand(3, M, device=device)
    go, = torch.autograd.grad(out, pred, w)
    gr, = torch.autograd.grad(ref, pred, w)
    torch.testing.assert_close(go.float(), gr.float(), atol=1e-6, rtol=tol)


def test_noise_and_mask_ref_definition():
    x0, eps, sab, s1 = _inputs(torch.float32)
    present = torch.tensor(PRESENT["one_masked"], dtype=torch.float32)
    emb = torch.arange(len(CM), dtype=torch.float32) + 10
    out = noise_and_mask_ref(x0, eps, sab, s1, present, emb, CM)
    for b in range(3):
        for c in range(len(CM)):
            want = sab[b] * x0[b, c] + s1[b] * eps[b, c] if present[b, CM[c]] else emb[c].expand(5, 7)
            torch.testing.assert_close(out[b, c], want)
    assert torch.equal(out, noise_and_mask_ref(x0, eps, sab, s1, present.bool(), emb, CM))


def test_noise_and_mask_ref_gradcheck():
    x0, eps, sab, s1 = (t.double() for t in _inputs(torch.float32, B=2, H=2, W=3))
    present = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.bool)
    emb = torch.randn(len(CM), dtype=torch.double, requires_grad=True)
    x0.requires_grad_()
    with torch.enable_grad():  # independent of any grad mode another test may have left behind
        assert torch.autograd.gradcheck(lambda e, x: noise_and_mask_ref(x, eps, sab, s1, present, e, CM), (emb, x0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern", list(PRESENT))
def test_noise_and_mask_triton_matches_ref(interp, dtype, pattern):
    x0, eps, sab, s1 = _inputs(dtype)
    present = torch.tensor(PRESENT[pattern], dtype=torch.float32)
    emb = torch.randn(len(CM), requires_grad=True)
    sab = sab.requires_grad_()
    ref = noise_and_mask_ref(x0, eps, sab, s1, present, emb, CM)
    out = noise_and_mask_triton(x0, eps, sab, s1, present, emb, CM)
    assert out.dtype == dtype and out.shape == x0.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    g = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, (emb, sab), g)
    g_out = torch.autograd.grad(out, (emb, sab), g)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, atol=5e-4, rtol=TOL[dtype])
    if pattern == "all":  # nothing masked: the embedding gets no gradient
        assert torch.count_nonzero(g_out[0]) == 0


def test_noise_and_mask_triton_x0_grad(interp):
    x0, eps, sab, s1 = _inputs(torch.float32)
    x0.requires_grad_()
    present = torch.tensor(PRESENT["one_masked"])
    emb = torch.randn(len(CM))
    g = torch.randn_like(x0)
    want = torch.autograd.grad(noise_and_mask_ref(x0, eps, sab, s1, present, emb, CM), x0, g)[0]
    got = torch.autograd.grad(noise_and_mask_triton(x0, eps, sab, s1, present, emb, CM), x0, g)[0]
    torch.testing.assert_close(got, want)


def test_balanced_mse_ref_definition():
    """Each modality weighs the same, whatever its band count."""
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, len(CM), 4, 3, generator=g), torch.randn(2, len(CM), 4, 3, generator=g)
    out = balanced_mse_ref(pred, target, CM, M)
    assert out.shape == (2, M) and out.dtype == torch.float32
    for m in range(M):
        sel = CM == m
        torch.testing.assert_close(out[:, m], ((pred - target)[:, sel] ** 2).mean(dim=(1, 2, 3)))
    # a modality with no channels gives 0, not nan
    assert torch.equal(balanced_mse_ref(pred, target, CM, M + 1)[:, M], torch.zeros(2))


def test_balanced_mse_ref_gradcheck():
    g = torch.Generator().manual_seed(2)
    pred = torch.randn(2, len(CM), 2, 3, generator=g, dtype=torch.double, requires_grad=True)
    target = torch.randn(2, len(CM), 2, 3, generator=g, dtype=torch.double)
    assert torch.autograd.gradcheck(lambda p: balanced_mse_ref(p, target, CM, M), (pred,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hw", [(5, 7), (33, 40)])
def test_balanced_mse_triton_matches_ref(interp, dtype, hw):
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(3, len(CM), *hw, generator=g).to(dtype).requires_grad_()
    target = torch.randn(3, len(CM), *hw, generator=g).to(dtype)
    ref = balanced_mse_ref(pred, target, CM, M)
    out = balanced_mse_triton(pred, target, CM, M)
    assert out.shape == (3, M) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    w = torch.rand(3, M)
    gr, = torch.autograd.grad(ref, pred, w)
    go, = torch.autograd.grad(out, pred, w)
    torch.testing.assert_close(go.float(), gr.float(), atol=1e-6, rtol=TOL[dtype])


def test_triton_rejects_bad_inputs_before_launch(interp):
    x0, eps, sab, s1 = _inputs(torch.float32)
    present, emb = torch.ones(3, M), torch.zeros(len(CM))
    with pytest.raises(ValueError, match="eps"):
        noise_and_mask_triton(x0, eps[:, :-1], sab, s1, present, emb, CM)
    with pytest.raises(ValueError, match="channel_modality"):
        noise_and_mask_triton(x0, eps, sab, s1, present, emb, CM + 1)
    with pytest.raises(ValueError, match="present"):
        noise_and_mask_triton(x0, eps, sab, s1, present[:2], emb, CM)
    with pytest.raises(ValueError, match="target"):
        balanced_mse_triton(x0, eps.half(), CM, M)
    with pytest.raises(ValueError, match="channel_modality"):
        balanced_mse_triton(x0, eps, CM.float(), M)


# Planes larger than the GPU's 1024-wide block (kernels.tl_masked_denoise.block_for(hw, False)):
# several blocks per plane, the last one ragged (33 x 40 = 1320 px; 64 x 64 = 4096 px, a
# pretraining tile); and one smaller than a block.
GPU_HW = [(33, 40), (64, 64), (5, 7)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hw", GPU_HW[:2])
def test_gpu_block_sizes_interpreted(interp, monkeypatch, dtype, hw):
    """The GPU's block cap (1024 px, several blocks per plane) under the interpreter."""
    from kernels import tl_masked_denoise as K

    gpu = K.block_for
    monkeypatch.setattr(K, "block_for", lambda n, interpret: gpu(n, False))
    assert gpu(hw[0] * hw[1], False) == 1024 < hw[0] * hw[1]
    _check_both_against_ref(dtype, hw, "one_masked")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hw", GPU_HW)
@pytest.mark.parametrize("pattern", list(PRESENT))
def test_triton_on_cuda_matches_ref(cuda_triton, dtype, hw, pattern):
    """Compiled kernels on CUDA tensors at the block sizes a GPU runs, forward and backward."""
    _check_both_against_ref(dtype, hw, pattern, device=cuda_triton)


@pytest.mark.gpu
def test_dispatch_on_cuda_picks_triton(cuda_triton, monkeypatch):
    import kernels
    from kernels import dispatch

    monkeypatch.delenv("BDGF_KERNELS", raising=False)
    monkeypatch.setattr(dispatch, "_broken", set())
    x0, eps, sab, s1 = _inputs(torch.bfloat16, H=64, W=64, device=cuda_triton)
    present = torch.tensor(PRESENT["one_masked"], device=cuda_triton)
    emb = torch.zeros(len(CM), device=cuda_triton, requires_grad=True)
    cm = CM.to(cuda_triton)
    assert kernels.backend_for("noise_and_mask", x0, eps, emb) == "triton"
    assert kernels.backend_for("balanced_mse", x0, eps) == "triton"
    xt = kernels.noise_and_mask(x0, eps, sab, s1, present, emb, cm)
    loss = kernels.balanced_mse(xt, eps, cm, M)
    torch.testing.assert_close(loss, balanced_mse_ref(noise_and_mask_ref(x0, eps, sab, s1, present, emb, cm), eps, cm, M),
                               atol=2e-2, rtol=2e-2)
    loss.sum().backward()
    assert emb.grad is not None and torch.count_nonzero(emb.grad) > 0
    assert not dispatch._broken
