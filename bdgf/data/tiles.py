"""Tiles of a scene for stage-1 pretraining (origins from :func:`bdgf.tiler.cover_origins`).

Glossary (letters as in docs/glossary.md): C bands (all modalities), T tile side, H×W scene grid,
B tiles in a batch.

Tiles whose share of valid pixels (``Scene.valid``; reflect-padded past the grid like the data)
is below ``min_valid_fraction`` are dropped once, at construction, so they are never sampled.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from bdgf.data.chunks import (CountingStore, cache_budget, chunk_bytes, chunk_shape, open_scene, scene_bytes,
                              tile_chunk_keys)
from bdgf.data.scene import Scene
from bdgf.errors import InputError
from bdgf.tiler import cover_origins

__all__ = ["TileDataset", "tile_valid_shares", "random_augment", "random_augment_with_valid"]


def tile_valid_shares(scene: Scene, origins: np.ndarray, tile_size: int) -> np.ndarray:
    """(N,) float64 share of valid pixels of each T×T tile at ``origins`` (N, 2).

    Reads the validity mask one strip of T rows at a time (T × max(W, T) booleans), so a large
    scene is never held whole."""
    t, (h, w) = tile_size, scene.shape
    shares = np.empty(len(origins), np.float64)
    for r in np.unique(origins[:, 0]):
        sel = np.flatnonzero(origins[:, 0] == r)
        strip = scene.read_valid_window(int(r), 0, t, max(w, t))  # (T, max(W, T)) bool
        cols = np.concatenate([[0], np.cumsum(strip.sum(axis=0, dtype=np.int64))])  # (max(W, T) + 1,)
        c = origins[sel, 1]
        shares[sel] = (cols[c + t] - cols[c]) / float(t * t)
    return shares


class TileDataset(Dataset):
    """Item i -> {"tile": (C, T, T) float32 normalised tile of every modality, concatenated,
    "valid": (T, T) bool, True where every modality has data}.

    Only tiles with at least ``min_valid_fraction`` valid pixels are items (``origins``,
    ``valid_shares``; ``chunk_keys``: the store chunk of each tile's top-left pixel, for
    :func:`bdgf.data.chunks.chunk_shard`). The store is opened lazily in each process (the dataset
    pickles as a path). Memory per process is bounded by ``cache_bytes``
    (:func:`bdgf.data.chunks.cache_budget`: 512 MiB unless ``$BDGF_CACHE_BYTES`` says otherwise):
    with ``cache=True`` (the default when the normalised scene, C × H × W × 4 bytes, fits the
    budget) the scene is read once per process; otherwise tiles are assembled from whole chunks
    kept in an LRU of at most ``cache_bytes`` (``cache_bytes=0``: no cache, every tile reads its
    chunks from the store). ``read_stats()`` counts the chunk reads of this process.
    """

    def __init__(self, store: str | Path, tile_size: int, stride: int | None = None,
                 cache: bool | None = None, cache_bytes: int | None = None, min_valid_fraction: float = 0.0):
        if not 0.0 <= min_valid_fraction <= 1.0:
            raise ValueError(f"min_valid_fraction must be in [0, 1], got {min_valid_fraction}")
        self.store = str(store)
        scene = Scene.open(self.store)
        self.tile_size = tile_size
        origins = cover_origins(*scene.shape, tile_size, stride or max(tile_size // 2, 1))
        shares = tile_valid_shares(scene, origins, tile_size)
        keep = shares >= min_valid_fraction
        if not keep.any():
            raise InputError(f"{self.store}: no {tile_size}x{tile_size} tile has at least {min_valid_fraction:.0%} "
                             f"valid pixels (pretrain.min_valid_fraction = {min_valid_fraction}; best tile "
                             f"{shares.max():.0%} valid): too much nodata for pretraining")
        self.origins, self.valid_shares = origins[keep], shares[keep]
        self.skipped = int((~keep).sum())
        self.min_valid_fraction = min_valid_fraction
        self.channels = scene.total_bands
        self.chunk = chunk_shape(scene)
        self.chunk_keys = tile_chunk_keys(self.origins, self.chunk, scene.shape[1])
        self.chunk_bytes = chunk_bytes(scene)
        self.cache_bytes = cache_budget(cache_bytes)
        self.scene_bytes = scene_bytes(scene)
        self.cache = (self.scene_bytes <= self.cache_bytes) if cache is None else cache
        self._scene: Scene | None = None
        self._counter: CountingStore | None = None
        self._full: np.ndarray | None = None
        self._full_valid: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.origins)

    @property
    def window(self) -> int:
        """Chunks the LRU holds with the neighbours their straddling tiles read (at least 1)."""
        return max(1, self.cache_bytes // max(4 * self.chunk_bytes, 1))

    def read_stats(self) -> dict:
        """{"chunk_reads", "bytes"} fetched from the store by this process so far."""
        return self._counter.stats() if self._counter is not None else {"chunk_reads": 0, "bytes": 0}

    def _read(self, r: int, c: int) -> tuple[np.ndarray, np.ndarray]:
        if self._scene is None:
            self._scene, self._counter = open_scene(self.store, chunk_cache_bytes=0 if self.cache else self.cache_bytes)
        t = self.tile_size
        h, w = self._scene.shape
        if self.cache and h >= t and w >= t:
            if self._full is None:
                self._full = self._scene.read_window(0, 0, h, w, concat=True)
                self._full_valid = self._scene.valid
            return self._full[:, r : r + t, c : c + t], self._full_valid[r : r + t, c : c + t]
        return self._scene.read_window(r, c, t, t, concat=True), self._scene.read_valid_window(r, c, t, t)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        r, c = self.origins[i]
        tile, valid = self._read(int(r), int(c))
        return {"tile": torch.from_numpy(np.ascontiguousarray(tile, dtype=np.float32)),
                "valid": torch.from_numpy(np.ascontiguousarray(valid, dtype=bool))}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_scene"] = None
        state["_counter"] = None
        state["_full"] = None
        state["_full_valid"] = None
        return state


def _draw(generator: torch.Generator) -> tuple[int, bool]:
    k = int(torch.randint(0, 4, (1,), generator=generator))
    flip = bool(torch.randint(0, 2, (1,), generator=generator))
    return k, flip


def _apply(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    x = torch.rot90(x, k, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if flip else x


def random_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips and 90° rotations of a batch of tiles (B, C, T, T), one draw per batch."""
    return _apply(x, *_draw(generator))


def random_augment_with_valid(x: torch.Tensor, valid: torch.Tensor,
                              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`random_augment` of tiles (B, C, T, T) and the same flip/rotation of their validity
    (B, T, T); draws exactly what ``random_augment`` draws."""
    k, flip = _draw(generator)
    return _apply(x, k, flip), _apply(valid, k, flip)
