"""The scene store: layout readable without bdgf, statistics, windows, and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bdgf.data.scene import Scene, write_scene
from bdgf.errors import InputError, StoreError


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_round_trip_values_and_metadata(tmp_path, small_scene):
    scene = write_scene(small_scene, tmp_path / "s.zarr")
    assert scene.shape == (40, 52)
    assert scene.modality_names == ["hsi", "lidar"]
    assert scene.bands == {"hsi": 12, "lidar": 1}
    np.testing.assert_array_equal(scene.modality("hsi")[...], small_scene.modalities["hsi"].data)
    np.testing.assert_array_equal(scene.labels("train"), small_scene.labels["train"])
    assert scene.meta.split_counts == {"train": 32, "test": 50}
    assert scene.modality_meta("hsi").wavelengths_nm[0] == pytest.approx(400.0)
    assert list(scene.channel_modality) == [0] * 12 + [1]


def test_statistics_are_computed_on_valid_pixels_only(tmp_path, small_scene):
    hsi = small_scene.modalities["hsi"].data
    hsi[:, 0, :] = 1e6  # a row of garbage that is then declared invalid
    valid = np.ones(hsi.shape[1:], bool)
    valid[0, :] = False
    small_scene.valid = valid
    scene = write_scene(small_scene, tmp_path / "s.zarr")
    mean, std = scene.statistics("hsi")
    expected = hsi[:, 1:, :].reshape(12, -1)
    np.testing.assert_allclose(mean, expected.mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(std, expected.std(axis=1), rtol=1e-4)
    assert scene.meta.invalid_pixels == 52


def test_read_window_normalises_and_reflects_at_borders(tmp_path, small_scene):
    scene = write_scene(small_scene, tmp_path / "s.zarr")
    raw = small_scene.modalities["hsi"].data.astype(np.float64)
    mean = raw.reshape(12, -1).mean(1)[:, None, None]
    std = raw.reshape(12, -1).std(1)[:, None, None]
    norm = (raw - mean) / std
    win = scene.read_window(-2, -3, 7, 9)["hsi"]
    assert win.shape == (12, 7, 9)
    expected = np.pad(norm, ((0, 0), (2, 0), (3, 0)), mode="reflect")[:, :7, :9]
    np.testing.assert_allclose(win, expected, atol=1e-4)
    inner = scene.read_window(10, 11, 5, 5, concat=True)
    assert inner.shape == (13, 5, 5)
    np.testing.assert_allclose(inner[:12], norm[:, 10:15, 11:16], atol=1e-4)


def test_nan_and_inf_are_masked_counted_and_never_stored(tmp_path, small_scene):
    small_scene.modalities["hsi"].data[3, 5, 7] = np.nan
    small_scene.modalities["lidar"].data[0, 6, 8] = np.inf
    scene = write_scene(small_scene, tmp_path / "s.zarr")
    assert scene.meta.invalid_pixels == 2
    assert scene.meta.invalid_by_modality == {"hsi": 1, "lidar": 1}
    assert not scene.valid[5, 7] and not scene.valid[6, 8]
    assert np.isfinite(scene.modality("hsi")[...]).all()
    win = scene.read_window(5, 7, 1, 1)
    assert win["hsi"][:, 0, 0].tolist() == [0.0] * 12  # invalid pixels read as the band mean
    assert "invalid pixels: 2" in scene.summary()


def test_plain_zarr_and_xarray_read_the_store_without_bdgf(tmp_path, small_scene):
    path = tmp_path / "s.zarr"
    write_scene(small_scene, path)
    code = (
        "import sys, xarray, zarr\n"
        "ds = xarray.open_zarr(sys.argv[1], group='modalities', consolidated=False)\n"
        "print(ds['hsi'].dims, ds['hsi'].shape, float(ds['band_hsi'][0]))\n"
        "g = zarr.open_group(sys.argv[1], mode='r')\n"
        "print(g['labels/train'].shape, g.attrs['bdgf']['class_names'])\n"
        "assert 'bdgf' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert "('band_hsi', 'y', 'x') (12, 40, 52) 400.0" in out.stdout
    assert "(40, 52) ['grass', 'roof']" in out.stdout


def test_existing_store_is_refused_then_replaced_with_overwrite(tmp_path, small_scene):
    path = tmp_path / "s.zarr"
    write_scene(small_scene, path)
    with pytest.raises(StoreError, match="already exists"):
        write_scene(small_scene, path)
    small_scene.class_names = ["a", "b"]
    scene = write_scene(small_scene, path, overwrite=True)
    assert scene.class_names == ["a", "b"]
    assert _leftovers(tmp_path) == ["s.zarr"]


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda s: s.modalities["lidar"].__setattr__("data", np.zeros((1, 40, 50), np.float32)), "does not match"),
        (lambda s: s.labels.__setitem__("test", np.zeros((40, 51), np.uint8)), "has shape"),
        (lambda s: s.labels.__setitem__("test", np.zeros((40, 52), np.uint8)), "zero labelled pixels"),
        (lambda s: s.labels["train"].__setitem__((0, 0), 9), "outside 0..2"),
        (lambda s: s.modalities["hsi"].__setattr__("data", np.zeros((40, 52), np.float32)), "must be \\(bands, H, W\\)"),
        (lambda s: s.modalities["hsi"].data.__setitem__(Ellipsis, np.nan), "no valid pixel"),
    ],
    ids=["grid-mismatch", "label-shape", "empty-split", "label-range", "2d-modality", "all-nan"],
)
def test_bad_input_is_rejected_and_leaves_nothing(tmp_path, small_scene, breakage, message):
    breakage(small_scene)
    with pytest.raises(InputError, match=message):
        write_scene(small_scene, tmp_path / "s.zarr")
    assert _leftovers(tmp_path) == []


def test_failed_overwrite_keeps_the_old_store(tmp_path, small_scene):
    path = tmp_path / "s.zarr"
    write_scene(small_scene, path)
    small_scene.labels["test"] = np.zeros((40, 52), np.uint8)
    with pytest.raises(InputError):
        write_scene(small_scene, path, overwrite=True)
    assert Scene.open(path).meta.split_counts["test"] == 50
    assert _leftovers(tmp_path) == ["s.zarr"]


def test_missing_and_corrupt_stores_give_clear_errors(tmp_path, small_scene):
    with pytest.raises(StoreError, match="no such scene store"):
        Scene.open(tmp_path / "nope.zarr")
    path = tmp_path / "s.zarr"
    write_scene(small_scene, path)
    (path / "zarr.json").write_text("{not json")
    with pytest.raises(StoreError, match="not a readable Zarr v3 scene store"):
        Scene.open(path)
    write_scene(small_scene, path, overwrite=True)
    meta = json.loads((path / "modalities" / "hsi" / "zarr.json").read_text())
    meta["shape"] = [3, 40, 52]
    (path / "modalities" / "hsi" / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="modalities/hsi has shape"):
        Scene.open(path)
    plain = tmp_path / "plain.zarr"
    import zarr

    zarr.open_group(str(plain), mode="w")
    with pytest.raises(StoreError, match="not a BDGF scene store"):
        Scene.open(plain)
