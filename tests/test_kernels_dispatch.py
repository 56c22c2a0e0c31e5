"""Dispatcher: which back end runs, forcing it, errors before launch, fallback, export."""

from __future__ import annotations

import logging
import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton reads this when first imported: set it before that
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels  # noqa: E402
from kernels import dispatch  # noqa: E402
from kernels import masked_denoise as md  # noqa: E402

CM = torch.tensor([0, 0, 0, 1])


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.delenv("BDGF_KERNELS", raising=False)
    monkeypatch.setattr(dispatch, "_logged", set())
    monkeypatch.setattr(dispatch, "_broken", set())


def _denoise_args(B=2, H=3, W=5):
    x0, eps = torch.randn(B, len(CM), H, W), torch.randn(B, len(CM), H, W)
    sab = torch.rand(B)
    return x0, eps, sab, (1 - sab**2).sqrt(), torch.tensor([[1, 0], [0, 1]]), torch.randn(len(CM)), CM


def _scan_args(Bt=2, L=9, Dm=3, N=2):
    return (torch.randn(Bt, L, Dm), torch.rand(Bt, L, Dm), -torch.rand(Dm, N), torch.randn(Bt, L, N),
            torch.randn(Bt, L, N), torch.randn(Dm))


def test_cpu_auto_picks_references(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 2, 3, 16)
    for op in ("noise_and_mask", "balanced_mse", "cross_attention"):
        assert kernels.backend_for(op, x) == "reference"
    assert kernels.backend_for("selective_scan", x) == "chunked"
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # auto never picks the (slow) interpreter
    assert kernels.backend_for("cross_attention", x) == "reference"


def test_reference_forced_and_results_match_refs(monkeypatch):
    monkeypatch.setenv("BDGF_KERNELS", "reference")
    a = _denoise_args()
    assert kernels.backend_for("noise_and_mask", a[0]) == "reference"
    torch.testing.assert_close(kernels.noise_and_mask(*a), md.noise_and_mask_ref(*a))
    torch.testing.assert_close(kernels.balanced_mse(a[0], a[1], CM, 2), md.balanced_mse_ref(a[0], a[1], CM, 2))
    q = torch.randn(1, 2, 5, 16)
    torch.testing.assert_close(kernels.cross_attention(q, q, q), kernels.cross_attention_ref(q, q, q))
    s = _scan_args()
    assert kernels.backend_for("selective_scan", *s) == "chunked"
    torch.testing.assert_close(kernels.selective_scan(*s), kernels.selective_scan_ref(*s))


def test_bad_mode_rejected(monkeypatch):
    monkeypatch.setenv("BDGF_KERNELS", "fastest")
    with pytest.raises(ValueError, match="BDGF_KERNELS"):
        kernels.backend_for("cross_attention", torch.randn(1))
    with pytest.raises(ValueError, match="unknown kernel op"):
        dispatch.backend_for("softmax")


def test_forced_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("BDGF_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.cross_attention(q, q, q)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.noise_and_mask(*_denoise_args())


def test_forced_triton_with_interpreter_runs_triton(monkeypatch):
    import triton  # noqa: F401
    monkeypatch.setenv("BDGF_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not dispatch.interpreter_ready():
        if torch.cuda.is_available():
            pytest.skip("CUDA host: Triton was imported in compiled mode, so this interpreter test does not run "
                        "here (TRITON_INTERPRET=1 pytest runs it on CPU)")
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set; run pytest with TRITON_INTERPRET=1")
    a = _denoise_args()
    assert kernels.backend_for("noise_and_mask", a[0]) == "triton"
    calls = []
    real = md.noise_and_mask_triton
    monkeypatch.setattr(md, "noise_and_mask_triton", lambda *x: calls.append(1) or real(*x))
    torch.testing.assert_close(kernels.noise_and_mask(*a), md.noise_and_mask_ref(*a))
    assert calls == [1]
    torch.testing.assert_close(kernels.balanced_mse(a[0], a[1], CM, 2), md.balanced_mse_ref(a[0], a[1], CM, 2))
    s = _scan_args()
    assert kernels.backend_for("selective_scan", *s) == "chunked"  # no Triton scan


def test_bad_inputs_raise_before_any_launch(monkeypatch):
    monkeypatch.setenv("BDGF_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def boom(*_):
        raise AssertionError("launched")

    for name in ("noise_and_mask_triton", "balanced_mse_triton"):
        monkeypatch.setattr(md, name, boom)
    monkeypatch.setattr(dispatch._ca, "cross_attention_triton", boom)
    x0, eps, sab, s1, present, emb, cm = _denoise_args()
    with pytest.raises(ValueError, match="mask_embed"):
        kernels.noise_and_mask(x0, eps, sab, s1, present, emb[:2], cm)
    with pytest.raises(ValueError, match="sqrt_ab"):
        kernels.noise_and_mask(x0, eps, sab[:1], s1, present, emb, cm)
    with pytest.raises(ValueError, match="x0"):
        kernels.noise_and_mask(x0.long(), eps, sab, s1, present, emb, cm)
    with pytest.raises(ValueError, match="num_modalities"):
        kernels.balanced_mse(x0, eps, cm, 0)
    with pytest.raises(ValueError, match="target"):
        kernels.balanced_mse(x0, eps[:1], cm, 2)
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="q has dtype|k has dtype"):
        kernels.cross_attention(q, q.half(), q.half())
    with pytest.raises(ValueError, match="u must"):
        kernels.selective_scan(torch.randn(2, 3), *_scan_args()[1:])


def test_allow_list():
    assert dispatch._allow_listed("cross_attention", [torch.randn(1, 1, 2, 64)])
    assert not dispatch._allow_listed("cross_attention", [torch.randn(1, 1, 2, 256)])
    assert not dispatch._allow_listed("balanced_mse", [torch.randn(1, 1, 2, 2, dtype=torch.float64)])


def test_auto_falls_back_when_triton_fails(monkeypatch, caplog):
    def broken(*_):
        raise RuntimeError("0 active drivers")

    with caplog.at_level(logging.WARNING, logger="bdgf.kernels"):
        out = dispatch._run("cross_attention", "triton", broken, lambda *a: "ref", 1)
    assert out == "ref" and "cross_attention" in dispatch._broken
    assert any("Triton failed at forward launch" in r.message for r in caplog.records)
    with pytest.raises(ValueError):  # a validation error is never swallowed
        dispatch._run("cross_attention", "triton", lambda *a: (_ for _ in ()).throw(ValueError("bad")),
                      lambda *a: "ref")


class _BadConfig:
    """A real Triton kernel launched with a bad configuration (a block that is not a power of two):
    the launch fails inside Triton, as a kernel that does not compile for a device would."""

    def __init__(self, lazy, **bad):
        self.lazy, self.bad = lazy, bad

    def __getitem__(self, grid):
        launch = self.lazy[grid]
        return lambda *args, **meta: launch(*args, **{**meta, **self.bad})


def _triton_device():
    """CUDA where Triton can launch there, else CPU under the interpreter (or skip, naming why)."""
    from kernels._triton_util import can_launch

    if torch.cuda.is_available() and can_launch(torch.device("cuda")):
        return torch.device("cuda")
    if not dispatch.interpreter_ready():
        if torch.cuda.is_available():
            pytest.skip("Triton cannot launch on this CUDA device, and the interpreter is off (TRITON_INTERPRET unset)")
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set; run pytest with TRITON_INTERPRET=1")
    return torch.device("cpu")


def test_auto_falls_back_when_a_backward_launch_fails(monkeypatch, caplog):
    """Forward on Triton, its dQ kernel fails at backward: the gradients come from the reference,
    the failure is logged, the op is marked broken and the next call uses the reference."""
    from kernels import tl_cross_attention as K

    dev = _triton_device()
    if dev.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(K, "attn_bwd_dq", _BadConfig(K.attn_bwd_dq, BLOCK_M=12))
    q, k, v = (torch.randn(1, 2, 9, 16, device=dev, requires_grad=True) for _ in range(3))
    with caplog.at_level(logging.WARNING, logger="bdgf.kernels"):
        out = dispatch._run("cross_attention", "triton", dispatch._ca.cross_attention_triton,
                            dispatch._ca.cross_attention_ref, q, k, v, None)
        assert "cross_attention" not in dispatch._broken  # the forward ran on Triton
        assert out.grad_fn is not None
        ref = kernels.cross_attention_ref(q, k, v)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        g = torch.randn_like(ref)
        got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert "cross_attention" in dispatch._broken
    assert any("Triton failed at backward launch" in r.message and "power of 2" in r.message
               for r in caplog.records), [r.message for r in caplog.records]
    if dev.type == "cuda":  # auto: the op is now broken, so the next call is the reference
        assert kernels.backend_for("cross_attention", q, k, v) == "reference"


def test_backward_failure_of_masked_rowsum_falls_back(monkeypatch):
    """The same for noise_and_mask: its mask_embed gradient kernel fails; the reference's gradient comes back."""
    from kernels import tl_masked_denoise as K

    dev = _triton_device()
    if dev.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(K, "masked_rowsum", _BadConfig(K.masked_rowsum, BLOCK=24))
    x0, eps, sab, s1, present, emb, cm = (t.to(dev) for t in _denoise_args())
    emb.requires_grad_()
    out = dispatch._run("noise_and_mask", "triton", md.noise_and_mask_triton, md.noise_and_mask_ref,
                        x0, eps, sab, s1, present, emb, cm)
    g = torch.randn_like(out)
    got, = torch.autograd.grad(out, emb, g)
    want, = torch.autograd.grad(md.noise_and_mask_ref(x0, eps, sab, s1, present, emb, cm), emb, g)
    torch.testing.assert_close(got, want)
    assert dispatch._broken == {"noise_and_mask"}


def test_guarded_backward_without_failure_is_the_triton_gradient(monkeypatch):
    """No failure: gradients through the guard equal Triton's own, nothing is marked broken, and a
    second backward through a retained graph works."""
    dev = _triton_device()
    if dev.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    pred = torch.randn(2, len(CM), 6, 5, device=dev, requires_grad=True)
    target = torch.randn(2, len(CM), 6, 5, device=dev)
    cm = CM.to(dev)
    out = dispatch._run("balanced_mse", "triton", md.balanced_mse_triton, md.balanced_mse_ref, pred, target, cm, 2)
    w = torch.rand(2, 2, device=dev)
    first, = torch.autograd.grad(out, pred, w, retain_graph=True)
    second, = torch.autograd.grad(out, pred, w)
    plain, = torch.autograd.grad(md.balanced_mse_triton(pred, target, cm, 2), pred, w)
    torch.testing.assert_close(first, plain, rtol=0, atol=0)
    torch.testing.assert_close(second, plain, rtol=0, atol=0)
    assert not dispatch._broken


def test_guard_is_not_fooled_by_inplace_edits_or_empty_queries(monkeypatch):
    """An in-place edit of the returned tensor, or an op whose output needs no gradient (no query
    token), is not a launch failure: no fallback, nothing marked broken."""
    dev = _triton_device()
    if dev.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    x0, eps, sab, s1, present, emb, cm = (t.to(dev) for t in _denoise_args())
    emb.requires_grad_()
    out = dispatch._run("noise_and_mask", "triton", md.noise_and_mask_triton, md.noise_and_mask_ref,
                        x0, eps, sab, s1, present, emb, cm)
    out.mul_(2.0)  # an in-place edit downstream
    got, = torch.autograd.grad(out.sum(), emb)
    want, = torch.autograd.grad(md.noise_and_mask_ref(x0, eps, sab, s1, present, emb, cm).mul(2.0).sum(), emb)
    torch.testing.assert_close(got, want)
    q = torch.randn(1, 2, 0, 16, device=dev, requires_grad=True)
    k = torch.randn(1, 2, 3, 16, device=dev, requires_grad=True)
    out = dispatch._run("cross_attention", "triton", dispatch._ca.cross_attention_triton,
                        dispatch._ca.cross_attention_ref, q, k, k, None)
    assert out.shape == q.shape
    out.sum().backward()
    assert not dispatch._broken


def test_forced_triton_lets_a_backward_failure_raise(monkeypatch):
    """BDGF_KERNELS=triton never falls back: the failing backward launch raises."""
    from kernels import tl_cross_attention as K

    dev = _triton_device()
    if dev.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("BDGF_KERNELS", "triton")
    monkeypatch.setattr(K, "attn_bwd_dkdv", _BadConfig(K.attn_bwd_dkdv, BLOCK_N=12))
    q = torch.randn(1, 1, 5, 16, device=dev, requires_grad=True)
    out = kernels.cross_attention(q, q, q)
    with pytest.raises(Exception, match="power of 2"):
        out.sum().backward()
    assert not dispatch._broken


def test_choice_logged_once(caplog):
    q = torch.randn(1, 1, 3, 16)
    with caplog.at_level(logging.INFO, logger="bdgf.kernels"):
        for _ in range(3):
            kernels.cross_attention(q, q, q)
    msgs = [r.message for r in caplog.records if r.name == "bdgf.kernels"]
    assert msgs == ["kernel cross_attention -> reference (auto on cpu)"]


def test_mamba_ssm_layout(monkeypatch):
    """The mamba_ssm back end gets (Bt, Dm, L) / (Bt, N, L) tensors and its output is transposed back."""
    def fake_fn(u, delta, A, B, C, D=None):
        assert u.shape == (2, 3, 9) and B.shape == (2, 2, 9)
        return kernels.selective_scan_ref(u.transpose(1, 2), delta.transpose(1, 2), A,
                                          B.transpose(1, 2), C.transpose(1, 2), D).transpose(1, 2)

    monkeypatch.setattr(dispatch, "_mamba_selective_scan_fn", lambda: fake_fn)
    monkeypatch.setattr(dispatch, "backend_for", lambda *a: "mamba_ssm")
    s = _scan_args()
    torch.testing.assert_close(kernels.selective_scan(*s), kernels.selective_scan_ref(*s))


def test_export_goes_through_references():
    class Net(torch.nn.Module):
        def forward(self, x0, eps, sab, s1, present, emb, u, delta, A, B, C, D, q, k):
            xt = kernels.noise_and_mask(x0, eps, sab, s1, present, emb, CM)
            return (xt, kernels.balanced_mse(xt, x0, CM, 2), kernels.selective_scan(u, delta, A, B, C, D),
                    kernels.cross_attention(q, k, k))

    args = (*_denoise_args()[:6], *_scan_args(), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 7, 16))
    ep = torch.export.export(Net(), args)
    for a, b in zip(ep.module()(*args), Net()(*args)):
        torch.testing.assert_close(a, b)
