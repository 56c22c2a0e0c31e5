"""Input checks shared by the kernels: shapes and dtypes, before any launch.

Every check raises ``ValueError`` naming the offending argument. Only static tensor metadata
(shape, dtype, device) is read, so the checks are safe inside ``torch.export`` / ONNX tracing.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def need_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def need_float(name: str, t: torch.Tensor) -> None:
    need_tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be floating point (float32/float16/bfloat16/float64), got {t.dtype}")


def need_ndim(name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    need_tensor(name, t)
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")


def need_shape(name: str, t: torch.Tensor, shape: tuple, layout: str) -> None:
    need_tensor(name, t)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {layout} = {tuple(shape)}, got {tuple(t.shape)}")


def need_same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")


def need_same_device(tensors: dict) -> None:
    devs = {n: t.device for n, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devs.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devs}")


def need_integer(name: str, t: torch.Tensor) -> None:
    need_tensor(name, t)
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"{name} must be an integer tensor (int64), got {t.dtype}")
