"""Loading MATLAB .mat files, v5 (scipy.io.loadmat) and v7.3 (HDF5, h5py), with clear errors.

v7.3 files store arrays column-major, so h5py sees the axes reversed: a MATLAB (H, W, C) array
reads as (C, W, H). Every numeric array read here is transposed back, so both formats give the
MATLAB axis order. Structs become dicts (v7.3) or ``mat_struct`` objects (v5); ``field`` reads
a field from either, and from numpy structured arrays (``struct_as_record=True``).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import scipy.io

from bdgf.errors import InputError

_H5_SKIP = ("#refs#", "#subsystem#")


def check_file(path, what: str = "file") -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    return path


def is_v73(path: Path) -> bool:
    return h5py.is_hdf5(str(path))


def _h5_to_py(f: h5py.File, obj):
    """An HDF5 object of a v7.3 file as numpy / dict / list, in MATLAB axis order."""
    if isinstance(obj, h5py.Group):
        return {k: _h5_to_py(f, obj[k]) for k in obj.keys() if k not in _H5_SKIP}
    mclass = obj.attrs.get("MATLAB_class", b"")
    mclass = mclass.decode() if isinstance(mclass, bytes) else str(mclass)
    if obj.attrs.get("MATLAB_empty", 0):
        return np.zeros((0,))
    data = obj[()]
    if obj.dtype == h5py.ref_dtype:  # a cell array: references to its elements
        refs = np.asarray(data).T
        out = np.empty(refs.shape, object)
        for idx in np.ndindex(refs.shape):
            out[idx] = _h5_to_py(f, f[refs[idx]])
        return out
    data = np.asarray(data).T
    if mclass == "char":
        return "".join(map(chr, data.ravel(order="F")))
    if mclass == "logical":
        return data.astype(bool)
    return data


def load_mat(path) -> dict:
    """All variables of a .mat file (v5 or v7.3): {name: array / struct}, metadata dropped."""
    path = check_file(path, ".mat file")
    try:
        if is_v73(path):
            with h5py.File(path, "r") as f:
                return {k: _h5_to_py(f, f[k]) for k in f.keys() if k not in _H5_SKIP}
        raw = scipy.io.loadmat(str(path), squeeze_me=False, struct_as_record=False)
    except InputError:
        raise
    except Exception as exc:  # scipy and h5py raise many types for unreadable files
        raise InputError(f"{path}: not a readable MATLAB .mat file ({type(exc).__name__}: {exc})") from exc
    return {k: v for k, v in raw.items() if not k.startswith("__")}


def _is_array(v) -> bool:
    return isinstance(v, np.ndarray) and (np.issubdtype(v.dtype, np.number) or v.dtype == bool)


def load_mat_array(path, key: str | None = None) -> np.ndarray:
    """One numeric array of a .mat file, in MATLAB axis order.

    ``key`` is used when present; otherwise (or with ``key=None``) the file must hold exactly
    one numeric array. Anything else is an InputError naming the file and the keys found.
    """
    path = Path(path)
    data = load_mat(path)
    if key is not None and key in data:
        arr = data[key]
        if not _is_array(arr):
            raise InputError(f"{path}: variable {key!r} is not a numeric array (it is {type(arr).__name__})")
        return arr
    arrays = [k for k, v in data.items() if _is_array(v)]
    if len(arrays) == 1:
        return data[arrays[0]]
    wanted = f"no variable {key!r} and " if key is not None else ""
    raise InputError(
        f"{path}: {wanted}{len(arrays)} numeric arrays, cannot choose one; keys found: {sorted(data) or 'none'}"
    )


def split_key(spec) -> tuple[Path, str | None]:
    """'file.mat:key' -> (Path('file.mat'), 'key'); a plain path -> (path, None)."""
    s = str(spec)
    head, sep, tail = s.rpartition(":")
    if sep and head.lower().endswith(".mat") and tail and "/" not in tail and "\\" not in tail:
        return Path(head), tail
    return Path(s), None


def field(obj, name: str, where: str = "struct"):
    """Field ``name`` of a MATLAB struct as loaded by scipy (either layout) or h5py (dict).

    Size-1 object/struct arrays are unwrapped first; field names match case-insensitively.
    """
    obj = unwrap(obj)
    if isinstance(obj, dict):
        names = list(obj)
        get = obj.__getitem__
    elif isinstance(obj, scipy.io.matlab.mat_struct):
        names = list(obj._fieldnames)
        get = lambda n: getattr(obj, n)  # noqa: E731
    elif isinstance(obj, (np.ndarray, np.void)) and obj.dtype.names:
        names = list(obj.dtype.names)
        get = obj.__getitem__
    else:
        raise InputError(f"{where}: expected a struct with field {name!r}, found {type(obj).__name__}")
    for n in names:
        if n == name or n.lower() == name.lower():
            return unwrap(get(n))
    raise InputError(f"{where}: no field {name!r}; fields found: {names}")


def unwrap(obj):
    """Strip size-1 object / struct array wrappers that scipy puts around MATLAB values."""
    while isinstance(obj, np.ndarray) and (obj.dtype == object or obj.dtype.names) and obj.size == 1:
        obj = obj.reshape(-1)[0]
    return obj
