"""What makes a bulk run resumable: its manifest and one done marker per chunk, inside the output.

    OUT.zarr/_bulk/                a Zarr group (so Zarr and xarray list the output without complaint)
    OUT.zarr/_bulk/manifest.json   {"parameters": {...}, "status": running|complete, ...}
    OUT.zarr/_bulk/done/<i>.<j>    {"attempt": ..., "backend": ..., "pixels": ...}, written after the chunk's data

``parameters`` are everything that decides the output's bytes: the model's checksum, the back
end asked for, chunk size and halo, the inputs (paths, bands, grid), probabilities, batch. A run
started on an output whose parameters differ is refused (unless ``overwrite``); with the same
parameters it skips the chunks that have a marker. A marker is written (temporary name, then
renamed) only after the chunk's arrays are written, so a killed task leaves no marker and its
chunk is recomputed whole; a chunk is written by exactly one task at a time (its own chunks of
every array: Zarr needs no lock).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path

from bdgf.errors import BDGFError

MANIFEST = Path("_bulk") / "manifest.json"
DONE = Path("_bulk") / "done"
FORMAT = 1


def model_checksum(package) -> str:
    """sha256 over what decides the package's outputs (graph files' checksums, classes, bands,
    statistics, geometry, noise), not its creation time: re-exports of the same weights match."""
    m = package.manifest
    keep = {k: m.get(k) for k in ("classes", "modalities", "geometry", "noise")}
    keep["files"] = {name: e.get("sha256") for name, e in sorted(m.get("files", {}).items())}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically (temporary name in the same folder, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def read_manifest(out: Path) -> dict | None:
    p = Path(out) / MANIFEST
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except ValueError as exc:
        raise BDGFError(f"{p}: unreadable bulk manifest ({exc}); pass --overwrite to start over") from exc


def check_parameters(out: Path, parameters: dict) -> dict:
    """The manifest of an existing output made with the same ``parameters``, else a BDGFError that
    names what differs."""
    old = read_manifest(out)
    if old is None:
        raise BDGFError(f"{out}: exists but is not a bulk classification output (no {MANIFEST}); "
                        "pass --overwrite to replace it")
    prev = old.get("parameters", {})
    diff = sorted(k for k in set(prev) | set(parameters) if prev.get(k) != parameters.get(k))
    if diff:
        raise BDGFError(f"{out}: made by another run (different {', '.join(diff)}); pass --overwrite to replace "
                        "it, or write to another output")
    return old


def new_manifest(parameters: dict) -> dict:
    return {"format": FORMAT, "parameters": parameters, "status": "running",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def done_keys(out: Path) -> set[str]:
    """Keys ("i.j") of the chunks marked done."""
    d = Path(out) / DONE
    return {p.name for p in d.iterdir() if not p.name.startswith(".")} if d.exists() else set()


def mark_done(out: Path, key: str, record: dict) -> None:
    d = Path(out) / DONE
    d.mkdir(parents=True, exist_ok=True)
    write_json(d / key, record)
