"""A Python client of the HTTP endpoint (:mod:`bdgf.serve_app`): send a raster, get the class map.

    result = classify_file("http://127.0.0.1:8000", "tile.tif", "map.tif", row=0, col=0, absent=("lidar",))
    result.classes (h, w), result.nodata_pixels, result.seconds; map.tif keeps tile.tif's georeference
    out = classify_array("http://127.0.0.1:8000", x)   # x (C, H, W) float32 -> classes (h, w) as .npy

A server that cannot be reached, or that answers an error, is a :class:`BDGFError` whose message
carries the server's JSON ``error``.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from bdgf.errors import BDGFError


@dataclass
class ClientResult:
    classes: np.ndarray  # (h, w), 0 = nodata
    nodata_pixels: int
    seconds: float  # the request's round trip
    body: bytes  # the answer as sent (a GeoTIFF for classify_file)
    class_names: list[str] | None = None  # the model's classes (class i is class_names[i - 1])

    def found(self) -> dict[str, int]:
        """{class name: pixels} of the classes in the map (nodata left out)."""
        ids, counts = np.unique(self.classes[self.classes > 0], return_counts=True)
        names = self.class_names or []
        return {(names[i - 1] if i - 1 < len(names) else f"class {i}"): int(n) for i, n in zip(ids, counts)}


def _params(row: int, col: int, region: Sequence[int] | None, absent: Sequence[str], probabilities: bool) -> dict:
    params = {"row": int(row), "col": int(col)}
    if region is not None:
        params["region"] = ",".join(str(int(v)) for v in region)
    if absent:
        params["absent"] = ",".join(absent)
    if probabilities:
        params["probabilities"] = "true"
    return params


def post(url: str, body: bytes, content_type: str, params: dict, timeout: float = 300.0):
    """POST /v1/classify; the response when it is 200, else a BDGFError with the server's message."""
    import requests

    endpoint = url.rstrip("/") + "/v1/classify"
    try:
        r = requests.post(endpoint, data=body, params=params, headers={"Content-Type": content_type},
                          timeout=timeout)
    except requests.exceptions.RequestException as exc:
        raise BDGFError(f"cannot reach the server at {url} ({type(exc).__name__}: {exc})") from None
    if r.status_code != 200:
        try:
            message = r.json()["error"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:500] or r.reason
        raise BDGFError(f"the server answered {r.status_code}: {message}")
    return r


def classify_file(url: str, path: str | Path, out: str | Path, *, row: int = 0, col: int = 0,
                  region: Sequence[int] | None = None, absent: Sequence[str] = (), probabilities: bool = False,
                  timeout: float = 300.0) -> ClientResult:
    """Send the GeoTIFF ``path`` (every modality's bands stacked), write the answer (band 1 classes,
    band 2 confidence[, probabilities]; georeferenced like ``path``) to ``out``."""
    from rasterio.io import MemoryFile

    path, out = Path(path), Path(out)
    if not path.is_file():
        raise BDGFError(f"{path}: no such file")
    t0 = time.perf_counter()
    r = post(url, path.read_bytes(), "image/tiff", _params(row, col, region, absent, probabilities), timeout)
    seconds = time.perf_counter() - t0
    with MemoryFile(r.content) as mem, mem.open() as ds:
        classes = ds.read(1)
        names = json.loads(ds.tags().get("BDGF_CLASS_NAMES", "null"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(r.content)
    return ClientResult(classes.astype(np.uint16 if classes.max(initial=0) > 255 else np.uint8),
                        int(r.headers.get("X-BDGF-Nodata-Pixels", (classes == 0).sum())), seconds, r.content, names)


def classify_array(url: str, x: np.ndarray, *, row: int = 0, col: int = 0, region: Sequence[int] | None = None,
                   absent: Sequence[str] = (), timeout: float = 300.0) -> ClientResult:
    """Send ``x`` (C, H, W) float32 as .npy; the classes (h, w) of the region."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(x, np.float32), allow_pickle=False)
    t0 = time.perf_counter()
    r = post(url, buf.getvalue(), "application/x-npy", _params(row, col, region, absent, False), timeout)
    classes = np.load(io.BytesIO(r.content), allow_pickle=False)
    return ClientResult(classes, int(r.headers.get("X-BDGF-Nodata-Pixels", (classes == 0).sum())),
                        time.perf_counter() - t0, r.content)


def model(url: str, timeout: float = 30.0) -> dict:
    """The served package's manifest (GET /v1/model)."""
    import requests

    try:
        r = requests.get(url.rstrip("/") + "/v1/model", timeout=timeout)
    except requests.exceptions.RequestException as exc:
        raise BDGFError(f"cannot reach the server at {url} ({type(exc).__name__}: {exc})") from None
    if r.status_code != 200:
        raise BDGFError(f"the server answered {r.status_code}: {r.text[:500]}")
    return r.json()
