"""The one tiler: tile origins, halo windows, cropping and write-back.

Feature extraction, the inference graph, pretraining tiles, and (next) serving and bulk
classification all cut a grid the same way, with this module.

    grid  = TileGrid(H, W, tile=T, halo=h)
    for origin in grid.origins():                     # non-overlapping T×T tiles, row-major
        row0, col0, S = grid.window(origin)           # the S×S window the model sees, S = T + 2h
        x = scene.read_window(row0, col0, S, S)       # reflect-padded past the grid
        y = crop(model(x), h, T)                      # the T×T the tile owns
        write_tile(arrays, origin, y)                 # clipped at the grid's last row/column

Glossary (letters as in docs/glossary.md): H×W grid, T tile side, h halo, S = T + 2h window side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class TileGrid:
    """Non-overlapping T×T tiles that partition an H×W grid (the last row/column of tiles is cut
    by the grid edge), each seen through a window with ``halo`` pixels of context per side."""

    height: int
    width: int
    tile: int
    halo: int = 0

    def __post_init__(self) -> None:
        if self.tile < 1 or self.halo < 0 or self.height < 1 or self.width < 1:
            raise ValueError(f"bad tile grid {self.height}x{self.width}, tile {self.tile}, halo {self.halo}")

    @property
    def window_size(self) -> int:
        """S = T + 2h."""
        return self.tile + 2 * self.halo

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of tiles."""
        return -(-self.height // self.tile), -(-self.width // self.tile)

    def origins(self) -> np.ndarray:
        """(N, 2) int64 top-left corners of the tiles, row-major (chunk-aligned when T is the chunk)."""
        T = self.tile
        return np.array([(r, c) for r in range(0, self.height, T) for c in range(0, self.width, T)], dtype=np.int64)

    def index(self, origin: Sequence[int]) -> tuple[int, int]:
        """(tile row, tile col) of a tile origin."""
        return int(origin[0]) // self.tile, int(origin[1]) // self.tile

    def window(self, origin: Sequence[int]) -> tuple[int, int, int]:
        """(row0, col0, S): the top-left of the tile's window in grid coordinates (may be
        negative: reflect-padded by the reader) and its side."""
        return int(origin[0]) - self.halo, int(origin[1]) - self.halo, self.window_size

    def owned(self, origin: Sequence[int]) -> tuple[int, int]:
        """(rows, cols) of the tile inside the grid: T×T except at the last row/column."""
        return min(self.tile, self.height - int(origin[0])), min(self.tile, self.width - int(origin[1]))


def cover_origins(height: int, width: int, tile: int, stride: int) -> np.ndarray:
    """(N, 2) int64 top-left corners of tiles with ``stride`` that cover the grid (overlapping
    for stride < tile); the last row/column of tiles is flush with the edge (a grid smaller than
    a tile gets one tile at (0, 0), reflect-padded). Pretraining samples these."""
    if tile < 1 or stride < 1:
        raise ValueError(f"tile and stride must be >= 1, got {tile}, {stride}")

    def axis(n: int) -> list[int]:
        if n <= tile:
            return [0]
        starts = list(range(0, n - tile + 1, stride))
        if starts[-1] != n - tile:
            starts.append(n - tile)
        return starts

    rows, cols = axis(height), axis(width)
    return np.array([(r, c) for r in rows for c in cols], dtype=np.int64)


def crop(x, halo: int, size: int):
    """The centre ``size``×``size`` of windows (..., S, S) with ``halo`` pixels each side
    (numpy arrays or torch tensors)."""
    return x[..., halo : halo + size, halo : halo + size]


def read_windows(scene, grid: TileGrid, origins: Sequence[Sequence[int]], nodata: float = 0.0) -> np.ndarray:
    """(B, C, S, S) float32 normalised windows of the given tiles (reflect-padded past the grid);
    invalid pixels hold ``nodata`` (0, the band mean, for the denoiser; NaN for the inference
    graph, which finds nodata that way)."""
    out = []
    for o in origins:
        r0, c0, S = grid.window(o)
        w = scene.read_window(r0, c0, S, S, concat=True)
        if nodata != 0.0:
            w[:, ~scene.read_valid_window(r0, c0, S, S)] = nodata
        out.append(w)
    return np.stack(out)


def pad_block(block: np.ndarray, pads, mode: str) -> np.ndarray:
    """(C, h, w) ``block`` padded by ((top, bottom), (left, right)) pixels: "reflect" (repeated
    for pads wider than the block; "edge" on a one-pixel-wide block) or "constant" zeros."""
    widths = ((0, 0),) + tuple(pads)
    if mode == "reflect" and min(block.shape[1:]) < 2:
        mode = "edge"  # nothing to reflect on a one-pixel-wide grid
    if mode == "edge":
        return np.pad(block, widths, mode="edge")
    if mode == "reflect":
        # numpy's reflect needs pad < size; repeat for very small grids.
        while any(p >= s for (p0, p1), s in zip(pads, block.shape[1:]) for p in (p0, p1)):
            step = tuple((min(p0, s - 1), min(p1, s - 1)) for (p0, p1), s in zip(pads, block.shape[1:]))
            block = np.pad(block, ((0, 0),) + step, mode="reflect")
            pads = tuple((p0 - a, p1 - b) for (p0, p1), (a, b) in zip(pads, step))
        return np.pad(block, ((0, 0),) + tuple(pads), mode="reflect")
    if mode == "constant":
        return np.pad(block, widths, mode="constant")
    raise ValueError(f"unknown pad mode {mode!r}; use 'reflect' or 'constant'")


def cut_window(image: np.ndarray, row: int, col: int, size: int) -> np.ndarray:
    """The ``size``×``size`` window of an in-memory (C, H, W) array whose top-left is (row, col)
    (may be negative or reach past the array: reflect-padded there, as a scene store's windows
    are past the scene's edge). Returns (C, size, size), a copy."""
    C, H, W = image.shape
    r0, r1 = max(row, 0), min(row + size, H)
    c0, c1 = max(col, 0), min(col + size, W)
    if r1 <= r0 or c1 <= c0:
        raise ValueError(f"window ({row}, {col}, {size}) lies outside the {H}x{W} array")
    block = np.array(image[:, r0:r1, c0:c1])
    pads = ((r0 - row, row + size - r1), (c0 - col, col + size - c1))
    return pad_block(block, pads, "reflect") if any(p for pair in pads for p in pair) else block


def write_tile(arrays: Mapping[str, object], grid: TileGrid, origin: Sequence[int],
               values: Mapping[str, np.ndarray]) -> None:
    """Write each ``values[name]`` (F, T, T) into ``arrays[name]`` (F, H, W) at the tile,
    clipped to the grid. With T the arrays' chunk size each tile writes whole chunks only."""
    r, c = int(origin[0]), int(origin[1])
    th, tw = grid.owned(origin)
    for name, v in values.items():
        arrays[name][:, r : r + th, c : c + tw] = v[:, :th, :tw]
