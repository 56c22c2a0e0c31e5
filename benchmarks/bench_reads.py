"""Reads that scale: bytes fetched per pretraining tile and peak memory per rank, before vs after.

A synthetic scene 4× the per-process cache budget (default: 63 HSI bands + 1 LiDAR band on a
1024 × 1024 grid = 256 MiB of float32, written with the store's (C, 256, 256) chunks; budget
``BDGF_CACHE_BYTES`` = 64 MiB). Each rank of a 2-rank job runs in its own fresh subprocess (one
after the other) and draws the same number of 32 × 32 tiles through the pretraining data path:

* ``before (whole)``: what the old code did with this scene (4096² px limit: it fits), the whole
  normalised scene read into every rank, tile-level shards (``shard_indices`` over the tile list),
  uniform sampling with replacement;
* ``before (lazy)``: the old path above that pixel limit: every tile reads its whole chunks from
  the store, no cache, tile-level shards;
* ``after``: :func:`bdgf.engine.pretrain.tile_batches` with ``world=2``: the scene is over the
  64 MiB budget so it is read lazily through the LRU chunk cache, chunk-aligned shards,
  chunk-window sampling.

Figures per rank: chunk objects fetched per tile and stored MiB per tile (counted by the store
wrapper every reader goes through, :class:`bdgf.data.chunks.CountingStore`), against the 256 KiB a
tile holds; the distinct chunks the rank touched and how many of them the other rank touched too;
the process's resident-memory high-water mark (``VmHWM`` of ``/proc/self/status``) and the same
for a process that imported everything and opened the dataset but read nothing (``baseline``).
Ratios are against the rows measured in the same run.

    .venv/bin/python benchmarks/bench_reads.py            # ~2 min on 2 busy cores
    .venv/bin/python benchmarks/bench_reads.py --quick    # smaller scene, a smoke check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODES = ("baseline", "before (whole)", "before (lazy)", "after")
WORLD, TILE, MICRO = 2, 32, 16


def vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_store(path: Path, size: int, bands: int) -> None:
    import numpy as np

    from bdgf.data.scene import ModalityData, SceneData, write_scene

    rng = np.random.default_rng(0)
    hsi = rng.standard_normal((bands - 1, size, size), dtype=np.float32)
    lidar = rng.standard_normal((1, size, size), dtype=np.float32)
    labels = np.zeros((size, size), np.uint16)
    labels[::9, ::9] = 1
    labels[4::9, ::9] = 2
    scene = SceneData("reads", {"hsi": ModalityData(hsi, kind="hsi"), "lidar": ModalityData(lidar, kind="lidar")},
                      {"train": labels}, ["a", "b"])
    write_scene(scene, path, overwrite=True)


def worker(mode: str, rank: int, store: str, tiles: int) -> dict:
    import torch
    from torch.utils.data import DataLoader, RandomSampler, Subset

    from bdgf.config import RunConfig
    from bdgf.data.patches import shard_indices
    from bdgf.data.tiles import TileDataset
    from bdgf.engine.pretrain import tile_batches

    torch.set_num_threads(1)
    cfg = RunConfig().with_overrides({"pretrain.tile_size": TILE, "pretrain.steps": tiles // MICRO,
                                      "pretrain.seed": 0}).pretrain
    t0 = time.perf_counter()
    if mode == "after":
        loader, _ = tile_batches([store], cfg, micro_batch=MICRO, rank=rank, world=WORLD)
        datasets = [loader.dataset.dataset]
    else:  # the old data path, as it was: tile-level shards, uniform sampling with replacement
        whole = mode in ("before (whole)", "baseline")
        data = TileDataset(store, TILE, cache=whole, cache_bytes=None if whole else 0,
                           min_valid_fraction=cfg.min_valid_fraction)
        sub = Subset(data, shard_indices(len(data), rank, WORLD, seed=cfg.seed, shuffle=True).tolist())
        sampler = RandomSampler(sub, replacement=True, num_samples=tiles,
                                generator=torch.Generator().manual_seed(cfg.seed + 1_000_003 * rank))
        loader, datasets = DataLoader(sub, batch_size=MICRO, sampler=sampler, drop_last=True), [data]
    n = 0
    if mode != "baseline":
        for batch in loader:
            n += batch["tile"].shape[0]
    data = datasets[0]
    counter = data._counter
    keys = sorted(k for k in (counter.by_key if counter is not None else {}) if k.startswith("modalities/"))
    return {"mode": mode, "rank": rank, "tiles": n, "chunk_reads": data.read_stats()["chunk_reads"],
            "bytes": data.read_stats()["bytes"], "chunks": keys, "hwm_mib": vm_hwm_mib(),
            "seconds": time.perf_counter() - t0, "tile_bytes": data.channels * TILE * TILE * 4,
            "cache_bytes": data.cache_bytes, "scene_bytes": data.scene_bytes}


def run_worker(mode: str, rank: int, store: Path, tiles: int, budget: int) -> dict:
    """One fresh process per (mode, rank), run twice: glibc's default allocator, then with its mmap
    threshold pinned at 128 KiB (``MALLOC_MMAP_THRESHOLD_``: freed chunk buffers go back to the
    system at once instead of staying in the heap), which separates what the reader holds from
    what the allocator keeps."""
    rows = []
    for extra in ({}, {"MALLOC_MMAP_THRESHOLD_": "131072"}):
        env = {**os.environ, "BDGF_CACHE_BYTES": str(budget), "OMP_NUM_THREADS": "1", **extra}
        out = subprocess.run([sys.executable, __file__, "--worker", mode, str(rank), str(store), str(tiles)],
                             capture_output=True, text=True, env=env, check=False)
        if out.returncode:
            raise SystemExit(f"{mode} rank {rank} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {**rows[0], "hwm_pinned_mib": rows[1]["hwm_mib"]}


def table(rows: list[dict]) -> str:
    base = {r["rank"]: r["hwm_mib"] for r in rows if r["mode"] == "baseline"}
    pinned = {r["rank"]: r["hwm_pinned_mib"] for r in rows if r["mode"] == "baseline"}
    lazy = {r["rank"]: r for r in rows if r["mode"] == "before (lazy)"}
    whole = {r["rank"]: r for r in rows if r["mode"] == "before (whole)"}
    lines = ["| path | rank | tiles | chunk reads / tile | MiB read / tile | × a tile's bytes | chunks touched | "
             "of them also by the other rank | peak RSS MiB | above baseline MiB | same, mmap threshold pinned | s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    by = {(r["mode"], r["rank"]): r for r in rows}
    for r in rows:
        if r["mode"] == "baseline":
            lines.append(f"| baseline (imports + dataset, no reads) | {r['rank']} | 0 | | | | | | "
                         f"{r['hwm_mib']:.0f} | 0 | 0 ({r['hwm_pinned_mib']:.0f}) | {r['seconds']:.1f} |")
            continue
        other = by.get((r["mode"], 1 - r["rank"]))
        shared = len(set(r["chunks"]) & set(other["chunks"])) if other else 0
        t = max(r["tiles"], 1)
        lines.append(f"| {r['mode']} | {r['rank']} | {r['tiles']} | {r['chunk_reads'] / t:.2f} | "
                     f"{r['bytes'] / t / 2**20:.2f} | {r['bytes'] / t / r['tile_bytes']:.1f} | {len(r['chunks'])} | "
                     f"{shared} | {r['hwm_mib']:.0f} | {r['hwm_mib'] - base[r['rank']]:.0f} | "
                     f"{r['hwm_pinned_mib'] - pinned[r['rank']]:.0f} | {r['seconds']:.1f} |")
    lines.append("")
    for rank in sorted(base):
        a = by[("after", rank)]
        per = lambda r: r["bytes"] / max(r["tiles"], 1)  # noqa: E731
        above = lambda r, key, b: (r[key] - b[rank]) / max(a[key] - b[rank], 1)  # noqa: E731
        lines.append(f"rank {rank}: bytes read per tile, before (lazy) / after = "
                     f"{per(lazy[rank]) / max(per(a), 1):.1f}x; memory above baseline, before (whole) / after = "
                     f"{above(whole[rank], 'hwm_mib', base):.1f}x ({above(whole[rank], 'hwm_pinned_mib', pinned):.1f}x "
                     f"pinned), before (lazy) / after = {above(lazy[rank], 'hwm_mib', base):.1f}x "
                     f"({above(lazy[rank], 'hwm_pinned_mib', pinned):.1f}x pinned)")
    r0 = rows[0]
    lines.append(f"scene {r0['scene_bytes'] / 2**20:.0f} MiB normalised, budget {r0['cache_bytes'] / 2**20:.0f} MiB "
                 f"per process, tile {TILE}² × {r0['tile_bytes'] // (TILE * TILE * 4)} bands = "
                 f"{r0['tile_bytes'] / 2**10:.0f} KiB, {WORLD} ranks")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", nargs=4, metavar=("MODE", "RANK", "STORE", "TILES"), help=argparse.SUPPRESS)
    ap.add_argument("--work", default="/tmp/bdgf_bench/reads")
    ap.add_argument("--size", type=int, default=1024, help="grid side (px)")
    ap.add_argument("--bands", type=int, default=64, help="bands in all (HSI + 1 LiDAR)")
    ap.add_argument("--budget-mib", type=int, default=64)
    ap.add_argument("--tiles", type=int, default=1024, help="tiles drawn per rank")
    ap.add_argument("--lazy-tiles", type=int, default=256,
                    help="tiles per rank for 'before (lazy)' (slow: whole chunks per tile; the figures are per tile)")
    ap.add_argument("--quick", action="store_true", help="512² px, 128 tiles: a smoke check")
    args = ap.parse_args()
    if args.worker:
        mode, rank, store, tiles = args.worker
        print(json.dumps(worker(mode, int(rank), store, int(tiles))))
        return
    if args.quick:
        args.size, args.tiles, args.lazy_tiles, args.budget_mib = 512, 128, 64, 16
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store = work / f"scene_{args.size}_{args.bands}.zarr"
    if not store.exists():
        t0 = time.perf_counter()
        # in a subprocess, so the writer's memory is gone before anything is measured
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                        f"sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_reads as b; "
                        f"b.make_store(__import__('pathlib').Path({str(store)!r}), {args.size}, {args.bands})"],
                       check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        print(f"wrote {store} in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for mode in MODES:
        for rank in range(WORLD):
            tiles = args.lazy_tiles if mode == "before (lazy)" else args.tiles
            rows.append(run_worker(mode, rank, store, tiles, args.budget_mib * 2**20))
            r = rows[-1]
            print(f"  {mode} rank {rank}: {r['tiles']} tiles, {r['chunk_reads']} chunk reads, "
                  f"peak {r['hwm_mib']:.0f} MiB, {r['seconds']:.1f} s", flush=True)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
