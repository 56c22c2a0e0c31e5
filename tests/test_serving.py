"""The HTTP endpoint (bdgf.serve_app via serving/app.py): a real local Ray + Serve on 127.0.0.1 at a
free port, real HTTP. A raster in (GeoTIFF, .npy, base64 JSON) gives exactly the classes of the
in-process pipeline (classify_region on the back end) and the GeoTIFF keeps its georeference;
concurrent requests with different absent sets are batched correctly; bad input is a 4xx JSON
error naming the problem; a burst beyond the queue gets quick 503s while /healthz stays 200 and the
rest are correct; the client command writes a georeferenced map; a killed model replica is
replaced. bdgf.serve_api and bdgf.serve_config are also checked without Serve."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from rasterio.crs import CRS
from rasterio.io import MemoryFile
from rasterio.transform import Affine, from_origin
from typer.testing import CliRunner

from bdgf import serve_api
from bdgf.backends import ModelPackage, open_backend
from bdgf.regions import TileJob, classify_jobs, classify_region
from bdgf.serve_formats import to_npy
from test_export_package import export_random_run

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
NPY = {"Content-Type": "application/x-npy"}
TIFF = {"Content-Type": "image/tiff"}
LIMIT = 1 << 21  # max_body_bytes of the test's config
MAX_PIXELS = 160 * 160
CRS_UTM = CRS.from_epsg(32615)
GEO = from_origin(500000.0, 4000000.0, 2.0, 2.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    return export_random_run(tmp_path_factory.mktemp("serving"))[2]


@pytest.fixture(scope="module")
def backend(pkg):
    return open_backend(pkg)


@pytest.fixture(scope="module")
def url(pkg, tmp_path_factory):
    """The application on 127.0.0.1 at a free port (one Ray + Serve for the module): a small
    queue (2 ongoing + 2 queued requests on one model replica) so that a burst overflows it."""
    import ray
    from ray import serve

    from serving.app import build  # noqa: F401 - the deployment entry point imports and builds

    cfg = tmp_path_factory.mktemp("cfg") / "serve.yaml"
    cfg.write_text(f"serve:\n  max_ongoing_requests: 2\n  max_queued_requests: 2\n  max_body_bytes: {LIMIT}\n"
                   f"  max_pixels: {MAX_PIXELS}\n  batch_wait_timeout_s: 0.02\n  num_cpus: 1\n"
                   f"  ingress_num_cpus: 0\n  health_check_period_s: 1\n")
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "BDGF_ORT_THREADS": "1"}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})
    try:
        from bdgf.serve_app import start

        yield start(pkg, cfg, host="127.0.0.1", port=free_port())
    finally:
        serve.shutdown()
        ray.shutdown()


def raster(pkg, h, w, seed=0) -> np.ndarray:
    p = ModelPackage.open(pkg)
    rng = np.random.default_rng(seed)
    return (p.mean[:, None, None] + p.std[:, None, None] * rng.standard_normal((p.channels, h, w))).astype(np.float32)


def tiff_bytes(x, crs=CRS_UTM, transform=GEO, nodata=None) -> bytes:
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=x.shape[2], height=x.shape[1], count=x.shape[0], dtype=x.dtype.name,
                      crs=crs, transform=transform, nodata=nodata) as ds:
            ds.write(x)
        return mem.read()


def read_tiff(body: bytes):
    with MemoryFile(body) as mem, mem.open() as ds:
        return ds.read(), ds.crs, ds.transform, ds.nodata, ds.descriptions


def test_bdgf_serve_prints_its_url_serves_and_stops_on_ctrl_c(pkg, tmp_path):
    """`bdgf serve` in its own process (its own local Ray; runs before the module's Serve starts)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BDGF_ORT_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-c", "from bdgf.cli import main; main()", "serve", str(pkg),
                             "--port", str(port), "--config", str(REPO / "infra" / "serve.yaml")],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while f"at http://127.0.0.1:{port}" not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        r = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=30)
        assert r.status_code == 200 and r.json()["status"] == "ok"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10)


def test_a_geotiff_gives_the_in_process_classes_and_keeps_its_georeference(pkg, backend, url):
    x = raster(pkg, 40, 52)
    x[:, 21, 30] = np.nan  # nodata inside the region
    x[0, 33, 40] = -9999.0  # the GeoTIFF's nodata value: nodata too
    want = classify_region(backend, np.where(x == -9999.0, np.nan, x), origin=(8, 12))
    r = requests.post(f"{url}/v1/classify", params={"row": 8, "col": 12}, data=tiff_bytes(x, nodata=-9999.0),
                      headers=TIFF, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("image/tiff")
    bands, crs, transform, nodata, names = read_tiff(r.content)
    np.testing.assert_array_equal(bands[0], want.classes)
    np.testing.assert_array_equal(bands[1], want.confidence)
    assert crs == CRS_UTM and transform == GEO and nodata == 0 and names == ("classes", "confidence")
    assert bands[0][21, 30] == 0 and bands[0][33, 40] == 0 and int(r.headers["X-BDGF-Nodata-Pixels"]) == 2
    timing = dict(part.strip().split(";dur=") for part in r.headers["Server-Timing"].split(","))
    assert set(timing) == {"model", "backend", "ingress"}
    assert 0 < float(timing["backend"]) <= float(timing["model"]) <= float(timing["ingress"])
    # a region with real context around it: the transform moves by the region's offset
    region = (4, 8, 28, 36)
    want = classify_region(backend, x, origin=(8, 12), region=region)
    r = requests.post(f"{url}/v1/classify?row=8&col=12&region=4,8,28,36", data=tiff_bytes(x), headers=TIFF,
                      timeout=60)
    assert r.status_code == 200, r.text
    bands, crs, transform, _, _ = read_tiff(r.content)
    np.testing.assert_array_equal(bands[0], want.classes)
    assert crs == CRS_UTM and transform == GEO * Affine.translation(8, 4)
    assert transform.c == 500000.0 + 2 * 8 and transform.f == 4000000.0 - 2 * 4


def test_the_old_single_window_and_npy_json_formats(pkg, backend, url):
    p = backend.package
    window = raster(pkg, p.window_size, p.window_size, 1)
    window[:, p.halo + 3, p.halo + 5] = np.nan
    want = backend.classify(window[None], [(16, 32)])  # the tile at (16, 32) seen through its window
    h = p.halo
    r = requests.post(f"{url}/v1/classify", params={"row": 16 - h, "col": 32 - h, "region": f"{h},{h},16,16"},
                      data=to_npy(window), headers=NPY, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/x-npy")
    got = np.load(io.BytesIO(r.content))
    assert got.dtype == want.classes.dtype and got.shape == (16, 16)
    np.testing.assert_array_equal(got, want.classes[0])
    assert got[3, 5] == 0 and r.headers["X-BDGF-Nodata-Pixels"] == "1"
    # base64 JSON in, JSON out with probabilities; parameters in the body
    x = raster(pkg, 36, 44, 2)
    want = classify_region(backend, x, origin=(4, 8), probabilities=True)
    doc = {"data": base64.b64encode(x.astype("<f4").tobytes()).decode(), "shape": list(x.shape), "dtype": "float32",
           "row": 4, "col": 8, "probabilities": True}
    r = requests.post(f"{url}/v1/classify", json=doc, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    np.testing.assert_array_equal(np.array(out["classes"]), want.classes)
    np.testing.assert_array_equal(np.array(out["confidence"]), want.confidence)
    np.testing.assert_allclose(np.array(out["probabilities"]), want.probabilities, atol=1e-6)
    assert out["nodata_pixels"] == 0 and out["origin"] == [4, 8] and out["class_names"] == p.class_names
    # .npy in, GeoTIFF out (Accept): no georeference to keep; probabilities stacked as bands 3..
    r = requests.post(f"{url}/v1/classify?row=4&col=8&probabilities=true", data=to_npy(x), timeout=60,
                      headers={**NPY, "Accept": "image/tiff"})
    assert r.status_code == 200, r.text
    bands, crs, _, _, names = read_tiff(r.content)
    assert crs is None and bands.shape == (2 + p.num_classes, 36, 44) and names[2] == f"p:{p.class_names[0]}"
    np.testing.assert_array_equal(bands[0], want.classes)
    np.testing.assert_allclose(bands[2:], want.probabilities, atol=1e-6)


def test_concurrent_requests_with_different_absent_sets(pkg, backend, url):
    """Two requests at once are batched into shared back-end calls; an absent set is never mixed."""
    x = raster(pkg, 32, 48, 3)
    cases = [(), ("lidar",), (), ("lidar",)]
    want = [classify_region(backend, x, absent=a).classes for a in cases]

    def post(absent):
        for _ in range(20):  # the module's queue is tiny (2 + 2): a 503 is the documented "retry later"
            r = requests.post(f"{url}/v1/classify", params={"absent": ",".join(absent)}, data=to_npy(x),
                              headers=NPY, timeout=60)
            if r.status_code != 503:
                return r
            time.sleep(float(r.headers.get("Retry-After", 1)) / 2)
        return r

    with ThreadPoolExecutor(len(cases)) as pool:
        replies = list(pool.map(post, cases))
    for r, w in zip(replies, want):
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(np.load(io.BytesIO(r.content)), w)
    assert not np.array_equal(want[0], want[1])  # the absent modality changes the answer


def test_model_and_health(pkg, url):
    r = requests.get(f"{url}/v1/model", timeout=30)
    assert r.status_code == 200 and r.json() == json.loads((pkg / "model.json").read_text())
    r = requests.get(f"{url}/healthz", timeout=30)
    assert r.status_code == 200 and r.json() == {"status": "ok", "backend": "onnx"}


def test_bad_inputs_are_json_errors_naming_the_problem(pkg, url):
    x = raster(pkg, 24, 24)
    C = x.shape[0]
    big = int(np.sqrt(MAX_PIXELS)) + 8
    doc = {"data": base64.b64encode(x.tobytes()).decode(), "shape": list(x.shape)}
    cases = [
        (to_npy(x[:-1]), NPY, "", 422, "wrong band count"),
        (tiff_bytes(x[:-1]), TIFF, "", 422, "wrong band count"),
        (to_npy(x[0]), NPY, "", 422, "wrong shape"),
        (to_npy(x.astype(np.float64)), NPY, "", 422, "dtype float64"),
        (tiff_bytes(x.astype(np.float64)), TIFF, "", 422, "dtype float64"),
        (json.dumps({**doc, "dtype": "float16"}).encode(), {"Content-Type": "application/json"}, "", 422,
         "dtype float16"),
        (b"not an npy file", NPY, "", 400, "not a valid .npy"),
        (b"II*\0 broken", TIFF, "", 400, "not a readable GeoTIFF"),
        (b"{\"data\": ", {"Content-Type": "application/json"}, "", 400, "not valid JSON"),
        (json.dumps({**doc, "data": "***"}).encode(), {"Content-Type": "application/json"}, "", 400,
         "not valid base64"),
        (json.dumps({**doc, "shape": [C, 24, 23]}).encode(), {"Content-Type": "application/json"}, "", 422,
         "needs"),
        (json.dumps({**doc, "absent": 5}).encode(), {"Content-Type": "application/json"}, "", 422,
         "parameter 'absent'"),
        (json.dumps({**doc, "region": [0, 0, "x", 8]}).encode(), {"Content-Type": "application/json"}, "", 422,
         "parameter 'region'"),
        (b"", NPY, "", 400, "empty body"),
        (b"", TIFF, "", 400, "empty body"),
        (to_npy(x), {"Content-Type": "image/png"}, "", 415, "content type"),
        (b"\0" * (LIMIT + 1), NPY, "", 413, "over the limit"),
        (tiff_bytes(np.zeros((C, big, big), np.uint8)), TIFF, "", 413, "pixels is over the limit"),
        (to_npy(x), NPY, "?row=a", 422, "whole number"),
        (to_npy(x), NPY, "?row=1", 422, "stride phase"),
        (to_npy(x), NPY, "?region=0,0,30,8", 422, "not inside"),
        (to_npy(x), NPY, "?region=0,0", 422, "r0,c0,h,w"),
        (to_npy(x), NPY, "?absent=radar", 422, "unknown modalities"),
        (to_npy(x), NPY, "?absent=hsi,lidar", 422, "every modality is absent"),
        (to_npy(x), NPY, "?probabilities=maybe", 422, "true or false"),
        (to_npy(x), NPY, "?regoin=0,0,8,8", 422, "unknown parameters ['regoin']"),
    ]
    for body, headers, query, status, words in cases:
        r = requests.post(f"{url}/v1/classify{query}", data=body, headers=headers, timeout=60)
        assert r.status_code == status, (words, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json")
        assert words in r.json()["error"], (words, r.json())
    for method, path, status in [("GET", "/v1/classify", 405), ("POST", "/v2/classify", 404)]:
        r = requests.request(method, f"{url}{path}", timeout=60)
        assert r.status_code == status and path in r.json()["error"] and "POST /v1/classify" in r.json()["error"]
    msg = requests.post(f"{url}/v1/classify", data=to_npy(x[:-1]), headers=NPY, timeout=60).json()["error"]
    assert f"({C}, H, W)" in msg and "hsi" in msg and "lidar" in msg
    # NaN/inf are nodata, not errors
    x[:, 2, 3], x[1, 5, 6] = np.nan, np.inf
    r = requests.post(f"{url}/v1/classify", data=to_npy(x), headers={**NPY, "Accept": "application/json"},
                      timeout=60)
    assert r.status_code == 200 and r.json()["nodata_pixels"] == 2 and r.headers["X-BDGF-Nodata-Pixels"] == "2"


def test_the_client_writes_a_georeferenced_map(pkg, backend, url, tmp_path):
    from bdgf.cli import app

    x = raster(pkg, 40, 40, 4)
    (tmp_path / "tile.tif").write_bytes(tiff_bytes(x))
    want = classify_region(backend, x, origin=(4, 4), absent=("lidar",))
    res = CliRunner().invoke(app, ["client", "classify", "--url", url, str(tmp_path / "tile.tif"), "--out",
                                   str(tmp_path / "map.tif"), "--row", "4", "--col", "4", "--absent", "lidar"])
    assert res.exit_code == 0, res.output
    bands, crs, transform, _, _ = read_tiff((tmp_path / "map.tif").read_bytes())
    np.testing.assert_array_equal(bands[0], want.classes)
    assert crs == CRS_UTM and transform == GEO
    assert "classes found" in res.output and "nodata 0" in res.output
    for name in np.unique(want.classes):
        assert backend.package.class_names[name - 1] in res.output
    # the server's error message, and an unreachable server, are one-line errors
    (tmp_path / "bad.tif").write_bytes(tiff_bytes(x[:-1]))
    res = CliRunner().invoke(app, ["client", "classify", "--url", url, str(tmp_path / "bad.tif"), "--out",
                                   str(tmp_path / "m2.tif")])
    assert res.exit_code == 2 and "422" in res.output and "wrong band count" in res.output
    res = CliRunner().invoke(app, ["client", "classify", "--url", f"http://127.0.0.1:{free_port()}",
                                   str(tmp_path / "tile.tif"), "--out", str(tmp_path / "m3.tif")])
    assert res.exit_code == 2 and "cannot reach" in res.output and not (tmp_path / "m3.tif").exists()


def test_a_burst_beyond_the_queue_gets_quick_503s_and_health_stays_up(pkg, backend, url):
    """24 concurrent requests against 2 ongoing + 2 queued: some are refused with 503 at once, every
    200 is the in-process answer, /healthz answers 200 throughout."""
    rasters = [raster(pkg, 96, 96, s) for s in range(3)]
    want = [classify_region(backend, x).classes for x in rasters]
    bodies = [to_npy(x) for x in rasters]
    health, done = [], threading.Event()

    def poll_health():
        while not done.is_set():
            health.append(requests.get(f"{url}/healthz", timeout=30).status_code)
            time.sleep(0.05)

    def post(i):
        t0 = time.perf_counter()
        r = requests.post(f"{url}/v1/classify", data=bodies[i % 3], headers=NPY, timeout=120)
        return i, r, time.perf_counter() - t0

    poller = threading.Thread(target=poll_health)
    poller.start()
    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(24) as pool:
            replies = list(pool.map(post, range(24)))
    finally:
        done.set()
        poller.join()
    burst = time.perf_counter() - t0
    codes = [r.status_code for _, r, _ in replies]
    assert set(codes) <= {200, 503} and codes.count(503) >= 1 and codes.count(200) >= 1, codes
    for i, r, _ in replies:
        if r.status_code == 200:
            np.testing.assert_array_equal(np.load(io.BytesIO(r.content)), want[i % 3])
        else:
            assert "queue is full" in r.json()["error"]
    slowest_503 = max(s for _, r, s in replies if r.status_code == 503)
    assert slowest_503 < 30 and burst < 120, (slowest_503, burst)  # sanity bounds, not performance claims
    assert health and set(health) == {200}, health


def model_replicas() -> list[str]:
    """Names of the model deployment's live replica actors (Serve names them SERVE_REPLICA::app#Model#id)."""
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("SERVE_REPLICA::") and "#Model#" in a["name"])


def test_a_killed_model_replica_is_replaced(pkg, backend, url):
    """Runs last: kills the model replica's actor; the endpoint answers correctly again."""
    import ray

    x = raster(pkg, 32, 32, 5)
    want = classify_region(backend, x).classes
    (victim,) = model_replicas()
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 120
    while True:
        r = requests.post(f"{url}/v1/classify", data=to_npy(x), headers=NPY, timeout=60)
        if (r.status_code == 200 and victim not in model_replicas()) or time.monotonic() > deadline:
            break
        assert r.status_code in (200, 503), r.text
        time.sleep(0.5)
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(np.load(io.BytesIO(r.content)), want)
    assert len(model_replicas()) == 1 and victim not in model_replicas()


# --- without Serve ------------------------------------------------------------------------------


def test_config_defaults_and_checks(tmp_path):
    assert serve_api.load_config(None) == serve_api.DEFAULTS
    shipped = serve_api.load_config(REPO / "infra" / "serve.yaml")
    assert set(shipped) == set(serve_api.DEFAULTS) and shipped["max_queued_requests"] >= 1
    bad = tmp_path / "s.yaml"
    for text, words in [("max_ongoing: 3", "unknown serving settings"), ("max_queued_requests: 0", "max_queued_requests must be"),
                        ("num_cpus: -1", "num_cpus must be"), ("max_pixels: 1.5", "max_pixels must be a whole"),
                        ("autoscaling: {min_replicas: 1, max: 2}", "unknown autoscaling settings"),
                        ("autoscaling: {min_replicas: 3, max_replicas: 2}", "above max_replicas")]:
        bad.write_text(f"serve:\n  {text}\n")
        with pytest.raises(serve_api.BDGFError, match=words):
            serve_api.load_config(bad)
    bad.write_text("serve:\n  autoscaling: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 2}\n"
                   "  batch_wait_timeout_s: 0\n")
    cfg = serve_api.load_config(bad)
    assert cfg["autoscaling"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2.0}
    assert cfg["batch_wait_timeout_s"] == 0.0


def test_serve_api_without_serve(pkg, backend):
    """The library's request handling on its own: the same replies as over HTTP, no Serve."""
    x = raster(pkg, 24, 28, 6)
    want = classify_region(backend, x, origin=(4, 8))
    reply = serve_api.classify(backend, to_npy(x), {"row": "4", "col": "8"},
                               {"content-type": "application/x-npy; q=1", "accept": "application/json"})
    assert reply.status == 200 and reply.media_type == "application/json"
    np.testing.assert_array_equal(np.array(json.loads(reply.body)["classes"]), want.classes)
    reply = serve_api.classify(backend, to_npy(x), {"row": "5", "col": "8"}, {"content-type": "application/x-npy"})
    assert reply.status == 422 and "stride phase" in json.loads(reply.body)["error"]
    reply = serve_api.classify(backend, to_npy(x), {}, {"content-length": str(LIMIT + 1),
                                                        "content-type": "application/x-npy"}, {**serve_api.DEFAULTS,
                                                                                               "max_body_bytes": LIMIT})
    assert reply.status == 413
    reply = serve_api.classify(backend, to_npy(x), {}, {})
    assert reply.status == 415 and "(none)" in json.loads(reply.body)["error"]
    assert serve_api.health(backend) == {"status": "ok", "backend": backend.name}
    # uint16 GeoTIFF bands are read exactly as float32
    u = np.rint(np.clip(x * 10 + 100, 1, 60000)).astype(np.uint16)
    reply = serve_api.classify(backend, tiff_bytes(u), {}, {"content-type": "image/tiff"})
    assert reply.status == 200, reply.body
    np.testing.assert_array_equal(read_tiff(reply.body)[0][0], classify_region(backend, u.astype(np.float32)).classes)


def test_tiles_of_several_requests_share_a_call_per_absent_set(pkg, backend):
    """classify_jobs (the replica's batcher): each job's tiles come back as if run alone."""
    p = backend.package
    jobs = [TileJob(raster(pkg, p.window_size, p.window_size, s)[None].repeat(n, 0), [(4 * s, 8 * i) for i in range(n)],
                    absent, probs) for s, (n, absent, probs) in enumerate([(2, (), False), (1, ("lidar",), True),
                                                                          (3, (), True), (1, ("lidar",), False)])]
    calls = []
    run = backend.run

    class Counting(type(backend)):
        def run(self, window, noise, present):
            calls.append(present[:, -1].tolist())
            return run(window, noise, present)

    counted = Counting.__new__(Counting)
    counted.__dict__.update(backend.__dict__)
    got = classify_jobs(counted, jobs)
    assert sorted(len(c) for c in calls) == [2, 5] and all(len(set(c)) == 1 for c in calls)
    for job, out in zip(jobs, got):
        alone = backend.classify(job.windows, job.origins, absent=job.absent, probabilities=job.probabilities)
        np.testing.assert_array_equal(out.classes, alone.classes)
        assert (out.probabilities is None) == (not job.probabilities)
        if job.probabilities:
            np.testing.assert_allclose(out.probabilities, alone.probabilities, atol=1e-6)
