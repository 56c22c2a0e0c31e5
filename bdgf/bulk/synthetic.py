"""A large unlabelled synthetic mosaic, written chunk by chunk as a scene store (never whole in memory).

    write_mosaic("mosaic.zarr", size=8192, seed=0)            # `bdgf synth OUT --preset mosaic --size 8192`
    write_mosaic("m.zarr", size=(150, 130), like="tiny", chunk=64)

The store has the modalities and band counts of the preset ``like`` (``demo``: HSI 32 + LiDAR 1,
so a model trained by ``bdgf demo`` classifies it), no labels, a CRS (UTM 33N) and a 1 m
transform. Every pixel is a function of its *global* (row, col) and the seed (layout, spectra,
heights), plus sensor noise drawn from a generator keyed by (seed, chunk row, chunk col): chunks
are made independently and vectorised, and the same (size, seed, like, chunk) gives the same
bytes. Layout: jittered-grid Voronoi cells of the preset's "cell" classes, a lattice of roads
(its "line" classes) and at most one building per 40 px block (its "rect" classes).

Glossary: H×W the mosaic's grid, C_m the bands of modality m, K classes, c the chunk side.
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np
import zarr

from bdgf.data.scene import FORMAT_VERSION, ModalityMeta, SceneMeta, _replace
from bdgf.data.synthetic import SAR_BANDS, band_response, get_config, material_spectra, sar_means
from bdgf.errors import InputError, StoreError
from bdgf.progress import Progress

CRS = "EPSG:32633"
ORIGIN = (500000.0, 5000000.0)  # x0, top y of the 1 m grid
BLOCK = 40  # building blocks (px)
ROAD_PERIOD = (173, 229)  # road lattice periods (px) of the first and further line classes


def _hash(*keys: np.ndarray | int) -> np.ndarray:
    """uint64 hash (splitmix64 steps) of integer arrays broadcast together."""
    h = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        for k in keys:
            h = (h ^ np.asarray(k).astype(np.uint64)) * np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(31)
            h *= np.uint64(0x94D049BB133111EB)
            h ^= h >> np.uint64(29)
    return h


def _unit(*keys) -> np.ndarray:
    """Uniform [0, 1) float64 from a hash of the keys."""
    return (_hash(*keys) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _waves(seed: int, stream: int, rows: np.ndarray, cols: np.ndarray, period: float) -> np.ndarray:
    """(h, w) smooth seamless field, std ~1: four plane waves of about ``period`` px in global coordinates."""
    out = 0.0
    for k in range(4):
        u = _unit(seed, stream, k, np.arange(3))
        angle, phase, scale = 2 * np.pi * u[0], 2 * np.pi * u[1], period * (0.7 + 0.6 * u[2])
        out = out + np.sin((rows * np.sin(angle) + cols * np.cos(angle)) * 2 * np.pi / scale + phase)
    return out / np.sqrt(2.0)


def class_block(cfg, seed: int, r0: int, r1: int, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
    """(class map (h, w) int64 1..K, building id (h, w) int64, -1 off buildings) of rows r0:r1, cols c0:c1."""
    layer = {name: [k for k, c in enumerate(cfg.classes, 1) if c.layer == name] for name in ("cell", "line", "rect")}
    if not layer["cell"]:
        raise InputError(f"preset {cfg.name!r}: a mosaic needs at least one 'cell' class")
    rows = np.arange(r0, r1)[:, None]
    cols = np.arange(c0, c1)[None, :]
    # jittered-grid Voronoi: each grid cell of side s holds one point; look at the 3x3 neighbours
    s = float(np.sqrt(cfg.cell_area))
    gi, gj = rows // s, cols // s
    best = np.full((r1 - r0, c1 - c0), np.inf)
    cmap = np.zeros((r1 - r0, c1 - c0), np.int64)
    cell_ids = np.asarray(layer["cell"])
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            i, j = (gi + di).astype(np.int64), (gj + dj).astype(np.int64)
            py = (i + _unit(seed, 1, i, j)) * s
            px = (j + _unit(seed, 2, i, j)) * s
            d = (rows - py) ** 2 + (cols - px) ** 2
            k = cell_ids[(_hash(seed, 3, i, j) % np.uint64(len(cell_ids))).astype(np.int64)]
            closer = d < best
            best = np.where(closer, d, best)
            cmap = np.where(closer, k, cmap)
    for n, k in enumerate(layer["line"]):  # a lattice of roads per line class
        period = ROAD_PERIOD[min(n, 1)] + 31 * n
        width = int(round(np.mean(cfg.line_width)))
        off = int(_hash(seed, 4, n) % np.uint64(period))
        road = ((rows + off) % period < width) | ((cols + off) % period < width)
        cmap = np.where(road, k, cmap)
    building = np.full(cmap.shape, -1, np.int64)
    if layer["rect"]:
        bi, bj = rows // BLOCK, cols // BLOCK
        bid = bi * 1_000_003 + bj
        lo, hi = cfg.rect_size
        rh = lo + (_hash(seed, 5, bid) % np.uint64(hi - lo + 1)).astype(np.int64)
        rw = lo + (_hash(seed, 6, bid) % np.uint64(hi - lo + 1)).astype(np.int64)
        top = bi * BLOCK + 2 + (_unit(seed, 7, bid) * (BLOCK - 4 - rh)).astype(np.int64)
        left = bj * BLOCK + 2 + (_unit(seed, 8, bid) * (BLOCK - 4 - rw)).astype(np.int64)
        present = _unit(seed, 9, bid) < 0.45
        inside = present & (rows >= top) & (rows < top + rh) & (cols >= left) & (cols < left + rw)
        rect_ids = np.asarray(layer["rect"])
        k = rect_ids[(_hash(seed, 10, bid) % np.uint64(len(rect_ids))).astype(np.int64)]
        cmap = np.where(inside, k, cmap)
        building = np.where(inside, bid, -1)
    return cmap, building


def mosaic_block(cfg, seed: int, r0: int, r1: int, c0: int, c1: int, noise_key: tuple[int, int]) -> dict[str, np.ndarray]:
    """{modality: (C_m, h, w) float32} of rows r0:r1, cols c0:c1 (see the module docstring)."""
    cmap, building = class_block(cfg, seed, r0, r1, c0, c1)
    rows = np.arange(r0, r1, dtype=np.float64)[:, None]
    cols = np.arange(c0, c1, dtype=np.float64)[None, :]
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 77, *noise_key]))
    centres, _, _ = band_response(cfg)
    spectra = material_spectra(cfg)
    table = np.stack([np.zeros(cfg.hsi_bands)] + [spectra[c.material] for c in cfg.classes])  # (K+1, C_m)
    bright = 1.0 + 0.06 * cfg.variability * _waves(seed, 20, rows, cols, 37.0)
    tilt = 0.03 * cfg.variability * _waves(seed, 21, rows, cols, 23.0)  # a smooth within-class mode
    slope = np.linspace(-1.0, 1.0, cfg.hsi_bands)[:, None, None]
    hsi = table[cmap].transpose(2, 0, 1) * (bright + tilt * slope)
    noise_std = cfg.hsi_noise * (1.0 + 1.5 * ((centres - 700.0) / 300.0) ** 2)
    hsi += noise_std[:, None, None] * rng.standard_normal(hsi.shape)
    terrain = 0.5 * _waves(seed, 30, rows, cols, 400.0) + cfg.terrain_relief * _waves(seed, 31, rows, cols, 60.0)
    height = np.zeros(cmap.shape)
    for k, spec in enumerate(cfg.classes, 1):
        sel = cmap == k
        lo, hi = spec.height_range
        if spec.height == "flat":
            height = np.where(sel, lo + (hi - lo) * _unit(seed, 40, building), height)
        elif spec.height == "canopy":
            canopy = lo + (hi - lo) * (0.5 + 0.25 * _waves(seed, 41, rows, cols, 9.0))
            height = np.where(sel, np.clip(canopy, lo, hi), height)
        elif spec.height == "water":
            height = np.where(sel, -0.5 - terrain + terrain.min(), height)
    dsm = terrain + height + cfg.ground_roughness * rng.standard_normal(cmap.shape)
    dsm += cfg.elevation_noise * rng.standard_normal(cmap.shape)
    elev = [dsm]
    if cfg.lidar_bands == 2:
        elev.append(100.0 + 2.0 * rng.standard_normal(cmap.shape))
    out = {"hsi": hsi.astype(np.float32), cfg.elevation_name: np.stack(elev).astype(np.float32)}
    if cfg.sar:
        mean = sar_means(cfg)[cmap].transpose(2, 0, 1)
        speckle = rng.gamma(cfg.sar_looks, 1.0 / cfg.sar_looks, size=mean.shape)
        out["sar"] = (10.0 * np.log10(np.maximum(mean * speckle, 1e-10))).astype(np.float32)
    return out


def write_mosaic(path: str | Path, size: int | tuple[int, int] = 8192, seed: int = 0, *, like: str = "demo",
                 chunk: int = 256, overwrite: bool = False, progress: bool = False) -> Path:
    """Write an H×W (``size``: side or (H, W)) unlabelled mosaic with the modalities of preset
    ``like`` to the scene store ``path``, chunk by chunk (memory: one c×c block of every band),
    under a temporary name, then renamed. Returns ``path``."""
    path = Path(path)
    H, W = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if H < 1 or W < 1 or chunk < 1:
        raise InputError(f"a mosaic needs a positive size and chunk, got {H}x{W}, chunk {chunk}")
    if path.exists() and not overwrite:
        raise StoreError(f"{path}: already exists (pass --overwrite to replace it)")
    cfg = get_config(like)
    from rasterio.crs import CRS as RioCRS

    x0, ytop = ORIGIN
    transform = (x0, 1.0, 0.0, ytop, 0.0, -1.0)
    centres, _, _ = band_response(cfg)
    bands = {"hsi": cfg.hsi_bands, cfg.elevation_name: cfg.lidar_bands, **({"sar": len(SAR_BANDS)} if cfg.sar else {})}
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        mods = root.create_group("modalities")
        for g in (root, mods, root.create_group("labels")):
            g.create_array("y", data=ytop - (np.arange(H) + 0.5), dimension_names=("y",))
            g.create_array("x", data=x0 + (np.arange(W) + 0.5), dimension_names=("x",))
        root.create_group("features")
        valid = root.create_array("valid", shape=(H, W), dtype="bool", chunks=(chunk, chunk),
                                  dimension_names=("y", "x"), fill_value=True)
        arrays = {m: mods.create_array(m, shape=(b, H, W), dtype="float32", chunks=(b, chunk, chunk),
                                       dimension_names=(f"band_{m}", "y", "x"), fill_value=0.0)
                  for m, b in bands.items()}
        for m, b in bands.items():
            coord = centres if m == "hsi" else np.arange(b)
            mods.create_array(f"band_{m}", data=np.asarray(coord, np.float64), dimension_names=(f"band_{m}",))
        sums = {m: np.zeros((2, b)) for m, b in bands.items()}
        blocks = [(i, j) for i in range(0, H, chunk) for j in range(0, W, chunk)]
        with Progress(len(blocks), f"writing mosaic {H}x{W}", "chunk", enabled=progress) as bar:
            for i, j in blocks:
                r1, c1 = min(i + chunk, H), min(j + chunk, W)
                block = mosaic_block(cfg, seed, i, r1, j, c1, (i // chunk, j // chunk))
                for m, x in block.items():
                    arrays[m][:, i:r1, j:c1] = x
                    x64 = x.reshape(x.shape[0], -1).astype(np.float64)
                    sums[m] += np.stack([x64.sum(1), (x64 * x64).sum(1)])
                bar.update(1)
        del valid  # all pixels valid (fill value True): nothing to write
        n = float(H * W)
        metas = []
        for m, b in bands.items():
            mean = sums[m][0] / n
            std = np.sqrt(np.maximum(sums[m][1] / n - mean * mean, 0.0))
            std[std < 1e-12] = 1.0
            kind = "hsi" if m == "hsi" else ("sar" if m == "sar" else cfg.elevation_kind)
            metas.append(ModalityMeta(m, kind, b, [f"{m}_{i}" for i in range(b)],
                                      [float(c) for c in centres] if m == "hsi" else None,
                                      "reflectance" if m == "hsi" else ("dB" if m == "sar" else "m"),
                                      mean.tolist(), std.tolist()))
        meta = SceneMeta(name=f"synthetic-mosaic-{cfg.name}-s{seed}", height=H, width=W, class_names=cfg.class_names,
                         modalities=metas, split_counts={}, invalid_pixels=0, invalid_by_modality={m: 0 for m in bands},
                         crs=RioCRS.from_user_input(CRS).to_wkt(), transform=list(transform),
                         source={"synthetic": "mosaic", "like": cfg.name, "seed": int(seed), "chunk": int(chunk)},
                         format_version=FORMAT_VERSION, val_split={"method": "none"})
        root.attrs["bdgf"] = json.loads(json.dumps(asdict(meta)))
        _replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
