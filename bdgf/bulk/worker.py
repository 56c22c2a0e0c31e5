"""What runs inside a Dask worker: one model per worker process, and the task of one chunk.

    out = classify_chunk(ChunkTask(...))     # reads the window with halo, classifies, writes, marks done

The model (a :class:`bdgf.backends.Backend`) is loaded once per worker process and kept in
:data:`_MODELS`, keyed by (package path, back end, ONNX Runtime threads): tasks carry only the
package's path, never the model. Before the first load the process's ``BDGF_ORT_THREADS`` is set
to the worker's thread budget per task (``threads``), unless already set, so that N workers × 1
thread each do not oversubscribe the cores.

Memory allocator: a Dask nanny starts its worker with ``MALLOC_TRIM_THRESHOLD_=65536``, which
turns off glibc's adaptive mmap threshold: every window and noise batch (megabytes each) is then
mmap'd and unmapped anew, page by page (measured: 30× the page faults and +55 % CPU per pixel).
:func:`tune_malloc` (called with the first model load) sets glibc's mmap threshold to 64 MiB and
its trim threshold to 256 MiB in the worker process, so those buffers are reused from the heap.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bdgf.bulk.inputs import Mosaic
from bdgf.bulk.outputs import write_chunk
from bdgf.bulk.plan import Chunk, ChunkPlan
from bdgf.bulk.resume import mark_done

_MODELS: dict[tuple[str, str, int], object] = {}
_LOCK = threading.Lock()


def tune_malloc() -> bool:
    """glibc only: mmap threshold 64 MiB, trim threshold 256 MiB (see the module docstring).
    Returns whether it applied."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or "libc.so" not in name:
        return False
    try:
        libc = ctypes.CDLL(name)
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 64 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 256 << 20))
    except (OSError, AttributeError):
        return False


def model_for(package: str, backend: str | None, threads: int):
    """The worker process's Backend for ``package`` (loaded on first use, then reused)."""
    key = (package, backend or "auto", int(threads))
    with _LOCK:
        if key not in _MODELS:
            from bdgf.backends import open_backend

            os.environ.setdefault("BDGF_ORT_THREADS", str(max(1, int(threads))))
            tune_malloc()
            _MODELS[key] = open_backend(package, backend)
        return _MODELS[key]


@dataclass(frozen=True)
class ChunkTask:
    """Everything one chunk's task needs (small and picklable: paths, not data or models)."""

    mosaic: Mosaic
    plan: ChunkPlan
    chunk: Chunk
    package: str
    backend: str | None
    out: str
    probabilities: bool = False
    batch: int = 16
    threads: int = 1
    attempt: str = ""


def classify_chunk(task: ChunkTask) -> dict:
    """Classify ``task.chunk`` from its window with halo, write it into the output, mark it done.
    Returns {"key", "pixels", "backend", "seconds", "pid"}. A read error is an InputError naming
    the file and window; the chunk is then not marked done."""
    from bdgf.regions import classify_region

    t0 = time.perf_counter()
    model = model_for(task.package, task.backend, task.threads)
    c = task.chunk
    top, left, bottom, right = task.plan.read_window(c)
    image = task.mosaic.read(top, bottom, left, right)
    out = classify_region(model, image, origin=(top, left), region=(c.r0 - top, c.c0 - left, c.h, c.w),
                          probabilities=task.probabilities, batch=task.batch)
    write_chunk(Path(task.out), c.r0, c.c0, out)
    record = {"attempt": task.attempt, "backend": model.name, "pixels": c.pixels, "pid": os.getpid(),
              "seconds": round(time.perf_counter() - t0, 4)}
    mark_done(Path(task.out), c.key, record)
    return {"key": c.key, **record}
