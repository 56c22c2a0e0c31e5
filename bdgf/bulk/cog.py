"""The class map as a Cloud-Optimised GeoTIFF: tiled, DEFLATE-compressed, with overviews (MODE
resampling: a class, never a blend) and a colour table (0 = nodata, transparent; 1..K the
manifest's class colours), read from the output Zarr block by block.

    write_cog("out.zarr", "map.tif", blocksize=512)     # written under a temporary name, validated, renamed
    validate_cog("map.tif")                              # [] when valid, else the problems

How: a tiled GTiff with the colour table is written row band by row band (~64 MiB each) from the
Zarr, then GDAL's COG driver copies it (overviews built until they fit one block, IFDs and
overviews before the data, as the COG layout requires; compression on every CPU). This runs in
the driver after the last chunk: for 1e10 px (10 GB of uint8) expect tens of minutes.
Validation is rio-cogeo's ``cog_validate`` (GDAL's validate_cloud_optimized_geotiff logic) where
installed, else :func:`cog_layout_problems`, a check of the layout with rasterio alone (tiled,
overviews, GDAL's LAYOUT=COG marker).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np

from bdgf.errors import BDGFError


def write_cog(zarr_path: str | Path, tif: str | Path, *, blocksize: int = 512) -> Path:
    """Write OUT.zarr's ``classes`` to ``tif`` as a validated COG (atomically). Returns ``tif``."""
    import rasterio
    import rasterio.shutil
    import zarr
    from rasterio.crs import CRS
    from rasterio.transform import Affine

    tif = Path(tif)
    root = zarr.open_group(str(zarr_path), mode="r")
    classes = root["classes"]
    H, W = classes.shape
    ref = root["spatial_ref"].attrs
    gt = [float(v) for v in ref["GeoTransform"].split()] if "GeoTransform" in ref else None
    profile = {"driver": "GTiff", "height": H, "width": W, "count": 1, "dtype": str(classes.dtype), "nodata": 0,
               "tiled": True, "blockxsize": blocksize, "blockysize": blocksize, "compress": "deflate"}
    if gt is not None:
        profile["transform"] = Affine.from_gdal(*gt)
    if "crs_wkt" in ref:
        profile["crs"] = CRS.from_user_input(ref["crs_wkt"])
    colours = classes.attrs.get("colours", [])
    tag = uuid.uuid4().hex[:8]
    plain = tif.with_name(f".{tif.name}.plain-{tag}.tif")
    tmp = tif.with_name(f".{tif.name}.tmp-{tag}.tif")
    try:
        with rasterio.Env():
            with rasterio.open(plain, "w", **profile) as dst:
                step = blocksize * max(1, (64 << 20) // (W * classes.dtype.itemsize * blocksize))  # ~64 MiB a band
                for r in range(0, H, step):
                    block = np.asarray(classes[r : min(r + step, H), :])
                    dst.write(block[None], window=((r, r + block.shape[0]), (0, W)))
                if str(classes.dtype) == "uint8":  # GDAL colour tables are for Byte (and UInt16) bands
                    cmap = {0: (0, 0, 0, 0)}
                    cmap.update({k: (*map(int, c), 255) for k, c in enumerate(colours, 1)})
                    dst.write_colormap(1, cmap)
            rasterio.shutil.copy(plain, tmp, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=blocksize,
                                 OVERVIEW_RESAMPLING="MODE", RESAMPLING="NEAREST", BIGTIFF="IF_SAFER",
                                 NUM_THREADS="ALL_CPUS")
        problems = validate_cog(tmp)
        if problems:
            raise BDGFError(f"{tif}: the written GeoTIFF is not a valid COG: {'; '.join(problems)}")
        os.replace(tmp, tif)
    finally:
        for p in (plain, tmp):
            if p.exists():
                p.unlink()
    return tif


def validate_cog(path: str | Path) -> list[str]:
    """Problems that make ``path`` not a valid COG ([] when valid): rio-cogeo's validator where
    installed (errors only; warnings ignored), else :func:`cog_layout_problems`."""
    try:
        from rio_cogeo.cogeo import cog_validate
    except ImportError:
        return cog_layout_problems(path)
    valid, errors, _warnings = cog_validate(str(path), quiet=True)
    return [] if valid else list(errors) or ["rio-cogeo: not a valid COG"]


def cog_layout_problems(path: str | Path) -> list[str]:
    """The layout check without rio-cogeo: the image is tiled (square blocks, not strips), has
    overviews when larger than a block, each overview tiled too, and GDAL reports LAYOUT=COG
    (its COG driver's marker that the IFDs and overviews lie before the image data)."""
    import rasterio

    problems = []
    with rasterio.open(path) as ds:
        bh, bw = ds.block_shapes[0]
        if not ds.profile.get("tiled", False) or bh != bw:
            problems.append(f"not tiled (blocks {bh}x{bw})")
        if max(ds.width, ds.height) > min(bw, 512) and not ds.overviews(1):
            problems.append("no overviews")
        if ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT", "").upper() != "COG":
            problems.append("GDAL does not report LAYOUT=COG (IFDs/overviews not before the data)")
    return problems
