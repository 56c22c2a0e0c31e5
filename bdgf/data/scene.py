"""The scene store: one Zarr v3 group per scene, and its typed Python API.

Layout (every array has named dimensions, so plain ``zarr`` and ``xarray.open_zarr`` read it)::

    scene.zarr/                      attrs["bdgf"]: SceneMeta as JSON
      y (H,), x (W,)                 pixel-centre coordinates (map units with a geotransform)
      valid (H, W) bool              False where any modality had NaN/inf/nodata
      modalities/<name> (C, H, W)    float32, raw values, chunks (C, 256, 256)
      modalities/band_<name> (C,)    wavelength in nm where known, else the band index
      labels/<split> (H, W)          uint16, 0 = unlabelled, classes 1..K
      features/<level> (F, H, W)     float16, written by the feature extractor

Normalisation statistics live in the metadata and are applied on read (``read_window``), so
the stored values stay the sensor's. Glossary: C bands, H×W grid, K classes.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import zarr

from bdgf.errors import InputError, StoreError
from bdgf.tiler import pad_block
from bdgf.progress import progress as with_progress

FORMAT_VERSION = 1
DEFAULT_CHUNK = 256
SPLITS = ("train", "val", "test")


@dataclass
class ModalityData:
    """One modality in memory before it is written: data (C, H, W)."""

    data: np.ndarray
    kind: str = "other"  # hsi | lidar | sar | dsm | other
    band_names: list[str] | None = None
    wavelengths_nm: list[float] | None = None
    units: str | None = None
    source: str | None = None  # file it came from, for error messages

    @property
    def bands(self) -> int:
        return int(self.data.shape[0])


@dataclass
class SceneData:
    """A scene in memory: what readers and the synthetic generator produce."""

    name: str
    modalities: dict[str, ModalityData]
    labels: dict[str, np.ndarray]
    class_names: list[str]
    valid: np.ndarray | None = None
    crs: str | None = None
    transform: tuple[float, ...] | None = None  # GDAL order: x0, dx, rx, y0, ry, dy
    source: dict = field(default_factory=dict)
    # how val was made: {"method": regions|blocks|random|given|none, "metric", "min_distance", ...}
    # (bdgf.data.splits.carve_val's info); None: unknown
    val_split: dict | None = None

    @property
    def shape(self) -> tuple[int, int]:
        first = next(iter(self.modalities.values()))
        return int(first.data.shape[1]), int(first.data.shape[2])


@dataclass
class ModalityMeta:
    name: str
    kind: str
    bands: int
    band_names: list[str]
    wavelengths_nm: list[float] | None
    units: str | None
    mean: list[float]
    std: list[float]


@dataclass
class SceneMeta:
    name: str
    height: int
    width: int
    class_names: list[str]
    modalities: list[ModalityMeta]
    split_counts: dict[str, int]
    invalid_pixels: int
    invalid_by_modality: dict[str, int]
    crs: str | None = None
    transform: list[float] | None = None
    source: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # how val was carved and how far it lies from train (Chebyshev px); stores written before
    # this field read as "unknown"
    val_split: dict = field(default_factory=lambda: {"method": "unknown", "min_distance": "unknown"})

    @classmethod
    def from_dict(cls, d: dict) -> "SceneMeta":
        d = dict(d)
        d["modalities"] = [ModalityMeta(**m) for m in d["modalities"]]
        return cls(**d)


# ----------------------------------------------------------------------------------------
# Validation and statistics
# ----------------------------------------------------------------------------------------


def validate(scene: SceneData) -> np.ndarray:
    """Check a SceneData and return the validity mask (H, W) with non-finite pixels removed."""
    if not scene.modalities:
        raise InputError(f"scene {scene.name!r}: no modalities")
    if len(scene.class_names) == 0:
        raise InputError(f"scene {scene.name!r}: no class names")
    grid = None
    for name, mod in scene.modalities.items():
        where = mod.source or name
        if mod.data.ndim != 3:
            raise InputError(f"{where}: modality {name!r} must be (bands, H, W), got shape {mod.data.shape}")
        if not np.issubdtype(mod.data.dtype, np.number) or np.issubdtype(mod.data.dtype, np.complexfloating):
            raise InputError(f"{where}: modality {name!r} has non-real dtype {mod.data.dtype}")
        if grid is None:
            grid = mod.data.shape[1:]
            grid_from = where
        elif mod.data.shape[1:] != grid:
            raise InputError(
                f"{where}: modality {name!r} grid {mod.data.shape[1:]} does not match {grid} of {grid_from}"
            )
        if mod.band_names is not None and len(mod.band_names) != mod.bands:
            raise InputError(f"{where}: {len(mod.band_names)} band names for {mod.bands} bands")
        if mod.wavelengths_nm is not None and len(mod.wavelengths_nm) != mod.bands:
            raise InputError(f"{where}: {len(mod.wavelengths_nm)} wavelengths for {mod.bands} bands")
    valid = np.ones(grid, bool) if scene.valid is None else np.asarray(scene.valid, bool).copy()
    if valid.shape != grid:
        raise InputError(f"scene {scene.name!r}: valid mask shape {valid.shape} != grid {grid}")
    for name, mod in scene.modalities.items():
        valid &= np.isfinite(mod.data).all(axis=0)
    if not valid.any():
        raise InputError(f"scene {scene.name!r}: no valid pixel (every pixel has NaN/inf/nodata)")
    k = len(scene.class_names)
    for split, lab in scene.labels.items():
        if lab.shape != grid:
            raise InputError(f"label raster {split!r} has shape {lab.shape}, the grid is {grid}")
        if np.issubdtype(lab.dtype, np.floating) and not np.all(np.isfinite(lab)):
            raise InputError(f"label raster {split!r} contains NaN/inf")
        if lab.min() < 0 or lab.max() > k:
            raise InputError(f"label raster {split!r} has values outside 0..{k} (0 = unlabelled, {k} classes)")
        if np.count_nonzero(lab) == 0:
            raise InputError(f"label raster {split!r} has zero labelled pixels")
    return valid


def band_statistics(data: np.ndarray, valid: np.ndarray, chunk_rows: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and std (C,) over valid pixels, in float64, streaming over row blocks."""
    c = data.shape[0]
    n = 0
    s1 = np.zeros(c)
    s2 = np.zeros(c)
    for r in range(0, data.shape[1], chunk_rows):
        block = np.asarray(data[:, r : r + chunk_rows], dtype=np.float64)
        m = valid[r : r + chunk_rows]
        vals = block[:, m]
        n += vals.shape[1]
        s1 += vals.sum(axis=1)
        s2 += (vals * vals).sum(axis=1)
    mean = s1 / n
    var = np.maximum(s2 / n - mean * mean, 0.0)
    std = np.sqrt(var)
    std[std < 1e-12] = 1.0  # a constant band normalises to zero, not to inf
    return mean, std


# ----------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------


def _coords(n: int, start: float, step: float) -> np.ndarray:
    return start + step * (np.arange(n, dtype=np.float64) + 0.5)


def _write_coords(group: zarr.Group, h: int, w: int, transform) -> None:
    if transform is not None:
        x0, dx, _, y0, _, dy = transform
    else:
        x0, dx, y0, dy = 0.0, 1.0, 0.0, 1.0
    group.create_array("y", data=_coords(h, y0, dy), dimension_names=("y",))
    group.create_array("x", data=_coords(w, x0, dx), dimension_names=("x",))


def write_scene(
    scene: SceneData,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    chunk: int = DEFAULT_CHUNK,
    progress: bool = False,
) -> "Scene":
    """Validate ``scene`` and write it to ``path`` atomically (temporary name, then rename).

    Non-finite pixels are removed from ``valid`` (and counted in the metadata); the raw values
    are stored with NaN/inf replaced by 0, so readers never see them.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise StoreError(f"{path}: already exists (pass --overwrite to replace it)")
    valid = validate(scene)
    h, w = scene.shape
    invalid_by_mod = {
        name: int((~np.isfinite(m.data).all(axis=0)).sum()) for name, m in scene.modalities.items()
    }
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        _write_coords(root, h, w, scene.transform)
        root.create_array("valid", data=valid, chunks=(chunk, chunk), dimension_names=("y", "x"))
        mods = root.create_group("modalities")
        _write_coords(mods, h, w, scene.transform)
        metas = []
        items = list(scene.modalities.items())
        for name, mod in with_progress(items, "writing modalities", "modality", enabled=progress):
            data = np.where(np.isfinite(mod.data), mod.data, 0).astype(np.float32, copy=False)
            arr = mods.create_array(
                name,
                shape=data.shape,
                dtype="float32",
                chunks=(data.shape[0], chunk, chunk),
                dimension_names=(f"band_{name}", "y", "x"),
                fill_value=0.0,
            )
            arr[...] = data
            band_coord = mod.wavelengths_nm if mod.wavelengths_nm is not None else np.arange(mod.bands)
            mods.create_array(f"band_{name}", data=np.asarray(band_coord, np.float64), dimension_names=(f"band_{name}",))
            mean, std = band_statistics(data, valid)
            metas.append(
                ModalityMeta(
                    name=name,
                    kind=mod.kind,
                    bands=mod.bands,
                    band_names=mod.band_names or [f"{name}_{i}" for i in range(mod.bands)],
                    wavelengths_nm=list(map(float, mod.wavelengths_nm)) if mod.wavelengths_nm is not None else None,
                    units=mod.units,
                    mean=mean.tolist(),
                    std=std.tolist(),
                )
            )
        labs = root.create_group("labels")
        _write_coords(labs, h, w, scene.transform)
        for split, lab in scene.labels.items():
            labs.create_array(
                split, data=np.asarray(lab, np.uint16), chunks=(chunk, chunk), dimension_names=("y", "x")
            )
        root.create_group("features")
        meta = SceneMeta(
            name=scene.name,
            height=h,
            width=w,
            class_names=list(scene.class_names),
            modalities=metas,
            split_counts={s: int(np.count_nonzero(l)) for s, l in scene.labels.items()},
            invalid_pixels=int((~valid).sum()),
            invalid_by_modality=invalid_by_mod,
            crs=scene.crs,
            transform=list(map(float, scene.transform)) if scene.transform is not None else None,
            source=scene.source,
            val_split=dict(scene.val_split) if scene.val_split else {"method": "unknown", "min_distance": "unknown"},
        )
        root.attrs["bdgf"] = json.loads(json.dumps(asdict(meta)))
        _replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Scene.open(path)


def _replace(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path``; an existing ``path`` is removed only after the move succeeds."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


# ----------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------


class Scene:
    """A scene store opened for reading (and for adding features/splits).

    >>> scene = Scene.open("houston.zarr")
    >>> scene.modality_names, scene.shape, scene.num_classes
    >>> window = scene.read_window(0, 0, 64, 64)   # {"hsi": (144, 64, 64), "lidar": (1, 64, 64)}
    """

    def __init__(self, path: Path, root: zarr.Group, meta: SceneMeta):
        self.path = path
        self.root = root
        self.meta = meta
        self._stats = {
            m.name: (np.asarray(m.mean, np.float32)[:, None, None], np.asarray(m.std, np.float32)[:, None, None])
            for m in meta.modalities
        }
        self._arrays = {m.name: root["modalities"][m.name] for m in meta.modalities}

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r", *, store=None) -> "Scene":
        """Open the store at ``path``; ``store`` (a zarr Store over that path, e.g.
        :class:`bdgf.data.chunks.CountingStore`) replaces the plain local one."""
        path = Path(path)
        if not path.exists():
            raise StoreError(f"{path}: no such scene store")
        try:
            root = zarr.open_group(str(path) if store is None else store, mode=mode, zarr_format=3,
                                   use_consolidated=False)
            raw = root.attrs.get("bdgf")
        except Exception as exc:  # zarr raises several types for unreadable metadata
            raise StoreError(f"{path}: not a readable Zarr v3 scene store ({type(exc).__name__}: {exc})") from exc
        if raw is None:
            raise StoreError(f"{path}: Zarr group has no 'bdgf' metadata; not a BDGF scene store")
        try:
            meta = SceneMeta.from_dict(raw)
            for m in meta.modalities:
                arr = root["modalities"][m.name]
                if tuple(arr.shape) != (m.bands, meta.height, meta.width):
                    raise StoreError(
                        f"{path}: modalities/{m.name} has shape {arr.shape}, metadata says "
                        f"({m.bands}, {meta.height}, {meta.width})"
                    )
            for split in meta.split_counts:
                root["labels"][split]
            root["valid"]
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"{path}: corrupt scene store ({type(exc).__name__}: {exc})") from exc
        return cls(path, root, meta)

    # --- description --------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def shape(self) -> tuple[int, int]:
        return self.meta.height, self.meta.width

    @property
    def modality_names(self) -> list[str]:
        return [m.name for m in self.meta.modalities]

    def modality_meta(self, name: str) -> ModalityMeta:
        for m in self.meta.modalities:
            if m.name == name:
                return m
        raise KeyError(f"{self.path}: no modality {name!r}; has {self.modality_names}")

    @property
    def bands(self) -> dict[str, int]:
        return {m.name: m.bands for m in self.meta.modalities}

    @property
    def total_bands(self) -> int:
        return sum(self.bands.values())

    @property
    def channel_modality(self) -> np.ndarray:
        """(C_total,) int64: index of the modality of each concatenated channel."""
        return np.concatenate([np.full(m.bands, i, np.int64) for i, m in enumerate(self.meta.modalities)])

    @property
    def class_names(self) -> list[str]:
        return self.meta.class_names

    @property
    def num_classes(self) -> int:
        return len(self.meta.class_names)

    @property
    def splits(self) -> list[str]:
        return list(self.meta.split_counts)

    # --- arrays ---------------------------------------------------------------------------
    def modality(self, name: str) -> zarr.Array:
        """The raw (C, H, W) zarr array of a modality (lazy; slice it to read)."""
        if name not in self._arrays:
            raise KeyError(f"{self.path}: no modality {name!r}; has {self.modality_names}")
        return self._arrays[name]

    def labels(self, split: str) -> np.ndarray:
        """(H, W) int64 label raster of a split; 0 = unlabelled."""
        if split not in self.meta.split_counts:
            raise KeyError(f"{self.path}: no split {split!r}; has {self.splits}")
        return np.asarray(self.root["labels"][split][...], np.int64)

    @property
    def valid(self) -> np.ndarray:
        return np.asarray(self.root["valid"][...], bool)

    def statistics(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-band (mean, std), each (C,)."""
        mean, std = self._stats[name]
        return mean[:, 0, 0], std[:, 0, 0]

    def read_window(
        self, row: int, col: int, height: int, width: int, *, pad: str = "reflect", concat: bool = False
    ) -> dict[str, np.ndarray] | np.ndarray:
        """Normalised window of every modality: {name: (C, height, width) float32}.

        The window may extend past the grid; the outside is filled by ``pad`` ("reflect" or
        "constant" zeros). Invalid pixels are 0 (the band mean) after normalisation.
        With ``concat=True`` returns one (C_total, height, width) array.
        """
        h, w = self.shape
        r0, r1 = max(row, 0), min(row + height, h)
        c0, c1 = max(col, 0), min(col + width, w)
        if r1 <= r0 or c1 <= c0:
            raise ValueError(f"window ({row}, {col}, {height}, {width}) lies outside the {h}x{w} grid")
        pads = ((r0 - row, row + height - r1), (c0 - col, col + width - c1))
        valid = np.asarray(self._raw_valid(r0, r1, c0, c1), bool)
        out = {}
        for name in self._arrays:
            mean, std = self._stats[name]
            block = (np.asarray(self._raw(name, r0, r1, c0, c1), np.float32) - mean) / std
            block[:, ~valid] = 0.0
            if any(p for pair in pads for p in pair):
                block = pad_block(block, pads, pad)
            out[name] = block
        if concat:
            return np.concatenate([out[n] for n in self.modality_names], axis=0)
        return out

    def read_valid_window(self, row: int, col: int, height: int, width: int, *, pad: str = "reflect") -> np.ndarray:
        """(height, width) bool validity; outside the grid follows ``pad`` like read_window."""
        h, w = self.shape
        r0, r1 = max(row, 0), min(row + height, h)
        c0, c1 = max(col, 0), min(col + width, w)
        pads = ((r0 - row, row + height - r1), (c0 - col, col + width - c1))
        v = np.asarray(self._raw_valid(r0, r1, c0, c1), bool)
        return pad_block(v[None], pads, pad)[0] if any(p for pair in pads for p in pair) else v

    # the two raw reads behind read_window / read_valid_window (in-grid bounds); a subclass may
    # serve them from a cache (bdgf.data.chunks.ChunkCachedScene) -- normalisation stays here
    def _raw(self, name: str, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        return self._arrays[name][:, r0:r1, c0:c1]

    def _raw_valid(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        return self.root["valid"][r0:r1, c0:c1]

    def summary(self) -> str:
        """Human-readable description (what ``bdgf info`` prints)."""
        m = self.meta
        lines = [f"scene {m.name!r} at {self.path}", f"  grid: {m.height} x {m.width}"]
        if m.crs:
            lines.append(f"  crs: {m.crs}; transform: {m.transform}")
        for mm in m.modalities:
            wl = ""
            if mm.wavelengths_nm:
                wl = f", {mm.wavelengths_nm[0]:.1f}-{mm.wavelengths_nm[-1]:.1f} nm"
            lines.append(f"  modality {mm.name} ({mm.kind}): {mm.bands} bands{wl}")
        lines.append(f"  invalid pixels: {m.invalid_pixels}")
        lines.append(f"  val split: {val_split_text(m.val_split)}")
        lines.append(f"  classes ({len(m.class_names)}):")
        counts = {s: np.bincount(self.labels(s).ravel(), minlength=self.num_classes + 1) for s in self.splits}
        wide = {s: max(9, len(s) + 2) for s in self.splits}  # cv<k>_train and the like need more
        header = "    " + f"{'class':<24}" + "".join(f"{s:>{wide[s]}}" for s in self.splits)
        lines.append(header)
        for k, cname in enumerate(m.class_names, start=1):
            lines.append("    " + f"{k:>2} {cname[:21]:<21}" + "".join(f"{counts[s][k]:>{wide[s]}}" for s in self.splits))
        lines.append("    " + f"{'total':<24}" + "".join(f"{m.split_counts[s]:>{wide[s]}}" for s in self.splits))
        feats = [k for k in self.root["features"].array_keys() if not k.startswith("_")] if "features" in self.root else []
        if feats:
            lines.append(f"  cached features: {', '.join(sorted(feats))}")
        return "\n".join(lines)


def val_split_text(info: dict) -> str:
    """One line on how val was made, from SceneMeta.val_split (what ``bdgf info`` prints)."""
    method = info.get("method", "unknown")
    if method == "none":
        return "none (no val carved)"
    dist = info.get("min_distance", "unknown")
    metric = info.get("metric", "chebyshev")
    text = f"{method}; min distance val-train {dist if dist is not None else 'n/a'} px ({metric})"
    if info.get("buffer"):
        text += f"; buffer {info['buffer']} px dropped {info.get('dropped_train', 0)} train px"
    if info.get("unbuffered_classes"):
        text += (f"; classes {info['unbuffered_classes']} too small for the buffer "
                 f"(without them {info.get('min_distance_buffered')} px)")
    if info.get("fallback_classes"):
        text += f"; classes {info['fallback_classes']} carved as blocks"
    if info.get("regions"):
        text += f"; {info['regions']} train regions"
    return text
