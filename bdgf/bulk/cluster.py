"""The Dask cluster a bulk run uses: an existing scheduler named by address, else a local one.

    with dask_client(scheduler="tcp://10.0.0.5:8786") as client: ...    # fails in ~CONNECT_TIMEOUT s, naming it
    with dask_client(workers=2, threads=1) as client: ...               # LocalCluster of processes
    with dask_client(workers=2, gpu=True) as client: ...                # dask-cuda's LocalCUDACluster

A local cluster is processes (``workers`` of them, default: the CPUs / ``threads``) with
``threads`` threads each; its dashboard is on a free port (``client.dashboard_link``). With
``gpu`` it is dask-cuda's LocalCUDACluster (one worker per visible GPU, or ``workers``), an
error naming what is missing when dask-cuda or a GPU is not there. Scripts that start a local
cluster need an ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

from bdgf.errors import BDGFError

CONNECT_TIMEOUT = 3  # seconds to wait for a named scheduler to answer


def gpu_missing() -> str | None:
    """Why a LocalCUDACluster cannot start here (None: it can)."""
    try:
        import dask_cuda  # noqa: F401
    except ImportError as exc:
        return f"dask-cuda is not installed ({exc})"
    from distributed.diagnostics import nvml

    try:
        count = nvml.device_get_count()
    except Exception as exc:  # noqa: BLE001 - pynvml raises its own types
        return f"NVML cannot count GPUs ({exc})"
    return None if count > 0 else "no CUDA device is visible"


def _local_cluster(workers: int | None, threads: int, gpu: bool):
    if gpu:
        why = gpu_missing()
        if why:
            raise BDGFError(f"cannot start a LocalCUDACluster: {why}")
        from dask_cuda import LocalCUDACluster

        return LocalCUDACluster(n_workers=workers, threads_per_worker=threads, dashboard_address=":0",
                                silence_logs=logging.ERROR)
    from distributed import LocalCluster

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = workers if workers is not None else max(1, cpus // max(1, threads))
    if n < 1 or threads < 1:
        raise BDGFError(f"a local cluster needs at least 1 worker and 1 thread, got {n} and {threads}")
    return LocalCluster(n_workers=n, threads_per_worker=threads, processes=True, dashboard_address=":0",
                        silence_logs=logging.ERROR)


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, workers: int | None = None, threads: int = 1,
                gpu: bool = False) -> Iterator:
    """A distributed Client: to ``scheduler`` (an address) or to a new local cluster, closed on exit."""
    from distributed import Client

    if scheduler:
        try:
            client = Client(scheduler, timeout=f"{CONNECT_TIMEOUT}s")
        except (OSError, TimeoutError) as exc:
            raise BDGFError(f"no Dask scheduler answers at {scheduler} (waited {CONNECT_TIMEOUT} s: "
                            f"{type(exc).__name__}: {exc}); start one with `dask scheduler` or leave out "
                            "--scheduler for a local cluster") from exc
        try:
            yield client
        finally:
            client.close()
        return
    cluster = _local_cluster(workers, threads, gpu)
    try:
        client = Client(cluster)
        try:
            yield client
        finally:
            client.close()
    finally:
        cluster.close()
