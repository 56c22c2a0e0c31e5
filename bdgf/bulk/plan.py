"""The chunk plan: output chunks of c×c px (the last row/column cut by the mosaic's edge), each
computed from an input window with ``halo`` px of real context per side, clipped at the mosaic's
true border (past it classify_region reflect-pads, exactly as for the whole mosaic in one piece).

    plan = ChunkPlan(H, W, size=2048, halo=package.halo)
    for chunk in plan.chunks():
        top, left, bottom, right = plan.read_window(chunk)     # rows top:bottom, cols left:right
        region = (chunk.r0 - top, chunk.c0 - left, chunk.h, chunk.w)

Glossary: H×W the mosaic's grid, c the chunk side, T tile side (the model's tile_multiple divides both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bdgf.errors import InputError


@dataclass(frozen=True)
class Chunk:
    """Output chunk (row, col) of the plan: rows r0:r0+h, cols c0:c0+w of the mosaic."""

    row: int
    col: int
    r0: int
    c0: int
    h: int
    w: int

    @property
    def key(self) -> str:
        return f"{self.row}.{self.col}"

    @property
    def pixels(self) -> int:
        return self.h * self.w

    def __str__(self) -> str:
        return f"chunk {self.key} (rows {self.r0}:{self.r0 + self.h}, cols {self.c0}:{self.c0 + self.w})"


def check_chunk_size(size: int, package) -> None:
    """``size`` must be a positive multiple of the tile size and of the model's tile_multiple (so
    every chunk's tiles are the whole mosaic's tiles, on the stride phase)."""
    T = int(package.tile_size)
    m = int(package.manifest["geometry"].get("tile_multiple", 1))
    step = T * m // math.gcd(T, m)
    if size < 1 or size % step:
        raise InputError(f"chunk size {size} must be a positive multiple of {step} (the model's tile size {T} "
                         f"and tile_multiple {m}); e.g. {max(step, size // step * step)}")


@dataclass(frozen=True)
class ChunkPlan:
    height: int
    width: int
    size: int
    halo: int

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of chunks."""
        return -(-self.height // self.size), -(-self.width // self.size)

    def chunks(self) -> list[Chunk]:
        """Every chunk, row-major."""
        c = self.size
        return [Chunk(i, j, i * c, j * c, min(c, self.height - i * c), min(c, self.width - j * c))
                for i in range(self.shape[0]) for j in range(self.shape[1])]

    def read_window(self, chunk: Chunk) -> tuple[int, int, int, int]:
        """(top, left, bottom, right): the chunk grown by ``halo`` px, clipped at the mosaic."""
        return (max(chunk.r0 - self.halo, 0), max(chunk.c0 - self.halo, 0),
                min(chunk.r0 + chunk.h + self.halo, self.height), min(chunk.c0 + chunk.w + self.halo, self.width))
