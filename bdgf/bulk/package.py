"""The model package a bulk run uses: given (``--model PKG``), or exported once from a run
(``--run RUN``) next to the output and reused while it still matches the run's checkpoints.

    pkg_dir = package_for_run("runs/demo", out="map.zarr")      # -> map.zarr.model/ (ONNX package)

Reuse rule: the package at ``<out>.model`` is reused when its manifest names this run directory
and every checkpoint it was exported from (``source.checkpoints``) still has the recorded
sha256; otherwise it is exported again (``bdgf.export.export_run``, ONNX, written under a
temporary name then renamed).
"""

from __future__ import annotations

import json
from pathlib import Path

from bdgf.errors import BDGFError


def package_dir_for(out: Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".model")


def _still_matches(pkg: Path, run: Path, seed: int | None) -> bool:
    from bdgf.export import sha256_file

    try:
        m = json.loads((pkg / "model.json").read_text())
        src = m["source"]
        if Path(src["run"]) != run.resolve() or (seed is not None and int(src["seed"]) != seed):
            return False
        if "onnx" not in {e.get("format") for e in m["files"].values()}:
            return False
        return all((run / e["file"]).exists() and sha256_file(run / e["file"]) == e["sha256"]
                   for e in src["checkpoints"].values())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def package_for_run(run: str | Path, out: str | Path, seed: int | None = None) -> tuple[Path, bool]:
    """(package directory, exported now?) for run directory ``run`` and output ``out``."""
    from bdgf.export import export_run

    run = Path(run)
    if not run.is_dir():
        raise BDGFError(f"{run}: no run directory there")
    pkg = package_dir_for(Path(out))
    if pkg.exists() and _still_matches(pkg, run, seed):
        return pkg, False
    export_run(run, pkg, ("onnx",), seed=seed, overwrite=True)
    return pkg, True
