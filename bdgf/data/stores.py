"""Opening the scene stores a stage reads, with one clear error for each way that can fail."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from bdgf.data.scene import Scene
from bdgf.errors import BDGFError, StoreError


def open_stores(paths: Iterable[str | os.PathLike], where: str = "driver") -> list[Scene]:
    """Open every store (a clear error naming the path and who could not read it: the driver,
    a worker on another node); all must share one band layout (modalities in order, band counts)."""
    scenes = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise StoreError(f"{where}: scene store {p} does not exist or is not readable from {where}")
        if not os.access(p, os.R_OK | os.X_OK):
            raise StoreError(f"{where}: scene store {p} is not readable (permission denied)")
        try:
            scenes.append(Scene.open(p))
        except BDGFError:
            raise
        except Exception as exc:  # noqa: BLE001 - zarr/OS errors: name the store and the reader
            raise StoreError(f"{where}: cannot read scene store {p}: {type(exc).__name__}: {exc}") from exc
    if not scenes:
        raise StoreError(f"{where}: no scene store given")
    layout = [(m.name, m.bands) for m in scenes[0].meta.modalities]
    for s in scenes[1:]:
        other = [(m.name, m.bands) for m in s.meta.modalities]
        if other != layout:
            raise StoreError(
                f"stores {scenes[0].path} and {s.path} have different band layouts: {layout} vs {other}; "
                "multi-scene pretraining needs the same modalities with the same band counts")
    return scenes
