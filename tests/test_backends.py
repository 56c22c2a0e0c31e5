"""bdgf.backends: every back end that runs here (ONNX Runtime, AOTInductor, eager PyTorch from the
torch.export program) gives the run's PyTorch pipeline's probabilities on the same tiles, raw or
normalised, with a modality absent too; `auto` picks by the documented order and logs the choice
once; BDGF_BACKEND forces one; the AOTInductor package loads in a fresh process."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from typer.testing import CliRunner

from bdgf.backends import class_map, open_backend
from bdgf.errors import BDGFError
from test_export_package import export_random_run, fresh_process_classify, raw_windows

pytestmark = pytest.mark.usefixtures("one_thread")

ORIGINS = [(0, 0), (16, 32), (32, 16)]


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """(store, run, package dir, pipeline): the random run exported with --format all --int8 (ONNX,
    its int8 copy and one AOTInductor compile here; TensorRT skipped where it cannot be built), for
    batches of at most 2 (larger batches are run in slices)."""
    from bdgf.pipeline import Pipeline

    # --max-batch 2: so the 3 tiles below run as two slices
    store, run, pkg, output = export_random_run(tmp_path_factory.mktemp("backends"), "--format", "all", "--int8",
                                                "--max-batch", "2")
    return store, run, pkg, Pipeline.from_run(run, seed=0), output


def test_all_builds_what_it_can_and_says_what_it_skipped(package):
    import json

    from bdgf.export import tensorrt_missing

    _, _, pkg, _, output = package
    m = json.loads((pkg / "model.json").read_text())
    assert {"onnx", "onnx-int8", "aoti", "torch"} <= {e["format"] for e in m["files"].values()}
    assert m["export"]["max_batch"] == 2
    assert m["checks"]["aoti"]["max_abs_diff"] < 1e-4 and m["checks"]["onnx"]["max_abs_diff"] < 1e-4
    if tensorrt_missing():
        assert m["skipped"]["tensorrt"] == tensorrt_missing() and "tensorrt: skipped" in output


@pytest.mark.parametrize("kind", ["onnx", "aoti", "torch"])
def test_every_backend_matches_the_pytorch_pipeline(package, kind):
    store, _, pkg, pipe, _ = package
    raw, want = raw_windows(store, pipe, ORIGINS)
    backend = open_backend(pkg, kind)
    assert backend.name == kind
    out = backend.classify(raw, ORIGINS, probabilities=True)
    np.testing.assert_allclose(out.probabilities, want, atol=1e-4)
    np.testing.assert_array_equal(out.classes, np.where(want.max(1) > 0, want.argmax(1) + 1, 0))
    np.testing.assert_array_equal(out.confidence, np.rint(want.max(1) * 255).astype(np.uint8))
    assert out.classes[0, 3, 5] == 0 and out.confidence[0, 3, 5] == 0  # the nodata pixel
    # the same from windows normalised by the caller, and from a dict of modalities
    norm = backend.package.normalise(raw)
    same = backend.classify(norm, ORIGINS, normalised=True)
    np.testing.assert_array_equal(same.classes, out.classes)
    by_modality = backend.classify({"hsi": raw[:, :16], "lidar": raw[:, 16:]}, ORIGINS)
    np.testing.assert_array_equal(by_modality.classes, out.classes)
    assert by_modality.probabilities is None


@pytest.mark.parametrize("kind", ["onnx", "aoti"])
def test_an_absent_modality_matches_the_pipeline(package, kind):
    store, _, pkg, pipe, _ = package
    raw, _ = raw_windows(store, pipe, ORIGINS[:2])
    halo = pipe.halo
    windows = (raw - backend_stats(pipe)[0]) / backend_stats(pipe)[1]
    want = pipe.classify_windows(windows, [(r - halo, c - halo) for r, c in ORIGINS[:2]], absent=("lidar",))
    out = open_backend(pkg, kind).classify({"hsi": raw[:, :16]}, ORIGINS[:2], absent=("lidar",), probabilities=True)
    np.testing.assert_allclose(out.probabilities, want, atol=1e-4)


def backend_stats(pipe):
    mean = np.concatenate([pipe.normalisation[m][0] for m in pipe.modalities])[None, :, None, None]
    std = np.concatenate([pipe.normalisation[m][1] for m in pipe.modalities])[None, :, None, None]
    return mean, std


def test_auto_takes_the_first_in_order_logs_once_and_the_env_forces(package, caplog, monkeypatch):
    import bdgf.backends as backends
    from bdgf.export import tensorrt_missing

    _, _, pkg, _, _ = package
    monkeypatch.delenv("BDGF_BACKEND", raising=False)
    backends._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="bdgf.backends"):
        first = open_backend(pkg)
        open_backend(pkg)
    if tensorrt_missing():
        import onnxruntime as ort

        assert first.name == "onnx" and "tensorrt: " in first.reason
        want = "CUDAExecutionProvider" if "CUDAExecutionProvider" in ort.get_available_providers() else "CPUExecutionProvider"
        assert first.providers[0] == want
    lines = [r.getMessage() for r in caplog.records if r.name == "bdgf.backends"]
    assert len(lines) == 1 and first.name in lines[0] and first.reason in lines[0]
    monkeypatch.setenv("BDGF_BACKEND", "torch")
    forced = open_backend(pkg)
    assert forced.name == "torch" and "BDGF_BACKEND=torch" in forced.reason
    monkeypatch.setenv("BDGF_BACKEND", "tensorrt")
    if tensorrt_missing():
        with pytest.raises(BDGFError, match="back end tensorrt cannot run"):
            open_backend(pkg)


def test_aoti_package_runs_in_a_fresh_process_without_the_run(package, tmp_path):
    store, run, pkg, pipe, _ = package
    raw, want = raw_windows(store, pipe, ORIGINS)
    moved = tmp_path / "moved_run"
    run.rename(moved)
    try:
        got = fresh_process_classify(pkg, "aoti", raw, ORIGINS, tmp_path)
    finally:
        moved.rename(run)
    np.testing.assert_allclose(got["probs"], want, atol=1e-4)
    assert got["classes"][0, 3, 5] == 0 and got["confidence"][0, 3, 5] == 0


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA device: AOTInductor for cuda")
def test_aoti_compiled_for_cuda_matches_the_pipeline(package, tmp_path):
    from bdgf.cli import app

    store, run, _, pipe, _ = package
    res = CliRunner().invoke(app, ["export", str(run), "--format", "aoti", "--aoti-device", "cuda",
                                   "--out", str(tmp_path / "cuda")])
    assert res.exit_code == 0, res.output
    raw, want = raw_windows(store, pipe, ORIGINS)
    out = open_backend(tmp_path / "cuda", "aoti").classify(raw, ORIGINS, probabilities=True)
    np.testing.assert_allclose(out.probabilities, want, atol=1e-3)


def test_int8_runs_when_named_and_agrees_with_fp32_on_most_pixels(package):
    """Dynamic int8 (ConvInteger/MatMulInteger, activations quantised per call) changes the
    probabilities a little: on these random weights the max abs difference was ~0.015 and the
    class differed at ~1-2% of pixels; the bounds below leave room for other CPUs' kernels but
    fail if the graph were not the model (classes of random weights agree ~1/K = 25% by chance)."""
    import json

    import onnx

    store, _, pkg, pipe, output = package
    ops = {n.op_type for n in onnx.load(str(pkg / "model_int8.onnx")).graph.node}
    assert {"ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"} <= ops  # really quantised
    m = json.loads((pkg / "model.json").read_text())
    assert m["export"]["int8"]["weight_type"] == "QUInt8" and m["checks"]["onnx-int8"]["class_agreement"] > 0.9
    assert "onnx-int8: max abs difference vs PyTorch" in output and "same class at" in output
    raw, want = raw_windows(store, pipe, ORIGINS)
    backend = open_backend(pkg, "onnx-int8")
    assert backend.name == "onnx-int8" and backend.providers == ["CPUExecutionProvider"]
    out = backend.classify(raw, ORIGINS, probabilities=True)
    valid = want.max(1) > 0
    assert out.classes[0, 3, 5] == 0 and out.confidence[0, 3, 5] == 0  # nodata stays nodata
    assert np.array_equal(out.probabilities.max(1) > 0, valid)
    assert np.abs(out.probabilities - want).max() < 0.1
    agree = (out.probabilities.argmax(1) == want.argmax(1))[valid].mean()
    assert agree > 0.9, agree


def test_auto_never_picks_int8(package, tmp_path, monkeypatch):
    """A package whose only graphs are the int8 ONNX and the torch program: auto runs torch."""
    import shutil

    _, _, pkg, _, _ = package
    for name in ("model.json", "program.pt2", "model_int8.onnx"):
        shutil.copy(pkg / name, tmp_path / name)
    monkeypatch.delenv("BDGF_BACKEND", raising=False)
    chosen = open_backend(tmp_path)
    assert chosen.name == "torch" and "onnx: the package has no onnx graph" in chosen.reason
    monkeypatch.setenv("BDGF_BACKEND", "onnx-int8")
    assert open_backend(tmp_path).name == "onnx-int8"


def test_class_map_dtypes_and_nodata():
    probs = np.zeros((1, 300, 2, 2), np.float32)
    probs[0, 299, 0, 0] = 1.0
    probs[0, 0, 0, 1] = 0.5
    probs[0, 1, 0, 1] = 0.5
    probs[0, 7, 1, 0] = 0.25
    classes, conf = class_map(probs)
    assert classes.dtype == np.uint16 and conf.dtype == np.uint8
    np.testing.assert_array_equal(classes[0], [[300, 1], [8, 0]])
    np.testing.assert_array_equal(conf[0], [[255, 128], [64, 0]])
    assert class_map(probs[:, :3])[0].dtype == np.uint8
