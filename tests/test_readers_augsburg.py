"""Augsburg reader: the real TrainImage/TestImage .mat with synthetic HS (180), SAR (4), DSM (1)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io

from bdgf.data.readers import read_augsburg
from bdgf.data.readers.augsburg import CLASS_NAMES
from bdgf.data.scene import Scene, write_scene
from bdgf.errors import InputError
from data.augsburg.data import H, W, make


@pytest.fixture(scope="module")
def augsburg(tmp_path_factory, real_data):
    return {**make(tmp_path_factory.mktemp("augsburg")),
            "train": real_data / "augsburg" / "TrainImage.mat", "test": real_data / "augsburg" / "TestImage.mat"}


def test_augsburg_real_split_round_trip(augsburg, tmp_path):
    scene = read_augsburg(**augsburg)
    assert scene.class_names == CLASS_NAMES and len(CLASS_NAMES) == 7
    assert scene.source["official_train"] == 761 and scene.source["official_test"] == 77533
    write_scene(scene, tmp_path / "a.zarr")
    s = Scene.open(tmp_path / "a.zarr")
    assert s.bands == {"hsi": 180, "sar": 4, "dsm": 1}
    dropped = s.meta.val_split["dropped_train"]
    assert s.meta.split_counts["train"] + s.meta.split_counts["val"] + dropped == 761
    assert s.meta.split_counts["test"] == 77533
    raw_test = scipy.io.loadmat(augsburg["test"])["TestImage"]
    assert raw_test.dtype == np.float32
    assert np.array_equal(s.labels("test"), raw_test.astype(np.int64))
    raw_train = scipy.io.loadmat(augsburg["train"])["TrainImage"].astype(np.int64)
    kept = s.labels("train") + s.labels("val")
    assert np.array_equal(kept[kept > 0], raw_train[kept > 0])  # a subset: the ring around val is dropped
    assert np.count_nonzero(raw_train) - np.count_nonzero(kept) == dropped
    assert np.count_nonzero(np.bincount(s.labels("test").ravel())[1:]) == 7


def test_augsburg_errors(augsburg, tmp_path):
    test = scipy.io.loadmat(augsburg["test"])["TestImage"].copy()
    test[test == 3] = 2.5
    scipy.io.savemat(tmp_path / "TestFrac.mat", {"TestImage": test})
    with pytest.raises(InputError, match=r"TestFrac\.mat.*non-integer values \(e\.g\. 2\.5\)"):
        read_augsburg(**{**augsburg, "test": tmp_path / "TestFrac.mat"})
    scipy.io.savemat(tmp_path / "sar3.mat", {"data_SAR_HR": np.zeros((H, W, 3), np.float32)})
    with pytest.raises(InputError, match=r"sar3\.mat.*4 bands, found 3"):
        read_augsburg(**{**augsburg, "sar": tmp_path / "sar3.mat"})
    scipy.io.savemat(tmp_path / "dsm_small.mat", {"data_DSM": np.zeros((H, W - 1), np.float32)})
    with pytest.raises(InputError, match=r"dsm_small\.mat.*does not match"):
        read_augsburg(**{**augsburg, "dsm": tmp_path / "dsm_small.mat"})
    scipy.io.savemat(tmp_path / "two.mat", {"a": np.zeros((H, W), np.float32), "b": np.zeros((H, W), np.float32)})
    with pytest.raises(InputError, match=r"two\.mat.*keys found: \['a', 'b'\]"):
        read_augsburg(**{**augsburg, "dsm": tmp_path / "two.mat"})
    scipy.io.savemat(tmp_path / "train9.mat", {"TrainImage": np.full((H, W), 9, np.uint8)})
    with pytest.raises(InputError, match=r"train9\.mat.*outside 0\.\.7"):
        read_augsburg(**{**augsburg, "train": tmp_path / "train9.mat"})
    # a single numeric array under another name, beside a string, is still found
    scipy.io.savemat(tmp_path / "dsm_renamed.mat", {"elev": np.ones((H, W), np.float32), "note": "metres"})
    s = read_augsburg(**{**augsburg, "dsm": tmp_path / "dsm_renamed.mat"}, val_fraction=0)
    assert s.modalities["dsm"].bands == 1 and float(s.modalities["dsm"].data.max()) == 1.0
    with pytest.raises(InputError, match=r"gone\.mat.*not found"):
        read_augsburg(**{**augsburg, "hsi": tmp_path / "gone.mat"})
