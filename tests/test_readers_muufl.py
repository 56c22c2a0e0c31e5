"""MUUFL reader: a synthetic file in the real struct layout, and the real demo sub-image."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io

from bdgf.data.readers import read_muufl, read_muufl_demo_subimage
from bdgf.data.readers.mat import field
from bdgf.data.readers.muufl import CLASS_NAMES
from bdgf.data.scene import ModalityData, Scene, SceneData, write_scene
from bdgf.errors import InputError
from data.muufl.data import H, W, make
from data.muufl.data import struct as muufl_struct


@pytest.fixture
def muufl_files(tmp_path):
    """The same seeded struct as MATLAB v5 ("v5") and v7.3 ("v73")."""
    return make(tmp_path)


@pytest.fixture
def muufl_file(muufl_files):
    return muufl_files["v5"]


def test_muufl_sampled_split_saved_and_reproducible(muufl_file, tmp_path):
    scene = read_muufl(muufl_file)
    assert scene.class_names == CLASS_NAMES and len(CLASS_NAMES) == 11
    assert scene.modalities["hsi"].bands == 64 and scene.modalities["lidar"].bands == 2
    assert scene.modalities["hsi"].wavelengths_nm[0] == pytest.approx(375.0)
    write_scene(scene, tmp_path / "m.zarr")
    s = Scene.open(tmp_path / "m.zarr")
    c = s.meta.split_counts
    dropped = s.meta.val_split["dropped_train"]  # train pixels in the 5-px ring around val regions
    assert c["train"] + c["val"] + dropped == 11 * 20 and abs(c["val"] - 11 * 4) <= 11
    assert c["train"] + c["val"] + c["test"] + dropped == 11 * 80
    per = np.bincount((s.labels("train") + s.labels("val")).ravel(), minlength=12)
    assert (per[1:] <= 20).all() and per[0] == H * W - 220 + dropped
    assert s.meta.source["per_class"] == 20 and s.meta.source["labelled"] == 880
    again = read_muufl(muufl_file)
    assert all(np.array_equal(again.labels[k], s.labels(k)) for k in ("train", "val", "test"))
    other = read_muufl(muufl_file, seed=1)
    assert not np.array_equal(other.labels["train"], scene.labels["train"])
    assert np.count_nonzero(read_muufl(muufl_file, per_class=5, val_fraction=0).labels["train"]) == 55


def test_muufl_struct_layouts(muufl_file):
    for rec in (True, False):
        for squeeze in (True, False):
            m = scipy.io.loadmat(muufl_file, struct_as_record=rec, squeeze_me=squeeze)
            labels = field(field(m["hsi"], "sceneLabels"), "labels")
            assert labels.shape == (H, W) and labels.min() == -1
            assert field(m["hsi"], "Data").shape == (H, W, 64)


def test_muufl_errors(tmp_path):
    bad = muufl_struct()
    bad["hsi"]["sceneLabels"]["labels"] = np.full((H, W), 12, np.int16)
    scipy.io.savemat(tmp_path / "labels12.mat", bad)
    with pytest.raises(InputError, match=r"labels12\.mat.*outside 0\.\.11"):
        read_muufl(tmp_path / "labels12.mat")
    scipy.io.savemat(tmp_path / "bands10.mat", muufl_struct(bands=10))
    with pytest.raises(InputError, match=r"bands10\.mat.*64 bands, found 10"):
        read_muufl(tmp_path / "bands10.mat")
    nolidar = muufl_struct()
    del nolidar["hsi"]["Lidar"]
    scipy.io.savemat(tmp_path / "nolidar.mat", nolidar)
    with pytest.raises(InputError, match=r"nolidar\.mat: hsi: no field 'Lidar'; fields found"):
        read_muufl(tmp_path / "nolidar.mat")
    scipy.io.savemat(tmp_path / "flat.mat", {"data": np.zeros((H, W, 64))})
    with pytest.raises(InputError, match=r"flat\.mat: no variable 'hsi'.*\['data'\]"):
        read_muufl(tmp_path / "flat.mat")
    with pytest.raises(InputError, match=r"absent\.mat.*not found"):
        read_muufl(tmp_path / "absent.mat")


def test_muufl_demo_subimage_into_store(real_data, tmp_path):
    hsi, mask = read_muufl_demo_subimage(real_data / "muufl" / "an_hsi_image_sub_for_demo.mat")
    assert hsi.data.shape == (72, 51, 88) and mask.shape == (51, 88)
    assert hsi.wavelengths_nm[0] == pytest.approx(367.7, abs=0.01) and hsi.wavelengths_nm[-1] == pytest.approx(1043.4, abs=0.01)
    assert int(mask.sum()) == 3884
    rng = np.random.default_rng(0)
    lidar = ModalityData(rng.normal(10, 2, (1, 51, 88)).astype(np.float32), kind="lidar")
    labels = np.zeros((51, 88), np.uint8)
    labels[10:20, 10:20] = 1
    labels[30:40, 50:60] = 2
    scene = SceneData("muufl-demo", {"hsi": hsi, "lidar": lidar}, {"train": labels}, ["a", "b"], valid=mask)
    write_scene(scene, tmp_path / "demo.zarr")
    s = Scene.open(tmp_path / "demo.zarr")
    wl = s.modality_meta("hsi").wavelengths_nm
    assert len(wl) == 72 and wl[0] == pytest.approx(367.7, abs=0.01) and wl[-1] == pytest.approx(1043.4, abs=0.01)
    assert np.array_equal(s.valid, mask)
    assert s.meta.invalid_pixels == 51 * 88 - 3884
    assert np.asarray(s.root["modalities"]["band_hsi"][...])[0] == pytest.approx(367.7, abs=0.01)


def test_muufl_v73_struct(muufl_files):
    """The same struct saved as MATLAB v7.3 (HDF5 groups, Lidar a cell of object references)."""
    a = read_muufl(muufl_files["v73"], val_fraction=0)
    b = read_muufl(muufl_files["v5"], val_fraction=0)
    assert np.array_equal(a.modalities["hsi"].data, b.modalities["hsi"].data)
    assert np.array_equal(a.modalities["lidar"].data, b.modalities["lidar"].data)
    assert np.array_equal(a.labels["train"], b.labels["train"]) and np.array_equal(a.labels["test"], b.labels["test"])
    assert a.modalities["hsi"].wavelengths_nm == b.modalities["hsi"].wavelengths_nm
