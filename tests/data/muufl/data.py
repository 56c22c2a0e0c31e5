"""MUUFL Gulfport stand-in: a seeded file in the real struct layout (hsi.Data, hsi.Lidar{1}.z,
hsi.sceneLabels.labels with -1 unlabelled, hsi.info.wavelength), as MATLAB v5 and as v7.3 (HDF5 groups,
Lidar a cell of object references). Script: `python tests/data/muufl/data.py OUTDIR [--seed N]`."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import scipy.io

if __package__ in (None, ""):  # run as a script: the shared writers are in tests/data/__init__.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data import main  # noqa: E402

H, W, BANDS = 40, 30, 64
CLASSES = 11
LABELLED_COLUMNS = 22  # columns 0..21 cycle through the classes: 80 pixels per class at H = 40


def struct(seed: int = 0, height: int = H, width: int = W, bands: int = BANDS,
           labels: np.ndarray | None = None) -> dict:
    """The {'hsi': ...} dict scipy.io.savemat writes as the MUUFL struct (tests may edit it first)."""
    from bdgf.data.readers.muufl import CLASS_NAMES

    rng = np.random.default_rng(seed)
    if labels is None:
        labels = np.full((height, width), -1, np.int16)
        cols = LABELLED_COLUMNS
        labels[:, :cols] = (np.arange(height * cols).reshape(height, cols) % CLASSES) + 1
    lidar = np.empty((1, 2), object)
    lidar[0, 0] = {"x": np.zeros((height, width)), "y": np.zeros((height, width)),
                   "z": rng.normal(20, 5, (height, width, 2)).astype(np.float32)}
    lidar[0, 1] = {"z": np.zeros((height, width, 2), np.float32)}
    return {"hsi": {
        "Data": rng.random((height, width, bands), dtype=np.float32),
        "Lidar": lidar,
        "sceneLabels": {"labels": labels, "Materials_Type": np.array(CLASS_NAMES, dtype=object)},
        "info": {"wavelength": np.linspace(375, 1050, bands)[:, None]},
    }}


def write_v73(path: Path, struct: dict) -> Path:
    """The struct as MATLAB v7.3 (the fields the reader uses; labels stored as double, as MATLAB does)."""
    import h5py

    s = struct["hsi"]
    with h5py.File(path, "w", userblock_size=512) as f:
        g = f.create_group("hsi")
        g.create_dataset("Data", data=s["Data"].T)
        cell = f.create_group("#refs#").create_group("a")
        cell.create_dataset("z", data=s["Lidar"][0, 0]["z"].T)
        g.create_dataset("Lidar", data=np.array([[cell.ref]], dtype=h5py.ref_dtype))
        g.create_group("sceneLabels").create_dataset("labels", data=s["sceneLabels"]["labels"].astype(np.float64).T)
        g.create_group("info").create_dataset("wavelength", data=s["info"]["wavelength"].T)
    return path


def make(dir: Path, seed: int = 0, height: int = H, width: int = W, bands: int = BANDS) -> dict[str, Path]:
    """Write the same struct as muufl_gulfport_campus_1_hsi_220_label.mat (v5) and muufl_v73.mat (v7.3)."""
    dir = Path(dir)
    s = struct(seed, height, width, bands)
    v5 = dir / "muufl_gulfport_campus_1_hsi_220_label.mat"
    scipy.io.savemat(v5, s)
    return {"v5": v5, "v73": write_v73(dir / "muufl_v73.mat", s)}


if __name__ == "__main__":
    main(make)
