"""Augsburg stand-ins on the real label grid: seeded HS (180 bands, int16), SAR (4) and DSM (1) .mat files.

The real TrainImage.mat / TestImage.mat are read in place (tests: the `real_data` fixture).
Script: `python tests/data/augsburg/data.py OUTDIR [--seed N]`."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import scipy.io

if __package__ in (None, ""):  # run as a script: the shared writers are in tests/data/__init__.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data import main  # noqa: E402

H, W = 332, 485  # the grid of the real TrainImage.mat / TestImage.mat


def make(dir: Path, seed: int = 0, height: int = H, width: int = W, hs_bands: int = 180,
         sar_bands: int = 4) -> dict[str, Path]:
    """Write data_HS_LR.mat, data_SAR_HR.mat and data_DSM.mat (MATLAB v5, (H, W[, C]) arrays)."""
    dir = Path(dir)
    rng = np.random.default_rng(seed)
    hs = rng.integers(0, 50, size=(height, width, 1), dtype=np.int16) + np.arange(hs_bands, dtype=np.int16)
    arrays = {"hsi": ("data_HS_LR", hs.astype(np.int16)),
              "sar": ("data_SAR_HR", rng.normal(0, 1, (height, width, sar_bands)).astype(np.float32)),
              "dsm": ("data_DSM", rng.normal(500, 5, (height, width)).astype(np.float32))}
    for key, array in arrays.values():
        scipy.io.savemat(dir / f"{key}.mat", {key: array})
    return {role: dir / f"{key}.mat" for role, (key, _) in arrays.items()}


if __name__ == "__main__":
    main(make)
