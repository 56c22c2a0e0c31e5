"""Nodata end to end: a scene whose border and an inner blob are nodata. Pretraining skips tiles
that are mostly nodata, the classifier sees which pixels are there, and the inference graph
returns class 0 (nodata) with zero confidence exactly on the nodata pixels; and what the
classifier sees of the data (bands where available, availability maps) is per pixel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bdgf.config import RunConfig
from bdgf.data.scene import Scene, write_scene
from bdgf.data.synthetic import make_scene
from bdgf.engine.classify import evaluate, train
from bdgf.engine.features import compute_features
from bdgf.engine.pretrain import pretrain
from bdgf.inference import class_map
from bdgf.models.inputs import classifier_input
from helpers import TINY_RUN

NODATA_RUN = {**TINY_RUN, "pretrain.steps": 20, "pretrain.checkpoint_every": 20, "train.epochs": 12,
              "train.patience": 12}


def nodata_mask(h: int, w: int) -> np.ndarray:
    """(h, w) bool, True = nodata: a 4-px border on the top and left and a disc inside."""
    rr, cc = np.mgrid[:h, :w]
    blob = (rr - 30) ** 2 + (cc - 20) ** 2 <= 5 ** 2
    return (rr < 4) | (cc < 4) | blob


@pytest.fixture(scope="module")
def nodata_run(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("nodata")
    scene = make_scene("tiny", 0)
    mask = nodata_mask(*scene.labels["train"].shape)
    for mod in scene.modalities.values():
        mod.data = mod.data.astype(np.float32)
        mod.data[:, mask] = np.nan
    store = d / "nodata.zarr"
    write_scene(scene, store)
    run = d / "run"
    pretrain(store, run, RunConfig().with_overrides(NODATA_RUN), progress=False)
    compute_features(store, run, progress=False)
    train(store, run, progress=False)
    return store, run, mask


def test_the_store_records_the_nodata(nodata_run):
    store, _, mask = nodata_run
    np.testing.assert_array_equal(~Scene.open(store).valid, mask)


def test_inference_gives_nodata_exactly_on_the_nodata_pixels(nodata_run):
    from bdgf.pipeline import Pipeline

    store, run, mask = nodata_run
    scene = Scene.open(store)
    pipe = Pipeline.from_run(run, seed=0)
    H, W = scene.shape
    classes = np.zeros((H, W), np.int64)
    conf = np.zeros((H, W), np.float32)
    for origin in pipe.grid(H, W).origins():
        probs = torch.from_numpy(pipe.classify_tiles(scene, [origin]))
        assert torch.isfinite(probs).all()
        c, p = class_map(probs)
        r0, c0 = int(origin[0]), int(origin[1])
        th, tw = min(pipe.tile_size, H - r0), min(pipe.tile_size, W - c0)
        classes[r0 : r0 + th, c0 : c0 + tw] = c[0, :th, :tw].numpy()
        conf[r0 : r0 + th, c0 : c0 + tw] = p[0, :th, :tw].numpy()
        sums = probs[0].sum(0)[:th, :tw].numpy()
        np.testing.assert_allclose(sums[~mask[r0 : r0 + th, c0 : c0 + tw]], 1.0, atol=1e-5)
    np.testing.assert_array_equal(classes == 0, mask)
    assert (conf[mask] == 0).all() and (conf[~mask] > 1.0 / scene.num_classes - 1e-6).all()


def test_pixels_next_to_nodata_are_classified_from_what_is_there(nodata_run):
    """Test pixels within a patch radius of nodata are classified well above chance, and their
    probabilities do not depend on what values the nodata pixels hold."""
    store, run, mask = nodata_run
    metrics = evaluate(store, run, split="test", write_map=False)
    pred = np.load(run / "eval" / "predictions_test.npz")
    coords, probs = pred["coords"], pred["probs"][0]
    scene = Scene.open(store)
    truth = scene.labels("test")[coords[:, 0], coords[:, 1]] - 1
    r = RunConfig.load(run / "config.yaml").train.patch_size // 2
    from scipy.ndimage import binary_dilation

    near = binary_dilation(mask, iterations=r)[coords[:, 0], coords[:, 1]]
    assert near.sum() >= 10
    k = scene.num_classes
    assert float((probs[near].argmax(1) == truth[near]).mean()) > 2.0 / k
    assert metrics.oa["mean"] > 2.0 / k


def test_classifier_input_zeroes_what_is_missing_and_says_so():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, 6, generator=g)
    x[0, :, 1, 1] = float("nan")  # a nodata pixel may hold anything, NaN included
    valid = torch.ones(2, 6, 6, dtype=torch.bool)
    valid[0, 1, 1] = False
    present = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    cm = torch.tensor([0, 0, 0, 1, 1])
    out = classifier_input(x, valid, present, cm)
    assert out.shape == (2, 7, 6, 6) and torch.isfinite(out).all()
    assert (out[0, :5, 1, 1] == 0).all() and (out[0, 5:, 1, 1] == 0).all()  # nodata: no bands, not available
    assert (out[1, 3:5] == 0).all() and (out[1, 6] == 0).all() and (out[1, 5] == 1).all()  # lidar absent
    torch.testing.assert_close(out[1, :3], x[1, :3])
    # Per pixel: applying it to a window and cutting a patch = cutting first.
    torch.testing.assert_close(out[..., 2:5, 1:4], classifier_input(x[..., 2:5, 1:4], valid[..., 2:5, 1:4], present, cm))
