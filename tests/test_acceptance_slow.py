"""Long acceptance runs, skipped in CI (marker `slow`); run them with `make test-slow`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_pipeline_end_to_end(tmp_path):
    """What `make demo` runs: store, preview, pretrain, features, train, evaluate."""
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "bdgf.demo", "--out", str(out)], capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["oa"] > 0.5 and summary["kappa"] > 0.4, summary  # 6 classes: chance OA is about 0.17
    for path in ("demo.zarr/zarr.json", "preview.png", "run/pretrain/curves.png", "run/eval/metrics.json",
                 "run/eval/map_test.png"):
        assert (out / path).exists(), path
    assert "OA" in r.stdout and "kappa" in r.stdout
