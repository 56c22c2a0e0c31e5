"""Augsburg: HySpex HSI (180 bands) + Sentinel-1 SAR (4) + DSM (1), 332 x 485, 7 classes.

Files (MATLAB v5 or v7.3, one array each; the usual key names are used when present, else
the single array of each file): ``data_HS_LR.mat``, ``data_SAR_HR.mat``, ``data_DSM.mat``, ``TrainImage.mat`` (uint8,
761 px) and ``TestImage.mat`` (stored as float32, 77533 px; cast to integers after checking).
"""

from __future__ import annotations

from pathlib import Path

from bdgf.data.readers._common import as_labels, check_bands, check_grid, check_modality_grids, official_split_source, hwc_to_chw, with_val
from bdgf.data.readers.mat import check_file, load_mat_array
from bdgf.data.scene import ModalityData, SceneData

CLASS_NAMES = [
    "Forest", "Residential area", "Industrial area", "Low plants", "Allotment", "Commercial area", "Water",
]
BANDS = {"hsi": 180, "sar": 4, "dsm": 1}
# usual variable names; a file with another name but a single array is read too
KEYS = {"hsi": "data_HS_LR", "sar": "data_SAR_HR", "dsm": "data_DSM", "train": "TrainImage", "test": "TestImage"}


def read_augsburg(
    hsi: Path, sar: Path, dsm: Path, train: Path, test: Path, *, val_fraction: float = 0.2, seed: int = 0,
    val_split: str = "regions",
    expected_bands: dict[str, int] | None = None,
) -> SceneData:
    """Read Augsburg from its .mat files. ``expected_bands`` overrides the per-modality band counts."""
    for p in (hsi, sar, dsm, train, test):
        check_file(p, ".mat file")
    want = {**BANDS, **(expected_bands or {})}
    mods = {}
    for name, path, units in (("hsi", hsi, None), ("sar", sar, None), ("dsm", dsm, "m")):
        arr = load_mat_array(path, KEYS[name])
        m = ModalityData(hwc_to_chw(arr, path, name.upper()), kind=name, units=units, source=str(path))
        check_bands(m, want[name], f"Augsburg {name.upper()}")
        mods[name] = m
    mods["dsm"].band_names = ["dsm"] if mods["dsm"].bands == 1 else None
    grid = check_modality_grids(mods)
    labels = {}
    for split, path in (("train", train), ("test", test)):
        lab = as_labels(load_mat_array(path, KEYS[split]), path, len(CLASS_NAMES))
        check_grid(lab, grid, path, hsi)
        labels[split] = lab
    source = official_split_source("augsburg", labels, val_fraction, seed, val_split, hsi=hsi, sar=sar, dsm=dsm, train=train, test=test)
    labels, val_info = with_val(labels, val_fraction, seed, val_split)
    return SceneData(
        name="augsburg", modalities=mods, labels=labels, val_split=val_info,
        class_names=list(CLASS_NAMES), source=source,
    )
