"""The HTTP endpoint's latency and throughput against the in-process back end on the same rasters.

A local Ray + Serve on 127.0.0.1 (bdgf.serve_app.start, the application `bdgf serve` runs) over a
model package: ``--package PKG``, else ``--run RUN`` exported to ONNX, else a run with seeded random
weights on the tiny synthetic scene (tests/test_export_package.make_random_run; cost does not
depend on the weights). Each request is one raster of ``--size`` × ``--size`` pixels (all bands,
.npy by default; ``--format tiff|json``), classified whole (T×T tiles, reflect-padded halo).

Measured, per concurrency level (closed loop: ``c`` client threads, each posting its next request
when the last one is answered, ``--requests`` requests per level, after ``--warmup`` requests):

* latency p50 / p99 of a request (client round trip), in ms;
* throughput: requests/s, tiles/s, pixels/s over the level's wall time;
* in-process: ``classify_region(open_backend(pkg), raster)`` on the same rasters in this process
  (median of ``--requests`` runs, the same ONNX Runtime threads as a replica); overhead = the
  endpoint's p50 at concurrency 1 − the in-process median (HTTP, parsing, the ingress → model
  hop, the batcher's wait, formatting); the answers' ``Server-Timing`` (back-end calls, model
  replica, ingress handler) says where it goes, and round trip − back-end calls of the same
  requests is the overhead that does not depend on how loaded the machine was when the
  in-process time was taken; ``GET /healthz`` is the HTTP + proxy floor.

Goals reported (not asserted): p50 overhead ≤ 5 ms per request; throughput at concurrency 8 above
concurrency 1 (batching of tiles across requests). The model deployment gets ``--num-cpus`` CPUs
and as many ONNX Runtime threads; ``--batch-wait`` is its batch_wait_timeout_s.

    .venv/bin/python benchmarks/bench_serving.py [--size 32] [--requests 200] [--concurrency 1 8 32]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(ROOT),) if p not in sys.path]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_package(args) -> Path:
    from typer.testing import CliRunner

    from bdgf.cli import app

    if args.package:
        return Path(args.package)
    work = Path(args.work)
    pkg = work / "pkg"
    if (pkg / "model.json").exists() and not args.run:
        return pkg
    work.mkdir(parents=True, exist_ok=True)
    run = args.run
    if run is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from test_export_package import make_random_run

        _, run = make_random_run(work)
    res = CliRunner().invoke(app, ["export", str(run), "--format", "onnx", "--out", str(pkg), "--overwrite"])
    if res.exit_code != 0:
        raise SystemExit(f"export failed: {res.output}")
    return pkg


def encode(x: np.ndarray, fmt: str) -> tuple[bytes, str]:
    from bdgf.serve_formats import to_npy, write_tiff

    if fmt == "npy":
        return to_npy(x), "application/x-npy"
    if fmt == "tiff":
        return write_tiff(x), "image/tiff"
    doc = {"data": base64.b64encode(x.astype("<f4").tobytes()).decode(), "shape": list(x.shape)}
    return json.dumps(doc).encode(), "application/json"


def server_timing(header: str) -> dict[str, float]:
    """``Server-Timing: ingress;dur=12.3, model;dur=...`` -> {name: ms}."""
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            out[name] = float(dur)
    return out


def level(url: str, bodies: list[bytes], media: str, concurrency: int, n: int):
    """(latencies in s, wall time, the answers' Server-Timing) of ``n`` requests from
    ``concurrency`` closed-loop threads."""
    import requests

    session_per_thread = {}

    def one(i: int) -> float:
        import threading

        s = session_per_thread.setdefault(threading.get_ident(), requests.Session())
        t0 = time.perf_counter()
        r = s.post(f"{url}/v1/classify", data=bodies[i % len(bodies)], headers={"Content-Type": media}, timeout=600)
        dt = time.perf_counter() - t0
        if r.status_code != 200:
            raise SystemExit(f"request failed: {r.status_code} {r.text[:300]}")
        return dt, server_timing(r.headers.get("Server-Timing", ""))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        got = list(pool.map(one, range(n)))
    return [g[0] for g in got], time.perf_counter() - t0, [g[1] for g in got]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--package", default=None, help="a model package (default: make one)")
    ap.add_argument("--run", default=None, help="a run to export (default: seeded random weights)")
    ap.add_argument("--work", default="/tmp/bdgf_bench/serving")
    ap.add_argument("--size", type=int, default=32, help="raster side in pixels (one request)")
    ap.add_argument("--format", choices=("npy", "tiff", "json"), default="npy")
    ap.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--num-cpus", type=float, default=1.0, help="CPUs (and ORT threads) of the model replica")
    ap.add_argument("--batch-wait", type=float, default=0.005, help="batch_wait_timeout_s")
    args = ap.parse_args(argv)

    threads = str(max(1, int(args.num_cpus)))
    os.environ["BDGF_ORT_THREADS"] = threads
    os.environ.setdefault("OMP_NUM_THREADS", threads)
    import ray
    from ray import serve

    from bdgf.backends import ModelPackage, open_backend
    from bdgf.regions import classify_region
    from bdgf.serve_app import start
    from bdgf.serve_config import DEFAULTS

    pkg = make_package(args)
    p = ModelPackage.open(pkg)
    rng = np.random.default_rng(0)
    rasters = [(p.mean[:, None, None] + p.std[:, None, None] * rng.standard_normal((p.channels, args.size, args.size)))
               .astype(np.float32) for _ in range(4)]
    per_side = -(-args.size // p.tile_size)
    tiles = per_side * per_side
    encoded = [encode(x, args.format) for x in rasters]
    bodies, media = [b for b, _ in encoded], encoded[0][1]

    backend = open_backend(pkg)
    for x in rasters:
        classify_region(backend, x)

    def in_process(n: int) -> float:
        """Median seconds of classify_region on the same rasters, in this process."""
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            classify_region(backend, rasters[i % len(rasters)])
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    cfg = {**DEFAULTS, "max_ongoing_requests": max(args.concurrency), "max_queued_requests": 4 * max(args.concurrency),
           "num_cpus": args.num_cpus, "ingress_num_cpus": 0.0, "batch_wait_timeout_s": args.batch_wait}
    ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"BDGF_ORT_THREADS": threads, "OMP_NUM_THREADS": threads}})
    try:
        url = start(pkg, cfg, host="127.0.0.1", port=free_port())
        level(url, bodies, media, 1, args.warmup)
        import requests

        with requests.Session() as sess:  # the floor: HTTP + proxy + ingress, no model hop
            hz = []
            for _ in range(max(20, args.requests // 2)):
                t0 = time.perf_counter()
                sess.get(f"{url}/healthz", timeout=60)
                hz.append(time.perf_counter() - t0)
        rows = []
        for c in args.concurrency:  # the in-process time beside each level, under the same load
            base = in_process(max(10, args.requests // 4))
            lat, wall, timing = level(url, bodies, media, c, args.requests)
            rows.append((c, np.percentile(lat, 50) * 1e3, np.percentile(lat, 99) * 1e3, args.requests / wall,
                         args.requests * tiles / wall, args.requests * args.size ** 2 / wall, base))
            if c == min(args.concurrency):
                split = {k: np.median([t[k] for t in timing]) for k in ("ingress", "model", "backend")}
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"bench_serving: {args.size}x{args.size} px rasters ({p.channels} bands, {tiles} tiles of {p.tile_size} px, "
          f"window {p.window_size} px), {args.format}, {args.requests} requests per level, model replica "
          f"{args.num_cpus:g} CPU, batch_wait {args.batch_wait * 1e3:g} ms, {os.cpu_count()} cores")
    print(f"GET /healthz (HTTP + proxy + ingress, no model hop): p50 {np.percentile(hz, 50) * 1e3:.1f} ms")
    print("| concurrency | p50 ms | p99 ms | requests/s | tiles/s | pixels/s | in-process ms (tiles/s) | p50 - in-process ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c, p50, p99, rps, tps, pps, base in rows:
        print(f"| {c} | {p50:.1f} | {p99:.1f} | {rps:.1f} | {tps:.0f} | {pps:.0f} | {base * 1e3:.1f} ({tiles / base:.0f}) "
              f"| {p50 - base * 1e3:+.1f} |")
    one = {r[0]: r for r in rows}
    print(f"where a request's time goes at concurrency {min(args.concurrency)} (Server-Timing medians): "
          f"back-end calls {split['backend']:.1f} ms, model replica {split['model']:.1f} ms, ingress handler "
          f"{split['ingress']:.1f} ms, client round trip {rows[0][1]:.1f} ms")
    if 1 in one:
        over = one[1][1] - split["backend"]
        print(f"goal p50 overhead <= 5 ms at concurrency 1: {over:.1f} ms = round trip - back-end calls of the same "
              f"requests ({'met' if over <= 5 else 'not met'}); vs the in-process median: {one[1][1] - one[1][6] * 1e3:+.1f} ms")
    if 1 in one and 8 in one:
        print(f"goal throughput at concurrency 8 above 1: {one[8][4]:.0f} vs {one[1][4]:.0f} tiles/s "
              f"({'met' if one[8][4] > one[1][4] else 'not met'})")


if __name__ == "__main__":
    main()
