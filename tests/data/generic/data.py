"""Generic-reader inputs: a seeded (H, W, C) .npy HSI, a LiDAR GeoTIFF with one nodata pixel, and label
rasters as GeoTIFF and .npy. Script: `python tests/data/generic/data.py OUTDIR [--seed N]`."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from affine import Affine

if __package__ in (None, ""):  # run as a script: the shared writers are in tests/data/__init__.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import data  # noqa: E402

H, W = 24, 36
CRS = "EPSG:32632"
TRANSFORM = Affine(1.0, 0.0, 660000.0, 0.0, -1.0, 5100000.0)
NODATA = -9999.0  # the LiDAR's declared nodata, set at pixel (2, 3)


def write_tif(path: Path, array: np.ndarray, **kw) -> Path:
    """`data.write_tif`, geo-referenced on this grid unless `crs`/`transform` say otherwise."""
    return data.write_tif(path, array, **{"crs": CRS, "transform": TRANSFORM, **kw})


def labels(height: int = H, width: int = W) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) uint8: classes 1 and 2 in two 5x10 blocks (100 pixels); class 3 on rows 20 and below."""
    train = np.zeros((height, width), np.uint8)
    train[:5, :10] = 1
    train[10:15, :10] = 2
    test = np.zeros((height, width), np.uint8)
    test[20:, :] = 3
    return train, test


def make(dir: Path, seed: int = 0, height: int = H, width: int = W, bands: int = 5) -> dict[str, Path]:
    """Write hsi.npy ((H, W, bands) float32), lidar.tif, train.tif (geo-referenced) and test.npy."""
    dir = Path(dir)
    rng = np.random.default_rng(seed)
    np.save(dir / "hsi.npy", rng.random((height, width, bands), dtype=np.float32))
    lidar = rng.normal(5, 1, (1, height, width)).astype(np.float32)
    lidar[0, 2, 3] = NODATA
    train, test = labels(height, width)
    np.save(dir / "test.npy", test)
    return {"hsi": dir / "hsi.npy", "lidar": write_tif(dir / "lidar.tif", lidar, nodata=NODATA),
            "train": write_tif(dir / "train.tif", train), "test": dir / "test.npy"}


if __name__ == "__main__":
    data.main(make)
