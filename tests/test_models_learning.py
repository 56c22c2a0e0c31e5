"""Learning sanity: ~100 Adam steps on a synthetic separable problem reach accuracy well above chance.

The class is set by the mean of band 0 over the central 3x3 region (three levels); everything else,
including the diffusion features, is noise."""
import torch

from bdgf.losses import MutualLearningConfig, MutualLearningLoss
from bdgf.models import BDGFClassifier
from helpers import C, FH, FL, FM, K, classifier_config

P = 5


def synthetic(n, g):
    y = torch.randint(0, K, (n,), generator=g)
    patch = torch.randn(n, C, P, P, generator=g)
    c = P // 2
    patch[:, 0, c - 1 : c + 2, c - 1 : c + 2] += 2.0 * (y.float() - 1.0)[:, None, None]
    feats = [torch.randn(n, f, P, P, generator=g) for f in (FL, FM, FH)]
    return (patch, *feats), y


def test_learns_centre_region_rule(one_thread):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = BDGFClassifier(classifier_config(patch_size=P, num_classes=K))
    crit = MutualLearningLoss(model.z_dims, MutualLearningConfig(proj_dim=8, proj_hidden=0))
    opt = torch.optim.AdamW(list(model.parameters()) + list(crit.parameters()), lr=3e-3)
    for _ in range(100):
        x, y = synthetic(32, g)
        out = model(*x)
        loss, _ = crit(out["logits"], out["z"], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y = synthetic(300, g)
    with torch.no_grad():
        out = model(*x)
    acc = (out["probs"].argmax(-1) == y).float().mean().item()
    assert acc > 0.9, acc                                     # chance is 1/3 (seeds 0-2 give ~0.99)
    for b, logits in out["logits"].items():
        assert (logits.argmax(-1) == y).float().mean().item() > 0.8, b
