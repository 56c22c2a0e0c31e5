"""Any co-registered scene from GeoTIFF, .npy and .mat files.

Modalities: ``{name: path}``; a .mat path may name its variable as ``file.mat:key`` (else the
file's single numeric array is used). Label rasters: ``{split: path}`` in the same formats.

Axis order of 3-D .npy / .mat arrays is decided by comparing with the grid (H, W): the label
rasters' shape, else the first GeoTIFF modality's grid. An array whose last two axes are the grid
is (C, H, W); else one whose first two axes are is (H, W, C); (C, H, W) wins when both fit. With
neither labels nor a GeoTIFF to fix the grid, .npy arrays are taken as (C, H, W) and .mat arrays
as (H, W, C) (MATLAB's usual order). 2-D arrays are one band. GeoTIFFs are always (C, H, W),
with nodata -> NaN; the CRS and transform come from the first GeoTIFF modality that has them.
Modality kinds follow the name (hsi, lidar, sar, dsm; else "other").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bdgf.data.readers._common import as_labels, check_grid, check_modality_grids, count, files, with_val
from bdgf.data.readers.mat import check_file, load_mat_array, split_key
from bdgf.data.readers.raster import GEOTIFF_SUFFIXES, read_label_raster, read_raster
from bdgf.data.scene import ModalityData, SceneData
from bdgf.errors import InputError

KINDS = ("hsi", "lidar", "sar", "dsm")


def _load(spec, label: bool = False) -> tuple[np.ndarray, str, Path, str | None, tuple | None]:
    """(array, format, path, crs, transform) of a GeoTIFF / .npy / .mat[:key].

    Label GeoTIFFs keep their integer values (single band); modality GeoTIFFs get nodata -> NaN."""
    path, key = split_key(spec)
    check_file(path)
    suffix = path.suffix.lower()
    if suffix in GEOTIFF_SUFFIXES:
        if key is not None:
            raise InputError(f"{spec}: a ':key' suffix is only for .mat files")
        arr, crs, transform = read_label_raster(path) if label else read_raster(path)
        return arr, "tif", path, crs, transform
    if suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise InputError(f"{path}: not a readable .npy file ({type(exc).__name__}: {exc})") from exc
        return arr, "npy", path, None, None
    if suffix == ".mat":
        return load_mat_array(path, key), "mat", path, None, None
    raise InputError(f"{path}: unsupported file type {suffix!r} (use .tif/.tiff, .npy or .mat)")


def _to_chw(arr: np.ndarray, fmt: str, path: Path, grid: tuple[int, int] | None) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim != 3:
        raise InputError(f"{path}: a modality must be 2-D or 3-D, got shape {arr.shape}")
    elif fmt != "tif":
        chw = grid is not None and arr.shape[1:] == tuple(grid)
        hwc = grid is not None and arr.shape[:2] == tuple(grid)
        if grid is not None and not (chw or hwc):
            raise InputError(f"{path}: shape {arr.shape} fits neither (C, H, W) nor (H, W, C) for the grid {tuple(grid)}")
        if hwc and not chw or (grid is None and fmt == "mat"):
            arr = np.moveaxis(arr, 2, 0)
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise InputError(f"{path}: modality has non-real dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def read_generic(
    modalities: dict[str, str | Path], labels: dict[str, str | Path] | None = None,
    class_names: list[str] | None = None, *, name: str = "scene", val_fraction: float = 0.2, seed: int = 0,
    val_split: str = "regions",
) -> SceneData:
    """A scene from per-modality files and label rasters (see the module docstring).

    Without ``class_names`` the classes are 1..max label, named ``class_1``...
    """
    if not modalities:
        raise InputError("generic reader: no modality files given")
    labels = labels or {}
    raw_labels = {}
    for split, spec in labels.items():
        arr, fmt, path, _, _ = _load(spec, label=True)
        raw_labels[split] = (arr, path)
    loaded = {m: _load(spec) for m, spec in modalities.items()}
    grid = None
    if raw_labels:
        grid = np.squeeze(next(iter(raw_labels.values()))[0]).shape
    else:
        grid = next((a.shape[1:] for a, fmt, *_ in loaded.values() if fmt == "tif"), None)
    crs = transform = None
    mods = {}
    for m, (arr, fmt, path, c, t) in loaded.items():
        mods[m] = ModalityData(_to_chw(arr, fmt, path, grid), kind=m if m in KINDS else "other", source=str(path))
        if crs is None and transform is None and (c or t):
            crs, transform = c, t
    grid = check_modality_grids(mods)
    k = len(class_names) if class_names is not None else None
    labs = {}
    for split, (arr, path) in raw_labels.items():
        lab = as_labels(arr, path, k)
        check_grid(lab, grid, path, next(iter(mods.values())).source)
        labs[split] = lab
    if class_names is None:
        top = max((int(v.max()) for v in labs.values()), default=0)
        class_names = [f"class_{i}" for i in range(1, max(top, 1) + 1)]
    source = {
        "dataset": "generic",
        **{f"given_{s}": count(v) for s, v in labs.items()},
        "val_fraction": val_fraction,
        "val_split": val_split,
        "seed": seed,
        "files": {**files(**{f"modality_{m}": split_key(p)[0] for m, p in modalities.items()}),
                  **files(**{f"labels_{s}": split_key(p)[0] for s, p in labels.items()})},
    }
    labs, val_info = with_val(labs, val_fraction, seed, val_split)
    return SceneData(
        name=name, modalities=mods, labels=labs, val_split=val_info,
        class_names=list(class_names), crs=crs, transform=transform, source=source,
    )
