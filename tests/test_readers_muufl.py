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

H, W = 40, 30


def muufl_struct(labels=None, bands=64):
    rng = np.random.default_rng(4)
    if labels is None:
        labels = np.full((H, W), -1, np.int16)
        labels[:, :22] = (np.arange(H * 22).reshape(H, 22) % 11) + 1  # 80 pixels per class
    lidar = np.empty((1, 2), object)
    lidar[0, 0] = {"x": np.zeros((H, W)), "y": np.zeros((H, W)), "z": rng.normal(20, 5, (H, W, 2)).astype(np.float32)}
    lidar[0, 1] = {"z": np.zeros((H, W, 2), np.float32)}
    return {"hsi": {
        "Data": rng.random((H, W, bands), dtype=np.float32),
        "Lidar": lidar,
        "sceneLabels": {"labels": labels, "Materials_Type": np.array(CLASS_NAMES, dtype=object)},
        "info": {"wavelength": np.linspace(375, 1050, bands)[:, None]},
    }}


@pytest.fixture
def muufl_file(tmp_path):
    p = tmp_path / "muufl_gulfport_campus_1_hsi_220_label.mat"
    scipy.io.savemat(p, muufl_struct())
    return p


def test_muufl_sampled_split_saved_and_reproducible(muufl_file, tmp_path):
    scene = read_muufl(muufl_file)
    assert scene.class_names == CLASS_NAMES and len(CLASS_NAMES) == 11
    assert scene.modalities["hsi"].bands == 64 and scene.modalities["lidar"].bands == 2
    assert scene.modalities["hsi"].wavelengths_nm[0] == pytest.approx(375.0)
    write_scene(scene, tmp_path / "m.zarr")
    s = Scene.open(tmp_path / "m.zarr")
    c = s.meta.split_counts
    assert c["train"] + c["val"] == 11 * 20 and c["val"] == 11 * 4
    assert c["train"] + c["val"] + c["test"] == 11 * 80
    per = np.bincount((s.labels("train") + s.labels("val")).ravel(), minlength=12)
    assert per[1:].tolist() == [20] * 11 and per[0] == H * W - 220
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


def test_muufl_v73_struct(tmp_path):
    """The same struct saved as MATLAB v7.3 (HDF5 groups, Lidar a cell of object references)."""
    import h5py

    s = muufl_struct()["hsi"]
    p = tmp_path / "muufl_v73.mat"
    with h5py.File(p, "w", userblock_size=512) as f:
        g = f.create_group("hsi")
        g.create_dataset("Data", data=s["Data"].T)
        refs = f.create_group("#refs#")
        cell = refs.create_group("a")
        cell.create_dataset("z", data=s["Lidar"][0, 0]["z"].T)
        g.create_dataset("Lidar", data=np.array([[cell.ref]], dtype=h5py.ref_dtype))
        g.create_group("sceneLabels").create_dataset("labels", data=s["sceneLabels"]["labels"].astype(np.float64).T)
        g.create_group("info").create_dataset("wavelength", data=s["info"]["wavelength"].T)
    a = read_muufl(p, val_fraction=0)
    scipy.io.savemat(tmp_path / "v5.mat", muufl_struct())
    b = read_muufl(tmp_path / "v5.mat", val_fraction=0)
    assert np.array_equal(a.modalities["hsi"].data, b.modalities["hsi"].data)
    assert np.array_equal(a.modalities["lidar"].data, b.modalities["lidar"].data)
    assert np.array_equal(a.labels["train"], b.labels["train"]) and np.array_equal(a.labels["test"], b.labels["test"])
    assert a.modalities["hsi"].wavelengths_nm == b.modalities["hsi"].wavelengths_nm
