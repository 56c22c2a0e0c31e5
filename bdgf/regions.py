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

Serving runs the same plan its own way: :func:`plan_region` checks the request and cuts the
windows (:meth:`RegionPlan.batches`), the replica sends them through its cross-request batcher
(:func:`classify_jobs`: one back-end call per absent set), and :meth:`RegionPlan.place` assembles;
:func:`classify_region` is that loop with the back end called directly.

Glossary (letters as in docs/glossary.md): C bands, H×W the image's pixel grid, T tile side,
S = T + 2·halo the window side, K classes, B tiles per batch. (h, w) is the region's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from bdgf.backends import Backend, Classified, class_dtype
from bdgf.errors import InputError
from bdgf.tiler import TileGrid, cut_window


def stack_image(package, image: np.ndarray | Mapping[str, np.ndarray], absent: Sequence[str] = ()) -> np.ndarray:
    """(C, H, W) float32 raw values in the package's channel order, checked against its bands."""
    if isinstance(image, Mapping):
        given = [np.asarray(v) for k, v in image.items() if k not in absent]
        if not given or given[0].ndim != 3:
            raise InputError(f"expected {{modality: (C_m, H, W)}} rasters, got shapes "
                             f"{ {k: np.shape(v) for k, v in image.items()} }")
        hw = given[0].shape[1:]
        return package.stack({k: np.asarray(v)[None] for k, v in image.items()}, absent, size=hw)[0]
    x = np.asarray(image)
    if x.ndim != 3:
        raise InputError(f"expected a (C, H, W) raster, got shape {x.shape}")
    return package.stack(x[None], absent, size=x.shape[1:])[0]


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


def check_phase(package, top: int, left: int) -> None:
    """Refuse a region whose top-left in scene coordinates is off the model's stride phase."""
    m = int(package.manifest["geometry"].get("tile_multiple", 1))
    if top % m or left % m:
        raise InputError(f"the region's top-left in scene coordinates ({top}, {left}) is not on the model's "
                         f"stride phase: both must be multiples of {m}")


@dataclass
class RegionPlan:
    """The tiles of a region and where their windows and results go (see :func:`plan_region`).

    ``x`` (C, H, W) the stacked raster, ``region`` (r0, c0, h, w) inside it, (``top``, ``left``)
    the region's top-left in scene coordinates, ``tiles`` (N, 2) the tile origins in region
    coordinates (row-major, :class:`TileGrid`)."""

    package: object
    x: np.ndarray
    region: tuple[int, int, int, int]
    top: int
    left: int
    grid: TileGrid
    tiles: np.ndarray

    def batches(self, batch: int) -> Iterator[tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]]:
        """(part (n, 2) tile origins, windows (n, C, S, S) raw, origins in scene coordinates) for
        ``batch`` tiles at a time (windows reflect-padded past the raster's edge)."""
        if batch < 1:
            raise InputError(f"batch must be >= 1 tile, got {batch}")
        r0, c0 = self.region[:2]
        halo, S = self.package.halo, self.grid.window_size
        for i in range(0, len(self.tiles), batch):
            part = self.tiles[i : i + batch]
            windows = np.stack([cut_window(self.x, r0 + int(r) - halo, c0 + int(c) - halo, S) for r, c in part])
            yield part, windows, [(self.top + int(r), self.left + int(c)) for r, c in part]

    def empty(self, probabilities: bool = False) -> Classified:
        """The region's output, zeros: classes (h, w), confidence (h, w), probabilities (K, h, w)."""
        h, w = self.region[2:]
        K = self.package.num_classes
        probs = np.zeros((K, h, w), np.float32) if probabilities else None
        return Classified(np.zeros((h, w), class_dtype(K)), np.zeros((h, w), np.uint8), probs)

    def place(self, out: Classified, part: np.ndarray, tiles: Classified) -> None:
        """Write the back end's per-tile results ``tiles`` (n, T, T) of ``part`` into ``out``."""
        for j, (r, c) in enumerate(part):
            th, tw = self.grid.owned((r, c))
            out.classes[r : r + th, c : c + tw] = tiles.classes[j, :th, :tw]
            out.confidence[r : r + th, c : c + tw] = tiles.confidence[j, :th, :tw]
            if out.probabilities is not None:
                out.probabilities[:, r : r + th, c : c + tw] = tiles.probabilities[j, :, :th, :tw]


def plan_region(package, image: np.ndarray | Mapping[str, np.ndarray], *, origin: Sequence[int] = (0, 0),
                region: Sequence[int] | None = None, absent: Sequence[str] = ()) -> RegionPlan:
    """The checked plan of :func:`classify_region` (same arguments, a :class:`ModelPackage`
    instead of a back end): for a driver that runs the windows its own way (serving's batched
    replicas), then assembles with :meth:`RegionPlan.place`."""
    x = stack_image(package, image, absent)
    r0, c0, h, w = check_region(x.shape[1:], region)
    top, left = int(origin[0]) + r0, int(origin[1]) + c0
    check_phase(package, top, left)
    grid = TileGrid(h, w, package.tile_size, package.halo)
    return RegionPlan(package, x, (r0, c0, h, w), top, left, grid, grid.origins())


def classify_region(backend: Backend, image: np.ndarray | Mapping[str, np.ndarray], *,
                    origin: Sequence[int] = (0, 0), region: Sequence[int] | None = None,
                    absent: Sequence[str] = (), probabilities: bool = False, batch: int = 16,
                    on_batch: Callable[[int], None] | None = None) -> Classified:
    """Classes (h, w), confidence (h, w) and, with ``probabilities``, (K, h, w) float32 of the
    ``region`` of ``image`` (see the module docstring). ``on_batch(n)`` is called after each
    batch of n tiles (progress bars)."""
    plan = plan_region(backend.package, image, origin=origin, region=region, absent=absent)
    out = plan.empty(probabilities)
    for part, windows, origins in plan.batches(batch):
        plan.place(out, part, backend.classify(windows, origins, absent=absent, probabilities=probabilities))
        if on_batch is not None:
            on_batch(len(part))
    return out


@dataclass
class TileJob:
    """Windows of one request for a shared back-end call: raw (n, C, S, S), their tile origins in
    scene coordinates, the request's absent modalities and whether it wants probabilities."""

    windows: np.ndarray
    origins: list[tuple[int, int]]
    absent: tuple[str, ...] = ()
    probabilities: bool = False

    def __len__(self) -> int:
        return len(self.origins)


def classify_jobs(backend: Backend, jobs: Sequence[TileJob]) -> list[Classified]:
    """Each job's per-tile results (n, T, T), running the jobs that share an absent set in one
    back-end call (different absent sets never share one: their presence flags differ)."""
    results: list[Classified | None] = [None] * len(jobs)
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(tuple(sorted(job.absent)), []).append(i)
    for absent, idx in groups.items():
        want = any(jobs[i].probabilities for i in idx)
        out = backend.classify(np.concatenate([jobs[i].windows for i in idx]),
                               [o for i in idx for o in jobs[i].origins], absent=absent, probabilities=want)
        at = 0
        for i in idx:
            n = len(jobs[i])
            probs = out.probabilities[at : at + n] if jobs[i].probabilities else None
            results[i] = Classified(out.classes[at : at + n], out.confidence[at : at + n], probs)
            at += n
    return results
