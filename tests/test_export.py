"""Export of the prediction path: torch.export with a dynamic batch axis, and ONNX (dynamo exporter)
run by onnxruntime, matching eager to 1e-4."""
import numpy as np
import pytest
import torch

from bdgf.models import BDGFClassifier
from bdgf.models.classifier import PredictWrapper
from helpers import classifier_config, classifier_inputs

P = 5  # smallest patch the tiny CNN branch takes: keeps the traced scan short
pytestmark = pytest.mark.usefixtures("one_thread")  # also while the module-scoped trace below is built


@pytest.fixture(scope="module")
def wrapper():
    torch.manual_seed(0)
    return PredictWrapper(BDGFClassifier(classifier_config(patch_size=P))).eval()


@pytest.fixture(scope="module")
def exported(wrapper):
    """One torch.export trace (dynamic batch), shared by both tests."""
    return torch.export.export(wrapper, classifier_inputs(batch=2, patch_size=P), dynamic_shapes=_dynamic_batch())


def _dynamic_batch():
    batch = torch.export.Dim("batch", min=1, max=4096)
    return {name: {0: batch} for name in ("patch", "low", "mid", "high")}


def test_torch_export_predict(wrapper, exported):
    ep = exported
    x = classifier_inputs(batch=5, patch_size=P, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(*x), wrapper(*x), rtol=1e-5, atol=1e-5)


def test_onnx_export_matches_eager(wrapper, exported, tmp_path):
    import onnxruntime as ort
    path = tmp_path / "bdgf.onnx"
    torch.onnx.export(exported, f=str(path), dynamo=True, output_names=["probs"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for batch in (1, 6):
        x = classifier_inputs(batch=batch, patch_size=P, seed=batch)
        feed = {name: t.numpy() for name, t in zip(("patch", "low", "mid", "high"), x)}
        (got,) = sess.run(None, feed)
        with torch.no_grad():
            want = wrapper(*x).numpy()
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
