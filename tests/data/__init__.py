"""Seeded fake dataset files for the reader tests (TorchGeo's habit): `tests/data/<dataset>/data.py`
writes small files in that dataset's native layout with `make(dir, seed=0, **shape) -> {role: path}`,
deterministic in the seed. Each also runs as a script: `python tests/data/trento/data.py OUTDIR [--seed N]`.
Real benchmark files are never copied here; the tests read those in place (the `real_data` fixture).

This module holds the native-format writers the generators and the tests share."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np


def write_tif(path: Path, data: np.ndarray, *, crs: str | None = None, transform: Any = None, nodata: float | None = None,
              tags: dict[int, dict[str, str]] | None = None) -> Path:
    """A GeoTIFF of a (bands, H, W) or (H, W) array; geo-referenced when `crs` is given; `tags` per band (1-based)."""
    import rasterio

    data = np.asarray(data)
    data = data[None] if data.ndim == 2 else data
    profile = dict(driver="GTiff", height=data.shape[1], width=data.shape[2], count=data.shape[0],
                   dtype=data.dtype.name, compress="deflate", nodata=nodata)
    if crs is not None:
        profile.update(crs=crs, transform=transform)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        for band, band_tags in (tags or {}).items():
            dst.update_tags(band, **band_tags)
    return path


def savemat73(path: Path, **arrays: np.ndarray) -> Path:
    """A MATLAB v7.3 file: HDF5 behind a 512-byte MATLAB header, arrays stored column-major."""
    import h5py

    with h5py.File(path, "w", userblock_size=512) as f:
        for key, value in arrays.items():
            value = np.asarray(value)
            ds = f.create_dataset(key, data=value.T)
            ds.attrs["MATLAB_class"] = np.bytes_({"float32": "single", "float64": "double"}.get(value.dtype.name,
                                                                                                value.dtype.name))
    with open(path, "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 .".ljust(116) + b"\0" * 8 + b"\x00\x02IM")
    return path


def main(make: Callable[..., dict[str, Path]], argv: list[str] | None = None) -> None:
    """The script entry of a generator: `data.py OUTDIR [--seed N]`; prints {role: path} as JSON."""
    parser = argparse.ArgumentParser(description=(make.__doc__ or "").strip().splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.outdir.mkdir(parents=True, exist_ok=True)
    paths = make(args.outdir, seed=args.seed)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=1))
