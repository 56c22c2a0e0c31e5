"""PatchDataset, labelled_pixels and shard_indices on small hand-built scenes."""

import pickle

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader, DistributedSampler

from bdgf.data.patches import PatchDataset, labelled_pixels, shard_indices
from bdgf.data.scene import ModalityData, Scene, SceneData, write_scene
from bdgf.errors import InputError, StoreError

H, W, P = 13, 17, 7
HALF = P // 2
NAN_PIXELS = [(4, 5), (9, 12), (6, 0)]  # (4,5) and (9,12) are labelled in train, (6,0) is not


def _raw(seed=0, h=H, w=W):
    rng = np.random.default_rng(seed)
    hsi = rng.normal(100, 20, (5, h, w)).astype(np.float32)
    lidar = rng.normal(10, 3, (1, h, w)).astype(np.float32)
    return hsi, lidar


def _labels(h=H, w=W, seed=1):
    rng = np.random.default_rng(seed)
    train = np.zeros((h, w), np.uint16)
    test = np.zeros((h, w), np.uint16)
    pick = rng.random((h, w))
    cls = rng.integers(1, 4, (h, w)).astype(np.uint16)
    train[pick < 0.3] = cls[pick < 0.3]
    test[pick > 0.7] = cls[pick > 0.7]
    return train, test


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A 13x17 scene (hsi 5 bands + lidar 1 band), NaN pixels, every corner labelled in train."""
    hsi, lidar = _raw()
    for r, c in NAN_PIXELS:
        hsi[2, r, c] = np.nan
    train, test = _labels()
    train[6, 0] = 0
    for r, c in [(0, 0), (0, W - 1), (H - 1, 0), (H - 1, W - 1), *NAN_PIXELS[:2]]:
        train[r, c] = 2
        test[r, c] = 0
    path = tmp_path_factory.mktemp("scene") / "s.zarr"
    write_scene(
        SceneData(
            name="toy",
            modalities={"hsi": ModalityData(hsi, kind="hsi"), "lidar": ModalityData(lidar, kind="lidar")},
            labels={"train": train, "test": test},
            class_names=["a", "b", "c"],
        ),
        path,
    )
    feat = np.random.default_rng(7).normal(0, 1, (3, H, W)).astype(np.float16)
    zarr.open_group(str(path), mode="a")["features"].create_array(
        "low", data=feat, dimension_names=("feat_low", "y", "x")
    )
    return {"path": path, "hsi": hsi, "lidar": lidar, "train": train, "feat": feat}


def _expected_normalised(store):
    """(C_total, H, W): per band (x - mean) / std over valid pixels, invalid pixels 0."""
    raw = np.concatenate([store["hsi"], store["lidar"]]).astype(np.float64)
    valid = np.isfinite(raw).all(axis=0)
    vals = raw[:, valid]
    mean, std = vals.mean(axis=1), vals.std(axis=1)
    out = (raw - mean[:, None, None]) / std[:, None, None]
    out[:, ~valid] = 0.0
    return out, valid


def test_labelled_pixels_drops_invalid(store):
    coords, dropped = labelled_pixels(Scene.open(store["path"]), "train", return_dropped=True)
    train = store["train"]
    assert dropped == 2
    expected = [(r, c) for r in range(H) for c in range(W) if train[r, c] and (r, c) not in NAN_PIXELS]
    assert coords.dtype == np.int64 and coords.shape == (len(expected), 2)
    assert [tuple(x) for x in coords.tolist()] == expected  # row-major
    np.testing.assert_array_equal(labelled_pixels(store["path"], "train"), coords)


def test_items_match_numpy(store):
    norm, valid = _expected_normalised(store)
    padded = np.pad(norm, ((0, 0), (HALF, HALF), (HALF, HALF)), mode="reflect")
    vpad = np.pad(valid, HALF, mode="reflect")
    fpad = np.pad(store["feat"].astype(np.float32), ((0, 0), (HALF, HALF), (HALF, HALF)), mode="reflect")
    ds = PatchDataset(store["path"], "train", patch_size=P, features=["low"], cache="lazy")
    assert ds.dropped_invalid == 2 and ds.num_classes == 3
    seen = set()
    for i in range(len(ds)):
        it = ds[i]
        r, c = it["coords"].tolist()
        seen.add((r, c))
        assert it["patch"].dtype == torch.float32 and it["patch"].shape == (6, P, P)
        assert it["label"].dtype == torch.int64 and it["label"].item() == store["train"][r, c] - 1
        # centre pixel == normalised raw value at (row, col)
        np.testing.assert_allclose(it["patch"][:, HALF, HALF].numpy(), norm[:, r, c], rtol=1e-5, atol=1e-5)
        # the whole window, incl. reflect padding at borders and zeros at invalid pixels
        np.testing.assert_allclose(it["patch"].numpy(), padded[:, r : r + P, c : c + P], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(it["valid"].numpy(), vpad[r : r + P, c : c + P])
        assert it["valid"][HALF, HALF]
        np.testing.assert_array_equal(it["low"].numpy(), fpad[:, r : r + P, c : c + P])
    assert {(0, 0), (0, W - 1), (H - 1, 0), (H - 1, W - 1)} <= seen


def test_corner_reflect_and_invalid_flag(store):
    norm, _ = _expected_normalised(store)
    ds = PatchDataset(store["path"], "train", patch_size=P, features=None, cache="lazy")
    corner = [i for i in range(len(ds)) if tuple(ds.coords[i]) == (0, 0)][0]
    it = ds[corner]
    # numpy reflect: padded row k < HALF is raw row HALF - k (edge row not repeated)
    for k in range(P):
        for m in range(P):
            np.testing.assert_allclose(
                it["patch"][:, k, m].numpy(), norm[:, abs(k - HALF), abs(m - HALF)], rtol=1e-5, atol=1e-5
            )
    # a patch containing the invalid pixel (6, 0): zero and flagged
    near = [i for i in range(len(ds)) if abs(ds.coords[i][0] - 6) <= HALF and ds.coords[i][1] <= HALF]
    assert near
    for i in near:
        it = ds[i]
        r, c = it["coords"].tolist()
        k, m = 6 - r + HALF, 0 - c + HALF
        assert not it["valid"][k, m]
        assert torch.all(it["patch"][:, k, m] == 0)


def test_memory_cache_equals_lazy(store):
    lazy = PatchDataset(store["path"], "train", patch_size=P, features=["low"], cache="lazy")
    mem = PatchDataset(store["path"], "train", patch_size=P, features=["low"], cache="memory")
    auto = PatchDataset(store["path"], "train", patch_size=P, features=["low"])
    assert auto.cache == "memory"  # a tiny scene is cached by default
    for i in range(len(lazy)):
        a, b = lazy[i], mem[i]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (i, k)


def test_auto_cache_follows_the_byte_budget(store, monkeypatch):
    need = PatchDataset(store["path"], "train", patch_size=P, features=["low"], cache="lazy").cache_bytes()
    assert PatchDataset(store["path"], "train", patch_size=P, features=["low"], cache_bytes=need).cache == "memory"
    small = PatchDataset(store["path"], "train", patch_size=P, features=["low"], cache_bytes=need - 1)
    assert small.cache == "lazy"
    monkeypatch.setenv("BDGF_CACHE_BYTES", str(need - 1))  # the process-wide budget TileDataset uses too
    assert PatchDataset(store["path"], "train", patch_size=P, features=["low"]).cache == "lazy"
    assert PatchDataset(store["path"], "train", patch_size=P, features=None).cache == "memory"  # fewer bytes


def test_memory_equals_lazy_on_grid_smaller_than_patch(tmp_path):
    hsi, lidar = _raw(3, h=4, w=3)
    lab = np.array([[1, 0, 2], [0, 1, 0], [2, 0, 0], [0, 0, 1]], np.uint16)
    write_scene(
        SceneData("tiny", {"hsi": ModalityData(hsi), "lidar": ModalityData(lidar)}, {"train": lab}, ["x", "y"]),
        tmp_path / "t.zarr",
    )
    lazy = PatchDataset(tmp_path / "t.zarr", "train", patch_size=11, features=None, cache="lazy")
    mem = PatchDataset(tmp_path / "t.zarr", "train", patch_size=11, features=None, cache="memory")
    assert len(lazy) == 5
    for i in range(len(lazy)):
        for k in ("patch", "valid", "label", "coords"):
            assert torch.equal(lazy[i][k], mem[i][k])


def test_missing_features_and_bad_args(store):
    with pytest.raises(StoreError, match=r"\['mid', 'high'\].*has \['low'\]"):
        PatchDataset(store["path"], "train", patch_size=P)  # default asks for low, mid, high
    with pytest.raises(InputError, match="odd"):
        PatchDataset(store["path"], "train", patch_size=4, features=None)
    with pytest.raises(KeyError, match="no split 'val'"):
        PatchDataset(store["path"], "val", features=None)


def test_pickle_and_dataloader_workers(store):
    ds = PatchDataset(store["path"], "train", patch_size=P, features=["low"], cache="lazy")
    ds[0]
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000  # path + index arrays, no scene data
    clone = pickle.loads(blob)
    for k, v in ds[3].items():
        assert torch.equal(v, clone[3][k])

    def batches(d, workers):
        return list(DataLoader(d, batch_size=8, num_workers=workers))

    b0 = batches(ds, 0)
    b2 = batches(ds, 2)
    mem = PatchDataset(store["path"], "train", patch_size=P, features=["low"], cache="memory")
    mem[0]  # cache built in the parent; must not be pickled into workers
    assert len(pickle.dumps(mem)) < 20_000
    b2m = batches(mem, 2)
    assert len(b0) == len(b2) == len(b2m) == -(-len(ds) // 8)
    for x, y, z in zip(b0, b2, b2m):
        assert x["patch"].shape[0] <= 8 and x["low"].dtype == torch.float32
        for k in x:
            assert torch.equal(x[k], y[k]) and torch.equal(x[k], z[k])


def test_shard_indices_properties():
    n, ws = 10, 3
    shards = [shard_indices(n, r, ws, seed=5, epoch=0, shuffle=True) for r in range(ws)]
    assert all(len(s) == 4 for s in shards)  # ceil(10 / 3), equal for lockstep
    allidx = np.concatenate(shards)
    assert set(allidx.tolist()) == set(range(n))  # cover everything
    assert len(allidx) - len(set(allidx.tolist())) == 2  # only the 2 wrap-around pads repeat
    # divisible n: strictly disjoint
    even = [shard_indices(12, r, 3, seed=5, epoch=0) for r in range(3)]
    assert sorted(np.concatenate(even).tolist()) == list(range(12))
    # deterministic; changes with epoch and seed when shuffling, not otherwise
    np.testing.assert_array_equal(shards[1], shard_indices(n, 1, ws, seed=5, epoch=0, shuffle=True))
    assert not np.array_equal(shard_indices(100, 0, 2, 5, 0), shard_indices(100, 0, 2, 5, 1))
    assert not np.array_equal(shard_indices(100, 0, 2, 5, 0), shard_indices(100, 0, 2, 6, 0))
    np.testing.assert_array_equal(shard_indices(9, 1, 2, 5, 0, False), shard_indices(9, 1, 2, 5, 3, False))
    # drop_last: floor, strictly disjoint
    dl = [shard_indices(n, r, ws, 5, 0, drop_last=True) for r in range(ws)]
    assert all(len(s) == 3 for s in dl) and len(set(np.concatenate(dl).tolist())) == 9
    with pytest.raises(ValueError):
        shard_indices(n, 3, 3)


def test_shard_matches_distributed_sampler_without_shuffle():
    for n, ws in [(10, 3), (7, 4), (2, 5)]:
        for r in range(ws):
            ref = list(DistributedSampler(range(n), num_replicas=ws, rank=r, shuffle=False))
            assert shard_indices(n, r, ws, shuffle=False).tolist() == ref


def test_dataset_shards_cover_split(store):
    full = PatchDataset(store["path"], "train", patch_size=P, features=None)
    parts = [
        PatchDataset(store["path"], "train", patch_size=P, features=None, rank=r, world_size=3, seed=1, shuffle=True)
        for r in range(3)
    ]
    assert len({len(p) for p in parts}) == 1
    got = {tuple(c) for p in parts for c in p.coords.tolist()}
    assert got == {tuple(c) for c in full.coords.tolist()}
    before = parts[0].coords.copy()
    parts[0].set_epoch(1)
    assert not np.array_equal(before, parts[0].coords)
    it = parts[0][0]
    assert it["coords"].tolist() == parts[0].coords[0].tolist()
    assert it["label"].item() == parts[0].labels[0]
