"""Bulk classification (`bdgf classify`, bdgf.bulk) against the pure back end on the same pixels,
peak memory per worker on two mosaics 4× apart in area, and a projection to 1e9 / 1e10 px.

Model (``bench_serving.make_package``): ``--package PKG``, else ``--run RUN`` exported to ONNX,
else a run with seeded random weights on the tiny synthetic scene (tests/test_export_package.
make_random_run; the cost does not depend on the weights). Mosaics:
``bdgf.bulk.synthetic.write_mosaic`` with the package's modalities (``--like`` tiny for the random
package, demo for a `bdgf demo` package), ``--side`` and 2 × ``--side``.

Measured (one ONNX Runtime thread per worker, ``--chunk`` px chunks, a fresh LocalCluster per run):

* in-process: ``classify_region(open_backend(pkg, "onnx"), mosaic)`` on the small mosaic held in
  memory, one ORT thread: the pure back-end time for its pixels (reads not counted);
* bulk: ``classify_mosaic`` on the same mosaic with 1 and 2 local workers (1 thread each): wall
  time of the Dask part (reads, classification, Zarr writes; not the cluster's start), pixels/s,
  and the ratio to the in-process time (goal ≤ 1.5× at 1 worker; at 2 workers against half the
  in-process time, i.e. perfect scaling);
* peak RSS per worker (``ru_maxrss`` of each worker process after the run, via ``client.run``)
  for the small mosaic and the one 4× larger (goal: it does not grow with the mosaic);
* CPU seconds (user + system) of the in-process call and of all the workers during the bulk
  run (``getrusage`` in each worker, via ``client.run``): on a machine shared with other jobs
  the wall-time ratios move with the load, the CPU-time ratio much less;
* projection: the per-pixel cost in CPU-seconds (from the 2-worker run on the larger mosaic) to the wall time and the
  node count of 1e9 and 1e10 px mosaics on CPU nodes of ``--node-cores`` cores; a GPU line from
  ``--gpu-speedup`` (an assumption, marked as an estimate: nothing is measured on a GPU here).

    .venv/bin/python benchmarks/bench_bulk.py [--side 384] [--chunk 128] [--work /tmp/bdgf_bench/bulk]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "benchmarks")) if p not in sys.path]

from bench_serving import make_package  # noqa: E402  --package, else --run exported, else a random run


def _vmhwm_kib() -> int:
    """This process's peak resident set (VmHWM, KiB). Not ru_maxrss: Linux carries that across
    exec, so a spawned worker would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def worker_peak_rss_mib(client) -> list[float]:
    """Peak resident memory (MiB) of each worker process so far."""
    return [round(v / 1024, 1) for v in client.run(_vmhwm_kib).values()]


def worker_cpu_s(client) -> float:
    """CPU seconds (user + system) used so far by all the workers together."""
    return sum(client.run(_cpu_s).values())


def bulk_run(pkg: Path, store: Path, out: Path, chunk: int, workers: int) -> dict:
    """classify_mosaic on a fresh LocalCluster of ``workers`` × 1 thread; its figures and the
    workers' peak RSS."""
    from distributed import Client, LocalCluster

    from bdgf.bulk import classify_mosaic

    shutil.rmtree(out, ignore_errors=True)
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            cpu0 = worker_cpu_s(client)
            r = classify_mosaic(out, package=pkg, scene=store, chunk=chunk, scheduler=cluster.scheduler_address,
                                threads=1, backend="onnx", progress=False, echo=lambda s: None)
            cpu = worker_cpu_s(client) - cpu0
            rss = worker_peak_rss_mib(client)
    return {"workers": workers, "pixels": r.pixels, "seconds": r.seconds, "px_s": r.pixels / r.seconds,
            "cpu_s": cpu, "peak_rss_mib": rss}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--package", default=None)
    p.add_argument("--run", default=None, help="a run directory to export (instead of --package)")
    p.add_argument("--like", default="tiny", help="synthetic preset whose modalities the mosaics have")
    p.add_argument("--side", type=int, default=384, help="side of the small mosaic (the large one is 2x)")
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--node-cores", type=int, default=32)
    p.add_argument("--gpu-speedup", type=float, default=40.0, help="assumed GPU / one CPU core (estimate)")
    p.add_argument("--work", default="/tmp/bdgf_bench/bulk")
    args = p.parse_args(argv)

    os.environ["BDGF_ORT_THREADS"] = "1"
    import numpy as np
    import torch

    torch.set_num_threads(1)  # the noise's torch ops: one thread, as in a Dask worker (OMP_NUM_THREADS=1)

    from bdgf.backends import open_backend
    from bdgf.bulk.inputs import open_mosaic
    from bdgf.bulk.synthetic import write_mosaic
    from bdgf.regions import classify_region

    work = Path(args.work)
    pkg = make_package(args)
    small = write_mosaic(work / f"mosaic{args.side}.zarr", args.side, seed=1, like=args.like, overwrite=True)
    large = write_mosaic(work / f"mosaic{2 * args.side}.zarr", 2 * args.side, seed=1, like=args.like, overwrite=True)

    mosaic = open_mosaic(small)
    image = mosaic.read(0, mosaic.height, 0, mosaic.width)
    backend = open_backend(pkg, "onnx")
    t0, c0 = time.perf_counter(), time.process_time()
    whole = classify_region(backend, image)
    inproc, inproc_cpu = time.perf_counter() - t0, time.process_time() - c0
    npx = mosaic.height * mosaic.width
    rows = {"in_process": {"pixels": npx, "seconds": inproc, "px_s": npx / inproc, "cpu_s": inproc_cpu}}
    rows["bulk_1w"] = bulk_run(pkg, small, work / "out1.zarr", args.chunk, 1)
    rows["bulk_2w"] = bulk_run(pkg, small, work / "out2.zarr", args.chunk, 2)
    rows["bulk_2w_4x"] = bulk_run(pkg, large, work / "out4x.zarr", args.chunk, 2)
    import zarr

    same = bool((zarr.open_array(str(work / "out2.zarr" / "classes"))[...] == whole.classes).all())

    print(f"bulk classification, package {pkg} (tile {backend.package.tile_size}, halo {backend.package.halo}), "
          f"chunk {args.chunk}, 1 ORT thread per worker, {os.cpu_count()} CPUs")
    print(f"{'run':<34}{'pixels':>11}{'wall s':>8}{'px/s':>9}{'wall vs ideal':>14}{'CPU s':>8}"
          f"{'CPU µs/px':>10}{'CPU vs in-proc':>15}  peak RSS/worker MiB")
    for name, r in rows.items():
        ideal = inproc * r["pixels"] / npx / r.get("workers", 1)
        ratio = r["seconds"] / ideal
        cpu_px = r["cpu_s"] / r["pixels"]
        cpu_ratio = cpu_px / (inproc_cpu / npx)
        label = {"in_process": f"classify_region in-process {args.side}²",
                 "bulk_1w": f"bulk 1 worker {args.side}²", "bulk_2w": f"bulk 2 workers {args.side}²",
                 "bulk_2w_4x": f"bulk 2 workers {2 * args.side}² (4x area)"}[name]
        print(f"{label:<34}{r['pixels']:>11,}{r['seconds']:>8.1f}{r['px_s']:>9,.0f}{ratio:>13.2f}x"
              f"{r['cpu_s']:>8.1f}{cpu_px * 1e6:>10.1f}{cpu_ratio:>14.2f}x  {r.get('peak_rss_mib', '')}")
    print(f"bulk map == in-process map on the {args.side}² mosaic: {same}")
    grow = max(rows["bulk_2w_4x"]["peak_rss_mib"]) / max(rows["bulk_2w"]["peak_rss_mib"])
    print(f"peak RSS per worker, 4x the area: x{grow:.2f} (goal: does not grow)")

    core_s_per_px = rows["bulk_2w_4x"]["cpu_s"] / rows["bulk_2w_4x"]["pixels"]
    print(f"\nprojection from {core_s_per_px * 1e6:.1f} CPU-µs per pixel (bulk, 2 workers x 1 thread, the 4x mosaic; "
          "CPU time, not wall: this machine's cores are shared), "
          f"CPU nodes of {args.node_cores} cores, perfect scaling across chunks:")
    print(f"{'mosaic':>8}{'core-hours':>12}{'1 node':>12}{'10 nodes':>12}{'nodes for 1 h':>15}{'GPU (estimate)':>16}")
    for n in (1e9, 1e10):
        core_h = n * core_s_per_px / 3600
        gpu_h = core_h / args.gpu_speedup
        print(f"{n:>8.0e}{core_h:>12,.0f}{core_h / args.node_cores:>11,.1f}h{core_h / args.node_cores / 10:>11,.1f}h"
              f"{int(np.ceil(core_h / args.node_cores)):>15,}{gpu_h:>14,.1f}h")
    print(f"(GPU: one GPU ≈ {args.gpu_speedup:g} CPU cores for this graph, an assumption, not measured here)")
    (work / "results.json").write_text(json.dumps({"rows": rows, "core_s_per_px": core_s_per_px, "same": same},
                                                  indent=1))


if __name__ == "__main__":
    main()
