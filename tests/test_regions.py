"""bdgf.regions.classify_region, the driver serving and bulk classification share: the whole scene
sent as one raster gives the PyTorch pipeline's classes on the scene store (reflect padding at the
scene's edge, borders and ragged last tiles included); a chunk sent with real context gives the
whole-scene result on that chunk (seamless); bad regions and rasters are clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from bdgf.backends import class_map, open_backend
from bdgf.data.scene import Scene
from bdgf.errors import InputError
from bdgf.regions import classify_region
from test_export_package import export_random_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(backend, raw scene (C, H, W) with a nodata pixel, the pipeline's whole-scene probabilities)."""
    from bdgf.pipeline import Pipeline

    d = tmp_path_factory.mktemp("regions")
    store, run, _, _ = export_random_run(d)
    scene = Scene.open(store)
    raw = np.concatenate([np.asarray(scene.modality(m), np.float32) for m in scene.modality_names])
    pipe = Pipeline.from_run(run, seed=0)
    grid = pipe.grid(*scene.shape)
    probs = pipe.classify_tiles(scene, grid.origins())
    H, W = scene.shape
    want = np.zeros((probs.shape[1], H, W), np.float32)
    for p, (r, c) in zip(probs, grid.origins()):
        th, tw = grid.owned((r, c))
        want[:, r : r + th, c : c + tw] = p[:, :th, :tw]
    return open_backend(d / "pkg", "onnx"), raw, want, scene


def test_the_whole_scene_as_one_raster_is_the_pipeline_on_the_store(setup):
    backend, raw, want, scene = setup
    out = classify_region(backend, raw, probabilities=True, batch=3)
    np.testing.assert_allclose(out.probabilities, want, atol=1e-4)
    classes, conf = class_map(want[None])
    np.testing.assert_array_equal(out.classes, classes[0])
    assert np.abs(out.confidence.astype(int) - conf[0]).max() <= 1
    assert out.classes.shape == scene.shape and (out.classes > 0).all()


def test_a_chunk_with_real_context_equals_the_whole_scene_there(setup):
    backend, raw, want, _ = setup
    halo = backend.package.halo
    H, W = raw.shape[1:]
    for r0, c0, h, w in [(16, 16, 24, 20), (0, 0, 20, 30), (32, 16, H - 32, W - 16)]:
        top, left = max(r0 - halo, 0), max(c0 - halo, 0)  # real context, clipped at the scene's edge
        image = raw[:, top : min(r0 + h + halo, H), left : min(c0 + w + halo, W)]
        out = classify_region(backend, image, origin=(top, left), region=(r0 - top, c0 - left, h, w),
                              probabilities=True)
        np.testing.assert_allclose(out.probabilities, want[:, r0 : r0 + h, c0 : c0 + w], atol=1e-4)


def test_without_context_a_chunk_differs_from_the_whole_scene(setup):
    backend, raw, want, _ = setup
    r0, c0 = 16, 16
    image = raw[:, r0 : r0 + 32, c0 : c0 + 32]  # no context: reflect-padded at the chunk's edge
    out = classify_region(backend, image, origin=(r0, c0), probabilities=True)
    diff = np.abs(out.probabilities - want[:, r0 : r0 + 32, c0 : c0 + 32]).max(0)
    assert diff.max() > 1e-3  # the padding is seen: the context test above is not vacuous


def test_nodata_and_a_modality_given_by_name(setup):
    backend, raw, want, scene = setup
    bands = backend.package.bands
    image = raw.copy()
    image[:, 5, 7] = np.nan
    image[0, 9, 9] = np.inf
    split = dict(zip(backend.package.modalities, np.split(image, np.cumsum(bands)[:-1])))
    out = classify_region(backend, split)
    assert out.classes[5, 7] == 0 and out.classes[9, 9] == 0 and out.confidence[5, 7] == 0
    assert (out.classes > 0).sum() == out.classes.size - 2


def test_bad_regions_and_rasters_are_clear_errors(setup):
    backend, raw, _, _ = setup
    m = backend.package.manifest["geometry"]["tile_multiple"]
    with pytest.raises(InputError, match="stride phase"):
        classify_region(backend, raw, origin=(1, 0))
    if m > 1:
        with pytest.raises(InputError, match="stride phase"):
            classify_region(backend, raw, region=(1, 0, 8, 8))
    with pytest.raises(InputError, match="not inside"):
        classify_region(backend, raw, region=(0, 0, raw.shape[1] + 1, 8))
    with pytest.raises(InputError, match="bands"):
        classify_region(backend, raw[:-1])
    with pytest.raises(InputError, match=r"\(C, H, W\)"):
        classify_region(backend, raw[0])
