"""The inference graph (denoiser features + classifier on a tile) matches the training-time
pieces (the cached feature path, the patch-wise classifier on what ``classifier_input`` makes of
each patch), returns zero probabilities at nodata, takes presence flags, and exports with
torch.export and ONNX, matching eager outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bdgf.diffusion.features import FeatureSpec, tile_features, tile_noise
from bdgf.diffusion.schedules import NoiseSchedule
from bdgf.diffusion.unet import DenoiserUNet, UNetConfig
from bdgf.inference import TileClassifier
from bdgf.models.classifier import BDGFClassifier, ClassifierConfig
from bdgf.models.inputs import classifier_input

C, M, K, P, T, HALO = 5, 2, 3, 5, 4, 32  # HALO >= the denoiser's receptive radius 28 + P // 2
S = T + 2 * HALO
SPEC = FeatureSpec("test", (5, 60), 1, 9, T, HALO, "concat")
CM = torch.tensor([0, 0, 0, 1, 1])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def graph(one_thread):
    torch.manual_seed(0)
    denoiser = DenoiserUNet(UNetConfig(C, M, base_channels=8, channel_mults=(1, 2, 2)))
    fc = {k: v * len(SPEC.timesteps) for k, v in denoiser.feature_channels.items()}
    classifier = BDGFClassifier(ClassifierConfig.from_dict({
        "in_channels": C + M, "feature_channels": fc, "num_classes": K, "patch_size": P,
        "mamba": {"d_model": 8, "d_state": 4, "n_layers": 1}, "cnn": {"width": 16, "low_width": 8, "num_blocks": 1},
    }))
    return TileClassifier(denoiser, NoiseSchedule(), classifier, SPEC, CM).eval(), denoiser, classifier


def _inputs(batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    window = torch.randn(batch, C, S, S, generator=g)
    origins = [(4 * i - HALO, 8 - HALO) for i in range(batch)]
    return window, torch.from_numpy(tile_noise(SPEC, C, origins, S)), origins


def test_graph_features_equal_the_cached_feature_path(graph):
    model, denoiser, _ = graph
    window, noise, origins = _inputs(2, 0)
    with torch.no_grad():
        dense = model.features(window, noise)
    cached = tile_features(denoiser, NoiseSchedule(), window, origins, SPEC)
    for level in ("low", "mid", "high"):
        torch.testing.assert_close(dense[level][:, :, HALO : HALO + T, HALO : HALO + T], cached[level],
                                   atol=1e-5, rtol=1e-5)


def test_graph_features_equal_the_cache_on_the_whole_patch_ring(graph):
    """Every pixel a patch of the tile reads (the tile and r around it) has, in the graph, exactly
    the features the cache holds for it: those of the tile that owns it (tile invariance)."""
    from bdgf.diffusion.features import region_features
    from bdgf.tiler import TileGrid

    model, denoiser, _ = graph
    g = torch.Generator().manual_seed(5)
    H = W = 24
    scene = torch.randn(C, H + 2 * 64, W + 2 * 64, generator=g)  # a scene with context all around

    def read(r0, c0, h, w):
        return scene[:, 64 + r0 : 64 + r0 + h, 64 + c0 : 64 + c0 + w].numpy()

    grid = TileGrid(H, W, T, HALO)
    r = P // 2
    cache_spec = FeatureSpec("test", SPEC.timesteps, 1, SPEC.noise_seed, T, 28, "concat")
    for origin in [(8, 8), (12, 4)]:
        r0, c0, side = grid.window(origin)
        window = torch.from_numpy(read(r0, c0, side, side))[None]
        noise = torch.from_numpy(tile_noise(SPEC, C, [(r0, c0)], side))
        with torch.no_grad():
            feats = model.features(window, noise)
        for level in ("low", "mid", "high"):
            ring = feats[level][0, :, HALO - r : HALO + T + r, HALO - r : HALO + T + r]
            cached = region_features(denoiser, NoiseSchedule(), read, cache_spec, origin[0] - r, origin[1] - r,
                                     T + 2 * r, T + 2 * r)[level]
            torch.testing.assert_close(ring, cached, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("present", [(1.0, 1.0), (1.0, 0.0)])
def test_graph_classifies_each_pixel_from_its_own_patch(graph, present):
    """Every pixel of the tile (its ring included) equals the patch-wise classifier on its own
    patch of what the classifier sees (nodata pixels zeroed and marked, absent bands dropped)."""
    model, _, classifier = graph
    window, noise, _ = _inputs(1, 1)
    window[0, :, HALO - 1, HALO + 1] = float("nan")  # nodata in the ring around the tile
    window[0, :, HALO + 2, HALO + 2] = float("nan")  # and inside it
    flags = torch.tensor([present])
    with torch.no_grad():
        probs = model(window, noise, flags)
        valid = torch.isfinite(window).all(1)
        clean = torch.where(valid[:, None], window, torch.zeros_like(window))
        feats = model.features(clean, noise, flags)
        x = classifier_input(clean, valid, flags, CM)
    assert probs.shape == (1, K, T, T) and torch.isfinite(probs).all()
    sums = probs.sum(1)[0]
    assert float(sums[2, 2]) == 0.0  # the nodata pixel: zero confidence
    sums[2, 2] = 1.0
    torch.testing.assert_close(sums, torch.ones(T, T))
    r = P // 2
    for i in range(T):
        for j in range(T):
            if (i, j) == (2, 2):
                continue
            y, xx = HALO + i, HALO + j
            crop = lambda a: a[:, :, y - r : y + r + 1, xx - r : xx + r + 1]  # noqa: E731
            with torch.no_grad():
                want = classifier.predict(crop(x), crop(feats["low"]), crop(feats["mid"]), crop(feats["high"]))
            torch.testing.assert_close(probs[0, :, i, j], want[0], atol=1e-5, rtol=1e-5)
    if present[1] == 0.0:  # the absent modality's values do not matter
        other = window.clone()
        other[:, 3:] = torch.randn_like(other[:, 3:])
        with torch.no_grad():
            torch.testing.assert_close(model(other, noise, flags), probs)


def test_torch_export_and_onnx_match_eager(graph, tmp_path):
    model, _, _ = graph
    window, noise, _ = _inputs(2, 2)
    present = torch.ones(2, M)
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(model, (window, noise, present),
                             dynamic_shapes={"window": {0: batch}, "noise": {0: batch}, "present": {0: batch}})
    w3, n3, _ = _inputs(3, 3)
    w3[1, :, HALO + 1, HALO] = float("nan")
    p3 = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    with torch.no_grad():
        want = model(w3, n3, p3)
    torch.testing.assert_close(ep.module()(w3, n3, p3), want, atol=1e-5, rtol=1e-5)

    import onnxruntime as ort

    path = tmp_path / "tile.onnx"
    torch.onnx.export(ep, f=str(path), dynamo=True, input_names=["window", "noise", "present"], output_names=["probs"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"window": w3.numpy(), "noise": n3.numpy(), "present": p3.numpy()})
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-4)
