"""Trento reader: the real Italy_lidar.mat and allgrd.mat with a synthetic 63-band HSI (v5 and v7.3)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io

from bdgf.data.readers import read_trento
from bdgf.data.readers.trento import CLASS_NAMES
from bdgf.data.scene import Scene, write_scene
from bdgf.errors import InputError
from data import savemat73
from data.trento.data import H, W, make


@pytest.fixture(scope="module")
def trento(tmp_path_factory, real_data):
    d = tmp_path_factory.mktemp("trento")
    fake = make(d)
    return {**fake, "lidar": real_data / "trento" / "Italy_lidar.mat", "gt": real_data / "trento" / "allgrd.mat",
            "dir": d, "cube": scipy.io.loadmat(fake["hsi"])["data"]}


def test_trento_ground_truth_store(trento, tmp_path):
    scene = read_trento(trento["hsi"], trento["lidar"], gt=trento["gt"], per_class=20, seed=0)
    assert scene.class_names == CLASS_NAMES
    assert scene.source["labelled_in_ground_truth"] == 30214
    write_scene(scene, tmp_path / "t.zarr")
    s = Scene.open(tmp_path / "t.zarr")
    c = s.meta.split_counts
    dropped = s.meta.val_split["dropped_train"]  # train pixels in the 5-px ring around val regions
    assert c["train"] + c["val"] + dropped == 6 * 20 and c["val"] == 6 * 4
    assert c["train"] + c["val"] + c["test"] + dropped == 30214
    full = scipy.io.loadmat(trento["gt"])["mask_test"].astype(np.int64)
    kept = s.labels("train") + s.labels("val") + s.labels("test")
    assert np.array_equal(kept[kept > 0], full[kept > 0]) and np.count_nonzero(full) - np.count_nonzero(kept) == dropped
    assert set(np.unique(full)) == set(range(7))
    assert s.bands == {"hsi": 63, "lidar": 2}
    dsm = s.modality("lidar")[0]
    assert float(dsm.min()) == 0.0 and float(dsm.max()) == pytest.approx(20.15, abs=0.01)
    assert float(s.modality("lidar")[1].max()) == pytest.approx(2901.0)
    assert s.modality("hsi")[10, 3, 4] == pytest.approx(0.5)  # data.trento.data.MARKER


def test_trento_split_reproducible(trento):
    a = read_trento(trento["hsi"], trento["lidar"], gt=trento["gt"], seed=5)
    b = read_trento(trento["hsi"], trento["lidar"], gt=trento["gt"], seed=5)
    c = read_trento(trento["hsi"], trento["lidar"], gt=trento["gt"], seed=6)
    for k in ("train", "val", "test"):
        assert np.array_equal(a.labels[k], b.labels[k])
    assert not np.array_equal(a.labels["train"], c.labels["train"])


def test_trento_v73_and_official_labels(trento):
    full = scipy.io.loadmat(trento["gt"])["mask_test"]
    tr = np.where(np.arange(full.size).reshape(full.shape) % 37 == 0, full, 0).astype(np.uint8)
    ts = np.where(tr > 0, 0, full).astype(np.uint8)
    d = trento["dir"]
    scipy.io.savemat(d / "TRLabel.mat", {"TRLabel": tr})
    savemat73(d / "TSLabel.mat", TSLabel=ts)
    s = read_trento(trento["hsi73"], trento["lidar"], d / "TRLabel.mat", d / "TSLabel.mat", val_fraction=0)
    assert np.array_equal(s.modalities["hsi"].data, np.moveaxis(trento["cube"], 2, 0))
    assert s.source["official_train"] == np.count_nonzero(tr)
    assert s.source["official_test"] == np.count_nonzero(ts)
    assert np.array_equal(s.labels["test"], ts)
    # train + ground truth: test is the rest of the ground truth
    s2 = read_trento(trento["hsi"], trento["lidar"], d / "TRLabel.mat", gt=trento["gt"], val_fraction=0)
    assert np.array_equal(s2.labels["test"], ts)


def test_trento_errors(trento, tmp_path):
    hsi, lidar, gt = trento["hsi"], trento["lidar"], trento["gt"]
    two = tmp_path / "two_arrays.mat"
    scipy.io.savemat(two, {"cube": np.zeros((H, W, 63), np.float32), "extra": np.zeros(3)})
    with pytest.raises(InputError, match=r"two_arrays\.mat.*'data'.*keys found: \['cube', 'extra'\]"):
        read_trento(two, lidar, gt=gt)
    one = tmp_path / "renamed.mat"
    scipy.io.savemat(one, {"cube": np.zeros((H, W, 63), np.float32)})
    assert read_trento(one, lidar, gt=gt).modalities["hsi"].bands == 63  # single array: used
    small = tmp_path / "small_hsi.mat"
    scipy.io.savemat(small, {"data": np.zeros((H, W - 10, 63), np.float32)})
    with pytest.raises(InputError, match=r"Italy_lidar\.mat.*\(166, 600\) does not match.*small_hsi\.mat"):
        read_trento(small, lidar, gt=gt)
    bands = tmp_path / "bands62.mat"
    scipy.io.savemat(bands, {"data": np.zeros((H, W, 62), np.float32)})
    with pytest.raises(InputError, match=r"bands62\.mat.*63 bands, found 62"):
        read_trento(bands, lidar, gt=gt)
    with pytest.raises(InputError, match=r"missing\.mat.*not found"):
        read_trento(hsi, lidar, gt=tmp_path / "missing.mat")
    badgt = tmp_path / "gt7.mat"
    scipy.io.savemat(badgt, {"mask_test": np.full((H, W), 7, np.uint8)})
    with pytest.raises(InputError, match=r"gt7\.mat.*outside 0\.\.6"):
        read_trento(hsi, lidar, gt=badgt)
    shape = tmp_path / "gt_shape.mat"
    scipy.io.savemat(shape, {"mask_test": np.ones((W, H), np.uint8)})
    with pytest.raises(InputError, match=r"gt_shape\.mat.*\(600, 166\)"):
        read_trento(hsi, lidar, gt=shape)
    junk = tmp_path / "junk.mat"
    junk.write_bytes(b"not a mat file at all")
    with pytest.raises(InputError, match=r"junk\.mat.*not a readable"):
        read_trento(hsi, lidar, gt=junk)
    with pytest.raises(InputError, match="test label file"):
        read_trento(hsi, lidar, train=gt)
