"""Houston2013 reader: the real official TR/VA GeoTIFFs with a synthetic HSI/DSM on their grid."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import rasterio

from bdgf.data.readers import read_dataset, read_houston2013
from bdgf.data.readers.houston2013 import CLASS_NAMES
from bdgf.data.scene import Scene, write_scene
from bdgf.errors import InputError
from data.houston2013.data import CRS, TRANSFORM, H, W, make, write_tif


@pytest.fixture(scope="module")
def houston(tmp_path_factory, real_data):
    """Real label rasters + a 4-band int16 stand-in HSI (nodata -1 at 7 pixels) and a DSM."""
    d = tmp_path_factory.mktemp("houston")
    src = real_data / "houston2013"
    return {
        **make(d),
        "train": src / "2013_IEEE_GRSS_DF_Contest_Samples_TR.tif",
        "test": src / "2013_IEEE_GRSS_DF_Contest_Samples_VA.tif",
        "dir": d,
    }


def raster_counts(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        ds = rasterio.open(path)
    with ds:
        return np.bincount(ds.read(1).ravel(), minlength=16)


def test_houston_real_split_counts_round_trip(houston, tmp_path):
    scene = read_houston2013(houston["hsi"], houston["lidar"], houston["train"], houston["test"], expected_bands=4)
    assert scene.shape == (H, W)
    assert scene.class_names == CLASS_NAMES and len(CLASS_NAMES) == 15
    assert scene.source["official_train"] == 2832 and scene.source["official_test"] == 12197
    store = write_scene(scene, tmp_path / "h.zarr")
    s = Scene.open(tmp_path / "h.zarr")
    # val carved from whole regions; the train pixels of the 5-px ring around val are dropped
    dropped = s.meta.val_split["dropped_train"]
    assert s.meta.val_split["method"] == "regions" and s.meta.val_split["min_distance"] >= 6
    assert s.meta.split_counts["train"] + s.meta.split_counts["val"] + dropped == 2832
    assert s.meta.split_counts["test"] == 12197
    assert s.meta.split_counts["val"] > 0
    tr, va, te = (np.bincount(s.labels(k).ravel(), minlength=16) for k in ("train", "val", "test"))
    assert ((tr + va)[1:] <= raster_counts(houston["train"])[1:]).all()
    assert (tr + va)[1:].sum() == 2832 - dropped
    assert np.array_equal(te[1:], raster_counts(houston["test"])[1:])
    assert int(np.count_nonzero(te[1:])) == 15
    assert not np.any((s.labels("train") > 0) & (s.labels("val") > 0))
    # geo-referencing, nodata -> invalid, default wavelengths
    assert s.meta.crs == CRS
    assert s.meta.transform == list(TRANSFORM.to_gdal())
    assert s.meta.invalid_pixels == 7 and not s.valid[0, :7].any()
    wl = s.modality_meta("hsi").wavelengths_nm
    assert wl[0] == pytest.approx(380.0) and wl[-1] == pytest.approx(1050.0)
    assert s.bands == {"hsi": 4, "lidar": 1}
    assert store.meta.source["dataset"] == "houston2013"


def test_houston_val_disabled_and_seeded(houston):
    a = read_houston2013(houston["hsi"], houston["lidar"], houston["train"], houston["test"], expected_bands=4, val_fraction=0)
    assert set(a.labels) == {"train", "test"} and np.count_nonzero(a.labels["train"]) == 2832
    assert a.val_split == {"method": "none"}
    r = read_houston2013(houston["hsi"], houston["lidar"], houston["train"], houston["test"], expected_bands=4,
                         val_split="random")
    assert r.val_split["method"] == "random" and r.val_split["min_distance"] == 1  # val next to train
    assert np.count_nonzero(r.labels["train"]) + np.count_nonzero(r.labels["val"]) == 2832
    b = read_dataset("houston2013", hsi=str(houston["hsi"]), lidar=str(houston["lidar"]), train=str(houston["train"]),
                     test=str(houston["test"]), expected_bands=4, seed=3)
    c = read_houston2013(houston["hsi"], houston["lidar"], houston["train"], houston["test"], expected_bands=4, seed=3)
    assert np.array_equal(b.labels["val"], c.labels["val"])


def test_houston_wavelengths_from_file(tmp_path, houston):
    tags = {b: {"wavelength": str(400 + 100 * b), "wavelength_units": "nm"} for b in range(1, 5)}
    hsi = write_tif(tmp_path / "hsi.tif", np.ones((4, H, W), np.int16), tags=tags)
    s = read_houston2013(hsi, houston["lidar"], houston["train"], houston["test"], expected_bands=4, val_fraction=0)
    assert s.modalities["hsi"].wavelengths_nm == [500.0, 600.0, 700.0, 800.0]


def test_houston_errors(houston, tmp_path):
    args = dict(hsi=houston["hsi"], lidar=houston["lidar"], train=houston["train"], test=houston["test"])
    with pytest.raises(InputError, match=r"hsi\.tif.*144 bands, found 4"):
        read_houston2013(**args)
    with pytest.raises(InputError, match="nope.tif.*not found"):
        read_houston2013(**{**args, "lidar": tmp_path / "nope.tif"})
    small = write_tif(tmp_path / "small_dsm.tif", np.zeros((H, W - 1), np.float32))
    with pytest.raises(InputError, match=r"small_dsm\.tif.*does not match"):
        read_houston2013(**{**args, "lidar": small}, expected_bands=4)
    two = write_tif(tmp_path / "two_band_dsm.tif", np.zeros((2, H, W), np.float32))
    with pytest.raises(InputError, match=r"two_band_dsm\.tif.*1 bands, found 2"):
        read_houston2013(**{**args, "lidar": two}, expected_bands=4)
    crop = write_tif(tmp_path / "crop_tr.tif", np.ones((H - 1, W), np.uint8))
    with pytest.raises(InputError, match=r"crop_tr\.tif.*shape \(348, 1905\)"):
        read_houston2013(**{**args, "train": crop}, expected_bands=4)
    lab = np.zeros((H, W), np.uint8)
    lab[5, 5] = 16
    bad = write_tif(tmp_path / "range_va.tif", lab)
    with pytest.raises(InputError, match=r"range_va\.tif.*outside 0\.\.15"):
        read_houston2013(**{**args, "test": bad}, expected_bands=4)
    flt = write_tif(tmp_path / "float_va.tif", np.full((H, W), 1.5, np.float32))
    with pytest.raises(InputError, match=r"float_va\.tif.*non-integer"):
        read_houston2013(**{**args, "test": flt}, expected_bands=4)
    with pytest.raises(InputError, match="unknown dataset"):
        read_dataset("houston2014", **args)
    with pytest.raises(InputError, match="houston2013"):
        read_dataset("houston2013", hsi=houston["hsi"])
