"""The diffusion-feature cache inside a scene store: its arrays, spec, per-tile flags, completeness.

    features/<level>   (F, H, W) float16, chunks (F, T, T): each tile owns whole chunks
    features/_done     (rows, cols) bool per tile, so an interrupted extraction resumes
    features attrs     {"spec": the extraction settings and checkpoint hash, "complete", "channels"}

The cache is valid for one spec (checkpoint hash, timesteps, draws, noise seed, tile, halo,
reduce); another spec replaces it. What computes the features lives in ``bdgf.diffusion``; this
module only keeps them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import zarr

from bdgf.errors import BDGFError
from bdgf.tiler import TileGrid, write_tile

GROUP = "features"


def cached_spec(store: str | Path) -> tuple[dict | None, bool]:
    """(spec dict, complete) of the features cached in a store, or (None, False)."""
    root = zarr.open_group(str(store), mode="r")
    if GROUP not in root:
        return None, False
    attrs = dict(root[GROUP].attrs)
    return attrs.get("spec"), bool(attrs.get("complete", False))


def prepare(store: str | Path, grid: TileGrid, spec: dict, channels: Mapping[str, int]) -> str:
    """Make ``features/`` ready for ``spec``: reuse, resume, or (re)create. Returns
    "reuse" | "resume" | "new" | "recompute" (the cached features were for another spec)."""
    root = zarr.open_group(str(store), mode="r+")
    old, complete = cached_spec(store)
    if old == spec:
        return "reuse" if complete else "resume"
    state = "recompute" if old is not None else "new"
    if GROUP in root:
        del root[GROUP]
    group = root.create_group(GROUP)
    T = grid.tile
    for name, f in channels.items():
        group.create_array(name, shape=(f, grid.height, grid.width), chunks=(f, T, T), dtype="float16",
                           dimension_names=(f"feature_{name}", "y", "x"), fill_value=0.0)
    group.create_array("_done", shape=grid.shape, chunks=(1, 1), dtype="bool", fill_value=False,
                       dimension_names=("tile_row", "tile_col"))
    group.attrs.update({"spec": spec, "complete": False, "channels": dict(channels)})
    return state


def pending(store: str | Path, grid: TileGrid, origins: Iterable) -> list[tuple[int, int]]:
    """The given tile origins whose features are not written yet."""
    done = zarr.open_group(str(store), mode="r")[GROUP]["_done"][...]
    todo = []
    for o in origins:
        i, j = grid.index(o)
        if not done[i, j]:
            todo.append((int(o[0]), int(o[1])))
    return todo


def open_for_writing(store: str | Path) -> zarr.Group:
    """The prepared ``features`` group, for :func:`write`."""
    return zarr.open_group(str(store), mode="r+")[GROUP]


def write(group: zarr.Group, grid: TileGrid, origin, features: Mapping[str, np.ndarray]) -> None:
    """Write one tile's features {level: (F, T, T)} as float16, then its ``_done`` flag."""
    write_tile({n: group[n] for n in features}, grid, origin,
               {n: np.asarray(v, np.float32).astype(np.float16) for n, v in features.items()})
    i, j = grid.index(origin)
    group["_done"][i, j] = True


def mark_complete(store: str | Path) -> bool:
    """Set ``complete`` when every tile is done; returns whether it is."""
    group = zarr.open_group(str(store), mode="r+")[GROUP]
    ok = bool(group["_done"][...].all())
    if ok:
        group.attrs["complete"] = True
    return ok


def ready_channels(store: str | Path, levels: Iterable[str]) -> dict[str, int]:
    """{level: F} of a complete cache, or a one-line error saying how to make one."""
    spec, complete = cached_spec(store)
    if spec is None or not complete:
        raise BDGFError(f"{store}: no complete diffusion features; run `bdgf features {store} --run RUN` first")
    group = zarr.open_group(str(store), mode="r")[GROUP]
    levels = list(levels)
    missing = [n for n in levels if n not in group]
    if missing:
        raise BDGFError(f"{store}: the cached features have no {missing} (they were computed with other "
                        f"settings, e.g. features.absent_variants: false); rerun `bdgf features {store} --run RUN` "
                        "with features.absent_variants: true")
    return {name: int(group[name].shape[0]) for name in levels}
