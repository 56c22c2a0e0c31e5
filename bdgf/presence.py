"""Presence flags of a request that leaves modalities out (numpy only: the pipeline, the back
ends and serving all check ``absent`` the same way)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from bdgf.errors import InputError


def presence_flags(modalities: Sequence[str], absent: Sequence[str] = ()) -> np.ndarray:
    """(M,) float32, 1 for each of ``modalities`` and 0 for those named in ``absent``; an unknown
    name, or every modality absent, is an InputError."""
    unknown = sorted(set(absent) - set(modalities))
    if unknown:
        raise InputError(f"unknown modalities {unknown} in absent; the model has {list(modalities)}")
    if set(absent) >= set(modalities):
        raise InputError(f"every modality is absent ({list(absent)}); at least one must be given")
    return np.array([0.0 if m in absent else 1.0 for m in modalities], np.float32)
