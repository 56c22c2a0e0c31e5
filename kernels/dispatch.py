"""The one place that picks a back end for each kernel op.

Back ends: ``"triton"`` (kernels in this package), ``"reference"`` (plain PyTorch), and for the
selective scan ``"mamba_ssm"`` (CUDA, when importable) or ``"chunked"`` (plain-PyTorch chunked
scan; the scan has no Triton kernel here).

Rules, per call:
  * ``BDGF_KERNELS=reference`` -> references (chunked for the scan).
  * ``BDGF_KERNELS=triton``    -> Triton; on CPU tensors this needs ``TRITON_INTERPRET=1``, else a
    RuntimeError says so. The scan has no Triton kernel and stays chunked.
  * ``BDGF_KERNELS=auto`` (default) -> Triton when the tensors are on CUDA, Triton can launch,
    the dtype/shape class is on the tested allow-list and no trace is running; else the
    reference. A Triton forward or backward that fails to launch is logged, the op is marked
    broken for this process and the reference is used (a failed backward gets its gradients
    from the reference, recomputed from the saved inputs).
  * Inside torch.export / torch.compile / ONNX export: always the references (traceable).
Each (op, back end) choice is logged once on the ``bdgf.kernels`` logger.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from . import cross_attention as _ca
from . import masked_denoise as _md
from . import selective_scan as _ss
from ._triton_util import can_launch, interpreter_on, interpreter_ready

log = logging.getLogger("bdgf.kernels")

OPS = ("noise_and_mask", "balanced_mse", "cross_attention", "selective_scan")
MODES = ("auto", "reference", "triton")
# Allow-list of what the tests cover for the Triton kernels.
TESTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_logged: set = set()
_broken: set = set()


def kernel_mode() -> str:
    """The ``BDGF_KERNELS`` setting, read at each call (default ``auto``)."""
    mode = os.environ.get("BDGF_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"BDGF_KERNELS must be one of {MODES}, got {mode!r}")
    return mode


def _tracing() -> bool:
    return bool(torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())


@functools.lru_cache(maxsize=None)
def _mamba_selective_scan_fn():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # not installed, or installed without its CUDA extension
        return None
    return selective_scan_fn


def _allow_listed(op: str, tensors) -> bool:
    ts = [t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not ts or ts[0].dtype not in TESTED_DTYPES:
        return False
    if op == "cross_attention" and ts[0].shape[-1] > _ca.MAX_HEAD_DIM:
        return False
    return True


def _device(tensors) -> torch.device:
    for t in tensors:
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


def _note(op: str, backend: str, why: str) -> str:
    if (op, backend) not in _logged:
        _logged.add((op, backend))
        log.info("kernel %s -> %s (%s)", op, backend, why)
    return backend


def backend_for(op_name: str, *tensors) -> str:
    """The back end that a call of ``op_name`` on these tensors uses now."""
    if op_name not in OPS:
        raise ValueError(f"unknown kernel op {op_name!r}; known: {OPS}")
    mode = kernel_mode()
    dev = _device(tensors)
    if op_name == "selective_scan":
        if mode == "auto" and dev.type == "cuda" and not _tracing() and _mamba_selective_scan_fn() is not None \
                and _allow_listed(op_name, tensors):
            return _note(op_name, "mamba_ssm", "CUDA tensors, mamba_ssm importable")
        return _note(op_name, "chunked", f"BDGF_KERNELS={mode}; plain-PyTorch chunked scan")
    if _tracing():
        return _note(op_name, "reference", "inside a trace/export")
    if mode == "reference":
        return _note(op_name, "reference", "BDGF_KERNELS=reference")
    if mode == "triton":
        if dev.type == "cpu" and not interpreter_on():
            raise RuntimeError(f"BDGF_KERNELS=triton with CPU tensors for {op_name} needs TRITON_INTERPRET=1 "
                               "(Triton's interpreter); set it, or use BDGF_KERNELS=auto|reference")
        if dev.type == "cpu" and not interpreter_ready():
            raise RuntimeError("BDGF_KERNELS=triton: TRITON_INTERPRET=1 is set but triton was imported before it "
                               "was (its library is in compiled mode); set TRITON_INTERPRET=1 before the "
                               "process starts")
        if not can_launch(dev):
            raise RuntimeError(f"BDGF_KERNELS=triton but Triton cannot launch on {dev} here "
                               "(triton missing, no active driver, or TRITON_INTERPRET with CUDA tensors)")
        return _note(op_name, "triton", "BDGF_KERNELS=triton")
    if dev.type == "cuda" and op_name not in _broken and can_launch(dev) and _allow_listed(op_name, tensors):
        return _note(op_name, "triton", "CUDA tensors, Triton launchable, tested dtype/shape")
    return _note(op_name, "reference", f"auto on {dev.type}")


def _fall_back(op: str, where: str, exc: BaseException) -> None:
    _broken.add(op)
    log.warning("kernel %s: Triton failed at %s launch (%s: %s); using the reference from now on",
                op, where, type(exc).__name__, exc)


class _GuardedBackward(torch.autograd.Function):
    """Runs a Triton op whose backward launch may fail; on failure the gradients come from the
    reference (recomputed from the inputs) and the op is marked broken.

    The Triton op runs under ``enable_grad`` on detached aliases of the inputs, so its own graph is
    kept (on ``ctx``, not ``save_for_backward``: the returned tensor shares its storage, and an
    in-place edit of it must not look like a failed launch) and ``backward`` differentiates it
    with ``torch.autograd.grad``. It holds nothing beyond what the Triton op's own graph saves.
    Not twice differentiable (neither are the Triton kernels)."""

    @staticmethod
    def forward(ctx, op, triton_fn, ref_fn, *args):
        grad_idx = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and ctx.needs_input_grad[3 + i]]
        inner = [a.detach().requires_grad_() if i in grad_idx else a for i, a in enumerate(args)]
        with torch.enable_grad():
            out = triton_fn(*inner)
        ctx.op, ctx.ref_fn, ctx.grad_idx, ctx.inner, ctx.out = op, ref_fn, grad_idx, inner, out
        return out.detach()

    @staticmethod
    def backward(ctx, g):
        args, out = ctx.inner, ctx.out
        wrt = [args[i] for i in ctx.grad_idx]
        if not out.requires_grad:  # e.g. an empty query set: nothing flows back
            grads = [None] * len(wrt)
        else:
            try:
                # retain_graph: a second backward through a retained outer graph works as it
                # would without the guard; the inner graph is freed with this node.
                grads = torch.autograd.grad(out, wrt, g, retain_graph=True, allow_unused=True)
            except Exception as exc:  # launch/compile failure of a backward kernel
                _fall_back(ctx.op, "backward", exc)
                with torch.enable_grad():
                    ref_args = [a.detach().requires_grad_() if i in ctx.grad_idx else a for i, a in enumerate(args)]
                    ref_out = ctx.ref_fn(*ref_args)
                    grads = torch.autograd.grad(ref_out, [ref_args[i] for i in ctx.grad_idx], g, allow_unused=True)
        result = [None] * len(args)
        for i, gr in zip(ctx.grad_idx, grads):
            result[i] = gr
        return (None, None, None, *result)


def _run(op: str, backend: str, triton_fn, ref_fn, *args):
    """Runs ``triton_fn`` or ``ref_fn`` on ``args``. In ``auto`` mode a Triton failure at
    forward *or* backward launch falls back to the reference (logged, op marked broken);
    ``BDGF_KERNELS=triton`` lets it raise. ``ValueError`` (bad input) is never swallowed."""
    if backend != "triton":
        return ref_fn(*args)
    if kernel_mode() == "triton":
        return triton_fn(*args)
    needs_grad = torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    try:
        if needs_grad:
            return _GuardedBackward.apply(op, triton_fn, ref_fn, *args)
        return triton_fn(*args)
    except ValueError:
        raise
    except Exception as exc:  # compile/launch failure: fall back for the rest of the process
        _fall_back(op, "forward", exc)
        return ref_fn(*args)


def noise_and_mask(x0, eps, sqrt_ab, sqrt_1mab, present, mask_embed, channel_modality):
    """x_t (B, C, S, S); see :func:`kernels.masked_denoise.noise_and_mask_ref`."""
    args = (x0, eps, sqrt_ab, sqrt_1mab, present, mask_embed, channel_modality)
    _md.check_noise_and_mask(*args)
    be = backend_for("noise_and_mask", x0, eps, mask_embed)
    return _run("noise_and_mask", be, _md.noise_and_mask_triton, _md.noise_and_mask_ref, *args)


def balanced_mse(pred, target, channel_modality, num_modalities):
    """(B, M) float32 per-modality MSE; see :func:`kernels.masked_denoise.balanced_mse_ref`."""
    args = (pred, target, channel_modality, num_modalities)
    _md.check_balanced_mse(*args)
    be = backend_for("balanced_mse", pred, target)
    return _run("balanced_mse", be, _md.balanced_mse_triton, _md.balanced_mse_ref, *args)


def cross_attention(q, k, v, scale=None):
    """(B, Hh, Nq, Dh); see :func:`kernels.cross_attention.cross_attention_ref`."""
    _ca.check_cross_attention(q, k, v, scale)
    be = backend_for("cross_attention", q, k, v)
    return _run("cross_attention", be, _ca.cross_attention_triton, _ca.cross_attention_ref, q, k, v, scale)


def selective_scan(u, delta, A, B, C, D=None, *, chunk_size: int | None = None):
    """y (Bt, L, Dm); see :func:`kernels.selective_scan.selective_scan_ref`."""
    _ss.check_selective_scan(u, delta, A, B, C, D)
    be = backend_for("selective_scan", u, delta, A, B, C)
    if be == "mamba_ssm":  # mamba_ssm layout: u, delta (Bt, Dm, L); B, C (Bt, N_s, L)
        fn = _mamba_selective_scan_fn()
        y = fn(u.transpose(1, 2).contiguous(), delta.transpose(1, 2).contiguous(), A.contiguous(),
               B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(),
               None if D is None else D.contiguous())
        return y.transpose(1, 2)
    return _ss.selective_scan_chunked(u, delta, A, B, C, D, chunk_size=chunk_size)
