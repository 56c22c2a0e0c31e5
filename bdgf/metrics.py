"""Classification metrics: confusion matrix, OA, AA, Cohen's kappa, per-class accuracy.

Every function takes ``y_true`` and ``y_pred`` as 1-D sequences of class indices 0..K-1 (numpy
arrays, torch tensors on any device, or lists; any shape is flattened) of equal length N.
Rows of the confusion matrix are the true class, columns the predicted class.

Glossary (letters as in docs/glossary.md)
    K   classes
    N   samples (pixels) compared

Conventions (docs/method.md, Stage 2):
- ``per_class_accuracy[k]`` is the recall of class k; it is NaN for a class absent from
  ``y_true`` (its accuracy is undefined, not 0 and not 1).
- ``average_accuracy`` is the mean of per-class recall over the classes present in ``y_true``.
- ``cohen_kappa`` is (p_o - p_e) / (1 - p_e); when p_e == 1 (a single class in both truth and
  prediction) it is 1.0 if the prediction agrees everywhere, else 0.0.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from bdgf.errors import InputError

__all__ = [
    "confusion_matrix",
    "overall_accuracy",
    "average_accuracy",
    "cohen_kappa",
    "per_class_accuracy",
    "classification_report",
]


def _as_labels(y, what: str) -> np.ndarray:
    """Any array-like of integer class indices -> (N,) int64 numpy array."""
    if hasattr(y, "detach"):  # torch.Tensor, without importing torch
        y = y.detach().cpu()
        if str(y.dtype) in ("torch.bfloat16", "torch.float16"):  # numpy has no bfloat16; exact in float32
            y = y.float()
        y = y.numpy()
    a = np.asarray(y)
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise InputError(f"{what}: expected integer class indices, got dtype {a.dtype}")
    a = a.reshape(-1)
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
            raise InputError(f"{what}: class indices must be whole numbers, got non-integer floats")
    return a.astype(np.int64, copy=False)


def _pair(y_true, y_pred, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    t = _as_labels(y_true, "y_true")
    p = _as_labels(y_pred, "y_pred")
    if t.shape[0] != p.shape[0]:
        raise InputError(f"y_true has {t.shape[0]} labels but y_pred has {p.shape[0]}")
    if num_classes is not None:
        if num_classes < 1:
            raise InputError(f"num_classes must be >= 1, got {num_classes}")
        for name, a in (("y_true", t), ("y_pred", p)):
            if a.size and (a.min() < 0 or a.max() >= num_classes):
                raise InputError(
                    f"{name} has labels outside 0..{num_classes - 1} "
                    f"(min {a.min()}, max {a.max()}; num_classes={num_classes})"
                )
    return t, p


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts; entry [i, j] = number of samples of true class i predicted as j."""
    t, p = _pair(y_true, y_pred, num_classes)
    k = int(num_classes)
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k).astype(np.int64)


def _cm(y_true, y_pred, num_classes: int | None) -> np.ndarray:
    if num_classes is None:
        t, p = _pair(y_true, y_pred)
        if t.size == 0:
            raise InputError("no samples: y_true and y_pred are empty")
        num_classes = int(max(t.max(), p.max())) + 1
    return confusion_matrix(y_true, y_pred, num_classes)


def _require_samples(cm: np.ndarray) -> int:
    n = int(cm.sum())
    if n == 0:
        raise InputError("no samples: y_true and y_pred are empty")
    return n


def overall_accuracy(y_true, y_pred, num_classes: int | None = None) -> float:
    """Fraction of samples predicted correctly: trace(CM) / N."""
    return _oa(_cm(y_true, y_pred, num_classes))


def per_class_accuracy(y_true, y_pred, num_classes: int | None = None) -> np.ndarray:
    """(K,) float64 recall per class: CM[k, k] / sum_j CM[k, j]; NaN where class k is absent from y_true."""
    return _per_class(_cm(y_true, y_pred, num_classes))


def average_accuracy(y_true, y_pred, num_classes: int | None = None) -> float:
    """Mean of per-class recall over the classes present in y_true."""
    return _aa(_cm(y_true, y_pred, num_classes))


def cohen_kappa(y_true, y_pred, num_classes: int | None = None) -> float:
    """Cohen's kappa (p_o - p_e) / (1 - p_e), p_e = sum_k row_k * col_k / N^2."""
    return _kappa(_cm(y_true, y_pred, num_classes))


def _oa(cm: np.ndarray) -> float:
    n = _require_samples(cm)
    return float(np.trace(cm) / n)


def _per_class(cm: np.ndarray) -> np.ndarray:
    support = cm.sum(axis=1)
    out = np.full(cm.shape[0], np.nan)
    present = support > 0
    out[present] = np.diag(cm)[present] / support[present]
    return out


def _aa(cm: np.ndarray) -> float:
    _require_samples(cm)
    return float(np.nanmean(_per_class(cm)))


def _kappa(cm: np.ndarray) -> float:
    n = _require_samples(cm)
    cmf = cm.astype(np.float64)
    p_o = np.trace(cmf) / n
    p_e = float((cmf.sum(axis=1) * cmf.sum(axis=0)).sum() / (n * n))
    if np.isclose(p_e, 1.0):
        return 1.0 if np.isclose(p_o, 1.0) else 0.0
    return float((p_o - p_e) / (1.0 - p_e))


def classification_report(y_true, y_pred, class_names: Sequence[str]) -> dict:
    """JSON-serialisable summary with K = len(class_names).

    Returns {"oa", "aa", "kappa": float, "per_class": {name: float or None}, "confusion": list of
    K lists of int (rows = true), "n": int, "support": {name: int}}. A class absent from y_true
    has per-class accuracy None (NaN is not valid JSON).
    """
    names = [str(c) for c in class_names]
    if len(set(names)) != len(names):
        raise InputError(f"class_names has duplicates: {names}")
    cm = confusion_matrix(y_true, y_pred, len(names))
    pc = _per_class(cm)
    return {
        "oa": _oa(cm),
        "aa": _aa(cm),
        "kappa": _kappa(cm),
        "per_class": {name: (None if np.isnan(a) else float(a)) for name, a in zip(names, pc)},
        "support": {name: int(s) for name, s in zip(names, cm.sum(axis=1))},
        "confusion": cm.tolist(),
        "n": int(cm.sum()),
    }
