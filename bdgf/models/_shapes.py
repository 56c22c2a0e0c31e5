"""Input-shape checks shared by the branches: a wrong shape is an InputError with names, not a
matmul error ten frames deep. Checks look at shapes only (never at values), so they are safe inside
torch.export; ``None`` in an expected shape means "any size" (used for the batch axis)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from bdgf.errors import InputError


def check_shape(name: str, x: torch.Tensor, expected: Sequence[int | None], what: str = "") -> None:
    """Raise InputError unless ``x.shape`` matches ``expected`` (``None`` = any size)."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name}: expected a tensor, got {type(x).__name__}")
    ok = x.dim() == len(expected) and all(e is None or s == e for s, e in zip(x.shape, expected))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        hint = f" {what}" if what else ""
        raise InputError(f"{name}: expected shape {want}{hint}, got {tuple(x.shape)}")
