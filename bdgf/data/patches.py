"""Per-pixel training patches read from a scene store (docs/method.md, Stage 2).

Each labelled, valid pixel (row, col) of a split becomes one sample: the P×P window centred on it
of every modality (normalised, concatenated in scene order) and, optionally, of the cached
diffusion feature maps ``features/<name>``. Windows that run past the grid are reflect-padded,
exactly as :meth:`bdgf.data.scene.Scene.read_window` does.

Glossary (letters as in docs/glossary.md)
    C   input bands, all modalities concatenated (in scene order)
    P   patch side (odd); r = P // 2
    F   channels of a cached diffusion feature map
    H, W   scene grid height, width
    K   classes (labels 0..K-1 here: the store's 1..K minus 1)
    N   labelled, valid pixels of a split

>>> ds = PatchDataset("houston.zarr", "train", patch_size=11, features=None)
>>> item = ds[0]   # {"patch": (C, 11, 11) f32, "label": () i64, "valid": (11, 11) bool, "coords": (2,) i64}
>>> loader = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=2)   # default collate

Distributed training: every rank builds the dataset with its ``rank``/``world_size`` and calls
``set_epoch(e)`` before each epoch; the shards come from :func:`shard_indices`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from bdgf.data.chunks import DEFAULT_CACHE_BYTES, cache_budget
from bdgf.data.scene import Scene
from bdgf.errors import InputError, StoreError
from bdgf.tiler import pad_block

log = logging.getLogger(__name__)

__all__ = ["labelled_pixels", "shard_indices", "PatchDataset", "MEMORY_CACHE_MAX_BYTES", "DEFAULT_FEATURES"]

DEFAULT_FEATURES = ("low", "mid", "high")
#: ``cache="auto"`` keeps the whole normalised scene (plus requested features, as float16) in
#: memory when it takes at most the per-process budget (``cache_bytes``, else
#: ``$BDGF_CACHE_BYTES``, else this many bytes: :func:`bdgf.data.chunks.cache_budget`, the same
#: budget ``TileDataset`` uses) -- per DataLoader worker, since each worker loads its own copy.
#: 512 MiB covers the four benchmarks' modalities; mosaics stay lazy.
MEMORY_CACHE_MAX_BYTES = DEFAULT_CACHE_BYTES
CACHE_MODES = ("auto", "lazy", "memory")


def labelled_pixels(scene: Scene | str | os.PathLike, split: str, *, return_dropped: bool = False):
    """(N, 2) int64 (row, col) of the pixels labelled in ``split`` AND valid, row-major order.

    Labelled pixels that are invalid (NaN/nodata in some modality) are dropped; their number is
    logged as a warning and, with ``return_dropped=True``, returned: ``(coords, n_dropped)``.
    """
    if not isinstance(scene, Scene):
        scene = Scene.open(scene)
    lab = scene.labels(split)
    labelled = lab > 0
    keep = labelled & scene.valid
    dropped = int(labelled.sum() - keep.sum())
    if dropped:
        log.warning("%s: split %r: dropped %d labelled pixels that are invalid", scene.path, split, dropped)
    coords = np.argwhere(keep).astype(np.int64)
    return (coords, dropped) if return_dropped else coords


def shard_indices(
    n: int,
    rank: int,
    world_size: int,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
) -> np.ndarray:
    """Indices (int64) into ``range(n)`` that ``rank`` of ``world_size`` visits this epoch.

    Deterministic in (n, world_size, seed, epoch, shuffle). With ``shuffle`` the order is a
    permutation drawn from ``seed + epoch`` (the same on every rank), so it changes every epoch.
    Every rank gets the same length ceil(n / world_size), so collective steps stay in lockstep:
    like ``torch.utils.data.DistributedSampler``, the permutation is padded by wrapping around to
    its start, so when n % world_size != 0 the first few items are visited twice per epoch. The
    shards are disjoint slices of that padded sequence and together cover all n items. With
    ``drop_last`` the tail is dropped instead: floor(n / world_size) each, strictly disjoint, some
    items skipped this epoch.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if shuffle:
        order = np.random.default_rng([int(seed), int(epoch)]).permutation(n).astype(np.int64)
    else:
        order = np.arange(n, dtype=np.int64)
    if drop_last:
        total = (n // world_size) * world_size
        order = order[:total]
    else:
        total = -(-n // world_size) * world_size
        if total > n:
            order = np.resize(order, total)  # repeats from the start: wrap-around padding
    return order[rank:total:world_size].copy()


class PatchDataset(torch.utils.data.Dataset):
    """P×P patches around the labelled, valid pixels of one split of a scene store.

    Args:
        store_path: the scene's Zarr store.
        split: label raster to sample ("train", "val", "test").
        patch_size: P, odd.
        features: names under ``features/`` to window too (each (F, H, W) float16 in the
            store), or None for none. A missing one is an error that lists what the store has.
        rank, world_size, seed, shuffle: this process's shard, from :func:`shard_indices`;
            world_size=1 and shuffle=False (the default) keep row-major order.
        cache: "lazy" reads each window from the store per item (the store is opened on first
            use in each worker process; nothing scene-sized is held); "memory" loads the
            normalised scene (and features, float16) once per worker and slices it -- the same
            values, much faster for small scenes; "auto" picks "memory" when that takes at most
            ``cache_bytes`` (what it would take: :meth:`cache_bytes`).
        cache_bytes: the per-process memory budget in bytes for ``cache="auto"``; None:
            ``$BDGF_CACHE_BYTES``, else ``MEMORY_CACHE_MAX_BYTES`` (512 MiB).
        epoch: initial epoch (see :meth:`set_epoch`).

    Item (tensors): "patch" (C, P, P) float32, modalities concatenated in scene order,
    invalid pixels 0; "label" () int64 in 0..K-1 (store label minus 1); "valid" (P, P) bool;
    "coords" (2,) int64 (row, col) of the centre; and per requested feature "<name>"
    (F, P, P) float32.

    Picklable: the state is the path plus small index arrays; open handles and caches are
    dropped on pickling and rebuilt lazily.
    """

    def __init__(
        self,
        store_path: str | os.PathLike,
        split: str,
        patch_size: int = 11,
        features: Sequence[str] | None = DEFAULT_FEATURES,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        *,
        shuffle: bool = False,
        cache: str = "auto",
        epoch: int = 0,
        cache_bytes: int | None = None,
    ):
        if patch_size < 1 or patch_size % 2 == 0:
            raise InputError(f"patch_size must be a positive odd number, got {patch_size}")
        if cache not in CACHE_MODES:
            raise InputError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
        if isinstance(features, str):
            features = (features,)
        self.store_path = str(Path(store_path))
        self.split = split
        self.patch_size = int(patch_size)
        self.features = tuple(features) if features else ()
        self.rank, self.world_size, self.seed, self.shuffle = int(rank), int(world_size), int(seed), bool(shuffle)

        scene = Scene.open(self.store_path)
        self._scene: Scene | None = scene
        self._cache: dict | None = None
        self.class_names = list(scene.class_names)
        self.num_classes = scene.num_classes
        self.bands = dict(scene.bands)
        self.channel_modality = scene.channel_modality
        self.feature_channels = self._check_features(scene)
        coords, self.dropped_invalid = labelled_pixels(scene, split, return_dropped=True)
        if len(coords) == 0:
            raise InputError(f"{self.store_path}: split {split!r} has no labelled valid pixel")
        self.all_coords = coords
        self.all_labels = scene.labels(split)[coords[:, 0], coords[:, 1]] - 1
        self.cache_budget = cache_budget(cache_bytes)
        self.cache = self._resolve_cache(cache, scene)
        self.set_epoch(epoch)

    # --- setup ------------------------------------------------------------------------------
    def _check_features(self, scene: Scene) -> dict[str, int]:
        have = sorted(scene.root["features"].array_keys()) if "features" in scene.root else []
        missing = [f for f in self.features if f not in have]
        if missing:
            raise StoreError(
                f"{self.store_path}: features {missing} requested but not in the store; it has "
                f"{have or 'no features'} (run the feature extractor, or pass features=None)"
            )
        out = {}
        for f in self.features:
            arr = scene.root["features"][f]
            if arr.ndim != 3 or tuple(arr.shape[1:]) != scene.shape:
                raise StoreError(
                    f"{self.store_path}: features/{f} has shape {arr.shape}, expected (F, {scene.shape[0]}, {scene.shape[1]})"
                )
            out[f] = int(arr.shape[0])
        return out

    def _resolve_cache(self, cache: str, scene: Scene) -> str:
        if cache != "auto":
            return cache
        return "memory" if self.cache_bytes(scene) <= self.cache_budget else "lazy"

    def cache_bytes(self, scene: Scene | None = None) -> int:
        """Bytes the memory cache takes (padded grid: float32 modalities, float16 features, bool valid)."""
        h, w = (scene or self._open()).shape
        px = (h + self.patch_size - 1) * (w + self.patch_size - 1)
        return px * (4 * sum(self.bands.values()) + 2 * sum(self.feature_channels.values()) + 1)

    def set_epoch(self, epoch: int) -> None:
        """Re-shard for ``epoch``. Call before creating the DataLoader iterator (workers copy the
        dataset when the iterator starts; with ``persistent_workers=True`` they would not see it)."""
        self.epoch = int(epoch)
        self.indices = shard_indices(
            len(self.all_coords), self.rank, self.world_size, self.seed, self.epoch, self.shuffle
        )

    def _open(self) -> Scene:
        if self._scene is None:
            self._scene = Scene.open(self.store_path)
        return self._scene

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_scene"] = None
        state["_cache"] = None
        return state

    # --- items ------------------------------------------------------------------------------
    @property
    def coords(self) -> np.ndarray:
        """(len(self), 2) int64 centre pixels of this shard, in item order."""
        return self.all_coords[self.indices]

    @property
    def labels(self) -> np.ndarray:
        """(len(self),) int64 class indices 0..K-1 of this shard, in item order."""
        return self.all_labels[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} patches")
        j = self.indices[i]
        r, c = (int(v) for v in self.all_coords[j])
        if self.cache == "memory":
            patch, valid, feats = self._read_cached(r, c)
        else:
            patch, valid, feats = self._read_lazy(r, c)
        item = {
            "patch": torch.from_numpy(np.ascontiguousarray(patch, np.float32)),
            "label": torch.tensor(int(self.all_labels[j]), dtype=torch.int64),
            "valid": torch.from_numpy(np.ascontiguousarray(valid, bool)),
            "coords": torch.tensor([r, c], dtype=torch.int64),
        }
        for name, f in feats.items():
            item[name] = torch.from_numpy(np.ascontiguousarray(f, np.float32))
        return item

    def _read_lazy(self, r: int, c: int):
        s = self._open()
        p, half = self.patch_size, self.patch_size // 2
        r0, c0 = r - half, c - half
        patch = s.read_window(r0, c0, p, p, pad="reflect", concat=True)
        valid = s.read_valid_window(r0, c0, p, p, pad="reflect")
        h, w = s.shape
        rr0, rr1, cc0, cc1 = max(r0, 0), min(r0 + p, h), max(c0, 0), min(c0 + p, w)
        pads = ((rr0 - r0, r0 + p - rr1), (cc0 - c0, c0 + p - cc1))
        feats = {}
        for name in self.features:
            block = np.asarray(s.root["features"][name][:, rr0:rr1, cc0:cc1], np.float32)
            feats[name] = pad_block(block, pads, "reflect") if any(x for pr in pads for x in pr) else block
        return patch, valid, feats

    def _load_cache(self) -> dict:
        s = self._open()
        h, w = s.shape
        half = self.patch_size // 2
        pads = ((half, half), (half, half))
        cache = {
            "patch": pad_block(s.read_window(0, 0, h, w, pad="reflect", concat=True), pads, "reflect"),
            "valid": pad_block(s.valid[None], pads, "reflect")[0],
        }
        for name in self.features:
            cache[name] = pad_block(np.asarray(s.root["features"][name][...], np.float16), pads, "reflect")
        return cache

    def _read_cached(self, r: int, c: int):
        if self._cache is None:
            self._cache = self._load_cache()
        p = self.patch_size
        # the cached grid is padded by P//2 on each side, so the window at r - P//2 starts at r
        sl = (slice(r, r + p), slice(c, c + p))
        feats = {name: self._cache[name][(slice(None),) + sl].astype(np.float32) for name in self.features}
        return self._cache["patch"][(slice(None),) + sl].copy(), self._cache["valid"][sl].copy(), feats

    def __repr__(self) -> str:
        return (
            f"PatchDataset({self.store_path!r}, split={self.split!r}, P={self.patch_size}, n={len(self)}"
            f"/{len(self.all_coords)}, rank={self.rank}/{self.world_size}, features={list(self.features)}, "
            f"cache={self.cache!r})"
        )
