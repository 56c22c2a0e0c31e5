"""Export of the prediction path: torch.export with a dynamic batch axis, and ONNX (dynamo exporter)
run by onnxruntime, matching eager to 1e-4."""
import numpy as np
import pytest
import torch

from _models_util import tiny_config, tiny_inputs
from bdgf.models import BDGFClassifier
from bdgf.models.classifier import PredictWrapper

P = 5  # smallest patch the tiny CNN branch takes: keeps the traced scan short


@pytest.fixture(scope="module")
def wrapper():
    torch.manual_seed(0)
    return PredictWrapper(BDGFClassifier(tiny_config(patch_size=P))).eval()


@pytest.fixture(scope="module")
def exported(wrapper):
    """One torch.export trace (dynamic batch), shared by both tests."""
    return torch.export.export(wrapper, tiny_inputs(batch=2, patch_size=P), dynamic_shapes=_dynamic_batch())


def _dynamic_batch():
    batch = torch.export.Dim("batch", min=1, max=4096)
    return {name: {0: batch} for name in ("patch", "low", "mid", "high")}


def test_torch_export_predict(wrapper, exported):
    ep = exported
    x = tiny_inputs(batch=5, patch_size=P, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(*x), wrapper(*x), rtol=1e-5, atol=1e-5)


def test_onnx_export_matches_eager(wrapper, exported, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "bdgf.onnx"
    torch.onnx.export(exported, f=str(path), dynamo=True, output_names=["probs"])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 6):
        x = tiny_inputs(batch=batch, patch_size=P, seed=batch)
        feed = {name: t.numpy() for name, t in zip(("patch", "low", "mid", "high"), x)}
        (got,) = sess.run(None, feed)
        with torch.no_grad():
            want = wrapper(*x).numpy()
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
