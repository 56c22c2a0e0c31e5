"""`bdgf export`: a run directory becomes a self-contained package (model.json + ONNX + the
torch.export program) that loads in a fresh process without the run directory and matches the
run's PyTorch pipeline; bad packages and inputs give one-line errors; TensorRT skips with its reason."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bdgf.config import RunConfig
from bdgf.data.scene import Scene, write_scene
from bdgf.data.synthetic import make_scene
from bdgf.errors import BDGFError, InputError
from bdgf.export import sha256_file, tensorrt_missing

REPO = Path(__file__).resolve().parents[1]

# A run with random weights, small enough to export in seconds: tiny UNet, CNN branch only, P = 5.
RANDOM_RUN = {
    "pretrain.unet": {"base_channels": 8, "channel_mults": [1, 2, 2]},
    "features.tile_size": 16,
    "features.timesteps": [5, 100],
    "train.patch_size": 5,
    "train.branches": ["cnn"],
    "train.model": {"cnn": {"width": 16, "low_width": 8, "num_blocks": 1}},
}

pytestmark = pytest.mark.usefixtures("one_thread")


def make_random_run(d: Path) -> tuple[Path, Path]:
    """(store, run): the tiny synthetic scene and a run on it whose denoiser and classifier (seed 0)
    have seeded random weights, saved as `bdgf pretrain` and `bdgf train` save them."""
    from bdgf.diffusion.features import FeatureSpec
    from bdgf.diffusion.schedules import NoiseSchedule, ScheduleConfig
    from bdgf.diffusion.unet import DenoiserUNet, UNetConfig
    from bdgf.engine.classify import build_classifier
    from bdgf.models.inputs import input_channels
    from bdgf.run import Run, write_checkpoint

    store = d / "tiny.zarr"
    write_scene(make_scene("tiny", 0), store)
    scene = Scene.open(store)
    config = RunConfig().with_overrides(RANDOM_RUN)
    run = Run(d / "run").create(scene, config)
    bands = [m.bands for m in scene.meta.modalities]
    torch.manual_seed(0)
    unet = DenoiserUNet(UNetConfig(in_channels=sum(bands), num_modalities=len(bands), **config.pretrain.unet))
    write_checkpoint({"model": unet.state_dict(), "unet_config": asdict(unet.config),
                      "schedule": NoiseSchedule(ScheduleConfig(**config.pretrain.schedule)).state_dict()},
                     run.denoiser_path)
    spec = FeatureSpec("x", tuple(config.features.timesteps), 1, 0, 16, 28, config.features.timestep_reduce)
    channels = {k: v for k, v in spec.channels(unet).items() if "_without_" not in k}
    model, _ = build_classifier(config.train, input_channels(sum(bands), len(bands)), channels, scene.num_classes)
    write_checkpoint({"model": model.state_dict(), "classifier_config": model.config.to_dict()},
                     run.classifier_path(0))
    return store, run.path


def export_random_run(d: Path, *options: str) -> tuple[Path, Path, Path, str]:
    """(store, run, package, the command's output): :func:`make_random_run` in ``d`` exported to
    ``d/pkg`` with the command line, ``bdgf export RUN --out d/pkg`` + ``options`` (default
    ``--format onnx``)."""
    from bdgf.cli import app

    store, run = make_random_run(d)
    args = ["export", str(run), "--out", str(d / "pkg"), *(options or ("--format", "onnx"))]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return store, run, d / "pkg", result.output


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(store, run, package, output): the random run exported to ONNX with the command line."""
    return export_random_run(tmp_path_factory.mktemp("export"))


def test_package_has_the_manifest_and_the_graphs(exported):
    store, run, pkg, output = exported
    m = json.loads((pkg / "model.json").read_text())
    scene = Scene.open(store)
    assert m["classes"]["names"] == list(scene.class_names) and m["classes"]["nodata"] == 0
    assert len(m["classes"]["colours"]) == scene.num_classes
    assert [(x["name"], x["bands"]) for x in m["modalities"]] == [(x.name, x.bands) for x in scene.meta.modalities]
    mean, std = scene.statistics("hsi")
    np.testing.assert_allclose(m["modalities"][0]["mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(m["modalities"][0]["std"], std, rtol=1e-6)
    # band wavelengths as the store has them (the synthetic HSI's band centres; none for LiDAR)
    hsi, lidar = scene.modality_meta("hsi"), scene.modality_meta("lidar")
    assert hsi.wavelengths_nm is not None and lidar.wavelengths_nm is None
    assert m["modalities"][0]["wavelengths_nm"] == pytest.approx(hsi.wavelengths_nm)
    assert len(m["modalities"][0]["wavelengths_nm"]) == 16 and m["modalities"][1]["wavelengths_nm"] is None
    assert [x["band_names"] for x in m["modalities"]] == [hsi.band_names, lidar.band_names]
    assert m["geometry"]["tile_size"] == 16 and m["geometry"]["patch_size"] == 5
    assert m["geometry"]["window_size"] == 16 + 2 * m["geometry"]["halo"]
    assert m["noise"]["timesteps"] == [5, 100] and m["noise"]["draws"] == 1
    assert m["source"]["checkpoints"]["denoiser"]["sha256"] == sha256_file(run / "pretrain" / "denoiser.pt")
    assert m["source"]["checkpoints"]["classifier"]["sha256"] == sha256_file(run / "train" / "seed0" / "classifier.pt")
    import bdgf
    assert m["bdgf_version"] == bdgf.__version__
    assert {e["format"] for e in m["files"].values()} == {"onnx", "torch"}
    for name, entry in m["files"].items():
        assert entry["sha256"] == sha256_file(pkg / name)
    # checked with onnx.checker and against PyTorch on tiles of the run's scene
    assert m["checks"]["onnx"]["max_abs_diff"] < 1e-4 and "tiles of" in m["checks"]["onnx"]["inputs"]
    assert "max abs difference vs PyTorch" in output
    import onnx
    onnx.checker.check_model(str(pkg / "model.onnx"))
    inputs = onnx.load(str(pkg / "model.onnx")).graph.input
    assert [i.name for i in inputs] == ["window", "noise", "present"]
    assert inputs[0].type.tensor_type.shape.dim[0].dim_param  # a dynamic batch axis


def test_the_run_records_band_wavelengths_and_older_runs_read_them_from_the_store(tmp_path):
    from bdgf.run import Run

    store = tmp_path / "tiny.zarr"
    write_scene(make_scene("tiny", 0), store)
    scene = Scene.open(store)
    run = Run(tmp_path / "run").create(scene, RunConfig())
    recorded = json.loads(run.info_path.read_text())["bands"]
    assert recorded["hsi"]["wavelengths_nm"] == pytest.approx(scene.modality_meta("hsi").wavelengths_nm)
    assert recorded["lidar"] == {"wavelengths_nm": None, "band_names": scene.modality_meta("lidar").band_names}
    # the store's band coordinate: wavelengths where known, band indices where not
    np.testing.assert_allclose(np.asarray(scene.root["modalities/band_hsi"]), recorded["hsi"]["wavelengths_nm"])
    np.testing.assert_array_equal(np.asarray(scene.root["modalities/band_lidar"]), [0])
    info = run.info()
    del info["bands"]  # a run made before the wavelengths were recorded
    run.info_path.write_text(json.dumps(info))
    assert run.bands() == recorded
    store.rename(tmp_path / "gone.zarr")
    assert run.bands() is None


def test_int8_is_built_only_when_asked_for_and_with_its_onnx():
    from bdgf.export import parse_formats

    assert parse_formats("all") == ["onnx", "aoti", "tensorrt"]  # int8 changes the outputs: never implied
    assert parse_formats("all", int8=True) == ["onnx", "onnx-int8", "aoti", "tensorrt"]
    assert parse_formats("onnx-int8") == ["onnx", "onnx-int8"]  # quantised from model.onnx, kept beside it
    assert parse_formats("aoti", int8=True) == ["onnx", "onnx-int8", "aoti"]
    with pytest.raises(BDGFError, match="use onnx, onnx-int8, aoti, tensorrt or all"):
        parse_formats("int8")


def test_a_scene_of_one_tile_still_gives_a_batch_to_export_with(exported):
    """torch.export on a batch of 1 would fix the dynamic batch axis at 1: a scene smaller than a
    tile (the tiny scene with the demo's T = 64) gives its one tile again at other origins."""
    from dataclasses import replace

    from bdgf.export import _check_inputs
    from bdgf.pipeline import Pipeline

    _, run, _, _ = exported
    pipe = Pipeline.from_run(run, seed=0)
    pipe = replace(pipe, spec=replace(pipe.spec, tile_size=64))  # 48 x 48 px: one tile
    window, noise, present, what = _check_inputs(pipe, count=2)
    assert window.shape[0] == noise.shape[0] == present.shape[0] == 2 and "repeated" in what
    torch.testing.assert_close(window[1], window[0], equal_nan=True)
    assert not torch.equal(noise[1], noise[0])  # another origin: other position-keyed noise


FRESH = r"""
import json, sys
import numpy as np
from bdgf.backends import open_backend
backend = open_backend(sys.argv[1], sys.argv[2])
data = np.load(sys.argv[3])
out = backend.classify(data["raw"], data["origins"].tolist(), probabilities=True)
np.savez(sys.argv[4], classes=out.classes, confidence=out.confidence, probs=out.probabilities,
         torch_imported="torch" in sys.modules)
print(backend.name)
"""


def fresh_process_classify(pkg: Path, backend: str, raw: np.ndarray, origins, tmp: Path) -> dict:
    """Run a package in a new Python process (no run directory, no test state) on raw windows,
    from a copy of the package in another folder (it must not name its own location): its
    classes, confidence, probs, and torch_imported (whether torch was imported by then)."""
    import shutil

    copy = shutil.copytree(pkg, tmp / "copied_package")
    np.savez(tmp / "in.npz", raw=raw, origins=np.asarray(origins))
    proc = subprocess.run([sys.executable, "-c", FRESH, str(copy), backend, str(tmp / "in.npz"), str(tmp / "out.npz")],
                          capture_output=True, text=True, cwd=tmp, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "BDGF_ORT_THREADS": "1",
                               "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == backend
    return dict(np.load(tmp / "out.npz"))


def raw_windows(store: Path, pipe, origins):
    """Raw sensor windows (B, C, S, S) of the scene at the tiles ``origins`` (NaN past the edge)
    and the PyTorch pipeline's probabilities on the same windows."""
    scene = Scene.open(store)
    S = pipe.tile_size + 2 * pipe.halo
    H, W = scene.shape
    raw = np.full((len(origins), sum(m.bands for m in scene.meta.modalities), S, S), np.nan, np.float32)
    full = np.concatenate([np.asarray(scene.modality(m), np.float32) for m in scene.modality_names])
    for i, (r, c) in enumerate(origins):
        r0, c0 = r - pipe.halo, c - pipe.halo
        rs, cs = slice(max(r0, 0), min(r0 + S, H)), slice(max(c0, 0), min(c0 + S, W))
        raw[i, :, rs.start - r0 : rs.stop - r0, cs.start - c0 : cs.stop - c0] = full[:, rs, cs]
    raw[0, :, pipe.halo + 3, pipe.halo + 5] = np.nan  # a nodata pixel inside a tile
    mean = np.concatenate([pipe.normalisation[m][0] for m in pipe.modalities])[None, :, None, None]
    std = np.concatenate([pipe.normalisation[m][1] for m in pipe.modalities])[None, :, None, None]
    windows = (raw - mean) / std  # NaN stays NaN: nodata
    want = pipe.classify_windows(windows, [(r - pipe.halo, c - pipe.halo) for r, c in origins])
    return raw, want


def test_onnx_package_runs_in_a_fresh_process_without_the_run(exported, tmp_path):
    from bdgf.pipeline import Pipeline

    store, run, pkg, _ = exported
    pipe = Pipeline.from_run(run, seed=0)
    origins = [(0, 0), (16, 32), (32, 16)]
    raw, want = raw_windows(store, pipe, origins)
    moved = tmp_path / "moved_run"
    run.rename(moved)  # the package must not need the run directory
    try:
        got = fresh_process_classify(pkg, "onnx", raw, origins, tmp_path)
    finally:
        moved.rename(run)
    np.testing.assert_allclose(got["probs"], want, atol=1e-4)
    assert not got["torch_imported"]  # normalisation, noise and ONNX Runtime: numpy only
    assert got["classes"].dtype == np.uint8 and got["confidence"].dtype == np.uint8
    np.testing.assert_array_equal(got["classes"], np.where(want.max(1) > 0, want.argmax(1) + 1, 0))
    assert got["classes"][0, 3, 5] == 0 and got["confidence"][0, 3, 5] == 0  # nodata
    valid = got["classes"] > 0
    assert valid.sum() == valid.size - 1 and (got["confidence"][valid] > 0).all()


def test_importing_the_back_ends_does_not_import_torch():
    """Serving and bulk classification import bdgf.backends (and bdgf.noise) in processes that run
    ONNX Runtime; torch is imported only by the back ends that run torch graphs."""
    code = "import sys, bdgf.backends, bdgf.noise; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"


def test_bad_packages_and_inputs_give_one_line_errors(exported, tmp_path):
    from bdgf.backends import ModelPackage, open_backend

    _, _, pkg, _ = exported
    with pytest.raises(BDGFError, match="no model package there"):
        ModelPackage.open(tmp_path / "nowhere")
    with pytest.raises(BDGFError, match=r"no model\.json"):
        ModelPackage.open(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(BDGFError, match="unreadable manifest"):
        ModelPackage.open(tmp_path)
    with pytest.raises(BDGFError, match="unknown back end 'cuda'"):
        open_backend(pkg, "cuda")
    with pytest.raises(BDGFError, match="back end aoti cannot run .*no aoti graph"):
        open_backend(pkg, "aoti")
    backend = open_backend(pkg, "onnx")
    p = backend.package
    S = p.window_size
    with pytest.raises(InputError, match=rf"expected \(B, 17, {S}, {S}\) \(16 hsi \+ 1 lidar bands, windows of {S} px\)"):
        backend.classify(np.zeros((1, 16, S, S), np.float32), [(0, 0)])
    with pytest.raises(InputError, match=r"lidar: expected \(1, 1, .*got shape \(1, 2,"):
        backend.classify({"hsi": np.zeros((1, 16, S, S)), "lidar": np.zeros((1, 2, S, S))}, [(0, 0)])
    with pytest.raises(InputError, match="missing modalities"):
        backend.classify({"hsi": np.zeros((1, 16, S, S))}, [(0, 0)])
    with pytest.raises(InputError, match="not on the model's stride phase"):
        backend.classify(np.zeros((1, 17, S, S), np.float32), [(1, 0)])
    for msg in (str(e) for e in [BDGFError("x")]):
        assert "\n" not in msg


def test_cli_errors_are_one_line(exported, tmp_path):
    from bdgf.cli import app

    _, run, pkg, _ = exported
    res = CliRunner().invoke(app, ["export", str(run), "--format", "onnx", "--out", str(pkg)])
    assert res.exit_code == 2 and "already exists" in res.output and res.output.count("\n") == 1
    res = CliRunner().invoke(app, ["export", str(run), "--format", "pdf", "--out", str(tmp_path / "p")])
    assert res.exit_code == 2 and "unknown export format 'pdf'" in res.output
    res = CliRunner().invoke(app, ["export", str(tmp_path), "--out", str(tmp_path / "p")])
    assert res.exit_code == 2 and "not a BDGF run directory" in res.output
    if not torch.cuda.is_available():
        res = CliRunner().invoke(app, ["export", str(run), "--format", "aoti", "--aoti-device", "cuda",
                                       "--out", str(tmp_path / "c")])
        assert res.exit_code == 2 and "no CUDA device is visible" in res.output and res.output.count("\n") == 1
    if tensorrt_missing():  # asked for by name, TensorRT is refused up front, with the reason
        res = CliRunner().invoke(app, ["export", str(run), "--format", "tensorrt", "--out", str(tmp_path / "t")])
        assert res.exit_code == 2 and "cannot build a TensorRT engine: tensorrt is not importable" in res.output
        assert not (tmp_path / "t").exists()


@pytest.mark.skipif(tensorrt_missing() is not None, reason=f"TensorRT: {tensorrt_missing()}")
def test_tensorrt_engine_matches_pytorch_in_fp16(exported, tmp_path):
    from bdgf.backends import open_backend
    from bdgf.cli import app
    from bdgf.pipeline import Pipeline

    store, run, _, _ = exported
    res = CliRunner().invoke(app, ["export", str(run), "--format", "tensorrt", "--out", str(tmp_path / "trt")])
    assert res.exit_code == 0, res.output
    pipe = Pipeline.from_run(run, seed=0)
    origins = [(0, 0), (16, 16)]
    raw, want = raw_windows(store, pipe, origins)
    out = open_backend(tmp_path / "trt", "tensorrt").classify(raw, origins, probabilities=True)
    np.testing.assert_allclose(out.probabilities, want, atol=2e-2)
    assert out.classes[0, 3, 5] == 0 and out.confidence[0, 3, 5] == 0
