"""Trento stand-in: a seeded (H, W, 63) float32 HSI on the real grid, as MATLAB v5 and v7.3 files.

The real Italy_lidar.mat and allgrd.mat are read in place (tests: the `real_data` fixture).
Script: `python tests/data/trento/data.py OUTDIR [--seed N]`."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import scipy.io

if __package__ in (None, ""):  # run as a script: the shared writers are in tests/data/__init__.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data import main, savemat73  # noqa: E402

H, W, BANDS = 166, 600, 63  # the grid of the real Italy_lidar.mat / allgrd.mat
MARKER = (3, 4, 10)  # (row, col, band) set to 0.5: shows the axis order survives the v7.3 transpose


def make(dir: Path, seed: int = 0, height: int = H, width: int = W, bands: int = BANDS) -> dict[str, Path]:
    """Write Italy_hsi.mat (v5, key 'data') and Italy_hsi_v73.mat (v7.3): the same (H, W, bands) cube."""
    dir = Path(dir)
    hsi = np.random.default_rng(seed).normal(1000, 50, size=(height, width, bands)).astype(np.float32)
    hsi[MARKER] = 0.5
    scipy.io.savemat(dir / "Italy_hsi.mat", {"data": hsi})
    return {"hsi": dir / "Italy_hsi.mat", "hsi73": savemat73(dir / "Italy_hsi_v73.mat", data=hsi)}


if __name__ == "__main__":
    main(make)
