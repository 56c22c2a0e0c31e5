"""`make demo` / `bdgf demo`: every stage of the product on the embedded default, nothing to download.

    1 synthetic scene -> scene store + PNG preview
    2 pretraining on 2 local Ray Train workers (DeepSpeed inside each)
    3 dense diffusion features (Ray tasks)
    4 classifier training on 2 Ray Train workers (three branches, mutual learning)
    5 evaluation: OA / AA / kappa, per branch, with each modality absent, the test map PNG
    6 export: ONNX + AOTInductor package; the whole scene classified from it, PNG beside the labels
    7 the Ray Serve endpoint on 127.0.0.1, queried over HTTP with a GeoTIFF tile
    8 Dask bulk classification of a mosaic larger than one chunk -> Zarr, COG and PNG of the map
    9 summary: every artefact and where it is

Everything lands in ``--out``; each stage prints what it did and where it wrote. The demo config
(``DEMO_OVERRIDES``) is sized to finish in a few minutes on 2 CPU cores; the library defaults are
what a real scene should use. ``workers=0`` runs stages 2–4 in this process, without Ray.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import numpy as np

DEMO_OVERRIDES = {
    "pretrain.steps": 300,
    "pretrain.batch_size": 8,
    "pretrain.tile_size": 32,
    "pretrain.log_every": 10,
    "pretrain.checkpoint_every": 100,
    "pretrain.unet": {"base_channels": 16, "channel_mults": [1, 2, 2]},
    "pretrain.masking": {"mode": "adaptive", "warmup_steps": 30},
    # 32-px feature tiles: the exported graph token-mixes a tile's windows in chunks of 256, and each
    # chunk is one copy of the Mamba and Transformer branches in the graph (torch.export unrolls the
    # loop): 4 chunks export in ~2.5 min on 2 cores, a 64-px tile's 16 took ~12 min. Larger chunks
    # export faster but ONNX Runtime then held 3.3x the memory per tile (6.2 vs 1.9 GB at batch 4).
    "features.tile_size": 32,
    "features.timesteps": [5, 50, 150],
    "train.epochs": 25,
    "train.batch_size": 32,
    "train.patience": 8,
}
#: The Serve settings of the demo: one model replica of one CPU, a small ingress (2 cores in all).
DEMO_SERVE = {"num_cpus": 1.0, "ingress_num_cpus": 0.25}
TILE_SIDE = 64  # the GeoTIFF tile sent to the endpoint: at most 64×64 px from the middle of the scene


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shutdown_ray() -> None:
    """Stop the local Ray session the training stages started (if any)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _tile_box(shape: tuple[int, int], multiple: int) -> tuple[int, int, int, int]:
    """(row, col, height, width) of the demo's tile: at most TILE_SIDE px a side, near the middle
    of a ``shape`` scene, its corner on the model's stride phase (multiples of ``multiple``)."""
    H, W = shape
    h, w = min(TILE_SIDE, H), min(TILE_SIDE, W)
    return (H - h) // 2 // multiple * multiple, (W - w) // 2 // multiple * multiple, h, w


def _write_tile(scene, path: Path, box: tuple[int, int, int, int]) -> np.ndarray:
    """The scene's raw bands over ``box`` as a georeferenced float32 GeoTIFF (every modality's
    bands stacked in the store's order); returns the (C, h, w) array written."""
    import rasterio
    from rasterio.transform import Affine

    r0, c0, h, w = box
    if r0 < 0 or c0 < 0 or r0 + h > scene.shape[0] or c0 + w > scene.shape[1]:
        raise ValueError(f"tile {box} is not inside the {scene.shape[0]}x{scene.shape[1]} scene")
    raw = np.concatenate([np.asarray(scene.modality(m)[:, r0 : r0 + h, c0 : c0 + w], np.float32)
                          for m in scene.modality_names])
    geo = scene.meta.transform  # GDAL order, or None: pixel units, north up
    transform = (Affine.from_gdal(*geo) if geo else Affine(1.0, 0.0, 0.0, 0.0, -1.0, 0.0)) * Affine.translation(c0, r0)
    crs = scene.meta.crs or "EPSG:32632"  # a synthetic scene has none: any projected CRS shows the round trip
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=raw.shape[0], dtype="float32",
                       crs=crs, transform=transform) as dst:
        dst.write(raw)
    return raw


def run_demo(out: str | Path = "demo", *, seed: int = 0, preset: str = "demo", workers: int = 2,
             mosaic_size: int = 768, chunk: int = 256, train_only: bool = False) -> dict:
    """Run every stage into ``out``; returns the summary also written to ``out/summary.json``.
    ``train_only``: stop after the evaluation (stages 1–5: a trained run, e.g. for benchmarks)."""
    from bdgf.backends import ModelPackage, open_backend
    from bdgf.bulk.driver import classify_mosaic
    from bdgf.bulk.synthetic import write_mosaic
    from bdgf.config import RunConfig
    from bdgf.data.scene import Scene, write_scene
    from bdgf.data.synthetic import make_scene
    from bdgf.engine.classify import evaluate, train
    from bdgf.engine.features import compute_features
    from bdgf.engine.pretrain import pretrain
    from bdgf.export import export_run
    from bdgf.preview import save_class_map, save_preview
    from bdgf.regions import classify_region
    from bdgf.run import Run

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    store, run, pkg = out / f"{preset}.zarr", Run(out / "run"), out / "model"
    t_all = time.perf_counter()
    times: dict[str, float] = {}
    stages = 5 if train_only else 9

    def stage(i: int, name: str) -> float:
        print(f"\n== {i}/{stages} {name}", flush=True)
        return time.perf_counter()

    def done(key: str, t: float) -> None:
        times[key] = time.perf_counter() - t
        print(f"   ({times[key]:.1f} s)", flush=True)

    t = stage(1, f"synthetic scene '{preset}' (seed {seed}) -> {store}")
    scene = write_scene(make_scene(preset, seed), store, overwrite=True, progress=True)
    print(scene.summary())
    print(f"preview: {save_preview(scene, out / 'preview.png')}")
    done("scene", t)

    cfg = RunConfig().with_overrides(DEMO_OVERRIDES)
    where = f"{workers} Ray Train workers" if workers else "this process"
    t = stage(2, f"pretrain the balanced multimodal denoiser on {where} -> {run.path}")
    print(pretrain(store, run.path, cfg, overwrite=True, workers=workers).line(), flush=True)
    done("pretrain", t)

    t = stage(3, f"dense diffusion features ({'Ray tasks' if workers else 'this process'}), cached in {store}")
    print(compute_features(store, run.path, workers=workers).line(), flush=True)
    done("features", t)

    t = stage(4, f"train the diffusion-guided classifier (cnn + mamba + transformer, mutual learning) on {where}")
    print(train(store, run.path, seed=seed, workers=workers).line(), flush=True)
    done("train", t)

    t = stage(5, "evaluate on the test split (and with each modality absent)")
    m = evaluate(store, run.path, split="test")
    print(m.text())
    without = {}
    for modality in scene.modality_names:
        mm = evaluate(store, run.path, split="test", absent=modality, write_map=False)
        without[modality] = mm.oa["mean"]
        print(f"  without {modality}: OA {100 * mm.oa['mean']:.2f}%  AA {100 * mm.aa['mean']:.2f}%  "
              f"kappa {mm.kappa['mean']:.4f}")
    print(f"metrics: {run.eval_dir / 'metrics.json'}; test map: {run.eval_dir / 'map_test.png'}")
    done("evaluate", t)
    if train_only:
        _shutdown_ray()
        summary = {"oa": m.oa["mean"], "aa": m.aa["mean"], "kappa": m.kappa["mean"], "oa_without": without,
                   "stage_s": times, "wall_s": time.perf_counter() - t_all}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    t = stage(6, f"export the model package (ONNX, AOTInductor) -> {pkg}")
    manifest = export_run(run.path, pkg, ["onnx", "aoti"], seed=seed, overwrite=True)
    for name, entry in manifest["files"].items():
        print(f"  {pkg / name}  {entry['format']}  {entry['bytes']:,} bytes")
    for fmt, check in manifest["checks"].items():
        print(f"  {fmt}: max abs difference vs PyTorch {check['max_abs_diff']:.1e}")
    backend = open_backend(pkg)
    scene = Scene.open(store)
    raw = {m: np.asarray(scene.modality(m), np.float32) for m in scene.modality_names}
    whole = classify_region(backend, raw, batch=4)  # 4 tiles per call: ONNX Runtime keeps its peak
    scene_map = save_preview(scene, out / "scene_map.png", prediction=whole.classes)
    print(f"  the whole {scene.shape[0]}x{scene.shape[1]} scene classified by the {backend.name} back end: "
          f"{scene_map} (beside the labels)")
    done("export", t)

    t = stage(7, "the Ray Serve endpoint on 127.0.0.1, queried over HTTP with a GeoTIFF tile")
    from bdgf import client, serve_app

    tile, tile_map = out / "tile.tif", out / "tile_map.tif"
    box = _tile_box(scene.shape, int(ModelPackage.open(pkg).manifest["geometry"].get("tile_multiple", 1)))
    sent = _write_tile(scene, tile, box)
    from bdgf.serve_config import load_config

    url = serve_app.start(pkg, {**load_config(None), **DEMO_SERVE}, host="127.0.0.1", port=_free_port())
    try:
        print(f"  serving {pkg} at {url} (GET {url}/healthz, {url}/v1/model; POST {url}/v1/classify)")
        got = client.classify_file(url, tile, tile_map, row=box[0], col=box[1])
    finally:
        serve_app.stop(shutdown_ray=True)
    want = classify_region(backend, sent, origin=box[:2], batch=4).classes
    del backend  # its memory (the bulk workers load their own)
    same = float((got.classes == want).mean())
    print(f"  POST {tile} ({sent.shape[0]} bands, {box[2]}x{box[3]} px at row {box[0]}, col {box[1]}) -> {tile_map} in {got.seconds:.2f} s; "
          f"classes {got.found()}; {100 * same:.2f}% of pixels equal to the in-process result")
    done("serve", t)

    mosaic, map_zarr, map_tif = out / "mosaic.zarr", out / "map.zarr", out / "map.tif"
    t = stage(8, f"Dask bulk classification of a {mosaic_size}x{mosaic_size} px mosaic in {chunk} px chunks "
                 f"-> {map_zarr}, {map_tif}")
    write_mosaic(mosaic, mosaic_size, seed, like=preset, overwrite=True)
    bulk = classify_mosaic(map_zarr, package=pkg, scene=mosaic, chunk=chunk, workers=2, cog=map_tif,
                           batch=4, overwrite=True)  # 4 tiles per back-end call: ~2 GB per worker here
    print(bulk.line())
    map_png = save_class_map(map_zarr, out / "map.png", ModelPackage.open(pkg).manifest["classes"])
    print(f"  map PNG: {map_png}")
    done("bulk", t)

    stage(9, "summary")
    artefacts = {
        "scene store": store, "preview": out / "preview.png", "pretraining curves": run.pretrain_dir / "curves.png",
        "training curves": run.seed_dir(seed) / "curves.png", "metrics": run.eval_dir / "metrics.json",
        "test map": run.eval_dir / "map_test.png", "model package": pkg / "model.json",
        "whole-scene map": scene_map, "GeoTIFF tile": tile, "served tile map": tile_map, "mosaic": mosaic,
        "bulk map (Zarr)": map_zarr, "bulk map (COG)": map_tif, "bulk map (PNG)": map_png,
    }
    missing = [k for k, p in artefacts.items() if not Path(p).exists()]
    for k, p in artefacts.items():
        print(f"  {k:<20} {p}")
    summary = {"oa": m.oa["mean"], "aa": m.aa["mean"], "kappa": m.kappa["mean"], "oa_without": without,
               "serve_equal_fraction": same, "bulk_pixels_per_s": bulk.pixels / max(bulk.seconds, 1e-9),
               "stage_s": times, "wall_s": time.perf_counter() - t_all,
               "artefacts": {k: str(p) for k, p in artefacts.items()}, "missing": missing}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nOA {100 * summary['oa']:.2f}%  AA {100 * summary['aa']:.2f}%  kappa {summary['kappa']:.4f}"
          f"  in {summary['wall_s']:.0f} s; summary {out / 'summary.json'}")
    if missing:
        print(f"missing artefacts: {missing}")
    return summary


if __name__ == "__main__":  # `python -m bdgf.demo --out demo` is `bdgf demo --out demo`
    import sys

    from bdgf.cli import main

    main(["demo", *sys.argv[1:]])
