"""The synthetic mosaic writer (`bdgf synth --preset mosaic --size N`, bdgf.bulk.synthetic): a
scene store with the demo preset's modalities and bands, a CRS and a transform, no labels; the
layout is seamless across chunks (a function of global position) and the same arguments give the
same bytes."""

from __future__ import annotations

import numpy as np
import zarr
from typer.testing import CliRunner

from bdgf.bulk.synthetic import class_block, mosaic_block, write_mosaic
from bdgf.data.scene import Scene
from bdgf.data.synthetic import get_config, make_scene


def test_the_mosaic_preset_has_the_demo_modalities_a_crs_and_no_labels(tmp_path):
    from bdgf.cli import app

    res = CliRunner().invoke(app, ["synth", str(tmp_path / "m.zarr"), "--preset", "mosaic", "--size", "300"])
    assert res.exit_code == 0, res.output
    scene = Scene.open(tmp_path / "m.zarr")
    demo = make_scene("demo", 0)
    assert scene.bands == {k: m.bands for k, m in demo.modalities.items()} == {"hsi": 32, "lidar": 1}
    assert scene.shape == (300, 300) and scene.splits == [] and scene.meta.class_names == demo.class_names
    assert "UTM zone 33N" in scene.meta.crs and scene.meta.transform == [500000.0, 1.0, 0.0, 5000000.0, 0.0, -1.0]
    hsi = np.asarray(scene.modality("hsi"))
    assert np.isfinite(hsi).all() and hsi.std() > 0.01 and scene.valid.all()
    mean, std = scene.statistics("hsi")
    np.testing.assert_allclose(mean, hsi.reshape(32, -1).mean(1), rtol=1e-4)
    np.testing.assert_allclose(std, hsi.reshape(32, -1).std(1), rtol=1e-3)
    res = CliRunner().invoke(app, ["synth", str(tmp_path / "t.zarr"), "--preset", "tiny", "--size", "300"])
    assert res.exit_code == 2 and "--size is for --preset mosaic" in res.output


def test_the_layout_is_seamless_across_chunks_and_the_bytes_repeat(tmp_path):
    cfg = get_config("demo")
    whole, _ = class_block(cfg, 7, 0, 100, 0, 90)
    parts = np.block([[class_block(cfg, 7, r, r + 50, c, c + 45)[0] for c in (0, 45)] for r in (0, 50)])
    np.testing.assert_array_equal(parts, whole)
    assert len(np.unique(whole)) >= 4  # cells, roads and buildings all appear
    a = mosaic_block(cfg, 7, 0, 40, 0, 40, (0, 0))
    assert a["hsi"].shape == (32, 40, 40) and a["lidar"].shape == (1, 40, 40)
    write_mosaic(tmp_path / "a.zarr", (70, 50), seed=2, like="tiny", chunk=32)
    write_mosaic(tmp_path / "b.zarr", (70, 50), seed=2, like="tiny", chunk=32)
    for m in ("hsi", "lidar"):
        np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "a.zarr" / "modalities" / m))[...],
                                      zarr.open_array(str(tmp_path / "b.zarr" / "modalities" / m))[...])
    other = write_mosaic(tmp_path / "c.zarr", (70, 50), seed=3, like="tiny", chunk=32)
    assert not np.array_equal(zarr.open_array(str(other / "modalities" / "hsi"))[...],
                              zarr.open_array(str(tmp_path / "a.zarr" / "modalities" / "hsi"))[...])
