"""The raster formats of the HTTP endpoint, read from and written to bytes (numpy + rasterio only).

In (a request's body, every modality's bands stacked in the manifest's order, (C, H, W)):
    image/tiff          a GeoTIFF; band types float32, uint8, int8, uint16, int16 (exact in float32);
                        its nodata value, where set, becomes NaN (nodata); CRS + transform are kept
    application/x-npy   an .npy array (C, H, W) float32
    application/json    {"data": base64 of the raw little-endian float32 array, "shape": [C, H, W],
                         "dtype": "float32", and optionally the request's parameters}
Out: :func:`write_tiff`, :func:`to_npy` (the JSON answer is built by :mod:`bdgf.serve_api`).

Every problem is a :class:`RequestError` with the HTTP status to answer and a message naming it.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bdgf.errors import BDGFError

TIFF = "image/tiff"
NPY = "application/x-npy"
JSON = "application/json"
FORMATS = (TIFF, NPY, JSON)
TIFF_DTYPES = ("float32", "uint8", "int8", "uint16", "int16")


class RequestError(BDGFError):
    """A request the server refuses: ``status`` is the HTTP status, the message names the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = int(status)
        self.message = message


@dataclass
class Raster:
    """A request's raster: ``data`` (C, H, W) float32 raw values (NaN = nodata), the GeoTIFF's
    ``crs`` and ``transform`` (None for .npy / JSON), and a JSON body's other fields."""

    data: np.ndarray
    crs: Any = None
    transform: Any = None
    fields: dict = field(default_factory=dict)


def check_pixels(h: int, w: int, max_pixels: int) -> None:
    if h * w > max_pixels:
        raise RequestError(413, f"raster of {h}x{w} = {h * w} pixels is over the limit of {max_pixels} pixels; "
                                "send it in parts (with region= and real context around each)")


def wrong_dtype(dtype, allowed: str = "float32") -> RequestError:
    return RequestError(422, f"wrong dtype {dtype}; send raw values as {allowed}")


def read_npy(body: bytes, max_pixels: int) -> Raster:
    try:
        x = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - numpy raises several types for a bad file
        raise RequestError(400, f"the body is not a valid .npy array ({type(exc).__name__}: {exc})") from None
    if not isinstance(x, np.ndarray):
        raise RequestError(400, "the body is not a valid .npy array (an .npz archive?)")
    if x.dtype != np.float32:
        raise wrong_dtype(x.dtype)
    if x.ndim == 3:
        check_pixels(x.shape[1], x.shape[2], max_pixels)
    return Raster(x)


def read_tiff(body: bytes, max_pixels: int) -> Raster:
    from rasterio.errors import NotGeoreferencedWarning, RasterioError
    from rasterio.io import MemoryFile

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with MemoryFile(body) as mem, mem.open() as ds:
                check_pixels(ds.height, ds.width, max_pixels)
                bad = sorted({d for d in ds.dtypes if d not in TIFF_DTYPES})
                if bad:
                    raise wrong_dtype(", ".join(bad), " or ".join(TIFF_DTYPES) + " GeoTIFF bands")
                x = ds.read(out_dtype="float32")
                if ds.nodata is not None and not np.isnan(ds.nodata):
                    x[x == np.float32(ds.nodata)] = np.nan
                georef = ds.crs is not None or not ds.transform.is_identity
                return Raster(x, ds.crs if georef else None, ds.transform if georef else None)
    except RasterioError as exc:
        raise RequestError(400, f"the body is not a readable GeoTIFF ({type(exc).__name__}: {exc})") from None


def read_json(body: bytes, max_pixels: int) -> Raster:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the body is not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or "data" not in doc or "shape" not in doc:
        raise RequestError(422, 'a JSON body is {"data": base64 of little-endian float32, "shape": [C, H, W], '
                                '"dtype": "float32", ...}; "data" or "shape" is missing')
    dtype = doc.get("dtype", "float32")
    if dtype not in ("float32", "<f4"):
        raise wrong_dtype(dtype)
    shape = doc["shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape)):
        raise RequestError(422, f'"shape" must be [C, H, W], three whole numbers > 0, got {shape!r}')
    check_pixels(shape[1], shape[2], max_pixels)
    if not isinstance(doc["data"], str):
        raise RequestError(422, '"data" must be a base64 string of the raw little-endian float32 values')
    try:
        raw = base64.b64decode(doc["data"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(400, f'"data" is not valid base64 ({exc})') from None
    n = int(np.prod(shape))
    if len(raw) != 4 * n:
        raise RequestError(422, f'"data" holds {len(raw)} bytes; shape {shape} of float32 needs {4 * n}')
    x = np.frombuffer(raw, "<f4").astype(np.float32).reshape(shape)
    return Raster(x, fields={k: v for k, v in doc.items() if k not in ("data", "shape", "dtype")})


READERS = {TIFF: read_tiff, NPY: read_npy, JSON: read_json}


def read_body(media: str, body: bytes, max_pixels: int) -> Raster:
    """The body of content type ``media`` (one of :data:`FORMATS`) as a :class:`Raster`."""
    if not body:
        raise RequestError(400, f"empty body; send the raster as {media}")
    return READERS[media](body, max_pixels)


def write_tiff(bands: np.ndarray, crs=None, transform=None, descriptions=(), tags: dict | None = None) -> bytes:
    """(n, h, w) bands as GeoTIFF bytes (nodata 0; ``crs``/``transform`` as given, else none)."""
    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.io import MemoryFile

    n, h, w = bands.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with MemoryFile() as mem:
            with mem.open(driver="GTiff", width=w, height=h, count=n, dtype=bands.dtype.name, crs=crs,
                          transform=transform, nodata=0) as ds:
                ds.write(bands)
                for i, d in enumerate(descriptions, start=1):
                    ds.set_band_description(i, d)
                if tags:
                    ds.update_tags(**tags)
            return mem.read()


def to_npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()
