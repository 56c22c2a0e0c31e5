"""Classify a rectangle of a scene held in memory: the one driver that serving (a request's
raster) and bulk classification (a mosaic chunk read with its halo) share.

    out = classify_region(backend, image, origin=(row, col), region=(r0, c0, h, w))
    out.classes (h, w), out.confidence (h, w), out.probabilities (K, h, w) or None

``image`` is (C, H, W) raw sensor values (every modality's bands in the package's order) or
{modality: (C_m, H, W)}; NaN/inf are nodata. ``origin`` is the scene coordinates of
``image[:, 0, 0]``: the position-keyed noise is drawn there, so the same place gives the same
classes whichever rectangle it is sent in. ``region`` is the part to classify (default: all of
``image``); the rest of ``image`` is real context for the tiles' halos. Past the edge of ``image``
windows are reflect-padded, as a scene store's windows are past the scene's edge: sending the
whole scene gives exactly what the pipeline gives on it, and sending a chunk with ``halo`` pixels
of real context on every side gives exactly the whole-scene result on the chunk.

The region is cut into T×T tiles with :class:`bdgf.tiler.TileGrid` (the last row/column cut by
the region's edge) and run through the back end ``batch`` tiles at a time, so memory is bounded by
the batch, not by the region. Tile origins must be on the model's stride phase: the region's
top-left in scene coordinates (``origin + region[:2]``) a multiple of ``tile_multiple``.

Glossary (letters as in docs/glossary.md): C bands, H×W the image, h×w the region, T tile side,
S = T + 2·halo the window side, K classes, B tiles per batch.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from bdgf.backends import Backend, Classified
from bdgf.errors import InputError
from bdgf.tiler import TileGrid, cut_window


def stack_image(backend: Backend, image: np.ndarray | Mapping[str, np.ndarray], absent: Sequence[str] = ()) -> np.ndarray:
    """(C, H, W) float32 raw values in the package's channel order, checked against its bands."""
    if isinstance(image, Mapping):
        given = [np.asarray(v) for k, v in image.items() if k not in absent]
        if not given or given[0].ndim != 3:
            raise InputError(f"expected {{modality: (C_m, H, W)}} rasters, got shapes "
                             f"{ {k: np.shape(v) for k, v in image.items()} }")
        hw = given[0].shape[1:]
        return backend.package.stack({k: np.asarray(v)[None] for k, v in image.items()}, absent, size=hw)[0]
    x = np.asarray(image)
    if x.ndim != 3:
        raise InputError(f"expected a (C, H, W) raster, got shape {x.shape}")
    return backend.package.stack(x[None], absent, size=x.shape[1:])[0]


def check_region(shape: tuple[int, int], region: Sequence[int] | None) -> tuple[int, int, int, int]:
    """(r0, c0, h, w) inside an image of ``shape`` (H, W); None: the whole image."""
    H, W = shape
    if region is None:
        return 0, 0, H, W
    if len(region) != 4:
        raise InputError(f"a region is (row, col, height, width) inside the image, got {tuple(region)}")
    r0, c0, h, w = (int(v) for v in region)
    if h < 1 or w < 1 or r0 < 0 or c0 < 0 or r0 + h > H or c0 + w > W:
        raise InputError(f"region (row {r0}, col {c0}, {h}x{w}) is not inside the {H}x{W} image")
    return r0, c0, h, w


def classify_region(backend: Backend, image: np.ndarray | Mapping[str, np.ndarray], *,
                    origin: Sequence[int] = (0, 0), region: Sequence[int] | None = None,
                    absent: Sequence[str] = (), probabilities: bool = False, batch: int = 16,
                    on_batch: Callable[[int], None] | None = None) -> Classified:
    """Classes (h, w), confidence (h, w) and, with ``probabilities``, (K, h, w) float32 of the
    ``region`` of ``image`` (see the module docstring). ``on_batch(n)`` is called after each
    batch of n tiles (progress bars)."""
    pkg = backend.package
    x = stack_image(backend, image, absent)
    r0, c0, h, w = check_region(x.shape[1:], region)
    top, left = int(origin[0]) + r0, int(origin[1]) + c0
    m = int(pkg.manifest["geometry"].get("tile_multiple", 1))
    if top % m or left % m:
        raise InputError(f"the region's top-left in scene coordinates ({top}, {left}) is not on the model's "
                         f"stride phase: both must be multiples of {m}")
    if batch < 1:
        raise InputError(f"batch must be >= 1 tile, got {batch}")
    grid = TileGrid(h, w, pkg.tile_size, pkg.halo)
    K = pkg.num_classes
    dtype = np.uint8 if K < 255 else np.uint16
    classes = np.zeros((h, w), dtype)
    confidence = np.zeros((h, w), np.uint8)
    probs = np.zeros((K, h, w), np.float32) if probabilities else None
    tiles = grid.origins()
    for i in range(0, len(tiles), batch):
        part = tiles[i : i + batch]
        windows = np.stack([cut_window(x, r0 + int(r) - pkg.halo, c0 + int(c) - pkg.halo, grid.window_size)
                            for r, c in part])
        out = backend.classify(windows, [(top + int(r), left + int(c)) for r, c in part], absent=absent,
                               probabilities=probabilities)
        for j, (r, c) in enumerate(part):
            th, tw = grid.owned((r, c))
            classes[r : r + th, c : c + tw] = out.classes[j, :th, :tw]
            confidence[r : r + th, c : c + tw] = out.confidence[j, :th, :tw]
            if probs is not None:
                probs[:, r : r + th, c : c + tw] = out.probabilities[j, :, :th, :tw]
        if on_batch is not None:
            on_batch(len(part))
    return Classified(classes, confidence, probs)
