"""Reads that scale: a per-process memory budget, an LRU chunk cache and chunk-aligned shards.

Glossary (letters as in docs/glossary.md): C bands (all modalities), T tile side, H×W scene grid,
N tiles (items of a shard). A *chunk* is one (C, 256, 256) block of ``modalities/<name>`` as
``write_scene`` stores it (the chunk grid of the first modality is the scene's chunk grid).

* **Budget.** Each process may hold ``cache_bytes`` of scene data (default
  :data:`DEFAULT_CACHE_BYTES`, 512 MiB; ``BDGF_CACHE_BYTES`` overrides it). A scene whose
  normalised values take at most that (``scene_bytes``: C × H × W × 4 bytes, plus the validity
  mask) is read whole once; a larger one is read lazily through :class:`ChunkCachedScene`, whose
  LRU holds at most ``cache_bytes`` of raw chunks.
* **Chunk cache.** :class:`ChunkCachedScene` is a :class:`~bdgf.data.scene.Scene` whose raw
  reads are assembled from whole chunks kept in an LRU (modalities: bounded in bytes; the
  validity mask: its own LRU of :data:`VALID_CHUNKS` chunks, 64 KiB each). Normalisation and
  padding are ``Scene``'s own code, so its windows equal ``Scene.read_window``'s exactly.
* **Counting.** :class:`CountingStore` wraps the store every reader opens (production too) and
  counts chunk reads and the bytes they fetched: ``dataset.read_stats()``.
* **Chunk-aligned shards** (:func:`chunk_shard`). A tile belongs to the chunk holding its
  top-left pixel (``origin // chunk``), also when it straddles into the neighbours below and to
  the right (which it then reads: at most 4 chunks per array). The non-empty chunks, in one order
  (stores in turn, chunks row-major in each) started at a seed-drawn chunk and wrapping around,
  are cut into ``world`` contiguous runs of about equal tile counts (a chunk goes to the rank
  whose share of the tiles holds its midpoint; shards within two chunks' tiles of each other), so a rank's straddling tiles mostly read its own
  chunks; should a rank get none (a few huge chunks), the chunks are dealt largest first to the
  least loaded rank instead. Deterministic in (seed, world size), disjoint in chunks, every tile
  in exactly one shard. With fewer chunks than ranks (a scene smaller than world × 256² px,
  which then fits any budget) it falls back to tile-level sharding (``shard_indices``).
* **Chunk-window sampling** (:class:`ChunkWindowSampler`), for scenes read lazily: passes over
  the shard, each in a fresh seed-drawn order of chunks, ``window`` chunks at a time with their
  tiles shuffled together; ``window`` is what the cache holds with the neighbours a straddling
  tile reads (``cache_bytes // (4 × chunk bytes)``, at least 1), so each chunk is read about once
  per pass. A scene cached whole keeps plain random sampling with replacement.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from zarr.storage import LocalStore, WrapperStore

from bdgf.data.scene import Scene

__all__ = ["DEFAULT_CACHE_BYTES", "VALID_CHUNKS", "cache_budget", "scene_bytes", "chunk_bytes", "CountingStore",
           "open_scene", "ChunkCachedScene", "tile_chunk_keys", "chunk_shard", "ChunkWindowSampler"]

#: bytes of scene data one process may hold (whole normalised scene, or LRU chunks)
DEFAULT_CACHE_BYTES = 512 * 2**20
#: validity-mask chunks the chunk cache keeps (each 256² bytes)
VALID_CHUNKS = 16


def cache_budget(cache_bytes: int | None = None) -> int:
    """``cache_bytes``, else ``$BDGF_CACHE_BYTES``, else :data:`DEFAULT_CACHE_BYTES`."""
    if cache_bytes is not None:
        return int(cache_bytes)
    env = os.environ.get("BDGF_CACHE_BYTES")
    return int(env) if env else DEFAULT_CACHE_BYTES


def scene_bytes(scene: Scene) -> int:
    """Bytes of the whole normalised scene in memory: C × H × W float32 plus the (H, W) bool mask."""
    h, w = scene.shape
    return h * w * (4 * scene.total_bands + 1)


def chunk_shape(scene: Scene) -> tuple[int, int]:
    """(rows, cols) of the scene's chunk grid (the first modality's chunks)."""
    chunks = scene.modality(scene.modality_names[0]).chunks
    return int(chunks[1]), int(chunks[2])


def chunk_bytes(scene: Scene) -> int:
    """Bytes of one full chunk of every modality (float32)."""
    ch, cw = chunk_shape(scene)
    return 4 * scene.total_bands * ch * cw


class CountingStore(WrapperStore):
    """A zarr store that counts what is fetched: ``reads`` (chunk objects), ``bytes`` (their
    stored size) and ``by_key``; metadata documents (``zarr.json``) are not counted."""

    def __init__(self, store, counts: dict | None = None) -> None:
        super().__init__(store)
        self._lock = threading.Lock()
        self._counts = counts if counts is not None else {"reads": 0, "bytes": 0, "by_key": {}}

    def _with_store(self, store):
        return type(self)(store, self._counts)  # a read-only view shares the counters

    @property
    def reads(self) -> int:
        return self._counts["reads"]

    @property
    def bytes(self) -> int:
        return self._counts["bytes"]

    @property
    def by_key(self) -> dict[str, int]:
        return self._counts["by_key"]

    def _count(self, key: str, buf) -> None:
        if buf is None or key.endswith("zarr.json"):
            return
        with self._lock:
            self._counts["reads"] += 1
            self._counts["bytes"] += len(buf)
            self._counts["by_key"][key] = self._counts["by_key"].get(key, 0) + 1

    async def get(self, key, prototype, byte_range=None):
        buf = await self._store.get(key, prototype, byte_range)
        self._count(key, buf)
        return buf

    def get_sync(self, key, *, prototype=None, byte_range=None):
        buf = self._store.get_sync(key, prototype=prototype, byte_range=byte_range)
        self._count(key, buf)
        return buf

    def stats(self) -> dict:
        return {"chunk_reads": self.reads, "bytes": self.bytes}


class ChunkCachedScene(Scene):
    """A :class:`Scene` whose raw reads come from whole chunks kept in an LRU of at most
    ``cache_bytes`` (the validity mask: :data:`VALID_CHUNKS` chunks). ``read_window`` and
    ``read_valid_window`` return exactly what the plain ``Scene`` returns. Room is made before a
    chunk is read, so the cached chunks plus the one being read stay within ``cache_bytes`` (one
    chunk is always kept, even when it alone is larger)."""

    cache_bytes: int = DEFAULT_CACHE_BYTES

    def _lru_init(self) -> None:
        if not hasattr(self, "_lru"):
            self._lru: OrderedDict = OrderedDict()
            self._lru_bytes = 0
            self._vlru: OrderedDict = OrderedDict()
            self.hits = self.misses = 0

    def _chunk(self, key: str, arr, cy: int, cx: int, valid: bool) -> np.ndarray:
        self._lru_init()
        lru = self._vlru if valid else self._lru
        k = (key, cy, cx)
        if k in lru:
            lru.move_to_end(k)
            self.hits += 1
            return lru[k]
        self.misses += 1
        ch, cw = arr.chunks[-2:]
        sel = (slice(cy * ch, (cy + 1) * ch), slice(cx * cw, (cx + 1) * cw))
        if valid:
            while len(lru) >= VALID_CHUNKS:
                lru.popitem(last=False)
        else:  # make room first, so the cache plus the chunk being read stay within the budget
            need = arr.dtype.itemsize * arr.shape[0] * (min(arr.shape[1], (cy + 1) * ch) - cy * ch) \
                * (min(arr.shape[2], (cx + 1) * cw) - cx * cw)
            while lru and self._lru_bytes + need > self.cache_bytes:
                _, old = lru.popitem(last=False)
                self._lru_bytes -= old.nbytes
        block = np.asarray(arr[sel] if valid else arr[(slice(None),) + sel])
        lru[k] = block
        if not valid:
            self._lru_bytes += block.nbytes
        return block

    def _assemble(self, key: str, arr, r0: int, r1: int, c0: int, c1: int, valid: bool) -> np.ndarray:
        ch, cw = arr.chunks[-2:]
        lead = () if valid else (arr.shape[0],)
        out = np.empty(lead + (r1 - r0, c1 - c0), arr.dtype)
        for cy in range(r0 // ch, (r1 - 1) // ch + 1):
            for cx in range(c0 // cw, (c1 - 1) // cw + 1):
                block = self._chunk(key, arr, cy, cx, valid)
                y0, y1 = max(r0, cy * ch), min(r1, (cy + 1) * ch)
                x0, x1 = max(c0, cx * cw), min(c1, (cx + 1) * cw)
                out[..., y0 - r0 : y1 - r0, x0 - c0 : x1 - c0] = block[..., y0 - cy * ch : y1 - cy * ch,
                                                                       x0 - cx * cw : x1 - cx * cw]
        return out

    def _raw(self, name: str, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        return self._assemble(name, self._arrays[name], r0, r1, c0, c1, valid=False)

    def _raw_valid(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        return self._assemble("valid", self.root["valid"], r0, r1, c0, c1, valid=True)

    def cached_bytes(self) -> int:
        self._lru_init()
        return self._lru_bytes + sum(v.nbytes for v in self._vlru.values())


def open_scene(path: str | os.PathLike, *, chunk_cache_bytes: int | None = None) -> tuple[Scene, CountingStore]:
    """(scene, its counting store): a :class:`ChunkCachedScene` with an LRU of
    ``chunk_cache_bytes`` (> 0), else a plain :class:`Scene` (every read goes to the store)."""
    store = CountingStore(LocalStore(str(Path(path)), read_only=True))
    if chunk_cache_bytes:
        scene = ChunkCachedScene.open(path, store=store)
        scene.cache_bytes = int(chunk_cache_bytes)
    else:
        scene = Scene.open(path, store=store)
    return scene, store


# ----------------------------------------------------------------------------------------
# Chunk-aligned shards
# ----------------------------------------------------------------------------------------


def tile_chunk_keys(origins: np.ndarray, chunk: tuple[int, int], width: int) -> np.ndarray:
    """(N,) int64 chunk of each tile's top-left pixel (row-major chunk index) for ``origins`` (N, 2)."""
    ch, cw = chunk
    ncx = -(-width // cw)
    return (origins[:, 0] // ch) * ncx + origins[:, 1] // cw


def chunk_shard(keys: Sequence[np.ndarray], rank: int, world: int, seed: int = 0
                ) -> tuple[np.ndarray, list[np.ndarray]] | None:
    """This rank's tiles under chunk-aligned sharding, or None (fewer non-empty chunks than ranks).

    keys: per store, (N_s,) chunk key of each tile (:func:`tile_chunk_keys`); tile indices are
    global over the stores in order (as in a ``ConcatDataset``). Returns (indices into the
    concatenated tiles, sorted; per owned chunk, the tile indices of that chunk).
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in 0..{world - 1}, got {rank}")
    groups: list[np.ndarray] = []
    offset = 0
    for k in keys:
        k = np.asarray(k, np.int64)
        order = np.argsort(k, kind="stable")
        uniq, starts = np.unique(k[order], return_index=True)
        groups += [order[a:b] + offset for a, b in zip(starts, list(starts[1:]) + [len(k)])]
        offset += len(k)
    if len(groups) < world:
        return None
    sizes = np.array([len(g) for g in groups], np.int64)
    # contiguous runs of the chunk order (stores in turn, chunks row-major), started at a
    # seed-drawn chunk: chunk g goes to the rank whose share of the tiles holds its midpoint
    shift = int(np.random.default_rng([int(seed), 7]).integers(len(groups)))
    order = np.roll(np.arange(len(groups)), -shift)
    mid = np.cumsum(sizes[order]) - sizes[order] / 2.0
    rank_of = np.empty(len(groups), np.int64)
    rank_of[order] = np.minimum((mid * world / sizes.sum()).astype(np.int64), world - 1)
    owned: list[list[int]] = [list(np.flatnonzero(rank_of == r)) for r in range(world)]
    if any(not o for o in owned):  # a few huge chunks: deal them, largest first, to the least loaded
        tie = np.random.default_rng([int(seed), 8]).permutation(len(groups))
        load = np.zeros(world, np.int64)
        owned = [[] for _ in range(world)]
        for g in np.lexsort((tie, -sizes)):
            r = int(np.argmin(load))
            owned[r].append(int(g))
            load[r] += sizes[g]
    mine = [groups[g] for g in sorted(owned[rank])]
    return np.sort(np.concatenate(mine)), mine


def fallback_shard(n: int, rank: int, world: int, seed: int) -> np.ndarray:
    """Tile-level shard (``shard_indices``), for scenes with fewer chunks than ranks."""
    from bdgf.data.patches import shard_indices  # noqa: PLC0415 - patches imports this module

    return shard_indices(n, rank, world, seed=seed, shuffle=True)


class ChunkWindowSampler(torch.utils.data.Sampler):
    """``num_samples`` tile positions drawn chunk-window by chunk-window (see the module doc).

    groups: per chunk, positions (into the dataset the sampler indexes) of its tiles."""

    def __init__(self, groups: Sequence[np.ndarray], window: int, num_samples: int, generator: torch.Generator):
        self.groups = [np.asarray(g, np.int64) for g in groups if len(g)]
        self.window, self.num_samples, self.generator = max(int(window), 1), int(num_samples), generator

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        left = self.num_samples
        while left > 0:
            order = torch.randperm(len(self.groups), generator=self.generator).tolist()
            for i in range(0, len(order), self.window):
                tiles = np.concatenate([self.groups[j] for j in order[i : i + self.window]])
                for p in torch.randperm(len(tiles), generator=self.generator).tolist():
                    yield int(tiles[p])
                    left -= 1
                    if left == 0:
                        return
