"""Plain helpers the test modules import (`from helpers import ...`): pytest puts tests/ on sys.path
because tests/conftest.py lives there (default "prepend" import mode). Fixtures live in conftest.py.

The classifier helpers build the tiny BDGFClassifier used by the model and export tests: an image patch
of C bands and diffusion features of FL/FM/FH channels at the low/mid/high levels, K classes."""

from __future__ import annotations

import torch

from bdgf.models import BRANCHES, ClassifierConfig

C, FL, FM, FH, K = 4, 6, 5, 7, 3  # patch bands, low/mid/high feature channels, classes


def classifier_config(patch_size: int = 7, branches: tuple[str, ...] = BRANCHES, num_classes: int = K) -> ClassifierConfig:
    """`ClassifierConfig.tiny` on the shapes above."""
    return ClassifierConfig.tiny(C, {"low": FL, "mid": FM, "high": FH}, num_classes, patch_size, branches)


def classifier_inputs(batch: int = 4, patch_size: int = 7, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(patch, low, mid, high), standard normal, each (batch, channels, patch_size, patch_size)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, c, patch_size, patch_size, generator=g) for c in (C, FL, FM, FH))
