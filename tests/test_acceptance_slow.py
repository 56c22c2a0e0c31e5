"""Long acceptance runs, skipped in CI (marker `slow`); run them with `make test-slow`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_pipeline_end_to_end(tmp_path):
    """What `make demo` runs, every stage: store and preview, training on 2 Ray workers,
    evaluation, export, the Serve endpoint over HTTP, Dask bulk classification, the summary."""
    import numpy as np
    import rasterio
    import xarray as xr

    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "bdgf.demo", "--out", str(out)], capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["oa"] > 0.5 and summary["kappa"] > 0.4, summary  # 6 classes: chance OA is about 0.17
    assert summary["missing"] == [] and len(summary["artefacts"]) >= 14
    for path in summary["artefacts"].values():
        assert (out / path).exists(), path
    for stage in ("== 2/9 pretrain", "2 Ray Train workers", "== 7/9", "== 8/9", "== 9/9 summary"):
        assert stage in r.stdout, stage
    assert summary["serve_equal_fraction"] == 1.0  # the endpoint's classes are the in-process ones
    with rasterio.open(out / "tile_map.tif") as src, rasterio.open(out / "tile.tif") as tile:
        assert src.crs == tile.crs and src.transform == tile.transform
        assert (src.read(1) > 0).all()
    bulk = xr.open_zarr(out / "map.zarr")
    with rasterio.open(out / "map.tif") as cog:
        np.testing.assert_array_equal(cog.read(1), bulk["classes"].values)
    assert "OA" in r.stdout and "kappa" in r.stdout
