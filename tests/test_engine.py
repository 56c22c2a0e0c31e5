"""The method end to end on the `tiny` preset: pretrain -> dense features -> classifier -> metrics,
plus dense-feature determinism, caching, divergence and mismatched-run errors."""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch
import zarr

from bdgf.config import ConfigError, RunConfig
from bdgf.data.scene import Scene, write_scene
from bdgf.data.synthetic import make_scene
from bdgf.data import feature_cache
from bdgf.diffusion.features import FeatureSpec, position_noise, tile_features
from bdgf.engine.classify import evaluate, train
from bdgf.engine.features import compute_features, extract_tiles
from bdgf.engine.loop import TorchStepper, TrainingDiverged, cycle
from bdgf.engine.pretrain import build_denoiser, pretrain, pretrain_loop, tile_loader
from bdgf.errors import InputError
from bdgf.run import Run
from helpers import TINY_RUN


def load_denoiser(path):
    """(model, schedule, checkpoint) of the run whose denoiser.pt is ``path``."""
    return Run(path.parents[1]).load_denoiser()


def feature_tiles(scene, spec):
    return spec.grid(*scene.shape).origins()


def prepare_store(store, scene, spec, channels):
    return feature_cache.prepare(store, spec.grid(*scene.shape), spec.as_dict(), channels)


mark_complete = feature_cache.mark_complete

TINY = TINY_RUN


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A pretrained run on the tiny preset with features cached (shared by the tests below)."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("tiny")
    store = d / "tiny.zarr"
    write_scene(make_scene("tiny", 0), store)
    summary = pretrain(store, d / "run", RunConfig().with_overrides(TINY), progress=False)
    feats = compute_features(store, d / "run", progress=False)
    return store, d / "run", summary, feats


def test_pretrain_logs_losses_and_masking_every_step(tiny_run):
    store, run, summary, _ = tiny_run
    lines = [json.loads(x) for x in (run / "pretrain" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(10, 31, 10))
    for r in lines:
        for m in ("hsi", "lidar"):
            assert np.isfinite(r[f"loss/{m}"]) and 0.0 < r[f"p_mask/{m}"] < 1.0
    assert set(summary.p_mask) == {"hsi", "lidar"}
    assert (run / "pretrain" / "curves.png").stat().st_size > 1000
    ckpt = torch.load(run / "pretrain" / "denoiser.pt", weights_only=False)
    assert ckpt["step"] == 30 and ckpt["masking"]  # masking state saved with the run


@pytest.fixture(scope="module")
def trained(tiny_run):
    """The tiny run with a classifier (seed 0) trained and scored on test."""
    store, run, _, _ = tiny_run
    result = train(store, run, progress=False)
    return result, evaluate(store, run, split="test")


def test_tiny_end_to_end_beats_chance(tiny_run, trained):
    store, run, _, feats = tiny_run
    assert feats.state == "new"
    result, metrics = trained
    assert result.val_oa > 0.5
    k = Scene.open(store).num_classes
    assert metrics.oa["mean"] > 2.0 / k, metrics.oa  # 4 classes: chance is 0.25
    saved = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(saved["branches"]) == {"cnn", "mamba", "transformer"}
    assert len(saved["per_seed"]["0"]["confusion"]) == k
    assert (run / "eval" / "map_test.png").exists()


def test_features_are_cached_reused_and_recomputed_for_another_checkpoint(tiny_run, tmp_path):
    store, run, _, _ = tiny_run
    assert compute_features(store, run, progress=False).state == "reuse"
    # Another checkpoint (other weights) on a copy of the store: the cache must not be trusted.
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    other = tmp_path / "run2"
    pretrain(copy, other, RunConfig().with_overrides({**TINY, "pretrain.steps": 3, "pretrain.seed": 7}),
             progress=False)
    assert compute_features(copy, other, progress=False).state == "recompute"
    a = zarr.open_group(str(store), mode="r")["features"]
    b = zarr.open_group(str(copy), mode="r")["features"]
    assert a.attrs["spec"]["checkpoint"] != b.attrs["spec"]["checkpoint"]


def test_dense_features_cover_every_pixel_once_from_its_own_tile(tiny_run):
    store, run, _, _ = tiny_run
    scene = Scene.open(store)
    group = zarr.open_group(str(store), mode="r")["features"]
    spec = FeatureSpec.from_dict(group.attrs["spec"])
    model, schedule, _ = load_denoiser(run / "pretrain" / "denoiser.pt")
    low = group["low"][...].astype(np.float32)
    assert group["_done"][...].all()
    assert np.abs(low).sum(axis=0).min() > 0  # no pixel left at the fill value: no gaps
    # Every stored pixel equals the centre crop of the one tile that owns it (no double writes).
    T, h = spec.tile_size, spec.halo
    H, W = scene.shape
    for r, c in feature_tiles(scene, spec):
        win = torch.from_numpy(scene.read_window(r - h, c - h, T + 2 * h, T + 2 * h, concat=True))[None]
        want = tile_features(model, schedule, win, [(r - h, c - h)], spec)["low"][0].numpy()
        th, tw = min(T, H - r), min(T, W - c)
        np.testing.assert_allclose(low[:, r : r + th, c : c + tw], want[:, :th, :tw], atol=2e-3, rtol=2e-3)


def test_tile_features_do_not_depend_on_batch_size(tiny_run):
    store, run, _, _ = tiny_run
    scene = Scene.open(store)
    model, schedule, _ = load_denoiser(run / "pretrain" / "denoiser.pt")
    spec = FeatureSpec("x", (5, 100), 1, 3, 16, 28, "concat")
    origins = [(-28, -28), (-12, 4), (4, -12)]
    wins = torch.from_numpy(np.stack([scene.read_window(r, c, 72, 72, concat=True) for r, c in origins]))
    together = tile_features(model, schedule, wins, origins, spec)
    for i, o in enumerate(origins):
        alone = tile_features(model, schedule, wins[i : i + 1], [o], spec)
        for level in ("low", "mid", "high"):
            torch.testing.assert_close(alone[level][0], together[level][i], atol=1e-5, rtol=1e-5)


def test_noise_is_a_function_of_global_position():
    a = position_noise(11, 3, -4, 10, 8, 8)
    b = position_noise(11, 3, 0, 12, 8, 8)
    np.testing.assert_array_equal(a[:, 4:, 2:], b[:, :4, :6])  # the overlap of two windows
    assert abs(float(a.mean())) < 0.3 and 0.7 < float(a.std()) < 1.3
    assert not np.array_equal(position_noise(12, 3, -4, 10, 8, 8), a)


def _extract_half(args):
    store, run, half = args
    torch.set_num_threads(1)
    from bdgf.engine.features import feature_spec

    model, schedule, ckpt = load_denoiser(run / "pretrain" / "denoiser.pt")
    group = zarr.open_group(str(store), mode="r")["features"]
    spec = FeatureSpec.from_dict(group.attrs["spec"])
    tiles = feature_tiles(Scene.open(store), spec)
    return extract_tiles(store, model, schedule, spec, tiles[half::2], batch_size=1 + half)


def test_two_worker_processes_write_the_same_features_as_one(tiny_run, tmp_path):
    import shutil

    store, run, _, _ = tiny_run
    copy = tmp_path / "two.zarr"
    shutil.copytree(store, copy)
    root = zarr.open_group(str(copy), mode="r+")
    spec_attrs = dict(root["features"].attrs["spec"])
    del root["features"]
    spec = FeatureSpec.from_dict(spec_attrs)
    model, _, _ = load_denoiser(run / "pretrain" / "denoiser.pt")
    prepare_store(copy, Scene.open(copy), spec, spec.channels(model))
    with ProcessPoolExecutor(2) as pool:
        counts = list(pool.map(_extract_half, [(copy, run, 0), (copy, run, 1)]))
    assert sum(counts) == len(feature_tiles(Scene.open(copy), spec))
    assert mark_complete(copy)
    one = zarr.open_group(str(store), mode="r")["features"]
    two = zarr.open_group(str(copy), mode="r")["features"]
    for level in ("low", "mid", "high"):
        np.testing.assert_allclose(two[level][...].astype(np.float32), one[level][...].astype(np.float32),
                                   atol=1e-5, rtol=1e-3)


def test_run_from_another_scene_is_refused(tiny_run, tmp_path):
    _, run, _, _ = tiny_run
    other = tmp_path / "sar.zarr"
    write_scene(make_scene("sar", 0), other)
    with pytest.raises(InputError, match="was made for scene"):
        compute_features(other, run, progress=False)
    with pytest.raises(InputError, match="was made for scene"):
        train(other, run, progress=False)


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    store = tmp_path / "t.zarr"
    write_scene(make_scene("tiny", 1), store)
    cfg = RunConfig().with_overrides(TINY).pretrain
    model, schedule, masking = build_denoiser(cfg, [16, 1])
    stepper = TorchStepper(model, torch.optim.SGD(model.parameters(), lr=1e12), grad_clip=None)
    saved = []
    with pytest.raises(TrainingDiverged) as info:
        pretrain_loop(model, schedule, masking, cycle(tile_loader(store, cfg, 400, 0)), stepper, steps=200,
                      channel_modality=torch.tensor([0] * 16 + [1]), modality_names=["hsi", "lidar"],
                      generator=torch.Generator().manual_seed(0), checkpoint_every=1, on_checkpoint=saved.append)
    import re

    m = re.search(r"loss became \S+ at step (\d+); stopped, (.*)", str(info.value))
    assert m, str(info.value)
    bad_step = int(m.group(1))
    assert saved == list(range(1, bad_step))  # every step before the bad one was checkpointed...
    if saved:
        assert f"last good checkpoint (step {saved[-1]}) is kept" in m.group(2)  # ...and is named


@pytest.mark.parametrize(
    "data, message",
    [
        ({"train": {"epochz": 3}}, "unknown key"),
        ({"trian": {}}, "unknown section"),
        ({"train": {"patch_size": 10}}, "must be odd"),
        ({"pretrain": {"lr": 5.0}}, "must be in \\(0, 1\\)"),
        ({"pretrain": {"masking": {"p0": 0.9, "p_max": 0.5}}}, "p_min <= p0 <= p_max"),
        ({"features": {"timesteps": [5, 5000]}}, "num_timesteps"),
        ({"train": {"branches": ["cnn", "rnn"]}}, "subset"),
    ],
)
def test_bad_config_is_rejected_with_the_key_named(tmp_path, data, message):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message):
        RunConfig.load(path)


def test_config_round_trips_through_yaml(tmp_path):
    cfg = RunConfig().with_overrides({"train.epochs": 3, "pretrain.unet": {"base_channels": 8}})
    cfg.save(tmp_path / "c.yaml")
    assert RunConfig.load(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("absent", [None, "lidar"])
def test_pipeline_from_run_gives_the_probabilities_of_evaluate(tiny_run, trained, absent):
    """The run loaded as one pipeline (raw scene tile in) reproduces `evaluate`'s per-pixel
    probabilities at every test pixel at least a patch radius inside the scene -- tile borders
    included, since the features are tile-invariant and the graph's halo covers the patch ring
    (at the scene border `evaluate` reflect-pads features, the graph its input). With a
    modality absent, both use the features computed without it."""
    from bdgf.pipeline import Pipeline

    store, run, _, _ = tiny_run
    if absent is not None:
        evaluate(store, run, split="test", absent=absent, write_map=False)
    suffix = "" if absent is None else f"_without_{absent}"
    pred = np.load(run / "eval" / f"predictions_test{suffix}.npz")
    coords, probs = pred["coords"], pred["probs"][list(pred["seeds"]).index(0)]
    pipe = Pipeline.from_run(run, seed=0)
    scene = Scene.open(store)
    T, r = pipe.tile_size, pipe.config.train.patch_size // 2
    H, W = scene.shape
    checked, near_tile_edge = 0, 0
    for origin in pipe.grid(H, W).origins():
        r0, c0 = int(origin[0]), int(origin[1])
        inside = ((coords[:, 0] >= r0) & (coords[:, 0] < r0 + T) & (coords[:, 1] >= c0) & (coords[:, 1] < c0 + T)
                  & (coords[:, 0] >= r) & (coords[:, 0] < H - r) & (coords[:, 1] >= r) & (coords[:, 1] < W - r))
        if not inside.any():
            continue
        tile = pipe.classify_tiles(scene, [origin], absent=[absent] if absent else ())[0]  # (K, T, T)
        got = tile[:, coords[inside, 0] - r0, coords[inside, 1] - c0].T
        # The cache keeps features as float16, the pipeline computes them in float32.
        np.testing.assert_allclose(got, probs[inside], atol=1e-3)
        np.testing.assert_array_equal(got.argmax(1), probs[inside].argmax(1))
        checked += int(inside.sum())
        rows, cols = coords[inside, 0] - r0, coords[inside, 1] - c0
        near_tile_edge += int(((np.minimum(rows, T - 1 - rows) < r) | (np.minimum(cols, T - 1 - cols) < r)).sum())
    assert checked >= 20 and near_tile_edge >= 10, (checked, near_tile_edge)
    if absent is not None:  # the absent modality really was left out
        full = np.load(run / "eval" / "predictions_test.npz")["probs"][0]
        assert np.abs(full - probs).max() > 1e-3
        return
    # The normalisation is the run's own record, not the store's: raw values in, same input.
    raw = {m: scene.modality(m)[:, :8, :8] for m in scene.modality_names}
    np.testing.assert_allclose(pipe.normalise(raw)[:, 2:6, 2:6],
                               scene.read_window(0, 0, 8, 8, concat=True)[:, 2:6, 2:6], atol=1e-5)
