"""Generic reader (.npy / GeoTIFF / .mat[:key]) and failure hygiene of reader -> write_scene."""

from __future__ import annotations

import os

import numpy as np
import pytest
import scipy.io

from bdgf.data.readers import read_dataset, read_generic
from bdgf.data.scene import Scene, write_scene
from bdgf.errors import InputError
from data.generic.data import CRS, TRANSFORM, H, W, labels, make
from data.generic.data import write_tif as tif


@pytest.fixture
def files(tmp_path):
    """hsi.npy (H, W, 5), lidar.tif (nodata at (2, 3)), train.tif, test.npy in tmp_path; arrays beside."""
    make(tmp_path)
    return {"dir": tmp_path, "hsi": np.load(tmp_path / "hsi.npy"), "train": labels()[0]}


def test_generic_round_trip_crs_and_layout(files, tmp_path):
    d = files["dir"]
    scene = read_generic({"hsi": d / "hsi.npy", "lidar": d / "lidar.tif"},
                         {"train": d / "train.tif", "test": d / "test.npy"}, ["a", "b", "c"], name="g")
    assert np.array_equal(scene.modalities["hsi"].data, np.moveaxis(files["hsi"], 2, 0))  # (H, W, C) detected
    assert scene.modalities["hsi"].kind == "hsi" and scene.modalities["lidar"].kind == "lidar"
    write_scene(scene, tmp_path / "g.zarr")
    s = Scene.open(tmp_path / "g.zarr")
    assert s.meta.crs == CRS and s.meta.transform == list(TRANSFORM.to_gdal())
    assert s.meta.invalid_pixels == 1 and not s.valid[2, 3]
    assert s.meta.split_counts["train"] + s.meta.split_counts["val"] == 100
    assert s.meta.split_counts["val"] == 20 and s.meta.split_counts["test"] == 4 * W
    assert np.asarray(s.root["x"][...])[0] == pytest.approx(660000.5)
    assert s.class_names == ["a", "b", "c"]


def test_generic_chw_npy_and_mat_key(files):
    d = files["dir"]
    chw = np.moveaxis(files["hsi"], 2, 0)
    np.save(d / "chw.npy", chw)
    scipy.io.savemat(d / "stack.mat", {"sar": files["hsi"][:, :, :4], "other": np.zeros(3)})
    s = read_dataset("generic", modalities={"hsi": str(d / "chw.npy"), "sar": f"{d / 'stack.mat'}:sar"},
                     labels={"train": str(d / "train.tif")}, val_fraction=0)
    assert np.array_equal(s.modalities["hsi"].data, chw)
    assert np.array_equal(s.modalities["sar"].data, chw[:4])
    assert s.class_names == ["class_1", "class_2"] and set(s.labels) == {"train"}
    assert s.crs is None  # only the label raster is geo-referenced, not a modality


def test_generic_errors(files):
    d = files["dir"]
    lab = {"train": d / "train.tif"}
    (d / "hsi.h5").write_bytes(b"x")
    with pytest.raises(InputError, match=r"hsi\.h5.*unsupported file type"):
        read_generic({"hsi": d / "hsi.h5"}, lab)
    np.save(d / "odd.npy", np.zeros((H + 1, W, 3), np.float32))
    with pytest.raises(InputError, match=r"odd\.npy.*fits neither"):
        read_generic({"hsi": d / "odd.npy"}, lab)
    np.save(d / "small_lab.npy", np.ones((H, W - 1), np.uint8))
    with pytest.raises(InputError, match=r"small_lab\.npy.*does not match the grid \(24, 36\)"):
        read_generic({"hsi": d / "hsi.npy", "lidar": d / "lidar.tif"}, {"train": d / "train.tif", "test": d / "small_lab.npy"})
    scipy.io.savemat(d / "k.mat", {"a": np.zeros((H, W)), "b": np.zeros((H, W))})
    with pytest.raises(InputError, match=r"k\.mat: no variable 'c'.*\['a', 'b'\]"):
        read_generic({"hsi": f"{d / 'k.mat'}:c"}, lab)
    with pytest.raises(InputError, match=r"train\.tif.*outside 0\.\.1"):
        read_generic({"hsi": d / "hsi.npy"}, lab, ["only"])
    with pytest.raises(InputError, match=r"nothere\.npy.*not found"):
        read_generic({"hsi": d / "nothere.npy"}, lab)


def test_failed_ingest_leaves_nothing(files, tmp_path):
    d = files["dir"]
    tif(d / "allnodata.tif", np.full((1, H, W), -1.0, np.float32), nodata=-1.0)
    before = sorted(os.listdir(tmp_path))
    # a reader error: no store is started
    with pytest.raises(InputError):
        write_scene(read_generic({"hsi": d / "odd_missing.npy"}, {"train": d / "train.tif"}), tmp_path / "x.zarr")
    # a modality that is all nodata: validation fails before writing
    scene = read_generic({"lidar": d / "allnodata.tif"}, {"train": d / "train.tif"})
    with pytest.raises(InputError, match="no valid pixel"):
        write_scene(scene, tmp_path / "x.zarr")
    # a failure midway through writing (metadata that is not JSON): the temporary store is removed
    scene = read_generic({"hsi": d / "hsi.npy"}, {"train": d / "train.tif"})
    scene.source["bad"] = object()
    with pytest.raises(TypeError):
        write_scene(scene, tmp_path / "x.zarr")
    assert sorted(os.listdir(tmp_path)) == before  # no x.zarr, no .x.zarr.tmp-*
    assert not any(n.startswith(".") or n.endswith(".zarr") for n in before)


def test_generic_label_geotiff_nodata_kept_as_value(files, tmp_path):
    """A label GeoTIFF declaring nodata=0 keeps its integer values (nodata is not NaN there)."""
    d = files["dir"]
    tif(d / "train_nd.tif", files["train"], nodata=0)
    s = read_generic({"hsi": d / "hsi.npy"}, {"train": d / "train_nd.tif"}, val_fraction=0)
    assert s.labels["train"].dtype == np.uint16 and np.array_equal(s.labels["train"], files["train"])
