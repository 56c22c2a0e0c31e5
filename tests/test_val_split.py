"""Spatially disjoint val (bdgf.data.splits.carve_val) on blob-labelled scenes and on the real
Houston2013 / Augsburg training rasters, and early stopping when val saturates."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.io
import torch
from scipy import ndimage

from bdgf.config import TrainConfig
from bdgf.data.scene import Scene, write_scene
from bdgf.data.splits import carve_val
from bdgf.data.synthetic import make_scene
from bdgf.engine.classify import ModalityView, build_classifier, train_epochs
from bdgf.engine.loop import TorchStepper
from bdgf.errors import InputError
from bdgf.models.inputs import input_channels
from helpers import separable_patch_batch

R = 5  # patch radius of the default 11x11 patch


def blob_labels(seed: int, size: int = 160, blobs: int = 60, classes: int = 3) -> np.ndarray:
    """(size, size) uint16 train raster of square blobs (3-7 px a side) of random classes, each
    at least 12 px from every other blob, so every region can be carved with a full buffer."""
    rng = np.random.default_rng(seed)
    lab = np.zeros((size, size), np.uint16)
    taken = np.zeros((size, size), bool)
    placed = tries = 0
    while placed < blobs and tries < 20_000:
        tries += 1
        s = int(rng.integers(3, 8))
        r, c = (int(v) for v in rng.integers(0, size - s, 2))
        if taken[max(r - 12, 0):r + s + 12, max(c - 12, 0):c + s + 12].any():
            continue
        lab[r:r + s, c:c + s] = 1 + placed % classes
        taken[r:r + s, c:c + s] = True
        placed += 1
    assert placed == blobs
    return lab


def chebyshev_min(a: np.ndarray, b: np.ndarray) -> int:
    """Brute force: smallest max(|dr|, |dc|) between a pixel labelled in a and one in b."""
    pa, pb = np.argwhere(a > 0), np.argwhere(b > 0)
    return int(np.abs(pa[:, None, :] - pb[None, :, :]).max(-1).min())


def shared_regions(original: np.ndarray, train: np.ndarray, val: np.ndarray) -> int:
    """Connected (8-neighbour, per class) regions of ``original`` with pixels in both train and val."""
    n = 0
    for k in np.unique(original[original > 0]):
        lab, m = ndimage.label(original == k, structure=np.ones((3, 3)))
        for i in range(1, m + 1):
            n += bool(((lab == i) & (train > 0)).any() and ((lab == i) & (val > 0)).any())
    return n


@pytest.mark.parametrize("seed", [0, 1])
def test_regions_val_is_beyond_the_patch_radius_and_keeps_class_proportions(seed):
    lab = blob_labels(seed)
    train, val, info = carve_val(lab, 0.2, seed=seed, return_info=True)
    assert chebyshev_min(val, train) > R  # no train patch holds a val pixel, and vice versa
    assert info["min_distance"] == chebyshev_min(val, train) and info["metric"] == "chebyshev"
    assert info["method"] == "regions" and info["dropped_train"] == 0  # blobs are far apart
    assert shared_regions(lab, train, val) == 0
    assert not np.any((train > 0) & (val > 0))
    assert np.array_equal(np.where(train > 0, train, val), lab)  # nothing lost, nothing relabelled
    n = np.bincount(lab.ravel(), minlength=4)[1:]
    v = np.bincount(val.ravel(), minlength=4)[1:]
    biggest = 7 * 7
    assert (np.abs(v - np.round(0.2 * n)) <= biggest).all(), (v, n)
    assert (v > 0).all() and (np.bincount(train.ravel(), minlength=4)[1:] > 0).all()


def test_regions_split_is_deterministic_per_seed():
    lab = blob_labels(3)
    a, b, c = (carve_val(lab, 0.2, seed=s) for s in (4, 4, 5))
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])
    assert not np.array_equal(a[1], c[1])


def test_touching_regions_lose_the_ring_of_train_pixels_around_val():
    """Two classes in adjacent stripes: the train pixels within r of val are dropped, so the
    distance guarantee holds even where regions touch."""
    lab = np.zeros((40, 120), np.uint16)
    for i in range(12):  # 12 regions of 10 columns each, alternating classes, touching
        lab[5:35, 10 * i:10 * i + 9] = 1 + i % 2
    train, val, info = carve_val(lab, 0.2, seed=0, return_info=True)
    assert val.any() and chebyshev_min(val, train) > R
    assert info["dropped_train"] == np.count_nonzero(lab) - np.count_nonzero(train) - np.count_nonzero(val) > 0
    assert shared_regions(lab, train, val) == 0


def test_single_region_class_falls_back_to_a_block_and_random_is_adjacent():
    lab = np.zeros((30, 80), np.uint16)
    lab[10:20, 5:75] = 1  # one long region
    lab[2:5, 2:5], lab[25:28, 60:63], lab[2:5, 40:43] = 2, 2, 2
    train, val, info = carve_val(lab, 0.2, seed=1, return_info=True)
    assert info["fallback_classes"] == [1]
    assert abs(np.count_nonzero(val == 1) - round(0.2 * 700)) <= 1 and chebyshev_min(val, train) > R
    _, rval, rinfo = carve_val(lab, 0.2, seed=1, method="random", return_info=True)
    assert rinfo["min_distance"] == 1 and np.count_nonzero(rval == 1) == 140
    with pytest.raises(InputError, match="regions, blocks, random"):
        carve_val(lab, 0.2, method="stripes")


@pytest.mark.parametrize("method", ["regions", "blocks"])
def test_synthetic_val_lies_beyond_the_patch_radius(method, tmp_path):
    data = make_scene("demo", 0, val_split=method)
    train, val = data.labels["train"], data.labels["val"]
    assert chebyshev_min(val, train) > R
    k = len(data.class_names)
    assert np.bincount(val.ravel(), minlength=k + 1)[1:].tolist() == [8] * k  # exact counts kept
    assert np.bincount(train.ravel(), minlength=k + 1)[1:].tolist() == [30] * k
    s = write_scene(data, tmp_path / "d.zarr")
    assert s.meta.val_split["method"] == method and s.meta.val_split["min_distance"] == chebyshev_min(val, train)
    assert f"val split: {method}; min distance val-train {chebyshev_min(val, train)} px (chebyshev)" in s.summary()
    rand = make_scene("demo", 0, val_split="random")
    assert chebyshev_min(rand.labels["val"], rand.labels["train"]) == 1


def test_old_store_without_val_metadata_reads_as_unknown(tmp_path):
    import zarr

    write_scene(make_scene("tiny", 0), tmp_path / "t.zarr")
    root = zarr.open_group(str(tmp_path / "t.zarr"), mode="r+")
    meta = dict(root.attrs["bdgf"])
    del meta["val_split"]
    root.attrs["bdgf"] = meta
    s = Scene.open(tmp_path / "t.zarr")
    assert s.meta.val_split == {"method": "unknown", "min_distance": "unknown"}
    assert "val split: unknown; min distance val-train unknown px" in s.summary()


# --- real label rasters ---------------------------------------------------------------------


def houston_train(real_data) -> np.ndarray:
    import rasterio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(real_data / "houston2013" / "2013_IEEE_GRSS_DF_Contest_Samples_TR.tif") as ds:
            return ds.read(1).astype(np.uint16)


def test_houston2013_val_is_whole_polygons_six_pixels_from_train(real_data):
    lab = houston_train(real_data)
    train, val, info = carve_val(lab, 0.2, seed=0, return_info=True)
    assert info["regions"] == 185
    assert chebyshev_min(val, train) >= R + 1 == info["min_distance"]
    assert info["unbuffered_classes"] == [] and info["fallback_classes"] == []
    assert shared_regions(lab, train, val) == 0
    n = np.bincount(lab.ravel(), minlength=16)[1:]
    v = np.bincount(val.ravel(), minlength=16)[1:]
    t = np.bincount(train.ravel(), minlength=16)[1:]
    assert (v > 0).all() and (t > 0).all()
    # 12 of the 15 classes come within 12 px of their 20 %; the two-polygon classes (synthetic
    # grass, tennis court, running track) give one whole polygon (a third to a half)
    close = np.abs(v - np.round(0.2 * n)) <= 12
    assert close.sum() >= 12 and (v <= 0.55 * n).all()
    assert 0.2 * 2832 <= v.sum() <= 0.3 * 2832
    assert t.sum() + v.sum() + info["dropped_train"] == 2832 and info["dropped_train"] < 0.1 * 2832


def test_augsburg_val_is_whole_regions_except_the_seven_pixel_class(real_data):
    lab = scipy.io.loadmat(real_data / "augsburg" / "TrainImage.mat")["TrainImage"].astype(np.uint16)
    train, val, info = carve_val(lab, 0.2, seed=0, return_info=True)
    assert info["regions"] == 96
    # class 6 (Commercial area) is one 7-pixel region: it is cut, and too small for the buffer
    assert info["fallback_classes"] == [6] and info["unbuffered_classes"] == [6]
    others = np.where(train == 6, 0, train)
    assert chebyshev_min(val, others) >= R + 1 == info["min_distance_buffered"]
    assert shared_regions(np.where(lab == 6, 0, lab), train, val) == 0
    n = np.bincount(lab.ravel(), minlength=8)[1:]
    v = np.bincount(val.ravel(), minlength=8)[1:]
    assert (v > 0).all() and (np.abs(v - np.round(0.2 * n)) <= 0.1 * n + 2).all(), (v, n)


# --- early stopping when val saturates -------------------------------------------------------


def test_saturated_val_stops_on_nll_patience_and_keeps_the_selected_epoch():
    """A two-class problem a patch's mean separates: val OA reaches 1.0 within a few epochs; the
    NLL then creeps down by less than 0.01 an epoch, so training stops on patience long before
    the last epoch, and the kept epoch is the last one that beat the best by the margin."""
    torch.manual_seed(0)
    modalities, cm = ["hsi", "lidar"], [0, 0, 0, 1]
    cfg = TrainConfig(patch_size=7, branches=("cnn",))
    feats = {"low": 2, "mid": 2, "high": 2}
    model, criterion = build_classifier(cfg, input_channels(4, 2), feats, 2)
    view = ModalityView(modalities, cm)
    g = torch.Generator().manual_seed(0)

    def batch(n):
        return separable_patch_batch(n, g, feats)

    train_loader = [batch(16) for _ in range(4)]
    val_loader = [batch(32)]
    joint = torch.nn.ModuleDict({"m": model, "c": criterion})
    stepper = TorchStepper(joint, torch.optim.AdamW(joint.parameters(), lr=1e-3))
    logs, kept = [], []
    best = train_epochs(model, criterion, train_loader, val_loader, stepper, view, epochs=300, patience=5,
                        on_log=lambda r: logs.append(r) if "val_oa" in r else None,
                        on_best=lambda e, oa: kept.append(e))
    last = logs[-1]["epoch"]
    assert best["stopped_early"] and last < 300 and last == best["epoch"] + 5
    assert best["val_oa"] == 1.0 and kept[-1] == best["epoch"]
    sat = [r for r in logs if r["val_oa"] == 1.0]
    assert sat and sat[0]["epoch"] < best["epoch"] <= last  # saturated before the selected epoch
    after = [r["val_nll"] for r in logs if r["epoch"] > best["epoch"]]
    assert all(v > best["val_nll"] - 0.01 for v in after)  # nothing after beat it by the margin
    assert any(v < best["val_nll"] for v in after)  # ...though the NLL kept creeping down
