"""Grouped cross-validation: folds of whole regions (bdgf.data.splits.grouped_folds) and
`bdgf cv` end to end on a tiny pretrained run with cached features."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from bdgf.config import RunConfig
from bdgf.data.scene import Scene, write_scene
from bdgf.data.splits import fold_splits, grouped_folds
from bdgf.data.synthetic import make_scene
from bdgf.engine.features import compute_features
from bdgf.engine.pretrain import pretrain
from bdgf.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")


def blob_labels(seed: int, size: int = 120, blobs: int = 40, classes: int = 3) -> np.ndarray:
    """(size, size) raster of square blobs (2-6 px a side) of random classes, a few touching."""
    rng = np.random.default_rng(seed)
    lab = np.zeros((size, size), np.int64)
    for i in range(blobs):
        s = int(rng.integers(2, 7))
        r, c = (int(v) for v in rng.integers(0, size - s, 2))
        lab[r:r + s, c:c + s] = 1 + int(rng.integers(classes))
    return lab


def region_folds(lab: np.ndarray, fold: np.ndarray) -> list[set[int]]:
    """The set of folds each 8-connected same-class region of ``lab`` has pixels in."""
    out = []
    for k in np.unique(lab[lab > 0]):
        ids, n = ndimage.label(lab == k, structure=np.ones((3, 3)))
        out.extend(set(np.unique(fold[ids == i]).tolist()) for i in range(1, n + 1))
    return out


def test_folds_are_grouped_stratified_and_deterministic():
    lab = blob_labels(0)
    fold = grouped_folds(lab, 4, seed=1)
    assert ((fold >= 0) == (lab > 0)).all()
    assert all(len(f) == 1 for f in region_folds(lab, fold))  # no region in two folds
    assert set(np.unique(fold[fold >= 0])) == {0, 1, 2, 3}
    for k in np.unique(lab[lab > 0]):  # every class is spread over the folds, none hoarding it
        per = np.bincount(fold[lab == k], minlength=4)
        assert per.max() <= 0.5 * per.sum() + 36
    assert np.array_equal(fold, grouped_folds(lab, 4, seed=1))
    assert not np.array_equal(fold, grouped_folds(lab, 4, seed=2))
    with pytest.raises(InputError, match="cannot fill 50 folds"):
        grouped_folds(np.pad(np.ones((2, 2), np.int64), 3), 50)


def test_fold_train_keeps_the_buffer_from_its_test_regions():
    lab = blob_labels(1)
    fold = grouped_folds(lab, 3, seed=0)
    for k in range(3):
        parts = fold_splits(lab, fold, k, seed=k)
        test, train, val = parts["test"], parts["train"], parts["val"]
        assert np.array_equal(test > 0, fold == k)
        for a, b in ((train, test), (val, test)):
            pa, pb = np.argwhere(a > 0), np.argwhere(b > 0)
            assert np.abs(pa[:, None] - pb[None]).max(-1).min() > 5  # Chebyshev, beyond the patch radius
        assert not np.any((train > 0) & (val > 0))


TINY = {
    "pretrain.steps": 6,
    "pretrain.batch_size": 4,
    "pretrain.tile_size": 16,
    "pretrain.unet": {"base_channels": 8, "channel_mults": [1, 2, 2]},
    "features.tile_size": 16,
    "features.timesteps": [5],
    "train.epochs": 4,
    "train.batch_size": 32,
    "train.patience": 2,
    "train.branches": ["cnn"],
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("cv")
    store = d / "tiny.zarr"
    write_scene(make_scene("tiny", 0), store)
    pretrain(store, d / "run", RunConfig().with_overrides(TINY), progress=False)
    compute_features(store, d / "run", progress=False)
    return store, d / "run"


def test_bdgf_cv_prints_mean_and_std_over_grouped_folds(tiny_run, capsys):
    from bdgf.cli import main

    store, run = tiny_run
    before = Scene.open(store)
    with pytest.raises(SystemExit) as done:
        main(["cv", str(store), "--run", str(run), "--folds", "3", "--seed", "0"])
    assert done.value.code in (0, None)
    out = capsys.readouterr().out
    saved = json.loads((run / "eval" / "cv.json").read_text())
    folds = saved["per_fold"]
    assert saved["folds"] == 3 and [f["fold"] for f in folds] == [0, 1, 2]
    oa = np.array([f["oa"] for f in folds])
    assert saved["oa"]["mean"] == pytest.approx(oa.mean()) and saved["oa"]["std"] == pytest.approx(oa.std(ddof=1))
    assert f"OA {100 * oa.mean():.2f} ± {100 * oa.std(ddof=1):.2f}" in out
    # the fold splits are in the store; together the test folds cover every pooled label, once
    s = Scene.open(store)
    pooled = sum(before.labels(k) for k in before.splits)
    tests = [s.labels(f"cv{k}_test") for k in range(3)]
    assert np.array_equal(sum(tests), pooled)
    assert all(f["test_pixels"] == np.count_nonzero(t) for f, t in zip(folds, tests))
    for f in folds:  # each fold's classifier was trained, selected and reported with both figures
        summary = json.loads((run / "cv" / f"fold{f['fold']}" / "summary.json").read_text())
        assert summary["train_split"] == f"cv{f['fold']}_train" and summary["val_split"] == f"cv{f['fold']}_val"
        assert 1 <= summary["epoch"] <= summary["epochs_run"] <= 4
        assert 0.0 <= summary["train_oa"] <= 1.0 and summary["train_nll"] > 0.0
        assert summary["val_oa"] == f["val_oa"]
    assert not (run / "train").exists() or not list((run / "train").glob("seed*"))  # the run's own seeds untouched
    # a second run with fewer folds replaces the cv splits
    with pytest.raises(SystemExit):
        main(["cv", str(store), "--run", str(run), "--folds", "2"])
    assert sorted(k for k in Scene.open(store).splits if k.startswith("cv")) == [
        f"cv{k}_{p}" for k in range(2) for p in ("test", "train", "val")]
