"""The serving API's logic, as plain functions (no Serve, no web framework): parse and check a
classify request, run it on a back end (:mod:`bdgf.backends`), format the answer, and the serving
settings. ``serving/app.py`` only wires these into a Ray Serve + FastAPI application.

    POST /v1/classify?row=R&col=C[&absent=lidar]   body: .npy (C, S, S) float32 raw window
        Content-Type: application/x-npy; (row, col) the centre tile's origin (the window starts
        ``halo`` pixels before). Answer: .npy classes (T, T) uint8/uint16 (0 = nodata), or with
        ``Accept: application/json`` {"classes": [[..]], "confidence": [[..]], "nodata_pixels": n}.
    GET /v1/model   the manifest        GET /healthz   {"status": "ok", "backend": name}

Every refusal is a :class:`RequestError` with an HTTP status and a message naming the problem;
:func:`error_json` is its body, ``{"error": "..."}``. NaN pixels are nodata (class 0), not errors.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from bdgf.errors import BDGFError, InputError

NPY = "application/x-npy"
JSON = "application/json"
DEFAULTS = {"max_ongoing_requests": 8, "max_queued_requests": 64, "max_body_bytes": 64 * 1024 * 1024}


class RequestError(BDGFError):
    """A request the server refuses: ``status`` is the HTTP status, the message names the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = int(status)
        self.message = message


@dataclass
class Reply:
    status: int
    media_type: str
    body: bytes


def error_json(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def error_reply(exc: Exception) -> Reply:
    """A refusal as a JSON reply: RequestError keeps its status, InputError is 422, else 500."""
    if isinstance(exc, RequestError):
        return Reply(exc.status, JSON, error_json(exc.message))
    if isinstance(exc, InputError):
        return Reply(422, JSON, error_json(str(exc)))
    return Reply(500, JSON, error_json(f"internal error ({type(exc).__name__}: {exc})"))


def load_config(path: str | Path | None = None) -> dict:
    """Serving settings: DEFAULTS overridden by the ``serve:`` mapping (or top level) of a YAML file."""
    cfg = dict(DEFAULTS)
    if path is None:
        return cfg
    import yaml

    path = Path(path)
    if not path.exists():
        raise BDGFError(f"{path}: no serving config there")
    data = yaml.safe_load(path.read_text()) or {}
    data = data.get("serve", data) if isinstance(data, dict) else None
    if not isinstance(data, dict):
        raise BDGFError(f"{path}: the serving config must be a mapping of settings")
    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise BDGFError(f"{path}: unknown serving settings {unknown}; known: {sorted(DEFAULTS)}")
    for key, value in data.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BDGFError(f"{path}: {key} must be a whole number >= 1, got {value!r}")
        cfg[key] = value
    return cfg


def check_content(content_type: str | None, content_length: str | int | None, max_bytes: int) -> None:
    """Refuse an unknown content type (415) or a declared length over the limit (413) before reading."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media != NPY:
        raise RequestError(415, f"unsupported content type {content_type or '(none)'!r}; send the window as {NPY}")
    if content_length not in (None, ""):
        try:
            n = int(content_length)
        except (TypeError, ValueError):
            raise RequestError(400, f"bad Content-Length {content_length!r}") from None
        if n > max_bytes:
            raise RequestError(413, f"body of {n} bytes is over the limit of {max_bytes} bytes")


def parse_window(body: bytes, package, max_bytes: int) -> np.ndarray:
    """An .npy body -> the (C, S, S) float32 window, checked against the package."""
    if len(body) > max_bytes:
        raise RequestError(413, f"body of {len(body)} bytes is over the limit of {max_bytes} bytes")
    if not body:
        raise RequestError(400, "empty body; send the window as an .npy array (C, S, S) float32")
    try:
        x = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - numpy raises several types for a bad file
        raise RequestError(400, f"the body is not a valid .npy array ({type(exc).__name__}: {exc})") from None
    if not isinstance(x, np.ndarray):
        raise RequestError(400, "the body is not a valid .npy array (an .npz archive?)")
    if x.dtype != np.float32:
        raise RequestError(422, f"wrong dtype {x.dtype}; the window must be float32")
    S, C = package.window_size, package.channels
    if x.shape != (C, S, S):
        bands = " + ".join(f"{b} {m}" for m, b in zip(package.modalities, package.bands))
        what = "band count" if x.ndim == 3 and x.shape[1:] == (S, S) else "shape"
        raise RequestError(422, f"wrong {what}: expected a window ({C}, {S}, {S}) ({bands} bands, "
                                f"{S} px with the halo), got shape {tuple(x.shape)}")
    return x


def parse_origin(row: str | None, col: str | None) -> tuple[int, int]:
    out = []
    for name, value in (("row", row), ("col", col)):
        if value is None or value == "":
            raise RequestError(422, f"missing query parameter {name!r} (the tile origin's {name})")
        try:
            out.append(int(value))
        except ValueError:
            raise RequestError(422, f"query parameter {name!r} must be a whole number, got {value!r}") from None
    return out[0], out[1]


def parse_absent(absent: str | None) -> tuple[str, ...]:
    return tuple(a.strip() for a in (absent or "").split(",") if a.strip())


def wants_json(accept: str | None) -> bool:
    return JSON in (accept or "").lower()


def to_npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def classify(backend, body: bytes, query: Mapping[str, str], headers: Mapping[str, str], max_bytes: int) -> Reply:
    """One POST /v1/classify; every refusal comes back as a JSON error reply, never an exception.
    ``headers`` keys are lower case."""
    try:
        check_content(headers.get("content-type"), headers.get("content-length"), max_bytes)
        window = parse_window(body, backend.package, max_bytes)
        origin = parse_origin(query.get("row"), query.get("col"))
        out = backend.classify(window[None], [origin], absent=parse_absent(query.get("absent")))
    except Exception as exc:  # noqa: BLE001 - turned into the reply
        return error_reply(exc)
    classes, conf = out.classes[0], out.confidence[0]
    if wants_json(headers.get("accept")):
        doc = {"classes": classes.tolist(), "confidence": conf.tolist(), "nodata_pixels": int((classes == 0).sum())}
        return Reply(200, JSON, json.dumps(doc).encode())
    return Reply(200, NPY, to_npy(classes))


def model(backend) -> dict[str, Any]:
    return backend.package.manifest


def health(backend) -> dict[str, Any]:
    return {"status": "ok", "backend": backend.name}
