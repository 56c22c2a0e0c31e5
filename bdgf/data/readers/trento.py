"""Trento: AISA Eagle HSI (63 bands) + LiDAR (2 rasters), 166 x 600, 6 classes.

Files (MATLAB v5 or v7.3): ``Italy_hsi.mat`` (key ``data``, (166, 600, 63)), ``Italy_lidar.mat``
(key ``data``, (166, 600, 2): DSM and a second LiDAR raster), and either the official split
``TRLabel.mat`` / ``TSLabel.mat`` (819 / 29395 pixels) or the full ground truth ``allgrd.mat``
(key ``mask_test``, 30214 labelled pixels).

Splits, by what is given:
- ``train`` and ``test``: the official split (``gt`` is not used).
- ``gt`` and ``train``: test = every labelled pixel of ``gt`` not in train.
- ``gt`` only: a seeded per-class sample (``sample_per_class``: ``per_class`` pixels of each
  class) is train, and test = all labelled pixels not in train.
In every case ``val`` is then carved from train unless ``val_fraction=0``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bdgf.data.readers._common import as_labels, check_bands, check_grid, check_modality_grids, count, files, hwc_to_chw, with_val
from bdgf.data.readers.mat import check_file, load_mat_array
from bdgf.data.scene import ModalityData, SceneData
from bdgf.data.splits import sample_per_class
from bdgf.errors import InputError

CLASS_NAMES = ["Apple trees", "Buildings", "Ground", "Woods", "Vineyard", "Roads"]
HSI_BANDS = 63


def read_trento(
    hsi: Path, lidar: Path, train: Path | None = None, test: Path | None = None, gt: Path | None = None, *,
    per_class: int = 20, val_fraction: float = 0.2, seed: int = 0, val_split: str = "regions",
    expected_bands: int | None = HSI_BANDS,
) -> SceneData:
    """Read Trento from its .mat files; see the module docstring for how the split is chosen."""
    if train is None and gt is None:
        raise InputError("trento: give train and test label files (TRLabel.mat, TSLabel.mat) or the ground truth (allgrd.mat)")
    if test is None and gt is None:
        raise InputError(f"{train}: trento needs a test label file (TSLabel.mat) or the ground truth (allgrd.mat) beside the train labels")
    for p in (hsi, lidar, train, test, gt):
        if p is not None:
            check_file(p, ".mat file")
    h = ModalityData(hwc_to_chw(load_mat_array(hsi, "data"), hsi, "HSI"), kind="hsi", source=str(hsi))
    check_bands(h, expected_bands, "Trento HSI")
    lid = hwc_to_chw(load_mat_array(lidar, "data"), lidar, "LiDAR")
    if not 1 <= lid.shape[0] <= 2:
        raise InputError(f"{lidar}: Trento LiDAR must have 1 or 2 bands, found {lid.shape[0]}")
    names = ["dsm", "lidar_2"][: lid.shape[0]]
    mods = {"hsi": h, "lidar": ModalityData(lid, kind="lidar", band_names=names, source=str(lidar))}
    grid = check_modality_grids(mods)
    k = len(CLASS_NAMES)

    def load(path, key):
        lab = as_labels(load_mat_array(path, key), path, k)
        check_grid(lab, grid, path, hsi)
        return lab

    labels = {}
    if train is not None and test is not None:
        labels["train"], labels["test"] = load(train, "TRLabel"), load(test, "TSLabel")
        split = "official"
    else:
        full = load(gt, "mask_test")
        if train is not None:
            labels["train"] = load(train, "TRLabel")
            split = "train given, test = ground truth minus train"
        else:
            labels["train"], _ = sample_per_class(full, per_class=per_class, seed=seed)
            split = f"sampled {per_class} per class from the ground truth (seed {seed})"
        labels["test"] = np.where(labels["train"] > 0, 0, full).astype(np.uint16)
    source = {
        "dataset": "trento",
        "split": split,
        "official_train": count(labels["train"]) if split == "official" else None,
        "official_test": count(labels["test"]) if split == "official" else None,
        "train_pixels": count(labels["train"]),
        "test_pixels": count(labels["test"]),
        "labelled_in_ground_truth": count(full) if gt is not None and split != "official" else None,
        "per_class": per_class if train is None else None,
        "val_fraction": val_fraction,
        "val_split": val_split,
        "seed": seed,
        "files": files(hsi=hsi, lidar=lidar, train=train, test=test, gt=gt),
    }
    labels, val_info = with_val(labels, val_fraction, seed, val_split)
    return SceneData(
        name="trento", modalities=mods, labels=labels, val_split=val_info,
        class_names=list(CLASS_NAMES), source={k_: v for k_, v in source.items() if v is not None},
    )
