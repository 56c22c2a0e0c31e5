"""GeoTIFF reading with rasterio: (array (C, H, W), crs string or None, GDAL transform or None).

Nodata values become NaN (the data are returned as float32), so the scene store marks those
pixels invalid. A file without georeferencing gives ``crs=None, transform=None`` (rasterio's
identity stand-in transform is not passed on). Label rasters use ``read_label_raster``, which
keeps the integer values and does not touch nodata.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

from bdgf.errors import InputError
from bdgf.data.readers.mat import check_file

GEOTIFF_SUFFIXES = (".tif", ".tiff")


def _open(path: Path):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioIOError as exc:
        raise InputError(f"{path}: not a readable GeoTIFF ({exc})") from exc


def _georef(ds) -> tuple[str | None, tuple[float, ...] | None]:
    crs = ds.crs.to_string() if ds.crs else None
    t = ds.transform
    if crs is None and t.is_identity:
        return None, None
    return crs, tuple(float(v) for v in t.to_gdal())


def read_raster(path, *, nodata_to_nan: bool = True) -> tuple[np.ndarray, str | None, tuple[float, ...] | None]:
    """(data (C, H, W) float32, crs, transform) of a GeoTIFF; nodata -> NaN."""
    path = check_file(path, "GeoTIFF")
    with _open(path) as ds:
        data = ds.read().astype(np.float32, copy=False)
        if nodata_to_nan:
            for i, nd in enumerate(ds.nodatavals):
                if nd is not None:
                    band = data[i]
                    band[np.isnan(band) if np.isnan(nd) else band == np.float32(nd)] = np.nan
        crs, transform = _georef(ds)
    return data, crs, transform


def read_label_raster(path) -> tuple[np.ndarray, str | None, tuple[float, ...] | None]:
    """(labels (H, W) in the file's dtype, crs, transform) of a single-band GeoTIFF."""
    path = check_file(path, "label GeoTIFF")
    with _open(path) as ds:
        if ds.count != 1:
            raise InputError(f"{path}: a label raster must have 1 band, found {ds.count}")
        data = ds.read(1)
        crs, transform = _georef(ds)
    return data, crs, transform


def raster_wavelengths(path) -> list[float] | None:
    """Band centre wavelengths (nm) from GeoTIFF metadata, or None if the file has none.

    Looks at per-band tags ``wavelength`` (with ``wavelength_units``) and at the ENVI domain's
    ``wavelength = {...}`` list, as GDAL writes them.
    """
    path = check_file(path, "GeoTIFF")
    with _open(path) as ds:
        values = []
        for b in range(1, ds.count + 1):
            tags = {k.lower(): v for k, v in ds.tags(b).items()}
            if "wavelength" not in tags:
                values = None
                break
            values.append(_to_nm(float(tags["wavelength"]), tags.get("wavelength_units", "")))
        if values:
            return values
        envi = {k.lower(): v for k, v in ds.tags(ns="ENVI").items()}
        if "wavelength" in envi:
            nums = [float(v) for v in re.findall(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", envi["wavelength"])]
            if len(nums) == ds.count:
                return [_to_nm(v, envi.get("wavelength_units", "")) for v in nums]
    return None


def _to_nm(value: float, units: str) -> float:
    u = units.lower()
    if u.startswith("micro") or u in ("um", "µm") or (not u and value < 30):
        return value * 1000.0
    return value
