"""Houston2013 (IEEE GRSS Data Fusion Contest 2013): CASI HSI + LiDAR DSM GeoTIFFs, 349 x 1905.

Files: the CASI hyperspectral GeoTIFF (144 bands, 380-1050 nm), the LiDAR DSM GeoTIFF (1 band),
and the official ``2013_IEEE_GRSS_DF_Contest_Samples_TR.tif`` / ``..._VA.tif`` label rasters
(uint8, classes 1-15; 2832 train / 12197 test pixels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bdgf.data.readers._common import as_labels, check_bands, check_grid, check_modality_grids, official_split_source, with_val
from bdgf.data.readers.mat import check_file
from bdgf.data.readers.raster import raster_wavelengths, read_label_raster, read_raster
from bdgf.data.scene import ModalityData, SceneData

CLASS_NAMES = [
    "Healthy grass", "Stressed grass", "Synthetic grass", "Trees", "Soil", "Water", "Residential",
    "Commercial", "Road", "Highway", "Railway", "Parking Lot 1", "Parking Lot 2", "Tennis Court",
    "Running Track",
]
HSI_BANDS = 144
WAVELENGTH_RANGE_NM = (380.0, 1050.0)


def read_houston2013(
    hsi: Path, lidar: Path, train: Path, test: Path, *, val_fraction: float = 0.2, seed: int = 0,
    val_split: str = "regions",
    expected_bands: int | None = HSI_BANDS,
) -> SceneData:
    """Read Houston2013 from its native GeoTIFFs. CRS and geotransform come from the HSI file.

    ``expected_bands`` (default 144) is checked against the HSI; ``None`` skips the check (for
    band subsets). Wavelengths come from the file's metadata, else 380-1050 nm evenly spaced.
    """
    for p in (hsi, lidar, train, test):
        check_file(p, "GeoTIFF")
    cube, crs, transform = read_raster(hsi)
    wl = raster_wavelengths(hsi)
    if wl is None:
        wl = np.linspace(*WAVELENGTH_RANGE_NM, cube.shape[0]).tolist()
    h = ModalityData(cube, kind="hsi", wavelengths_nm=wl, source=str(hsi))
    check_bands(h, expected_bands, "Houston2013 HSI")
    dsm, _, _ = read_raster(lidar)
    d = ModalityData(dsm, kind="lidar", band_names=["dsm"], units="m", source=str(lidar))
    check_bands(d, 1, "Houston2013 LiDAR DSM")
    mods = {"hsi": h, "lidar": d}
    grid = check_modality_grids(mods)
    labels = {}
    for split, path in (("train", train), ("test", test)):
        lab = as_labels(read_label_raster(path)[0], path, len(CLASS_NAMES))
        check_grid(lab, grid, path, hsi)
        labels[split] = lab
    source = official_split_source("houston2013", labels, val_fraction, seed, val_split, hsi=hsi, lidar=lidar, train=train, test=test)
    labels, val_info = with_val(labels, val_fraction, seed, val_split)
    return SceneData(
        name="houston2013", modalities=mods, labels=labels, val_split=val_info,
        class_names=list(CLASS_NAMES), crs=crs, transform=transform, source=source,
    )
