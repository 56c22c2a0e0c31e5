"""Seeded, stratified label splits: a `val` split carved from `train`, and per-class sampling
for datasets without an official split (MUUFL).

Label rasters are (H, W) integer arrays, 0 = unlabelled, classes 1..K.
"""

from __future__ import annotations

import numpy as np

from bdgf.errors import InputError


def _per_class_pick(labels: np.ndarray, take, seed: int) -> np.ndarray:
    """Boolean (H, W) mask of the pixels picked; ``take(k, n_k) -> count`` per class."""
    rng = np.random.default_rng(seed)
    flat = labels.ravel()
    picked = np.zeros(flat.shape, bool)
    for k in np.unique(flat[flat > 0]):
        idx = np.flatnonzero(flat == k)
        n = int(take(int(k), idx.size))
        if n > 0:
            picked[rng.choice(idx, size=min(n, idx.size), replace=False)] = True
    return picked.reshape(labels.shape)


def carve_val(train: np.ndarray, fraction: float = 0.2, seed: int = 0, min_train: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Split ``train`` into (train', val), stratified by class, seeded.

    Each class gives ``round(fraction * n_k)`` pixels to val, but keeps at least ``min_train``
    in train; a class with a single pixel stays wholly in train.
    """
    if not 0.0 < fraction < 1.0:
        raise InputError(f"val fraction must be in (0, 1), got {fraction}")
    pick = _per_class_pick(train, lambda k, n: min(round(fraction * n), max(n - min_train, 0)), seed)
    val = np.where(pick, train, 0).astype(train.dtype)
    rest = np.where(pick, 0, train).astype(train.dtype)
    return rest, val


def sample_per_class(labels: np.ndarray, per_class: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) from a full ground truth: ``per_class`` seeded pixels of each class for
    train (all of a class's pixels if it has at most twice that many, half of them), the rest test."""
    if per_class < 1:
        raise InputError(f"per-class sample size must be >= 1, got {per_class}")
    pick = _per_class_pick(labels, lambda k, n: per_class if n > 2 * per_class else max(n // 2, 1), seed)
    train = np.where(pick, labels, 0).astype(labels.dtype)
    test = np.where(pick, 0, labels).astype(labels.dtype)
    return train, test
