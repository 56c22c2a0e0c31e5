"""Mutual-learning loss: every term against values computed by hand (plain `math`) on a 2-branch,
3-class, 2-sample example."""
import math

import pytest
import torch

from bdgf.errors import InputError
from bdgf.losses import MutualLearningConfig, MutualLearningLoss

LA = [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]]   # branch "a" logits, 2 samples x 3 classes
LB = [[1.0, 1.0, 0.0], [0.0, 0.0, 2.0]]    # branch "b"
Y = [0, 1]
ZA = [[1.0, 0.0], [1.0, 1.0]]              # embeddings (Dz = 2)
ZB = [[0.0, 1.0], [1.0, 1.0]]              # cos(za, zb) per sample: 0 and 1
TAU = 2.0


def softmax(row, t=1.0):
    e = [math.exp(x / t) for x in row]
    s = sum(e)
    return [x / s for x in e]


def kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


def entropy(p):
    return -sum(pi * math.log(pi) for pi in p)


def mean(xs):
    return sum(xs) / len(xs)


CE_A = mean([-math.log(softmax(r)[y]) for r, y in zip(LA, Y)])
CE_B = mean([-math.log(softmax(r)[y]) for r, y in zip(LB, Y)])
# branch_first (DESIGN): KL(p_a || p_b) for a, KL(p_b || p_a) for b; with 2 branches pbar_{not a} = p_b.
KL_A = mean([kl(softmax(a, TAU), softmax(b, TAU)) for a, b in zip(LA, LB)]) * TAU**2
KL_B = mean([kl(softmax(b, TAU), softmax(a, TAU)) for a, b in zip(LA, LB)]) * TAU**2
H_A = mean([entropy(softmax(r)) for r in LA])
H_B = mean([entropy(softmax(r)) for r in LB])
H_BAR = (H_A + H_B) / 2
ENT = abs(H_A - H_BAR) + abs(H_B - H_BAR)
SIM = mean([1 - 0.0, 1 - 1.0])             # 1 - cos per sample


def make(cfg):
    loss = MutualLearningLoss({"a": 2, "b": 2}, cfg)
    with torch.no_grad():                   # identity projectors: g(z) = z
        for p in loss.projectors.values():
            p.weight.copy_(torch.eye(2))
            p.bias.zero_()
    return loss


def inputs():
    logits = {"a": torch.tensor(LA, requires_grad=True), "b": torch.tensor(LB, requires_grad=True)}
    z = {"a": torch.tensor(ZA), "b": torch.tensor(ZB)}
    return logits, z, torch.tensor(Y)


def test_each_term_matches_hand_values():
    cfg = MutualLearningConfig(lambda_kl=0.7, tau=TAU, lambda_ent=0.3, lambda_sim=0.2, proj_dim=2, proj_hidden=0)
    loss, terms = make(cfg)(*inputs())
    assert terms["ce/a"].item() == pytest.approx(CE_A, rel=1e-5)
    assert terms["ce/b"].item() == pytest.approx(CE_B, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(CE_A + CE_B, rel=1e-5)
    assert terms["kl/a"].item() == pytest.approx(KL_A, rel=1e-5)
    assert terms["kl/b"].item() == pytest.approx(KL_B, rel=1e-5)
    assert terms["kl"].item() == pytest.approx(KL_A + KL_B, rel=1e-5)
    assert terms["entropy/a"].item() == pytest.approx(H_A, rel=1e-5)
    assert terms["entropy/b"].item() == pytest.approx(H_B, rel=1e-5)
    assert terms["ent"].item() == pytest.approx(ENT, rel=1e-5)
    assert terms["sim"].item() == pytest.approx(SIM, abs=1e-6)
    total = CE_A + CE_B + 0.7 * (KL_A + KL_B) + 0.3 * ENT + 0.2 * SIM
    assert loss.item() == pytest.approx(total, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(total, rel=1e-5)


def test_kl_target_first_direction():
    cfg = MutualLearningConfig(tau=TAU, proj_dim=2, proj_hidden=0, kl_direction="target_first")
    _, terms = make(cfg)(*inputs())
    kl_a = mean([kl(softmax(b, TAU), softmax(a, TAU)) for a, b in zip(LA, LB)]) * TAU**2
    assert terms["kl/a"].item() == pytest.approx(kl_a, rel=1e-5)
    assert kl_a != pytest.approx(KL_A, rel=1e-3)      # the two directions really differ here


def test_kl_target_is_stop_gradient():
    """Only the KL term on: d loss / d logits_a = d CE_a + d tau^2 KL(p_a || const p_b), nothing from KL_b."""
    cfg = MutualLearningConfig(lambda_kl=1.0, tau=TAU, lambda_ent=0.0, lambda_sim=0.0, proj_dim=2, proj_hidden=0)
    logits, z, y = inputs()
    loss, _ = make(cfg)(logits, z, y)
    loss.backward()
    la = torch.tensor(LA, requires_grad=True)
    pa = (la / TAU).softmax(-1)
    pb = (torch.tensor(LB) / TAU).softmax(-1)           # a constant: the stop-gradient target
    ref = torch.nn.functional.cross_entropy(la, y) + (pa * (pa.log() - pb.log())).sum(-1).mean() * TAU**2
    ref.backward()
    torch.testing.assert_close(logits["a"].grad, la.grad, rtol=1e-5, atol=1e-6)


def test_single_branch_is_ce_only():
    cfg = MutualLearningConfig(lambda_kl=1.0, lambda_ent=1.0, lambda_sim=1.0)
    loss, terms = MutualLearningLoss({"a": 2}, cfg)({"a": torch.tensor(LA)}, {"a": torch.tensor(ZA)}, torch.tensor(Y))
    assert loss.item() == pytest.approx(CE_A, rel=1e-5)
    assert terms["kl"].item() == terms["ent"].item() == terms["sim"].item() == 0.0


def test_projectors_get_gradients_and_bad_inputs_raise():
    crit = MutualLearningLoss({"a": 2, "b": 2}, MutualLearningConfig(proj_dim=4, proj_hidden=8))
    logits, z, y = inputs()
    crit(logits, z, y)[0].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in crit.projectors.parameters())
    with pytest.raises(InputError):
        crit({"a": logits["a"]}, z, y)
    with pytest.raises(InputError):
        MutualLearningConfig(kl_direction="sideways")


def test_bf16_logits_under_autocast_give_the_fp32_loss_and_gradients():
    """An autocast forward hands the loss bf16 logits and z: the loss is the float32 one of those
    values (projectors in float32 too), and the gradient reaches the bf16 logits."""
    cfg = MutualLearningConfig(lambda_kl=0.7, tau=TAU, lambda_ent=0.3, lambda_sim=0.2, proj_dim=2, proj_hidden=0)
    crit = make(cfg)
    logits, z, y = inputs()
    half = {b: v.detach().bfloat16().requires_grad_(True) for b, v in logits.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, terms = crit(half, {b: v.bfloat16() for b, v in z.items()}, y)
    want, want_terms = crit({b: v.detach().float() for b, v in half.items()}, {b: v.bfloat16().float() for b, v in z.items()}, y)
    assert loss.dtype == torch.float32 and all(t.dtype == torch.float32 for t in terms.values())
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    for k in ("ce", "kl", "ent", "sim"):
        assert terms[k].item() == pytest.approx(want_terms[k].item(), rel=1e-6, abs=1e-7)
    loss.backward()
    assert all(v.grad is not None and v.grad.dtype == torch.bfloat16 and bool(v.grad.abs().sum() > 0)
               for v in half.values())


def test_float64_logits_stay_float64():
    cfg = MutualLearningConfig(proj_dim=2, proj_hidden=0)
    crit = make(cfg).double()
    logits, z, y = inputs()
    loss, _ = crit({b: v.double() for b, v in logits.items()}, {b: v.double() for b, v in z.items()}, y)
    assert loss.dtype == torch.float64
