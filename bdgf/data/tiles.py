"""Tiles of a scene for stage-1 pretraining (origins from :func:`bdgf.tiler.cover_origins`).

Glossary (letters as in docs/glossary.md): C bands (all modalities), T tile side, H×W scene grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from bdgf.data.scene import Scene
from bdgf.tiler import cover_origins


class TileDataset(Dataset):
    """Item i -> (C, T, T) float32 normalised tile of every modality, concatenated.

    The store is opened lazily in each process (the dataset pickles as a path), and with
    ``cache=True`` (the default for grids under ``cache_pixels``) the normalised scene is read
    once per process; otherwise each tile is read from its Zarr chunks.
    """

    def __init__(self, store: str | Path, tile_size: int, stride: int | None = None,
                 cache: bool | None = None, cache_pixels: int = 4096 * 4096):
        self.store = str(store)
        scene = Scene.open(self.store)
        self.tile_size = tile_size
        self.origins = cover_origins(*scene.shape, tile_size, stride or max(tile_size // 2, 1))
        self.channels = scene.total_bands
        self.cache = (scene.shape[0] * scene.shape[1] <= cache_pixels) if cache is None else cache
        self._scene: Scene | None = None
        self._full: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.origins)

    def _read(self, r: int, c: int) -> np.ndarray:
        if self._scene is None:
            self._scene = Scene.open(self.store)
        t = self.tile_size
        h, w = self._scene.shape
        if self.cache and h >= t and w >= t:
            if self._full is None:
                self._full = self._scene.read_window(0, 0, h, w, concat=True)
            return self._full[:, r : r + t, c : c + t]
        return self._scene.read_window(r, c, t, t, concat=True)

    def __getitem__(self, i: int) -> torch.Tensor:
        r, c = self.origins[i]
        return torch.from_numpy(np.ascontiguousarray(self._read(int(r), int(c)), dtype=np.float32))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_scene"] = None
        state["_full"] = None
        return state


def random_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips and 90° rotations of a batch of tiles (B, C, T, T), one draw per batch."""
    k = int(torch.randint(0, 4, (1,), generator=generator))
    flip = bool(torch.randint(0, 2, (1,), generator=generator))
    x = torch.rot90(x, k, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if flip else x
