"""Seeded, stratified label splits: a `val` split carved from `train`, per-class sampling for
datasets without an official split (MUUFL), and grouped folds for cross-validation.

Label rasters are (H, W) integer arrays, 0 = unlabelled, classes 1..K.

Why val must be carved spatially: benchmark labels are polygons (Houston2013's 2,832 training
pixels are 185 connected regions), so a val pixel drawn at random has training pixels of the same
polygon next to it and its P×P patch overlaps theirs: val accuracy then says nothing about
unseen ground. :func:`carve_val` therefore works on whole regions by default (``method``):

``regions`` (default)
    A *region* is a connected (8-neighbour) group of one class's train pixels. Per class, the
    regions are visited in a seeded order and a region goes to val when it brings the class's val
    count closer to ``round(fraction * n_k)``; at least one region always stays in train, and when
    every region overshoots the target the smallest one goes to val (Houston2013's tennis court: two
    regions of ~90 px for a target of 36), so classes keep their proportions to within one region
    and a region never straddles val and train. A class with a single region falls back to a
    block cut from it.
``blocks``
    A class's train pixels are grouped by square grid blocks of side ``4 * (2r + 1)`` (44 px for
    r = 5) and the blocks are carved like regions. A class whose pixels lie in one block is cut
    along its longer axis: the ``round(fraction * n_k)`` pixels at one (seeded) end go to val.
    This end cut is also the block a single-region class falls back to under ``regions``.
``random``
    Seeded, stratified random pixels (the old behaviour; val pixels sit next to train pixels).

Distance. Between a val and a train pixel it is the Chebyshev (chessboard) distance in pixels,
max(|Δrow|, |Δcol|), the metric of square patches. Under ``regions`` and ``blocks`` every train
pixel (of any class) within ``buffer`` (default 5, the patch radius r of an 11×11 patch) of a val
pixel is dropped from train (left unlabelled), so the distance between val and train is at least
``buffer + 1``: no train patch contains a val pixel and no val patch a train pixel. The one
exception ("where the geometry allows"): when the ring would take more than half of a class's
remaining train pixels (a class with one small region), that class keeps its ring pixels, and the
measured minimum distance (:func:`min_distance`, recorded in the store) shows it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from bdgf.errors import InputError

VAL_METHODS = ("regions", "blocks", "random")
#: patch radius r of the default 11×11 patch: the default buffer around val
DEFAULT_BUFFER = 5
DISTANCE_METRIC = "chebyshev"
_EIGHT = np.ones((3, 3), bool)


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


def regions(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """(region id (H, W) int64, 0 = unlabelled; number of regions): connected (8-neighbour)
    groups of pixels of one class. Ids are numbered class by class, in raster order."""
    out = np.zeros(labels.shape, np.int64)
    n = 0
    for k in np.unique(labels[labels > 0]):
        lab, m = ndimage.label(labels == k, structure=_EIGHT)
        out[lab > 0] = lab[lab > 0] + n
        n += m
    return out, n


def min_distance(a: np.ndarray, b: np.ndarray) -> int | None:
    """Smallest Chebyshev distance (pixels) between a labelled pixel of ``a`` and one of ``b``;
    None when either is empty."""
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    if not a.any() or not b.any():
        return None
    dist = ndimage.distance_transform_cdt(~b, metric="chessboard")
    return int(dist[a].min())


def _block_units(coords: np.ndarray, side: int) -> np.ndarray:
    """(N,) unit id of each pixel (N, 2) by the square grid block of side ``side`` it falls in."""
    b = coords // side
    _, ids = np.unique(b[:, 0] * (1 << 20) + b[:, 1], return_inverse=True)
    return ids


def _end_chunk(coords: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """(N,) bool: the ``target`` pixels at one seeded end of the longer axis of ``coords``."""
    span = coords.max(0) - coords.min(0)
    axis = int(span[1] > span[0])
    key = coords[:, axis] * (1 << 20) + coords[:, 1 - axis]
    order = np.argsort(key if rng.random() < 0.5 else -key, kind="stable")
    out = np.zeros(len(coords), bool)
    out[order[:target]] = True
    return out


def _pick_units(units: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """(N,) bool: whole units (ids in ``units`` (N,)) in a seeded order, each taken when it brings
    the count closer to ``target``; at least one unit is left out."""
    ids, sizes = np.unique(units, return_counts=True)
    chosen, count = [], 0
    for i in rng.permutation(len(ids)):
        if len(chosen) == len(ids) - 1:
            break
        if abs(count + sizes[i] - target) < abs(count - target):
            chosen.append(ids[i])
            count += int(sizes[i])
    if not chosen:  # every unit overshoots: the smallest one, so the class is in val at all
        chosen = [ids[np.argmin(sizes)]]
    return np.isin(units, chosen)


def carve_val(train: np.ndarray, fraction: float = 0.2, seed: int = 0, min_train: int = 1, *,
              method: str = "regions", buffer: int = DEFAULT_BUFFER, return_info: bool = False):
    """Split ``train`` into (train', val), stratified by class, seeded (``method``: regions,
    blocks or random; see the module docstring). With ``return_info`` also returns a dict for
    the store's metadata: {"method", "metric", "buffer", "min_distance" (Chebyshev px between val
    and train; None if either is empty), "regions" (connected regions of the input train),
    "dropped_train" (ring pixels dropped), "fallback_classes" (carved as blocks under
    ``regions``), "unbuffered_classes" (kept their ring), "min_distance_buffered" (the distance
    without those classes' train pixels: at least ``buffer + 1``)}.

    Each class gives about ``round(fraction * n_k)`` pixels to val (exactly, under ``random``),
    but keeps at least ``min_train`` in train; a class with a single pixel stays wholly in train.
    """
    if not 0.0 < fraction < 1.0:
        raise InputError(f"val fraction must be in (0, 1), got {fraction}")
    if method not in VAL_METHODS:
        raise InputError(f"val split method must be one of {', '.join(VAL_METHODS)}, got {method!r}")
    if buffer < 0:
        raise InputError(f"val buffer must be >= 0 pixels, got {buffer}")
    train = np.asarray(train)
    region_id, n_regions = regions(train)
    fallback: list[int] = []
    unbuffered: list[int] = []
    dropped = 0
    if method == "random":
        pick = _per_class_pick(train, lambda k, n: min(round(fraction * n), max(n - min_train, 0)), seed)
    else:
        rng = np.random.default_rng(seed)
        pick = np.zeros(train.shape, bool)
        side = 4 * (2 * buffer + 1) if buffer else 16
        for k in np.unique(train[train > 0]):
            coords = np.argwhere(train == k)
            n = len(coords)
            target = min(round(fraction * n), max(n - min_train, 0))
            if target <= 0:
                continue
            units = region_id[coords[:, 0], coords[:, 1]]
            if method == "blocks":
                units = _block_units(coords, side)
            if len(np.unique(units)) > 1:
                sel = _pick_units(units, target, rng)
            else:  # a single region (or block): cut it
                if method == "regions":
                    fallback.append(int(k))
                sel = _end_chunk(coords, target, rng)
            if n - int(sel.sum()) < min_train:
                continue
            pick[coords[sel, 0], coords[sel, 1]] = True
        if buffer and pick.any():
            ring = ndimage.binary_dilation(pick, structure=np.ones((2 * buffer + 1,) * 2, bool)) & ~pick & (train > 0)
            for k in np.unique(train[ring]):
                left = np.count_nonzero((train == k) & ~pick)
                lose = np.count_nonzero(ring & (train == k))
                if lose > left / 2:  # a small single region: keep it in train, distance not met
                    ring &= train != k
                    unbuffered.append(int(k))
            dropped = int(ring.sum())
            train = np.where(ring, 0, train)
    val = np.where(pick, train, 0).astype(train.dtype)
    rest = np.where(pick, 0, train).astype(train.dtype)
    if not return_info:
        return rest, val
    info = {"method": method, "metric": DISTANCE_METRIC, "buffer": int(buffer) if method != "random" else 0,
            "min_distance": min_distance(val, rest), "regions": int(n_regions), "dropped_train": dropped,
            "fallback_classes": fallback, "unbuffered_classes": unbuffered,
            "min_distance_buffered": min_distance(val, np.where(np.isin(rest, unbuffered), 0, rest))}
    return rest, val, info


def sample_per_class(labels: np.ndarray, per_class: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) from a full ground truth: ``per_class`` seeded pixels of each class for
    train (all of a class's pixels if it has at most twice that many, half of them), the rest test."""
    if per_class < 1:
        raise InputError(f"per-class sample size must be >= 1, got {per_class}")
    pick = _per_class_pick(labels, lambda k, n: per_class if n > 2 * per_class else max(n // 2, 1), seed)
    train = np.where(pick, labels, 0).astype(labels.dtype)
    test = np.where(pick, 0, labels).astype(labels.dtype)
    return train, test


def grouped_folds(labels: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """(H, W) int64 fold of every labelled pixel (0..folds-1; -1 unlabelled), whole regions at a
    time (a region never straddles two folds), stratified by class: per class, in a seeded order
    of classes, its regions from the largest down go to the fold holding the fewest pixels of that
    class so far (ties: the fewest pixels overall, then the lowest fold). A class with fewer
    regions than folds is missing from some folds' test."""
    if folds < 2:
        raise InputError(f"cross-validation needs at least 2 folds, got {folds}")
    labels = np.asarray(labels)
    region_id, n = regions(labels)
    if n < folds:
        raise InputError(f"{n} labelled regions cannot fill {folds} folds (each fold needs at least one region)")
    rng = np.random.default_rng(seed)
    sizes = np.bincount(region_id.ravel(), minlength=n + 1)
    cls = np.zeros(n + 1, np.int64)
    cls[region_id.ravel()] = labels.ravel()
    fold_of = np.full(n + 1, -1, np.int64)
    total = np.zeros(folds, np.int64)
    classes = np.unique(cls[1:])
    for k in rng.permutation(classes):
        ids = np.flatnonzero(cls == k)
        ids = ids[ids > 0]
        ids = ids[np.lexsort((rng.random(len(ids)), -sizes[ids]))]
        per = np.zeros(folds, np.int64)
        for i in ids:
            f = int(np.lexsort((np.arange(folds), total, per))[0])
            fold_of[i] = f
            per[f] += sizes[i]
            total[f] += sizes[i]
    out = fold_of[region_id]
    out[region_id == 0] = -1
    return out


def fold_splits(labels: np.ndarray, fold: np.ndarray, k: int, *, val_fraction: float = 0.2, seed: int = 0,
                method: str = "regions", buffer: int = DEFAULT_BUFFER) -> dict[str, np.ndarray]:
    """{"train", "val", "test"} (H, W) rasters of fold ``k``: test = the fold's regions; train =
    the other folds' pixels farther than ``buffer`` (Chebyshev) from test; val carved from that
    train by :func:`carve_val` (``method``, seeded) for model selection."""
    labels = np.asarray(labels)
    test = np.where(fold == k, labels, 0).astype(labels.dtype)
    pool = np.where((fold >= 0) & (fold != k), labels, 0).astype(labels.dtype)
    if buffer and test.any():
        ring = ndimage.binary_dilation(test > 0, structure=np.ones((2 * buffer + 1,) * 2, bool))
        pool = np.where(ring, 0, pool).astype(labels.dtype)
    if not pool.any():
        raise InputError(f"fold {k}: no training pixel left outside the {buffer}-px ring around its test regions")
    train, val = carve_val(pool, fraction=val_fraction, seed=seed, method=method, buffer=buffer)
    return {"train": train, "val": val, "test": test}
