"""serving/app.py: a real Ray Serve application on 127.0.0.1 over a model package, over real HTTP:
a window in gives the classes of `open_backend(pkg).classify` in-process on the same window (.npy
and JSON answers), the manifest and health routes, a NaN pixel is class 0, and every bad input is
a 4xx JSON error naming the problem. bdgf.serve_api's parsing is also checked without Serve."""

from __future__ import annotations

import io
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import requests
from typer.testing import CliRunner

from bdgf import serve_api
from bdgf.backends import ModelPackage, open_backend
from test_export_package import make_random_run


pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
NPY = {"Content-Type": "application/x-npy"}
LIMIT = 1 << 20  # max_body_bytes of the test's config


def npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    from bdgf.cli import app

    d = tmp_path_factory.mktemp("serving")
    _, run = make_random_run(d)
    res = CliRunner().invoke(app, ["export", str(run), "--format", "onnx", "--out", str(d / "pkg")])
    assert res.exit_code == 0, res.output
    return d / "pkg"


@pytest.fixture(scope="module")
def url(pkg, tmp_path_factory):
    """The application served on 127.0.0.1 at a free port (one Ray + Serve for the module)."""
    import ray
    from ray import serve

    from serving.app import build

    cfg = tmp_path_factory.mktemp("cfg") / "serve.yaml"
    cfg.write_text(f"serve:\n  max_ongoing_requests: 4\n  max_queued_requests: 8\n  max_body_bytes: {LIMIT}\n")
    port = free_port()
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "BDGF_ORT_THREADS": "1"}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(pkg, cfg), route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def window(pkg, seed=0) -> np.ndarray:
    p = ModelPackage.open(pkg)
    rng = np.random.default_rng(seed)
    return (p.mean[:, None, None] + p.std[:, None, None] * rng.standard_normal(
        (p.channels, p.window_size, p.window_size))).astype(np.float32)


def test_a_window_gives_the_in_process_classes(pkg, url):
    raw = window(pkg)
    h = ModelPackage.open(pkg).halo
    raw[:, h + 3, h + 5] = np.nan  # a nodata pixel inside the tile
    want = open_backend(pkg).classify(raw[None], [(16, 32)])
    r = requests.post(f"{url}/v1/classify", params={"row": 16, "col": 32}, data=npy(raw), headers=NPY, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/x-npy")
    got = np.load(io.BytesIO(r.content))
    assert got.dtype == want.classes.dtype and got.shape == want.classes.shape[1:]
    np.testing.assert_array_equal(got, want.classes[0])
    assert got[3, 5] == 0 and (got > 0).sum() > 0
    r = requests.post(f"{url}/v1/classify?row=16&col=32", data=npy(raw), timeout=60,
                      headers={**NPY, "Accept": "application/json"})
    assert r.status_code == 200, r.text
    doc = r.json()
    np.testing.assert_array_equal(np.array(doc["classes"]), want.classes[0])
    np.testing.assert_array_equal(np.array(doc["confidence"]), want.confidence[0])
    assert doc["nodata_pixels"] == int((want.classes[0] == 0).sum()) >= 1


def test_an_absent_modality(pkg, url):
    raw = window(pkg, 1)
    want = open_backend(pkg).classify(raw[None], [(0, 0)], absent=("lidar",))
    r = requests.post(f"{url}/v1/classify?row=0&col=0&absent=lidar", data=npy(raw), headers=NPY, timeout=60)
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(np.load(io.BytesIO(r.content)), want.classes[0])


def test_model_and_health(pkg, url):
    r = requests.get(f"{url}/v1/model", timeout=30)
    assert r.status_code == 200 and r.json() == json.loads((pkg / "model.json").read_text())
    r = requests.get(f"{url}/healthz", timeout=30)
    assert r.status_code == 200 and r.json() == {"status": "ok", "backend": "onnx"}


def test_bad_inputs_are_json_errors_naming_the_problem(pkg, url):
    raw = window(pkg)
    C, S = raw.shape[0], raw.shape[1]
    cases = [
        (npy(raw[:-1]), NPY, "?row=0&col=0", 422, "band count"),
        (npy(raw[:, :-1]), NPY, "?row=0&col=0", 422, "shape"),
        (npy(raw.astype(np.float64)), NPY, "?row=0&col=0", 422, "dtype float64"),
        (b"not an npy file", NPY, "?row=0&col=0", 400, "not a valid .npy"),
        (b"", NPY, "?row=0&col=0", 400, "empty body"),
        (npy(raw), {"Content-Type": "image/png"}, "?row=0&col=0", 415, "content type"),
        (b"\0" * (LIMIT + 1), NPY, "?row=0&col=0", 413, "over the limit"),
        (npy(raw), NPY, "?col=0", 422, "'row'"),
        (npy(raw), NPY, "?row=a&col=0", 422, "whole number"),
        (npy(raw), NPY, "?row=0&col=0&absent=radar", 422, "unknown modalities"),
    ]
    for body, headers, query, status, words in cases:
        r = requests.post(f"{url}/v1/classify{query}", data=body, headers=headers, timeout=60)
        assert r.status_code == status, (words, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json")
        assert words in r.json()["error"], (words, r.json())
    assert f"({C}, {S}, {S})" in requests.post(f"{url}/v1/classify?row=0&col=0", data=npy(raw[:-1]),
                                               headers=NPY, timeout=60).json()["error"]


def test_config_defaults_and_checks(tmp_path):
    assert serve_api.load_config(None) == serve_api.DEFAULTS
    assert serve_api.load_config(REPO / "infra" / "serve.yaml")["max_queued_requests"] >= 1
    bad = tmp_path / "s.yaml"
    bad.write_text("serve:\n  max_ongoing: 3\n")
    with pytest.raises(serve_api.BDGFError, match="unknown serving settings"):
        serve_api.load_config(bad)
    bad.write_text("serve:\n  max_queued_requests: 0\n")
    with pytest.raises(serve_api.BDGFError, match="max_queued_requests must be"):
        serve_api.load_config(bad)


def test_serve_api_without_serve(pkg):
    """The library's request handling on its own: the same replies as over HTTP, no Serve."""
    backend = open_backend(pkg)
    raw = window(pkg, 2)
    want = backend.classify(raw[None], [(4, 8)])
    reply = serve_api.classify(backend, npy(raw), {"row": "4", "col": "8"},
                               {"content-type": "application/x-npy; q=1", "accept": "application/json"}, LIMIT)
    assert reply.status == 200 and reply.media_type == "application/json"
    np.testing.assert_array_equal(np.array(json.loads(reply.body)["classes"]), want.classes[0])
    reply = serve_api.classify(backend, npy(raw), {"row": "5", "col": "8"}, {"content-type": "application/x-npy"}, LIMIT)
    assert reply.status == 422 and "stride phase" in json.loads(reply.body)["error"]
    reply = serve_api.classify(backend, npy(raw), {"row": "4", "col": "8"}, {"content-length": str(LIMIT + 1),
                                                                            "content-type": "application/x-npy"}, LIMIT)
    assert reply.status == 413
    reply = serve_api.classify(backend, npy(raw), {"row": "4", "col": "8"}, {}, LIMIT)
    assert reply.status == 415 and "(none)" in json.loads(reply.body)["error"]
    assert serve_api.health(backend) == {"status": "ok", "backend": backend.name}
