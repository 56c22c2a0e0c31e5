"""Houston2013 stand-ins on the official grid: a seeded int16 HSI GeoTIFF (nodata -1 at 7 pixels) and a DSM.

The real 2013_IEEE_GRSS_DF_Contest_Samples_{TR,VA}.tif are read in place (tests: the `real_data` fixture).
Script: `python tests/data/houston2013/data.py OUTDIR [--seed N]`."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from affine import Affine

if __package__ in (None, ""):  # run as a script: the shared writers are in tests/data/__init__.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import data  # noqa: E402

H, W = 349, 1905  # the grid of the official label rasters
CRS = "EPSG:26915"
TRANSFORM = Affine(2.5, 0.0, 268000.0, 0.0, -2.5, 3290000.0)
NODATA_PIXELS = 7  # row 0, columns 0..6 of every HSI band are -1 (the declared nodata)


def write_tif(path: Path, array: np.ndarray, **kw) -> Path:
    """`data.write_tif`, geo-referenced on the Houston grid unless `crs`/`transform` say otherwise."""
    return data.write_tif(path, array, **{"crs": CRS, "transform": TRANSFORM, **kw})


def make(dir: Path, seed: int = 0, height: int = H, width: int = W, bands: int = 4) -> dict[str, Path]:
    """Write hsi.tif ((bands, H, W) int16, nodata -1) and dsm.tif ((H, W) float32)."""
    dir = Path(dir)
    rng = np.random.default_rng(seed)
    hsi = rng.integers(0, 4000, size=(bands, height, width), dtype=np.int16)
    hsi[:, 0, :NODATA_PIXELS] = -1
    dsm = rng.normal(10, 3, size=(height, width)).astype(np.float32)
    return {"hsi": write_tif(dir / "hsi.tif", hsi, nodata=-1), "lidar": write_tif(dir / "dsm.tif", dsm)}


if __name__ == "__main__":
    data.main(make)
