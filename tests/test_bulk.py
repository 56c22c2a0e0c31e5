"""Bulk classification (bdgf.bulk, `bdgf classify`) on a real Dask cluster: a mosaic of several
chunks with ragged edges equals classify_region on the whole mosaic in one piece (nodata → class
0); the Zarr opens with xarray (coordinates, CRS) and the COG with rasterio (same classes, a valid
COG); GeoTIFF inputs; a separately started `dask scheduler` + `dask worker` named by address; an
unreachable scheduler, mismatched inputs, another run's output and a corrupt input chunk are
clear errors."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from bdgf.backends import open_backend
from bdgf.bulk import classify_mosaic
from bdgf.bulk.cluster import gpu_missing
from bdgf.bulk.plan import ChunkPlan
from bdgf.bulk.resume import done_keys
from bdgf.bulk.synthetic import write_mosaic
from bdgf.errors import BDGFError, InputError
from bdgf.regions import classify_region
from test_export_package import export_random_run

pytestmark = pytest.mark.usefixtures("one_thread")

H, W = 150, 130  # 48 px chunks: 4 x 3, the last row 6 px high, the last column 34 px wide
HOLES = [(slice(5, 9), slice(60, 66)), (slice(100, 101), slice(3, 4)), (slice(149, 150), slice(129, 130))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_image(store: Path) -> dict[str, np.ndarray]:
    """{modality: (C, H, W)} read straight from the store's arrays, NaN where ``valid`` is False."""
    valid = np.asarray(zarr.open_array(str(store / "valid"))[...], bool)
    out = {}
    for m in ("hsi", "lidar"):
        x = np.asarray(zarr.open_array(str(store / "modalities" / m))[...], np.float32)
        x[:, ~valid] = np.nan
        out[m] = x
    return out


def write_tif(path: Path, data: np.ndarray, transform=(500000.0, 1.0, 0.0, 5000000.0, 0.0, -1.0), nodata=None,
              crs="EPSG:32633"):
    import rasterio
    from rasterio.transform import Affine

    with rasterio.open(path, "w", driver="GTiff", height=data.shape[1], width=data.shape[2], count=data.shape[0],
                       dtype="float32", crs=crs, transform=Affine.from_gdal(*transform), nodata=nodata,
                       tiled=True, blockxsize=32, blockysize=32) as ds:
        ds.write(data.astype(np.float32))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(dir, package, mosaic store with nodata holes, whole-mosaic Classified with probabilities)."""
    d = tmp_path_factory.mktemp("bulk")
    export_random_run(d)
    store = write_mosaic(d / "mosaic.zarr", (H, W), seed=3, like="tiny", chunk=64)
    valid = zarr.open_array(str(store / "valid"), mode="r+")
    for rows, cols in HOLES:
        valid[rows, cols] = False
    whole = classify_region(open_backend(d / "pkg", "onnx"), raw_image(store), probabilities=True)
    return d, d / "pkg", store, whole


@pytest.fixture(scope="module")
def cluster():
    """A real LocalCluster of 2 worker processes, 1 thread each, shared by the module's runs."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as c:
        yield c


def test_chunks_with_halo_equal_the_whole_mosaic_and_the_outputs_open(setup, cluster, tmp_path):
    import rasterio
    import xarray as xr

    from bdgf.bulk.cog import cog_layout_problems, validate_cog

    d, pkg, store, whole = setup
    out, tif = tmp_path / "map.zarr", tmp_path / "map.tif"
    result = classify_mosaic(out, package=pkg, scene=store, chunk=48, scheduler=cluster.scheduler_address,
                             probabilities=True, cog=tif, cog_blocksize=32, progress=False, echo=lambda s: None)
    assert result.computed == 12 and result.skipped == 0 and result.backends == ["onnx"]
    assert len(done_keys(out)) == 12
    root = zarr.open_group(str(out), mode="r")
    classes, conf = root["classes"][...], root["confidence"][...]
    np.testing.assert_array_equal(classes, whole.classes)
    np.testing.assert_array_equal(conf, whole.confidence)
    np.testing.assert_array_equal(root["probabilities"][...],
                                  np.clip(np.rint(whole.probabilities * 255), 0, 255).astype(np.uint8))
    for rows, cols in HOLES:  # nodata -> class 0 and confidence 0, never a guess
        assert (classes[rows, cols] == 0).all() and (conf[rows, cols] == 0).all()
    assert (classes > 0).sum() == H * W - sum(np.ones((H, W))[r, c].size for r, c in HOLES)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # consolidated metadata, nothing unrecognised in the group
        ds = xr.open_zarr(out)
    assert ds.classes.dims == ("y", "x") and ds.classes.dtype == np.uint8 and ds.probabilities.dims[0] == "class"
    np.testing.assert_allclose(ds.x.values[[0, -1]], [500000.5, 500000.0 + W - 0.5])
    np.testing.assert_allclose(ds.y.values[[0, -1]], [5000000.0 - 0.5, 5000000.0 - H + 0.5])
    assert "spatial_ref" in ds.coords and ds.classes.attrs["grid_mapping"] == "spatial_ref"
    from rasterio.crs import CRS

    assert CRS.from_wkt(ds.spatial_ref.attrs["crs_wkt"]) == CRS.from_epsg(32633)
    assert ds.spatial_ref.attrs["GeoTransform"].split() == ["500000.0", "1.0", "0.0", "5000000.0", "0.0", "-1.0"]
    np.testing.assert_array_equal(ds.classes.values, whole.classes)

    with rasterio.open(tif) as cog:
        np.testing.assert_array_equal(cog.read(1), whole.classes)
        assert cog.crs == CRS.from_epsg(32633) and cog.transform.to_gdal() == (500000.0, 1.0, 0.0, 5000000.0, 0.0, -1.0)
        assert cog.overviews(1) and cog.block_shapes[0] == (32, 32) and cog.nodata == 0
        colours = open_backend(pkg, "onnx").package.manifest["classes"]["colours"]
        assert [list(cog.colormap(1)[k][:3]) for k in range(1, 5)] == colours
    assert validate_cog(tif) == [] and cog_layout_problems(tif) == []
    plain = tmp_path / "strips.tif"  # the checks can fail: a striped 600 px GeoTIFF without overviews
    with rasterio.open(plain, "w", driver="GTiff", height=600, width=600, count=1, dtype="uint8") as dst:
        dst.write(np.tile(whole.classes, (4, 5))[None, :600, :600])
    assert validate_cog(plain) and len(cog_layout_problems(plain)) == 3


def test_geotiff_inputs_with_nan_in_one_modality(setup, cluster, tmp_path):
    d, pkg, store, _ = setup
    raw = raw_image(store)
    raw["lidar"][0, 70:73, 40:45] = np.nan  # NaN in one modality only
    raw["hsi"][:, 20, 100] = -9999.0  # the GeoTIFF's nodata value
    hsi = write_tif(tmp_path / "hsi.tif", raw["hsi"], nodata=-9999.0)
    lidar = write_tif(tmp_path / "lidar.tif", raw["lidar"])
    want_image = {k: v.copy() for k, v in raw.items()}
    want_image["hsi"][:, 20, 100] = np.nan
    want = classify_region(open_backend(pkg, "onnx"), want_image)
    out = tmp_path / "tif.zarr"
    classify_mosaic(out, package=pkg, rasters={"hsi": hsi, "lidar": lidar}, chunk=64,
                    scheduler=cluster.scheduler_address, progress=False, echo=lambda s: None)
    classes = zarr.open_array(str(out / "classes"))[...]
    np.testing.assert_array_equal(classes, want.classes)
    assert (classes[70:73, 40:45] == 0).all() and classes[20, 100] == 0 and classes[19, 100] > 0

    from rasterio.crs import CRS  # a Zarr array input, its grid in attrs, next to a GeoTIFF

    arr = zarr.create_array(str(tmp_path / "lidar_arr.zarr"), data=raw["lidar"], chunks=(1, 50, 50))
    arr.attrs.update({"crs_wkt": CRS.from_epsg(32633).to_wkt(), "transform": [500000.0, 1.0, 0.0, 5000000.0, 0.0, -1.0]})
    out = tmp_path / "arr.zarr"
    classify_mosaic(out, package=pkg, rasters={"hsi": hsi, "lidar": tmp_path / "lidar_arr.zarr"}, chunk=64,
                    scheduler=cluster.scheduler_address, progress=False, echo=lambda s: None)
    np.testing.assert_array_equal(zarr.open_array(str(out / "classes"))[...], want.classes)


def test_a_separately_started_scheduler_and_worker_named_by_address(setup, tmp_path):
    d, pkg, store, whole = setup
    port = free_port()
    addr = f"tcp://127.0.0.1:{port}"
    dask = str(Path(sys.executable).with_name("dask"))
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        procs.append(subprocess.Popen([dask, "worker", addr, "--nthreads", "1", "--nworkers", "1", "--no-dashboard",
                                       "--memory-limit", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from distributed import Client

        with Client(addr, timeout="60s") as client:
            client.wait_for_workers(1, timeout=120)
        out = tmp_path / "remote.zarr"
        res = CliRunner().invoke(__import__("bdgf.cli", fromlist=["app"]).app,
                                 ["classify", str(store), "--out", str(out), "--model", str(pkg), "--chunk", "64",
                                  "--scheduler", addr])
        assert res.exit_code == 0, res.output
        assert "classified 9 chunks (0 skipped" in res.output
        np.testing.assert_array_equal(zarr.open_array(str(out / "classes"))[...], whole.classes)
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_a_scheduler_that_does_not_answer_is_a_fast_clear_error(setup, tmp_path):
    from bdgf.cli import app

    d, pkg, store, _ = setup
    addr = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    res = CliRunner().invoke(app, ["classify", str(store), "--out", str(tmp_path / "x.zarr"), "--model", str(pkg),
                                   "--chunk", "64", "--scheduler", addr])
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1].startswith(f"error: no Dask scheduler answers at {addr}")
    assert not (tmp_path / "x.zarr").exists()  # nothing written


def test_a_run_is_exported_once_next_to_the_output_and_reused(setup, cluster, tmp_path):
    from bdgf.cli import app

    d, pkg, store, whole = setup
    out = tmp_path / "fromrun.zarr"
    args = ["classify", str(store), "--out", str(out), "--run", str(d / "run"), "--chunk", "64",
            "--scheduler", cluster.scheduler_address]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    made = tmp_path / "fromrun.zarr.model" / "model.json"
    assert f"exported the model package {made.parent}" in res.output and made.exists()
    np.testing.assert_array_equal(zarr.open_array(str(out / "classes"))[...], whole.classes)
    stamp = made.stat().st_mtime_ns
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert f"reusing the model package {made.parent}" in res.output and "classified 0 chunks (9 skipped" in res.output
    assert made.stat().st_mtime_ns == stamp


def test_bad_inputs_are_clear_errors(setup, cluster, tmp_path):
    d, pkg, store, _ = setup
    raw = raw_image(store)
    hsi = write_tif(tmp_path / "hsi.tif", raw["hsi"])
    lidar = write_tif(tmp_path / "lidar.tif", raw["lidar"])
    run = dict(package=pkg, chunk=64, scheduler=cluster.scheduler_address, progress=False, echo=lambda s: None)
    few = write_tif(tmp_path / "hsi15.tif", raw["hsi"][:15])
    with pytest.raises(InputError, match=r"hsi15\.tif: modality 'hsi' has 15 bands, the model .* needs 16"):
        classify_mosaic(tmp_path / "a.zarr", rasters={"hsi": few, "lidar": lidar}, **run)
    with pytest.raises(InputError, match=r"needs modalities \['hsi', 'lidar'\].*missing \['lidar'\].*not in the model \['dsm'\]"):
        classify_mosaic(tmp_path / "a.zarr", rasters={"hsi": hsi, "dsm": lidar}, **run)
    shifted = write_tif(tmp_path / "shifted.tif", raw["lidar"], transform=(500001.0, 1.0, 0.0, 5000000.0, 0.0, -1.0))
    with pytest.raises(InputError, match=r"grids do not align: .*shifted\.tif.*hsi\.tif.*different transforms"):
        classify_mosaic(tmp_path / "a.zarr", rasters={"hsi": hsi, "lidar": shifted}, **run)
    other_crs = write_tif(tmp_path / "utm34.tif", raw["lidar"], crs="EPSG:32634")
    with pytest.raises(InputError, match=r"grids do not align: .*utm34\.tif.*hsi\.tif.*different CRS"):
        classify_mosaic(tmp_path / "a.zarr", rasters={"hsi": hsi, "lidar": other_crs}, **run)
    small = write_tif(tmp_path / "small.tif", raw["lidar"][:, :100])
    with pytest.raises(InputError, match=r"grids do not align: .*small\.tif.*100x130 and 150x130 px"):
        classify_mosaic(tmp_path / "a.zarr", rasters={"hsi": hsi, "lidar": small}, **run)
    with pytest.raises(InputError, match=r"chunk size 40 must be a positive multiple of 16"):
        classify_mosaic(tmp_path / "a.zarr", scene=store, **{**run, "chunk": 40})
    assert not (tmp_path / "a.zarr").exists()  # nothing written for bad input

    out = tmp_path / "done.zarr"
    classify_mosaic(out, scene=store, **run)
    before = zarr.open_array(str(out / "classes"))[...]
    with pytest.raises(BDGFError, match=r"done\.zarr: made by another run \(different chunk\); pass --overwrite"):
        classify_mosaic(out, scene=store, **{**run, "chunk": 48})
    with pytest.raises(BDGFError, match=r"made by another run \(different inputs\)"):
        classify_mosaic(out, rasters={"hsi": hsi, "lidar": lidar}, **run)
    np.testing.assert_array_equal(zarr.open_array(str(out / "classes"))[...], before)  # untouched
    again = classify_mosaic(out, scene=store, **run)  # same parameters: nothing left to do
    assert again.computed == 0 and again.skipped == 9
    redo = classify_mosaic(out, scene=store, overwrite=True, **{**run, "chunk": 48})
    assert redo.computed == 12 and len(done_keys(out)) == 12
    np.testing.assert_array_equal(zarr.open_array(str(out / "classes"))[...], before)


def test_a_corrupt_input_chunk_stops_the_run_naming_it_and_is_not_marked_done(setup, cluster, tmp_path):
    d, pkg, store, _ = setup
    bad = tmp_path / "bad.zarr"
    shutil.copytree(store, bad)
    block = bad / "modalities" / "hsi" / "c" / "0" / "1" / "1"  # input rows 64:128, cols 64:128
    assert block.exists()
    block.write_bytes(b"not a zstd frame" * 7)
    out = tmp_path / "bad_out.zarr"
    with pytest.raises(BDGFError) as err:
        classify_mosaic(out, package=pkg, scene=bad, chunk=48, scheduler=cluster.scheduler_address,
                        progress=False, echo=lambda s: None)
    text = str(err.value)
    assert "chunk " in text and str(bad) in text and "modality 'hsi'" in text and "corrupt" in text
    plan = ChunkPlan(H, W, 48, open_backend(pkg, "onnx").package.halo)
    for c in plan.chunks():  # a chunk whose window reads the corrupt block is never marked done
        top, left, bottom, right = plan.read_window(c)
        if top < 128 and bottom > 64 and left < 128 and right > 64:
            assert c.key not in done_keys(out)


@pytest.mark.skipif(gpu_missing() is not None, reason=f"LocalCUDACluster: {gpu_missing()}")
def test_a_local_cuda_cluster_classifies_the_same_map(setup, tmp_path):
    d, pkg, store, whole = setup
    out = tmp_path / "gpu.zarr"
    classify_mosaic(out, package=pkg, scene=store, chunk=48, gpu=True, backend="onnx", progress=False,
                    echo=lambda s: None)
    np.testing.assert_array_equal(zarr.open_array(str(out / "classes"))[...], whole.classes)
