"""Reads that scale (issue 11): a memory budget in bytes, an LRU chunk cache that changes no value,
chunk-aligned shards, and a bounded number of chunk reads per tile, counted at the store."""

from __future__ import annotations

import numpy as np
import pytest
from torch.utils.data import RandomSampler

from bdgf.config import RunConfig
from bdgf.data.chunks import (ChunkCachedScene, ChunkWindowSampler, CountingStore, cache_budget, chunk_shard,
                              open_scene, scene_bytes)
from bdgf.data.scene import ModalityData, Scene, SceneData, write_scene
from bdgf.data.tiles import TileDataset
from bdgf.engine.pretrain import tile_batches

pytestmark = pytest.mark.usefixtures("one_thread")

CHUNK, TILE = 32, 16


def write_store(path, h: int, w: int, bands: int = 6, seed: int = 0, chunk: int = CHUNK) -> str:
    """An (h, w) scene of ``bands`` HSI bands + 1 LiDAR band with nodata patches, chunks (C, chunk, chunk)."""
    rng = np.random.default_rng(seed)
    hsi = rng.normal(3.0, 2.0, (bands, h, w)).astype(np.float32)
    lidar = rng.normal(10.0, 5.0, (1, h, w)).astype(np.float32)
    hsi[min(2, bands - 1), 5:14, 7:30] = np.nan
    hsi[0, :24, w - 40 :] = np.nan  # a corner with whole tiles of nodata
    lidar[0, h - 9 :, : w // 3] = np.nan
    labels = np.zeros((h, w), np.uint16)
    labels[::7, ::5] = 1
    labels[3::7, ::5] = 2
    scene = SceneData("reads", {"hsi": ModalityData(hsi, kind="hsi"), "lidar": ModalityData(lidar, kind="lidar")},
                      {"train": labels}, ["a", "b"])
    write_scene(scene, path, chunk=chunk)
    return str(path)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("reads")
    return write_store(d / "a.zarr", 100, 140, seed=0), write_store(d / "b.zarr", 70, 90, seed=1)


def windows(h: int, w: int, n: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        hh, ww = (int(v) for v in rng.integers(11, 70, 2))  # > 10: every window overlaps the grid
        yield int(rng.integers(-10, h - 1)), int(rng.integers(-10, w - 1)), hh, ww


@pytest.mark.parametrize("budget", [1, 40_000, 10**9])  # one chunk at a time, a few, everything
def test_chunk_cache_returns_exactly_what_the_plain_reader_returns(stores, budget):
    plain = Scene.open(stores[0])
    cached, counter = open_scene(stores[0], chunk_cache_bytes=budget)
    assert isinstance(cached, ChunkCachedScene)
    for r, c, hh, ww in windows(*plain.shape, 60, seed=budget % 97):
        for pad in ("reflect", "constant"):
            want, got = plain.read_window(r, c, hh, ww, pad=pad), cached.read_window(r, c, hh, ww, pad=pad)
            assert want.keys() == got.keys()
            for name in want:
                assert got[name].dtype == want[name].dtype == np.float32
                np.testing.assert_array_equal(got[name], want[name])
            np.testing.assert_array_equal(cached.read_valid_window(r, c, hh, ww, pad=pad),
                                          plain.read_valid_window(r, c, hh, ww, pad=pad))
    assert counter.reads > 0
    # within the budget (one chunk of a modality at least), the validity mask's 16 chunks aside
    assert cached.cached_bytes() - sum(v.nbytes for v in cached._vlru.values()) <= max(budget, 6 * CHUNK * CHUNK * 4)
    assert len(cached._vlru) <= 16


def test_lazy_tiles_equal_whole_scene_tiles(stores):
    whole = TileDataset(stores[0], TILE, cache=True, min_valid_fraction=0.3)
    lazy = TileDataset(stores[0], TILE, cache_bytes=20_000, min_valid_fraction=0.3)
    assert whole.cache and not lazy.cache and len(whole) == len(lazy) and lazy.skipped > 0
    for i in range(len(lazy)):
        a, b = whole[i], lazy[i]
        assert set(b) == {"tile", "valid"} and b["tile"].shape == (7, TILE, TILE) and b["valid"].shape == (TILE, TILE)
        assert b["tile"].dtype == a["tile"].dtype and b["valid"].dtype == a["valid"].dtype
        assert bool((a["tile"] == b["tile"]).all()) and bool((a["valid"] == b["valid"]).all())


def test_the_whole_scene_cache_follows_a_byte_budget_not_a_pixel_count(tmp_path, monkeypatch):
    few = write_store(tmp_path / "few.zarr", 40, 40, bands=2)
    many = write_store(tmp_path / "many.zarr", 40, 40, bands=60)
    budget = 40 * 40 * (4 * 10 + 1)  # fits 9 bands + LiDAR, not 60 + 1
    assert scene_bytes(Scene.open(few)) == 40 * 40 * (4 * 3 + 1)
    assert TileDataset(few, TILE, cache_bytes=budget).cache
    assert not TileDataset(many, TILE, cache_bytes=budget).cache
    assert TileDataset(many, TILE).cache  # 40 x 40 x 61 bands: far under the 512 MiB default
    monkeypatch.setenv("BDGF_CACHE_BYTES", str(budget))
    assert cache_budget() == budget
    assert TileDataset(few, TILE).cache and not TileDataset(many, TILE).cache


def test_a_scene_over_the_budget_is_read_lazily_with_bounded_chunk_reads(stores):
    data = TileDataset(stores[0], TILE, cache_bytes=4 * 7 * CHUNK * CHUNK * 4)  # 4 chunks of every band
    assert not data.cache and data.window == 1
    c = data.chunk_keys
    chunks_in_store = len(np.unique(c))  # 4 x 5 chunks of (7, 32, 32) per modality...
    arrays = 3  # hsi, lidar, valid
    order = list(ChunkWindowSampler(chunk_shard([c], 0, 1)[1], data.window, len(data), _gen(0)))
    assert sorted(order) == list(range(len(data)))  # one pass: every tile once
    before = 0
    for i in order:
        data[i]
        reads = data.read_stats()["chunk_reads"]
        assert reads - before <= 4 * arrays  # a tile touches at most 4 chunks of each array
        before = reads
    assert data._full is None  # never read whole
    # chunk by chunk: each chunk object read about once (its own window and its up/left neighbours')
    counts = np.array(list(data._counter.by_key.values()))
    assert counts.max() <= 4 and data.read_stats()["chunk_reads"] <= 4 * arrays * chunks_in_store
    # the same tiles without the cache read their chunks again and again
    bare = TileDataset(stores[0], TILE, cache=False, cache_bytes=0)
    for i in order:
        bare[i]
    assert bare.read_stats()["chunk_reads"] >= 3 * data.read_stats()["chunk_reads"]


def _gen(seed):
    import torch

    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("world", [2, 3, 5])
def test_chunk_shards_are_disjoint_in_chunks_and_cover_every_tile_once(stores, world):
    datasets = [TileDataset(s, TILE, min_valid_fraction=0.3) for s in stores]
    keys = [d.chunk_keys for d in datasets]
    owner_chunks, seen = [], []
    for rank in range(world):
        indices, groups = chunk_shard(keys, rank, world, seed=4)
        assert np.array_equal(np.sort(np.concatenate(groups)), indices)
        seen.append(indices)
        # chunk identity across stores: (store, chunk of the top-left pixel)
        store_of = np.searchsorted(np.cumsum([len(k) for k in keys]), indices, side="right")
        flat = np.concatenate(keys)
        owner_chunks.append({(int(s), int(flat[i])) for s, i in zip(store_of, indices)})
        for g in groups:  # a group is one chunk of one store
            assert len({(int(s), int(flat[i])) for s, i in zip(np.searchsorted(np.cumsum([len(k) for k in keys]), g,
                                                                              side="right"), g)}) == 1
    allidx = np.concatenate(seen)
    assert sorted(allidx.tolist()) == list(range(sum(len(k) for k in keys)))  # every tile exactly once
    for a in range(world):
        for b in range(a + 1, world):
            assert not owner_chunks[a] & owner_chunks[b]
    sizes = [len(s) for s in seen]
    biggest = max(len(g) for r in range(world) for g in chunk_shard(keys, r, world, 4)[1])
    assert max(sizes) - min(sizes) <= 2 * biggest  # balanced to within two chunks' tiles
    again = [chunk_shard(keys, r, world, seed=4)[0] for r in range(world)]
    assert all(np.array_equal(x, y) for x, y in zip(seen, again))  # deterministic per seed
    other = [chunk_shard(keys, r, world, seed=5)[0] for r in range(world)]
    assert any(not np.array_equal(x, y) for x, y in zip(seen, other)) or world == 1


def test_fewer_chunks_than_ranks_falls_back_to_tile_shards(tmp_path):
    small = write_store(tmp_path / "s.zarr", 30, 30)  # one chunk
    cfg = RunConfig().with_overrides({"pretrain.tile_size": TILE, "pretrain.steps": 3}).pretrain
    keys = [TileDataset(small, TILE, min_valid_fraction=cfg.min_valid_fraction).chunk_keys]
    assert chunk_shard(keys, 0, 2) is None
    shards = [tile_batches([small], cfg, micro_batch=2, rank=r, world=2)[0].dataset.indices for r in range(2)]
    assert set(shards[0]) | set(shards[1]) == set(range(len(keys[0])))  # every tile, in tile-level shards
    assert abs(len(shards[0]) - len(shards[1])) <= 1


@pytest.mark.parametrize("budget", [None, "small"])
def test_tile_batches_draws_only_from_the_ranks_own_chunks(stores, budget, monkeypatch):
    if budget == "small":
        monkeypatch.setenv("BDGF_CACHE_BYTES", str(4 * 7 * CHUNK * CHUNK * 4))
    cfg = RunConfig().with_overrides({"pretrain.tile_size": TILE, "pretrain.steps": 6, "pretrain.seed": 3}).pretrain
    datasets = [TileDataset(s, TILE, min_valid_fraction=cfg.min_valid_fraction) for s in stores]
    keys = [d.chunk_keys for d in datasets]
    origins = np.concatenate([d.origins for d in datasets])
    for rank in range(2):
        loader, _ = tile_batches(list(stores), cfg, micro_batch=4, rank=rank, world=2)
        mine = chunk_shard(keys, rank, 2, seed=3)[0]
        assert loader.dataset.indices == mine.tolist()
        drawn = [loader.dataset.indices[p] for p in loader.sampler]
        assert len(drawn) == 6 * 4 and set(drawn) <= set(mine.tolist())
        batch = next(iter(tile_batches(list(stores), cfg, micro_batch=4, rank=rank, world=2)[0]))  # a fresh stream
        assert batch["tile"].shape == (4, 7, TILE, TILE) and batch["valid"].shape == (4, TILE, TILE)
        assert (budget == "small") == isinstance(loader.sampler, ChunkWindowSampler)
        # the first batch really holds the first drawn tiles
        first = drawn[0]
        store = 0 if first < len(datasets[0]) else 1
        local = first if store == 0 else first - len(datasets[0])
        r, c = origins[first]
        want = Scene.open(stores[store]).read_window(int(r), int(c), TILE, TILE, concat=True)
        np.testing.assert_array_equal(batch["tile"][0].numpy(), want)
        assert (datasets[store].origins[local] == origins[first]).all()


def test_counting_store_counts_chunk_objects_not_metadata(stores):
    scene, counter = open_scene(stores[1])
    assert isinstance(counter, CountingStore) and counter.reads == 0
    scene.read_window(0, 0, CHUNK, CHUNK)  # one chunk of hsi, lidar and valid
    assert counter.reads == 3 and counter.bytes > 0
    scene.read_window(CHUNK - 1, CHUNK - 1, 2, 2)  # a 2x2 window on a 4-chunk corner
    assert counter.reads == 3 + 12


LOG_WORKER = r"""
import json, os, sys
import torch
import torch.distributed as dist
from bdgf.config import RunConfig
from bdgf.engine.loop import TorchStepper
from bdgf.engine.pretrain import build_denoiser, pretrain_loop

rank = int(sys.argv[1])
dist.init_process_group("gloo", rank=rank, world_size=2)
torch.set_num_threads(1)
cfg = RunConfig().with_overrides({"pretrain.tile_size": 16,
                                  "pretrain.unet": {"base_channels": 8, "channel_mults": [1, 2, 2]}}).pretrain
torch.manual_seed(0)
model, schedule, masking = build_denoiser(cfg, [3, 1])
tiles = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(100 + rank)) * (1 + 3 * rank)
recs = []
stepper = TorchStepper(model, torch.optim.SGD(model.parameters(), lr=0.0))
local = pretrain_loop(model, schedule, masking, iter([tiles] * 2), stepper, steps=2,
                      channel_modality=torch.tensor([0, 0, 0, 1]), modality_names=["hsi", "lidar"],
                      generator=torch.Generator().manual_seed(rank), log_every=1, on_log=recs.append)
print(json.dumps({"local": local, "logged": recs[-1]}))
dist.destroy_process_group()
"""


def test_the_logged_loss_is_the_mean_over_ranks(tmp_path):
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", LOG_WORKER, str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env, cwd=tmp_path) for r in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    a, b = outs
    assert abs(a["local"]["loss"] - b["local"]["loss"]) > 1e-3  # the ranks' micro-batches differ
    for key in ("loss", "loss/hsi", "loss/lidar", "t_mean"):
        want = (a["local"][key] + b["local"][key]) / 2
        assert a["logged"][key] == pytest.approx(want, rel=1e-6) and b["logged"][key] == pytest.approx(want, rel=1e-6)


def test_several_stores_share_one_budget(stores, monkeypatch):
    sizes = [TileDataset(s, TILE).scene_bytes for s in stores]
    assert sizes[0] > sizes[1]
    monkeypatch.setenv("BDGF_CACHE_BYTES", str(max(sizes) + 1))  # each store fits alone, not both
    cfg = RunConfig().with_overrides({"pretrain.tile_size": TILE, "pretrain.steps": 2}).pretrain
    assert all(d.cache for d in (TileDataset(s, TILE) for s in stores))
    one, _ = tile_batches([stores[0]], cfg, micro_batch=2)
    assert one.dataset.cache and isinstance(one.sampler, RandomSampler)
    both, _ = tile_batches(list(stores), cfg, micro_batch=2)
    assert not both.dataset.datasets[0].cache and isinstance(both.sampler, ChunkWindowSampler)  # the larger one
    assert sum(d.cache_bytes for d in both.dataset.datasets) <= max(sizes) + 1
