"""BDGF kernels: Triton kernels beside their plain-PyTorch references, and one dispatcher.

Use the dispatch functions; they pick Triton on CUDA and the references elsewhere
(``BDGF_KERNELS=auto|reference|triton`` forces a choice; see :mod:`kernels.dispatch`).

Note: the dispatch functions ``kernels.cross_attention`` and ``kernels.selective_scan`` shadow the
submodules of the same name as *attributes*; import from the submodules with
``from kernels.selective_scan import selective_scan_ref`` (works), not ``import kernels.selective_scan as m``.
"""

from .cross_attention import cross_attention_ref
from .dispatch import (backend_for, balanced_mse, cross_attention, kernel_mode, noise_and_mask,
                       selective_scan)
from .masked_denoise import balanced_mse_ref, noise_and_mask_ref
from .selective_scan import selective_scan_chunked, selective_scan_ref

__all__ = [
    "backend_for", "kernel_mode", "noise_and_mask", "balanced_mse", "cross_attention", "selective_scan",
    "noise_and_mask_ref", "balanced_mse_ref", "cross_attention_ref", "selective_scan_ref",
    "selective_scan_chunked",
]
