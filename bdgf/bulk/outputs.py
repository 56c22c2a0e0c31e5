"""The output map as a Zarr v3 group that ``xarray.open_zarr`` (and rioxarray) read with its
coordinates and CRS:

    OUT.zarr/
      classes (y, x)             uint8 (K < 255) or uint16; 0 = nodata (attrs nodata, flag_values, flag_meanings)
      confidence (y, x)          uint8, round(255 · top probability); 0 at nodata
      probabilities (class, y, x) uint8 round(255 · p), only with probabilities=True
      y (y,), x (x,)             pixel-centre coordinates in map units (pixel indices without a transform)
      spatial_ref ()             CF grid mapping: attrs crs_wkt, spatial_ref, GeoTransform
      _bulk/                     the run's manifest and done markers (bdgf.bulk.resume)

When the last chunk is written the group's metadata is consolidated (:func:`finish_map`), so a
plain ``xarray.open_zarr(out)`` opens it in one read, without warnings. Every array is chunked
c×c over (y, x) like the chunk plan, so each task writes whole chunks of
every array (Zarr has no locking; no two tasks share a chunk).

Glossary: H×W the mosaic's grid, K classes, c the chunk side.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from bdgf.backends import Classified, class_dtype

GRID_MAPPING = "spatial_ref"


def create_map(path: Path, *, height: int, width: int, chunk: int, class_names: list[str], colours: list,
               crs_wkt: str | None, transform: tuple | None, probabilities: bool) -> None:
    """Create the (empty) output group at ``path`` (a new directory)."""
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.create_group("_bulk", attributes={"about": "bdgf bulk classification: manifest.json and done/ markers"})
    if transform is not None:
        x0, dx, _, y0, _, dy = transform
    else:
        x0, dx, y0, dy = 0.0, 1.0, 0.0, 1.0
    y = root.create_array("y", data=y0 + dy * (np.arange(height) + 0.5), dimension_names=("y",))
    x = root.create_array("x", data=x0 + dx * (np.arange(width) + 0.5), dimension_names=("x",))
    projected = transform is not None
    y.attrs.update({"standard_name": "projection_y_coordinate" if projected else "row", "axis": "Y"})
    x.attrs.update({"standard_name": "projection_x_coordinate" if projected else "column", "axis": "X"})
    ref = root.create_array(GRID_MAPPING, shape=(), dtype="int32", fill_value=0, dimension_names=())
    ref[...] = 0
    if crs_wkt:
        ref.attrs.update({"crs_wkt": crs_wkt, "spatial_ref": crs_wkt})
    if transform is not None:
        ref.attrs["GeoTransform"] = " ".join(repr(float(v)) for v in transform)
    K = len(class_names)
    common = {"grid_mapping": GRID_MAPPING, "coordinates": GRID_MAPPING}
    cls = root.create_array("classes", shape=(height, width), dtype=class_dtype(K), chunks=(chunk, chunk),
                            fill_value=0, dimension_names=("y", "x"))
    cls.attrs.update({**common, "long_name": "land-cover class", "nodata": 0, "flag_values": list(range(K + 1)),
                      "flag_meanings": " ".join(["nodata", *[n.replace(" ", "_") for n in class_names]]),
                      "class_names": list(class_names), "colours": [list(map(int, c)) for c in colours]})
    conf = root.create_array("confidence", shape=(height, width), dtype="uint8", chunks=(chunk, chunk),
                             fill_value=0, dimension_names=("y", "x"))
    conf.attrs.update({**common, "long_name": "confidence of the class (255 · top probability)", "nodata": 0,
                       "scale": 1 / 255})
    if probabilities:
        p = root.create_array("probabilities", shape=(K, height, width), dtype="uint8", chunks=(K, chunk, chunk),
                              fill_value=0, dimension_names=("class", "y", "x"))
        p.attrs.update({**common, "long_name": "class probabilities (255 · p)", "scale": 1 / 255,
                        "class_names": list(class_names)})
        root.create_array("class", data=np.arange(1, K + 1, dtype=np.int32), dimension_names=("class",))


def write_chunk(path: Path, r0: int, c0: int, out: Classified) -> None:
    """Write one chunk's classes, confidence (h, w) and probabilities (K, h, w) at (r0, c0)."""
    h, w = out.classes.shape
    zarr.open_array(str(Path(path) / "classes"), mode="r+")[r0 : r0 + h, c0 : c0 + w] = out.classes
    zarr.open_array(str(Path(path) / "confidence"), mode="r+")[r0 : r0 + h, c0 : c0 + w] = out.confidence
    if out.probabilities is not None:
        p = np.clip(np.rint(out.probabilities * 255.0), 0, 255).astype(np.uint8)
        zarr.open_array(str(Path(path) / "probabilities"), mode="r+")[:, r0 : r0 + h, c0 : c0 + w] = p


def finish_map(path: Path) -> None:
    """Consolidate the group's metadata into its zarr.json (zarr's warnings that consolidation is
    not in the v3 spec yet, and that _bulk/ holds plain files, are expected and silenced)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(path))
