"""The serving API's logic, as plain functions (no Serve, no web framework): parse and check a
classify request, format the answer, refuse bad input with a JSON error. :mod:`bdgf.serve_app`
wires these into Ray Serve; :func:`classify` runs one request in-process (the reference).

    POST /v1/classify[?row=R&col=C&region=r0,c0,h,w&absent=lidar&probabilities=true]
        body: a raster (C, H, W), every modality's bands stacked in the manifest's order, as
        image/tiff, application/x-npy or application/json (see :mod:`bdgf.serve_formats`).
        row, col   scene coordinates of the raster's top-left pixel (default 0, 0): the
                   position-keyed noise is drawn there
        region     the part to classify (default: all); the rest is real context for the tiles
        absent     modalities left out (comma-separated); probabilities: true/false
        A JSON body may carry these as fields ("region": [r0, c0, h, w], "absent": ["lidar"], ...);
        they take precedence over the query string.
    Answer (the request's format, or the one ``Accept`` names first), of the region (h, w):
        image/tiff         band 1 classes (0 = nodata), band 2 confidence 0..255, both uint8
                           (uint16 for K >= 255); with probabilities float32 and bands 3.. the K
                           probabilities; nodata 0; the request's CRS and the region's transform
        application/x-npy  classes (h, w); with probabilities float32 (2 + K, h, w) as the GeoTIFF
        application/json   {"classes", "confidence", ["probabilities"], "nodata_pixels",
                            "class_names", "region", "origin"}
        Headers: X-BDGF-Nodata-Pixels (NaN/inf pixels: class 0), X-BDGF-Bands; over HTTP also
        Server-Timing (model, backend, ingress ms).
    GET /v1/model   the manifest        GET /healthz   {"status": "ok", "backend": name}

Every refusal is a :class:`RequestError` with an HTTP status and a message naming the problem;
:func:`error_json` is its body, ``{"error": "..."}``. NaN/inf pixels are nodata (class 0), not errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from bdgf.backends import Classified
from bdgf.errors import BDGFError, InputError  # noqa: F401 - BDGFError re-exported
from bdgf.regions import check_phase, check_region, classify_region
from bdgf.serve_config import DEFAULTS, load_config  # noqa: F401 - re-exported
from bdgf.serve_formats import FORMATS, JSON, NPY, TIFF, Raster, RequestError, read_body, to_npy, write_tiff

PARAMS = ("row", "col", "region", "absent", "probabilities")


@dataclass
class Reply:
    status: int
    media_type: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class ClassifyRequest:
    """A checked request: the raster, where it lies in the scene, what to classify, how to answer."""

    raster: Raster
    answer: str  # the media type of the answer
    origin: tuple[int, int]
    region: tuple[int, int, int, int]
    absent: tuple[str, ...] = ()
    probabilities: bool = False


def error_json(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def error_reply(exc: Exception) -> Reply:
    """A refusal as a JSON reply: RequestError keeps its status, InputError is 422, else 500."""
    if isinstance(exc, RequestError):
        return Reply(exc.status, JSON, error_json(exc.message))
    if isinstance(exc, InputError):
        return Reply(422, JSON, error_json(str(exc)))
    return Reply(500, JSON, error_json(f"internal error ({type(exc).__name__}: {exc})"))


def check_content(content_type: str | None, content_length: str | int | None, max_bytes: int) -> str:
    """The request's media type; an unknown one is 415, a declared length over the limit 413
    (both before the body is read)."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media in ("image/geotiff", "image/tif"):
        media = TIFF
    if media not in FORMATS:
        raise RequestError(415, f"unsupported content type {content_type or '(none)'!r}; send the raster as "
                                f"{', '.join(FORMATS)}")
    if content_length not in (None, ""):
        try:
            n = int(content_length)
        except (TypeError, ValueError):
            raise RequestError(400, f"bad Content-Length {content_length!r}") from None
        if n > max_bytes:
            raise RequestError(413, f"body of {n} bytes is over the limit of {max_bytes} bytes")
    return media


def answer_format(accept: str | None, media: str) -> str:
    """The first of :data:`FORMATS` that ``Accept`` names, else the request's own format."""
    for part in (accept or "").lower().split(","):
        kind = part.split(";")[0].strip()
        if kind in FORMATS:
            return kind
    return media


def _whole(name: str, value, default: int | None = None) -> int:
    if value is None or value == "":
        if default is None:
            raise RequestError(422, f"missing parameter {name!r}")
        return default
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise RequestError(422, f"parameter {name!r} must be a whole number, got {value!r}") from None


def parse_origin(row, col) -> tuple[int, int]:
    """Scene coordinates of the raster's top-left pixel (default 0, 0)."""
    return _whole("row", row, 0), _whole("col", col, 0)


def parse_region(value) -> tuple[int, ...] | None:
    if value is None or value == "":
        return None
    parts = value.split(",") if isinstance(value, str) else value
    if not isinstance(parts, (list, tuple)) or len(parts) != 4:
        raise RequestError(422, f"parameter 'region' is r0,c0,h,w (four whole numbers), got {value!r}")
    return tuple(_whole("region", v) for v in parts)


def parse_absent(value) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)) and all(isinstance(a, str) for a in value):
        return tuple(a.strip() for a in value if a.strip())
    if value is not None and not isinstance(value, str):
        raise RequestError(422, f"parameter 'absent' is modality names (comma-separated, or a JSON list), got {value!r}")
    return tuple(a.strip() for a in (value or "").split(",") if a.strip())


def parse_bool(name: str, value) -> bool:
    if value is None or value == "" or isinstance(value, bool):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise RequestError(422, f"parameter {name!r} must be true or false, got {value!r}")


def check_bands(x: np.ndarray, package) -> None:
    """(C, H, W) with C the package's bands, else 422 naming the modalities and their bands."""
    C = package.channels
    bands = " + ".join(f"{b} {m}" for m, b in zip(package.modalities, package.bands))
    if x.ndim != 3:
        raise RequestError(422, f"wrong shape: expected a raster (C, H, W) with C = {C} ({bands} bands, stacked "
                                f"in that order), got shape {tuple(x.shape)}")
    if x.shape[0] != C:
        raise RequestError(422, f"wrong band count: expected ({C}, H, W) ({bands} bands, stacked in that "
                                f"order), got {x.shape[0]} bands (shape {tuple(x.shape)})")


def parse_request(body: bytes, query: Mapping[str, str], headers: Mapping[str, str], package,
                  config: Mapping[str, Any] = DEFAULTS) -> ClassifyRequest:
    """One POST /v1/classify checked against the package and the limits of ``config``
    (``headers`` keys lower case); any problem is a RequestError or InputError."""
    max_bytes = int(config["max_body_bytes"])
    media = check_content(headers.get("content-type"), headers.get("content-length"), max_bytes)
    if len(body) > max_bytes:
        raise RequestError(413, f"body of {len(body)} bytes is over the limit of {max_bytes} bytes")
    raster = read_body(media, body, int(config["max_pixels"]))
    unknown = sorted(set(query) - set(PARAMS)) + sorted(set(raster.fields) - set(PARAMS))
    if unknown:
        raise RequestError(422, f"unknown parameters {unknown}; known: {list(PARAMS)}")
    params = {**dict(query), **raster.fields}
    check_bands(raster.data, package)
    absent = parse_absent(params.get("absent"))
    package.presence(absent)  # unknown modality names: InputError
    origin = parse_origin(params.get("row"), params.get("col"))
    region = check_region(raster.data.shape[1:], parse_region(params.get("region")))
    check_phase(package, origin[0] + region[0], origin[1] + region[1])
    return ClassifyRequest(raster, answer_format(headers.get("accept"), media), origin, region, absent,
                           parse_bool("probabilities", params.get("probabilities")))


def band_names(package, probabilities: bool) -> list[str]:
    return ["classes", "confidence"] + ([f"p:{n}" for n in package.class_names] if probabilities else [])


def make_reply(req: ClassifyRequest, out: Classified, package) -> Reply:
    """The answer to ``req`` in ``req.answer``'s format (see the module docstring)."""
    r0, c0, h, w = req.region
    top, left = req.origin[0] + r0, req.origin[1] + c0
    nodata = int((out.classes == 0).sum())
    names = band_names(package, out.probabilities is not None)
    headers = {"X-BDGF-Nodata-Pixels": str(nodata), "X-BDGF-Bands": ",".join(names)}
    if req.answer == JSON:
        doc = {"classes": out.classes.tolist(), "confidence": out.confidence.tolist(), "nodata_pixels": nodata,
               "class_names": package.class_names, "region": [r0, c0, h, w], "origin": [top, left]}
        if out.probabilities is not None:
            doc["probabilities"] = out.probabilities.tolist()
        return Reply(200, JSON, json.dumps(doc).encode(), headers)
    if out.probabilities is not None:
        bands = np.concatenate([out.classes[None].astype(np.float32), out.confidence[None].astype(np.float32),
                                out.probabilities])
    else:
        bands = np.stack([out.classes, out.confidence.astype(out.classes.dtype)])
    if req.answer == NPY:
        return Reply(200, NPY, to_npy(bands if out.probabilities is not None else out.classes), headers)
    transform = None
    if req.raster.transform is not None:
        from rasterio.transform import Affine

        transform = req.raster.transform * Affine.translation(c0, r0)
    tags = {"BDGF_CLASS_NAMES": json.dumps(package.class_names), "BDGF_SCENE_ORIGIN": f"{top},{left}"}
    return Reply(200, TIFF, write_tiff(bands, req.raster.crs, transform, names, tags), headers)


def classify(backend, body: bytes, query: Mapping[str, str], headers: Mapping[str, str],
             config: Mapping[str, Any] = DEFAULTS) -> Reply:
    """One POST /v1/classify in-process (:func:`bdgf.regions.classify_region` on the back end);
    every refusal comes back as a JSON error reply, never an exception. ``headers`` keys are lower case."""
    try:
        req = parse_request(body, query, headers, backend.package, config)
        out = classify_region(backend, req.raster.data, origin=req.origin, region=req.region, absent=req.absent,
                              probabilities=req.probabilities,
                              batch=int(config["max_batch_tiles"]) or int(backend.package.manifest["export"]["max_batch"]))
        return make_reply(req, out, backend.package)
    except Exception as exc:  # noqa: BLE001 - turned into the reply
        return error_reply(exc)


def model(backend) -> dict[str, Any]:
    return backend.package.manifest


def health(backend) -> dict[str, Any]:
    return {"status": "ok", "backend": backend.name}
