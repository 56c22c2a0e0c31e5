"""The mosaic to classify: a scene store, or one raster per modality, read window by window.

    mosaic = open_mosaic(scene="mosaic.zarr")                                  # labels ignored
    mosaic = open_mosaic(rasters={"hsi": "a.tif", "lidar": "b.tif"})           # GeoTIFF / COG / Zarr array
    mosaic.check_package(package)                                              # names, bands vs model.json
    image = mosaic.read(r0, r1, c0, c1)                                        # {modality: (C_m, h, w) float32}

A :class:`Mosaic` is a small picklable description (paths, bands, grid); the data are read in
windows where it is used (a Dask task), through one dataset handle per thread (rasterio handles
are not thread-safe), never a whole raster. Nodata becomes NaN: a scene store's ``valid`` mask
(False → NaN in every modality), a GeoTIFF's nodata value, NaN/inf in the values themselves.
Grids must align: the same shape, CRS and transform for every modality, else an
:class:`InputError` naming both files. A read that fails (a corrupt chunk or tile) is an
InputError naming the file, the modality and the window.

Zarr array inputs (``--modality hsi=a.zarr``): a (C, H, W) array; its attrs ``crs_wkt`` and
``transform`` (GDAL order x0, dx, rx, y0, ry, dy) give the grid where present.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from bdgf.errors import InputError

_LOCAL = threading.local()  # per-thread open handles: {(kind, path): handle}


@dataclass(frozen=True)
class ModalitySource:
    """One modality's raster: ``kind`` scene (modality ``key`` of a scene store), geotiff or zarr."""

    name: str
    path: str
    kind: str
    bands: int
    key: str | None = None

    def describe(self) -> dict:
        return {"name": self.name, "path": self.path, "kind": self.kind, "bands": self.bands}

    def _handle(self):
        cache = getattr(_LOCAL, "handles", None)
        if cache is None:
            cache = _LOCAL.handles = {}
        key = (self.kind, self.path, self.key)
        if key not in cache:
            if self.kind == "geotiff":
                import rasterio

                cache[key] = rasterio.open(self.path)
            elif self.kind == "scene":
                import zarr

                cache[key] = zarr.open_array(str(Path(self.path) / "modalities" / self.key), mode="r")
            else:
                import zarr

                cache[key] = zarr.open_array(self.path, mode="r")
        return cache[key]

    def read(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """(C, r1-r0, c1-c0) float32 raw values of rows r0:r1, cols c0:c1; NaN at nodata."""
        try:
            h = self._handle()
            if self.kind == "geotiff":
                from rasterio.windows import Window

                x = h.read(window=Window(c0, r0, c1 - c0, r1 - r0)).astype(np.float32)
                if h.nodata is not None and not np.isnan(h.nodata):
                    x[x == np.float32(h.nodata)] = np.nan
            else:
                x = np.asarray(h[:, r0:r1, c0:c1], np.float32)
        except Exception as exc:  # noqa: BLE001 - zarr codecs and GDAL raise many types
            raise InputError(f"{self.path}: cannot read modality {self.name!r} rows {r0}:{r1}, cols {c0}:{c1} "
                             f"(corrupt or unreadable data: {type(exc).__name__}: {exc})") from exc
        x[~np.isfinite(x)] = np.nan
        return x


@dataclass(frozen=True)
class Mosaic:
    """Modalities on one H×W grid (CRS WKT and GDAL transform where known); ``valid``: a scene
    store whose ``valid`` mask marks nodata."""

    sources: tuple[ModalitySource, ...]
    height: int
    width: int
    crs_wkt: str | None = None
    transform: tuple[float, ...] | None = None
    valid: str | None = None

    @property
    def modalities(self) -> list[str]:
        return [s.name for s in self.sources]

    def describe(self) -> dict:
        """What identifies the input in a resume manifest."""
        return {"modalities": [s.describe() for s in self.sources], "shape": [self.height, self.width],
                "crs_wkt": self.crs_wkt, "transform": list(self.transform) if self.transform else None,
                "valid": self.valid}

    def check_package(self, package) -> None:
        """The model's modalities and band counts, by name, else an InputError naming the input."""
        have = {s.name: s for s in self.sources}
        missing = [m for m in package.modalities if m not in have]
        extra = [m for m in have if m not in package.modalities]
        if missing or extra:
            given = ", ".join(f"{s.name}={s.path}" for s in self.sources)
            raise InputError(f"the model {package.path} needs modalities {package.modalities}, the input has "
                             f"{list(have)} ({given})" + (f"; missing {missing}" if missing else "")
                             + (f"; not in the model {extra}" if extra else ""))
        for m, bands in zip(package.modalities, package.bands):
            if have[m].bands != bands:
                raise InputError(f"{have[m].path}: modality {m!r} has {have[m].bands} bands, the model "
                                 f"{package.path} needs {bands}")

    def read(self, r0: int, r1: int, c0: int, c1: int) -> dict[str, np.ndarray]:
        """{modality: (C_m, r1-r0, c1-c0) float32}, NaN at nodata (in every modality where the
        scene store's valid mask is False)."""
        out = {s.name: s.read(r0, r1, c0, c1) for s in self.sources}
        if self.valid is not None:
            mask = _valid_window(self.valid, r0, r1, c0, c1)
            for x in out.values():
                x[:, ~mask] = np.nan
        return out


def _valid_window(store: str, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    cache = getattr(_LOCAL, "handles", None)
    if cache is None:
        cache = _LOCAL.handles = {}
    key = ("valid", store, None)
    try:
        if key not in cache:
            import zarr

            cache[key] = zarr.open_array(str(Path(store) / "valid"), mode="r")
        return np.asarray(cache[key][r0:r1, c0:c1], bool)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{store}: cannot read the valid mask rows {r0}:{r1}, cols {c0}:{c1} "
                         f"({type(exc).__name__}: {exc})") from exc


def _scene_mosaic(path: Path) -> Mosaic:
    from bdgf.data.scene import Scene

    scene = Scene.open(path)
    p = str(path.resolve())
    sources = tuple(ModalitySource(m.name, p, "scene", m.bands, m.name) for m in scene.meta.modalities)
    crs = _wkt(scene.meta.crs)
    transform = tuple(scene.meta.transform) if scene.meta.transform else None
    return Mosaic(sources, scene.meta.height, scene.meta.width, crs, transform, valid=p)


def _wkt(crs) -> str | None:
    if not crs:
        return None
    from rasterio.crs import CRS

    return CRS.from_user_input(crs).to_wkt()


def _raster(name: str, path: Path) -> tuple[ModalitySource, tuple[int, int], str | None, tuple | None]:
    """(source, (H, W), CRS WKT, GDAL transform) of one modality's file."""
    if not path.exists():
        raise InputError(f"{path}: no such file (modality {name!r})")
    if path.is_dir():  # a Zarr array
        import zarr

        try:
            arr = zarr.open_array(str(path), mode="r")
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{path}: not a readable Zarr array (modality {name!r}: {exc})") from exc
        if arr.ndim != 3:
            raise InputError(f"{path}: modality {name!r} must be a (bands, H, W) array, got shape {arr.shape}")
        t = arr.attrs.get("transform")
        return (ModalitySource(name, str(path.resolve()), "zarr", int(arr.shape[0])), tuple(arr.shape[1:]),
                _wkt(arr.attrs.get("crs_wkt")), tuple(map(float, t)) if t else None)
    import rasterio

    try:
        with rasterio.open(path) as ds:
            t = ds.transform
            gdal = (t.c, t.a, t.b, t.f, t.d, t.e)
            crs = ds.crs.to_wkt() if ds.crs else None
            return (ModalitySource(name, str(path.resolve()), "geotiff", int(ds.count)), (ds.height, ds.width),
                    crs, gdal)
    except rasterio.errors.RasterioIOError as exc:
        raise InputError(f"{path}: not a readable raster (modality {name!r}: {exc})") from exc


def _same_transform(a: tuple | None, b: tuple | None) -> bool:
    if a is None or b is None:
        return a is b
    tol = 1e-6 * max(abs(a[1]), abs(a[5]), 1e-12)
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def _same_crs(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a is b
    from rasterio.crs import CRS

    return CRS.from_wkt(a) == CRS.from_wkt(b)


def open_mosaic(scene: str | Path | None = None, rasters: Mapping[str, str | Path] | None = None) -> Mosaic:
    """A scene store (``scene``) or per-modality rasters (``rasters``: {name: path}), not both;
    grids checked to align."""
    if (scene is None) == (not rasters):
        raise InputError("give either a scene store or --modality NAME=PATH rasters (one per modality), not both")
    if scene is not None:
        return _scene_mosaic(Path(scene))
    parts = [(name, *_raster(name, Path(path))) for name, path in rasters.items()]
    first, (src0, shape0, crs0, t0) = parts[0][0], parts[0][1:]
    for name, src, shape, crs, t in parts[1:]:
        where = f"{src.path} (modality {name!r}) and {src0.path} (modality {first!r})"
        if shape != shape0:
            raise InputError(f"grids do not align: {where} are {shape[0]}x{shape[1]} and {shape0[0]}x{shape0[1]} px")
        if not _same_crs(crs, crs0):
            raise InputError(f"grids do not align: {where} have different CRS")
        if not _same_transform(t, t0):
            raise InputError(f"grids do not align: {where} have different transforms {t} and {t0}")
    return Mosaic(tuple(p[1] for p in parts), int(shape0[0]), int(shape0[1]), crs0, t0)
