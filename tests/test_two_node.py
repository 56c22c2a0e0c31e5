"""infra/two_node_local.sh end to end (slow: a few minutes; `make two-node` or `pytest -m slow`):
two Ray nodes on this machine, pretraining/features/training submitted as Ray jobs with one worker
per node, export, the Serve application deployed to that cluster and queried with a GeoTIFF tile,
and a teardown that leaves no Ray process of that cluster behind."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_node_cluster_script(tmp_path):
    work = tmp_path / "two-node"
    p = subprocess.run(["bash", str(REPO / "infra" / "two_node_local.sh"), str(work)], capture_output=True,
                       text=True, timeout=1800)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    assert "pretraining ran 2 Ray Train workers on 2 nodes" in out
    assert "healthz: 200" in out
    assert "no Ray process of this cluster is left" in out and "two-node run: OK" in out
    left = subprocess.run(["pgrep", "-f", str(work)], capture_output=True, text=True)
    assert left.stdout.strip() == "", left.stdout
    assert (work / "map.tif").is_file() and (work / "pkg" / "model.json").is_file()
