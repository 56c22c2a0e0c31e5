"""The `bdgf` command line, run as a real subprocess: synth / info / preview / ingest and errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bdgf.data.scene import Scene


def bdgf(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("bdgf")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "bdgf.cli"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_synth_info_preview(tmp_path):
    store = tmp_path / "tiny.zarr"
    r = bdgf("synth", store, "--preset", "tiny", "--seed", "3")
    assert r.returncode == 0, r.stderr
    scene = Scene.open(store)
    assert scene.modality_names == ["hsi", "lidar"]
    info = bdgf("info", store)
    assert info.returncode == 0
    for split in scene.splits:
        assert f"{scene.meta.split_counts[split]}" in info.stdout
    assert "modality hsi (hsi): 16 bands" in info.stdout
    png = tmp_path / "p.png"
    r = bdgf("preview", store, "--out", png)
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_existing_store_is_refused_without_overwrite(tmp_path):
    store = tmp_path / "s.zarr"
    assert bdgf("synth", store, "--preset", "tiny").returncode == 0
    before = sorted(p.name for p in store.rglob("*"))
    r = bdgf("synth", store, "--preset", "tiny", "--seed", "9")
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {store}: already exists (pass --overwrite to replace it)"
    assert sorted(p.name for p in store.rglob("*")) == before
    assert bdgf("synth", store, "--preset", "tiny", "--seed", "9", "--overwrite").returncode == 0


def test_errors_are_one_line_and_name_the_file(tmp_path, real_data):
    r = bdgf("info", tmp_path / "missing.zarr")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "missing.zarr: no such scene store" in r.stderr
    r = bdgf("synth", tmp_path / "x.zarr", "--preset", "nope")
    assert r.returncode == 2 and "unknown synthetic preset 'nope'" in r.stderr
    r = bdgf("ingest", "augsburg", tmp_path / "a.zarr", "--hsi", tmp_path / "absent.mat",
             "--sar", tmp_path / "absent2.mat", "--dsm", tmp_path / "absent3.mat",
             "--train", real_data / "augsburg" / "TrainImage.mat", "--test", real_data / "augsburg" / "TestImage.mat")
    assert r.returncode == 2 and "absent.mat" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "a.zarr").exists()


def test_ingest_generic_through_the_cli(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "hsi.npy", rng.normal(size=(6, 20, 30)).astype(np.float32))
    np.save(tmp_path / "dsm.npy", rng.normal(size=(1, 20, 30)).astype(np.float32))
    train = np.zeros((20, 30), np.uint8)
    train[2:8, 2:8] = 1
    train[12:18, 20:26] = 2
    test = np.zeros((20, 30), np.uint8)
    test[10:12, 0:10] = 1
    test[0:2, 20:30] = 2
    np.save(tmp_path / "train.npy", train)
    np.save(tmp_path / "test.npy", test)
    out = tmp_path / "g.zarr"
    r = bdgf("ingest", "generic", out, "--modality", f"hsi={tmp_path / 'hsi.npy'}",
             "--modality", f"lidar={tmp_path / 'dsm.npy'}", "--labels", f"train={tmp_path / 'train.npy'}",
             "--labels", f"test={tmp_path / 'test.npy'}", "--classes", "grass,roof")
    assert r.returncode == 0, r.stderr
    scene = Scene.open(out)
    assert scene.class_names == ["grass", "roof"]
    counts = scene.meta.split_counts
    assert counts["train"] + counts["val"] == 72 and counts["test"] == 40
    assert counts["val"] == 14  # round(0.2 * 36) per class, stratified
    # each class is one 6x6 region: val is a block cut from one end, too small for the 5-px ring
    assert scene.meta.val_split["method"] == "regions" and scene.meta.val_split["fallback_classes"] == [1, 2]
    assert scene.meta.val_split["unbuffered_classes"] == [1, 2]
    r = bdgf("ingest", "generic", tmp_path / "r.zarr", "--modality", f"hsi={tmp_path / 'hsi.npy'}",
             "--labels", f"train={tmp_path / 'train.npy'}", "--labels", f"test={tmp_path / 'test.npy'}",
             "--val-split", "random")
    assert r.returncode == 0, r.stderr
    assert "val split: random; min distance val-train 1 px (chebyshev)" in r.stdout
    assert Scene.open(tmp_path / "r.zarr").meta.source["val_split"] == "random"


def test_val_split_option_is_recorded_and_printed_by_info(tmp_path):
    far, near = tmp_path / "regions.zarr", tmp_path / "random.zarr"
    assert bdgf("synth", far, "--preset", "demo").returncode == 0  # regions by default
    assert bdgf("synth", near, "--preset", "demo", "--val-split", "random").returncode == 0
    a, b = Scene.open(far), Scene.open(near)
    assert a.meta.val_split["method"] == "regions" and a.meta.val_split["min_distance"] >= 6
    assert b.meta.val_split["method"] == "random" and b.meta.val_split["min_distance"] == 1
    info = bdgf("info", far)
    assert f"val split: regions; min distance val-train {a.meta.val_split['min_distance']} px (chebyshev)" in info.stdout
    r = bdgf("synth", tmp_path / "x.zarr", "--preset", "tiny", "--val-split", "stripes")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "val split method must be one of regions, blocks, random, got 'stripes'" in r.stderr
    assert not (tmp_path / "x.zarr").exists()


def test_help_explains_every_command():
    r = bdgf("--help")
    for cmd in ("synth", "ingest", "info", "preview", "pretrain", "features", "train", "evaluate", "cv"):
        assert cmd in r.stdout
    r = bdgf("ingest", "--help")
    assert "--overwrite" in r.stdout and "houston2013" in r.stdout and "--val-split" in r.stdout
