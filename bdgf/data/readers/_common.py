"""Helpers shared by the dataset readers: label checks, axis order, the val split."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bdgf.data.scene import ModalityData
from bdgf.data.splits import DISTANCE_METRIC, VAL_METHODS, carve_val, min_distance
from bdgf.errors import InputError


def as_labels(arr, path, num_classes: int | None, *, unlabelled: tuple[int, ...] = ()) -> np.ndarray:
    """Check a label raster and return it as uint16 (H, W), 0 = unlabelled.

    Values listed in ``unlabelled`` (e.g. MUUFL's -1) become 0. Non-finite or non-integer values,
    and values outside 0..num_classes, are an InputError naming ``path``.
    """
    a = np.squeeze(np.asarray(arr))
    if a.ndim != 2:
        raise InputError(f"{path}: label raster must be 2-D (H, W), got shape {np.shape(arr)}")
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating) or a.dtype == bool):
        raise InputError(f"{path}: label raster has non-numeric dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise InputError(f"{path}: label raster contains NaN/inf")
        if not np.array_equal(a, np.round(a)):
            bad = a[a != np.round(a)][0]
            raise InputError(f"{path}: label raster has non-integer values (e.g. {bad})")
    a = a.astype(np.int64)
    for u in unlabelled:
        a[a == u] = 0
    hi = num_classes if num_classes is not None else 65535
    if a.size and (a.min() < 0 or a.max() > hi):
        raise InputError(
            f"{path}: label values {int(a.min())}..{int(a.max())} outside 0..{hi} (0 = unlabelled, {hi} classes)"
        )
    return a.astype(np.uint16)


def check_grid(labels: np.ndarray, grid: tuple[int, int], path, grid_from) -> None:
    if labels.shape != tuple(grid):
        raise InputError(f"{path}: label raster shape {labels.shape} does not match the grid {tuple(grid)} of {grid_from}")


def hwc_to_chw(arr: np.ndarray, path, what: str) -> np.ndarray:
    """A MATLAB-order (H, W, C) or (H, W) array as (C, H, W) float32."""
    a = np.asarray(arr)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise InputError(f"{path}: {what} must be (H, W, bands) or (H, W), got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise InputError(f"{path}: {what} has non-real dtype {a.dtype}")
    return np.ascontiguousarray(np.moveaxis(a, 2, 0), dtype=np.float32)


def check_bands(mod: ModalityData, expected: int | None, what: str) -> None:
    if expected is not None and mod.bands != expected:
        raise InputError(f"{mod.source}: {what} must have {expected} bands, found {mod.bands}")


def check_modality_grids(mods: dict[str, ModalityData]) -> tuple[int, int]:
    """All modalities on one grid; returns it. Mismatch -> InputError naming both files."""
    first_name, first = next(iter(mods.items()))
    grid = tuple(first.data.shape[1:])
    for name, m in mods.items():
        if tuple(m.data.shape[1:]) != grid:
            raise InputError(
                f"{m.source}: {name} grid {tuple(m.data.shape[1:])} does not match the {first_name} grid {grid} of {first.source}"
            )
    return grid


def with_val(labels: dict[str, np.ndarray], val_fraction: float, seed: int, val_split: str = "regions"
             ) -> tuple[dict[str, np.ndarray], dict]:
    """(labels, val info): ``val`` carved from ``train`` (seeded, stratified; ``val_split``:
    regions, blocks or random, see :func:`bdgf.data.splits.carve_val`) unless ``val_fraction`` is
    0 or a ``val`` raster was given. The info dict goes to the store's metadata (``val_split``)."""
    if val_split not in VAL_METHODS:
        raise InputError(f"val split method must be one of {', '.join(VAL_METHODS)}, got {val_split!r}")
    if "val" in labels:
        return labels, {"method": "given", "metric": DISTANCE_METRIC,
                        "min_distance": min_distance(labels["val"], labels.get("train", np.zeros(1)))}
    if not val_fraction or "train" not in labels:
        return labels, {"method": "none"}
    train, val, info = carve_val(labels["train"], fraction=val_fraction, seed=seed, method=val_split,
                                 return_info=True)
    out = {"train": train, "val": val}
    out.update((k, v) for k, v in labels.items() if k != "train")
    return out, info


def files(**paths) -> dict[str, str]:
    return {k: str(Path(v).resolve()) for k, v in paths.items() if v is not None}


def count(lab: np.ndarray) -> int:
    return int(np.count_nonzero(lab))


def official_split_source(dataset: str, labels: dict[str, np.ndarray], val_fraction: float, seed: int,
                          val_split: str = "regions", **paths) -> dict:
    """Provenance of a dataset read with its official train/test rasters."""
    return {
        "dataset": dataset,
        "official_train": count(labels["train"]),
        "official_test": count(labels["test"]),
        "val_fraction": val_fraction,
        "val_split": val_split,
        "seed": seed,
        "files": files(**paths),
    }
