"""A `bdgf classify` run killed for real (SIGKILL to its process group: the driver and its
LocalCluster's workers) after some chunks are marked done, restarted with the same command, ends
byte-identical to an uninterrupted run, and the chunks done before the kill are not recomputed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bdgf.bulk.resume import DONE, done_keys
from bdgf.bulk.synthetic import write_mosaic
from test_export_package import export_random_run

pytestmark = pytest.mark.usefixtures("one_thread")

H, W, CHUNK = 200, 180, 32  # 7 x 6 = 42 chunks, ragged last row and column
BDGF = str(Path(sys.executable).with_name("bdgf"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("bulk_resume")
    export_random_run(d)
    return d, d / "pkg", write_mosaic(d / "mosaic.zarr", (H, W), seed=5, like="tiny", chunk=64)


def command(pkg: Path, store: Path, out: Path, tif: Path) -> list[str]:
    return [BDGF, "classify", str(store), "--out", str(out), "--model", str(pkg), "--chunk", str(CHUNK),
            "--workers", "1", "--cog", str(tif), "--cog-blocksize", "32"]


def files(out: Path) -> dict[str, bytes]:
    """Every file of the map (arrays, coordinates, CRS), not the run's manifest and markers."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and "_bulk" not in p.parts}


def markers(out: Path) -> dict[str, tuple[str, int]]:
    return {k: ((out / DONE / k).read_text(), (out / DONE / k).stat().st_mtime_ns) for k in done_keys(out)}


def test_a_killed_run_restarted_resumes_and_ends_byte_identical(setup, tmp_path):
    d, pkg, store = setup
    total = -(-H // CHUNK) * -(-W // CHUNK)
    env = {**os.environ, "BDGF_PROGRESS": "lines"}
    ref = subprocess.run(command(pkg, store, tmp_path / "ref.zarr", tmp_path / "ref.tif"), capture_output=True,
                         text=True, env=env, timeout=300)
    assert ref.returncode == 0, ref.stderr
    assert f"classified {total} chunks (0 skipped" in ref.stdout

    out, tif = tmp_path / "map.zarr", tmp_path / "map.tif"
    proc = subprocess.Popen(command(pkg, store, out, tif), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    try:
        while len(done_keys(out)) < 3 if out.exists() else True:  # deterministic: wait for 3 done markers
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    for _ in range(2000):  # the group (driver, nanny, worker) is gone before we look
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.01)
    before = markers(out)
    print(f"killed with {len(before)} of {total} chunks done")
    assert 3 <= len(before) < total, "the run was not killed mid-way"
    assert not tif.exists()
    first = {json.loads(text)["attempt"] for text, _ in before.values()}
    assert len(first) == 1

    again = subprocess.run(command(pkg, store, out, tif), capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"classified {total - len(before)} chunks ({len(before)} skipped, done before)" in again.stdout
    after = markers(out)
    assert len(after) == total
    assert {k: after[k] for k in before} == before  # done chunks untouched (same marker, same mtime)
    second = {json.loads(text)["attempt"] for k, (text, _) in after.items() if k not in before}
    assert len(second) == 1 and second != first

    assert files(out) == files(tmp_path / "ref.zarr")  # byte-identical map
    assert tif.read_bytes() == (tmp_path / "ref.tif").read_bytes()
