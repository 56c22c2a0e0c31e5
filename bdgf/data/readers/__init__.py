"""Readers for the benchmarks' native files; each returns a ``SceneData`` for ``write_scene``.

>>> scene = read_dataset("trento", hsi="Italy_hsi.mat", lidar="Italy_lidar.mat", gt="allgrd.mat")
>>> write_scene(scene, "trento.zarr")

Every dataset reader carves ``val`` from ``train`` (``carve_val``, 20 %, seeded; whole labelled
regions with a buffer ring by default, ``val_split="regions"|"blocks"|"random"``) unless called
with ``val_fraction=0``; the official split sizes are kept in ``SceneData.source``, the val
method and measured val-train distance in ``SceneData.val_split``.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

from bdgf.data.readers.augsburg import read_augsburg
from bdgf.data.readers.generic import read_generic
from bdgf.data.readers.houston2013 import read_houston2013
from bdgf.data.readers.muufl import read_muufl, read_muufl_demo_subimage
from bdgf.data.readers.trento import read_trento
from bdgf.data.scene import SceneData
from bdgf.errors import InputError

READERS: dict[str, Callable[..., SceneData]] = {
    "houston2013": read_houston2013,
    "trento": read_trento,
    "muufl": read_muufl,
    "augsburg": read_augsburg,
    "generic": read_generic,
}


def read_dataset(name: str, **paths) -> SceneData:
    """``READERS[name](**paths)``; string paths become Paths (generic's dicts are passed as given)."""
    key = name.lower()
    if key not in READERS:
        raise InputError(f"unknown dataset {name!r}; known: {', '.join(READERS)}")
    args = {k: Path(v) if isinstance(v, str) and k not in ("name", "val_split") else v for k, v in paths.items()}
    fn = READERS[key]
    try:
        inspect.signature(fn).bind(**args)
    except TypeError as exc:
        raise InputError(f"{name}: {exc} (reader signature: {fn.__name__}{inspect.signature(fn)})") from exc
    return fn(**args)


__all__ = [
    "READERS", "read_dataset", "read_houston2013", "read_trento", "read_muufl", "read_muufl_demo_subimage",
    "read_augsburg", "read_generic",
]
