"""BDGFClassifier: shapes for every branch subset, gradients, centre-pixel and feature sensitivity,
input validation."""
import itertools

import pytest
import torch

from bdgf.errors import InputError
from bdgf.losses import MutualLearningLoss
from bdgf.models import BRANCHES, BDGFClassifier, ClassifierConfig
from helpers import C, FH, FL, FM, K, classifier_config, classifier_inputs

SUBSETS = [s for r in (1, 2, 3) for s in itertools.combinations(BRANCHES, r)]


@pytest.mark.parametrize("branches", SUBSETS, ids=lambda s: "+".join(s))
def test_shapes_every_subset(branches):
    torch.manual_seed(0)
    model = BDGFClassifier(classifier_config(branches=branches)).eval()
    x = classifier_inputs(batch=3)
    with torch.no_grad():
        out = model(*x)
        assert set(out["logits"]) == set(out["z"]) == set(branches)
        for b in branches:
            assert out["logits"][b].shape == (3, K)
            assert out["z"][b].shape == (3, model.z_dims[b])
        assert out["probs"].shape == (3, K)
        torch.testing.assert_close(out["probs"].sum(-1), torch.ones(3))
        mean = torch.stack([out["logits"][b].softmax(-1) for b in branches]).mean(0)
        torch.testing.assert_close(out["probs"], mean)
        torch.testing.assert_close(model.predict(*x), out["probs"])


def test_unused_features_may_be_none():
    model = BDGFClassifier(classifier_config(branches=("cnn",))).eval()
    patch, low, _, _ = classifier_inputs()
    assert model(patch, low)["probs"].shape == (4, K)
    with pytest.raises(InputError):
        BDGFClassifier(classifier_config(branches=("mamba",)))(patch, low)


def test_gradients_reach_every_branch():
    torch.manual_seed(0)
    model = BDGFClassifier(classifier_config())
    crit = MutualLearningLoss(model.z_dims)
    out = model(*classifier_inputs())
    loss, _ = crit(out["logits"], out["z"], torch.tensor([0, 1, 2, 0]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_centre_pixel_changes_every_branch():
    torch.manual_seed(0)
    model = BDGFClassifier(classifier_config()).eval()
    patch, low, mid, high = classifier_inputs()
    p2 = patch.clone()
    p2[:, :, 3, 3] += 1.0                                     # centre pixel only (P = 7)
    with torch.no_grad():
        a, b = model(patch, low, mid, high), model(p2, low, mid, high)
    for br in BRANCHES:
        assert not torch.allclose(a["logits"][br], b["logits"][br], atol=1e-6), br


@pytest.mark.parametrize("level,branch", [(1, "cnn"), (2, "mamba"), (3, "transformer")])
def test_features_guide_their_branch_only(level, branch):
    torch.manual_seed(0)
    model = BDGFClassifier(classifier_config()).eval()
    x = list(classifier_inputs())
    y = list(x)
    y[level] = x[level] + torch.randn_like(x[level])
    with torch.no_grad():
        a, b = model(*x), model(*y)
    for br in BRANCHES:
        changed = not torch.allclose(a["logits"][br], b["logits"][br], atol=1e-6)
        assert changed == (br == branch), br


def test_bad_shapes_and_configs_raise():
    model = BDGFClassifier(classifier_config())
    patch, low, mid, high = classifier_inputs()
    bad = [
        (patch[:, :2], low, mid, high),                        # wrong band count
        (patch[..., :5, :5], low, mid, high),                  # wrong patch size
        (patch, low[:, :2], mid, high),                        # wrong low channels
        (patch, low, mid[:2], high),                           # batch mismatch
        (patch, low, mid, high[0]),                            # missing batch axis
    ]
    for args in bad:
        with pytest.raises(InputError):
            model(*args)
    fc = {"low": FL, "mid": FM, "high": FH}
    for kw in ({"patch_size": 8}, {"branches": ("cnn", "gnn")}, {"branches": ()}, {"branches": ("cnn", "cnn")}):
        with pytest.raises(InputError):
            ClassifierConfig(in_channels=C, feature_channels=fc, num_classes=K, **kw)
    with pytest.raises(InputError):
        ClassifierConfig(in_channels=C, feature_channels={"low": FL}, num_classes=K)   # mid/high missing
    with pytest.raises(InputError):
        BDGFClassifier(classifier_config(patch_size=3))             # too small for the unpadded CNN
    for branch in ("mamba", "transformer"):                         # a token grid that does not tile P = 7
        d = classifier_config().to_dict()
        d[branch]["token_stride"] = 3
        with pytest.raises(InputError, match="token_stride"):
            BDGFClassifier(ClassifierConfig.from_dict(d))


def test_config_roundtrip():
    cfg = classifier_config(branches=("mamba", "cnn"))
    assert ClassifierConfig.from_dict(cfg.to_dict()) == cfg
    d = cfg.to_dict()
    d["transformer"]["token_stride"] = 1                       # per-pixel tokens
    assert ClassifierConfig.from_dict(d).transformer.token_stride == 1
    with pytest.raises(InputError, match="widht"):
        ClassifierConfig.from_dict({**cfg.to_dict(), "cnn": {"widht": 8}})
    with pytest.raises(InputError, match="colour"):
        ClassifierConfig.from_dict({**cfg.to_dict(), "colour": 1})


def test_cnn_branch_dense_equals_patchwise():
    """DESIGN 1.4: unpadded convolutions + window pooling make the CNN branch exactly dense."""
    torch.manual_seed(0)
    cnn = BDGFClassifier(classifier_config(patch_size=5, branches=("cnn",))).branches["cnn"].eval()
    tile, low = torch.randn(2, C, 8, 9), torch.randn(2, FL, 8, 9)
    with torch.no_grad():
        dense = cnn.dense(tile, low)                            # (2, D, 4, 5)
        assert dense.shape == (2, cnn.out_dim, 4, 5)
        for i, j in [(0, 0), (1, 3), (3, 4)]:
            z = cnn(tile[..., i : i + 5, j : j + 5], low[..., i : i + 5, j : j + 5])
            torch.testing.assert_close(dense[..., i, j], z, rtol=1e-5, atol=1e-5)
