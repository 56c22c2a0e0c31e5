"""MUUFL Gulfport: CASI HSI (64 bands) + LiDAR (2 rasters), 325 x 220, 11 classes.

File ``muufl_gulfport_campus_1_hsi_220_label.mat``: a MATLAB struct ``hsi`` with fields ``Data``
(325, 220, 64), ``Lidar`` (a cell or struct whose first element has ``z``, (325, 220, 2)),
``sceneLabels.labels`` (325, 220; -1 = unlabelled, classes 1-11) and ``info.wavelength``.
Struct access works for scipy's layouts (``mat_struct`` or record arrays) and for v7.3 files.

MUUFL has no official split: ``per_class`` pixels of each class are sampled (seeded) for train,
the rest of the labelled pixels are test, and the split is saved with the labels of the scene.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bdgf.data.readers._common import as_labels, check_bands, check_grid, check_modality_grids, count, files, hwc_to_chw, with_val
from bdgf.data.readers.mat import field, load_mat, unwrap
from bdgf.data.scene import ModalityData, SceneData
from bdgf.data.splits import sample_per_class
from bdgf.errors import InputError

CLASS_NAMES = [
    "Trees", "Mostly grass", "Mixed ground surface", "Dirt and sand", "Road", "Water", "Buildings shadow",
    "Buildings", "Sidewalk", "Yellow curb", "Cloth panels",
]
HSI_BANDS = 64


def _first(obj):
    """First element of a MATLAB cell array (object ndarray), else the object itself."""
    obj = unwrap(obj)
    if isinstance(obj, np.ndarray) and obj.dtype == object:
        if obj.size == 0:
            raise InputError("empty cell array")
        return unwrap(obj.reshape(-1, order="F")[0])
    return obj


def read_muufl(
    path: Path, per_class: int = 20, seed: int = 0, *, val_fraction: float = 0.2, val_split: str = "regions",
    expected_bands: int | None = HSI_BANDS,
) -> SceneData:
    """Read MUUFL Gulfport and draw a seeded per-class split (``per_class`` train pixels per class)."""
    path = Path(path)
    data = load_mat(path)
    if "hsi" not in data:
        raise InputError(f"{path}: no variable 'hsi' (the MUUFL struct); keys found: {sorted(data)}")
    s = data["hsi"]
    where = f"{path}: hsi"
    hsi = ModalityData(hwc_to_chw(field(s, "Data", where), path, "hsi.Data"), kind="hsi", source=str(path))
    check_bands(hsi, expected_bands, "MUUFL hsi.Data")
    try:
        wl = np.asarray(field(field(s, "info", where), "wavelength", f"{where}.info"), np.float64).ravel()
        hsi.wavelengths_nm = wl.tolist() if wl.size == hsi.bands else None
    except InputError:
        pass  # wavelengths are optional
    lidar_struct = _first(field(s, "Lidar", where))
    z = hwc_to_chw(field(lidar_struct, "z", f"{where}.Lidar"), path, "hsi.Lidar.z")
    lidar = ModalityData(z, kind="lidar", source=f"{path} (hsi.Lidar.z)")
    mods = {"hsi": hsi, "lidar": lidar}
    grid = check_modality_grids(mods)
    raw = field(field(s, "sceneLabels", where), "labels", f"{where}.sceneLabels")
    full = as_labels(raw, path, len(CLASS_NAMES), unlabelled=(-1,))
    check_grid(full, grid, path, "hsi.Data")
    if count(full) == 0:
        raise InputError(f"{path}: hsi.sceneLabels.labels has no labelled pixel")
    train, test = sample_per_class(full, per_class=per_class, seed=seed)
    labels = {"train": train, "test": test}
    source = {
        "dataset": "muufl",
        "split": f"sampled {per_class} per class (seed {seed})",
        "per_class": per_class,
        "labelled": count(full),
        "train_pixels": count(train),
        "test_pixels": count(test),
        "val_fraction": val_fraction,
        "val_split": val_split,
        "seed": seed,
        "files": files(data=path),
    }
    labels, val_info = with_val(labels, val_fraction, seed, val_split)
    return SceneData(
        name="muufl", modalities=mods, labels=labels, val_split=val_info,
        class_names=list(CLASS_NAMES), source=source,
    )


def read_muufl_demo_subimage(path: Path) -> tuple[ModalityData, np.ndarray]:
    """The MUUFL demo sub-image (``hsi_img_sub`` (H, W, C), ``mask_sub``, ``wavelengths``):
    (HSI ModalityData with wavelengths, valid mask (H, W) bool; all True if the file has none)."""
    path = Path(path)
    data = load_mat(path)
    if "hsi_img_sub" not in data:
        raise InputError(f"{path}: no variable 'hsi_img_sub'; keys found: {sorted(data)}")
    cube = hwc_to_chw(data["hsi_img_sub"], path, "hsi_img_sub")
    wl = None
    if "wavelengths" in data:
        wl = np.asarray(data["wavelengths"], np.float64).ravel().tolist()
        if len(wl) != cube.shape[0]:
            raise InputError(f"{path}: {len(wl)} wavelengths for {cube.shape[0]} bands")
    mask = np.ones(cube.shape[1:], bool)
    if "mask_sub" in data:
        mask = np.asarray(data["mask_sub"]).astype(bool)
        if mask.shape != cube.shape[1:]:
            raise InputError(f"{path}: mask_sub shape {mask.shape} does not match the image grid {cube.shape[1:]}")
    return ModalityData(cube, kind="hsi", wavelengths_nm=wl, units="reflectance", source=str(path)), mask
