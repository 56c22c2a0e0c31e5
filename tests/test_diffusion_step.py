"""The stage-1 training step: logs, loss kinds, gradients, determinism, that it learns, and that the
masking's paired rows are the same (x0, t, eps) denoised twice."""

import copy
import json

import pytest
import torch

import kernels.dispatch  # noqa: E402,F401 - a hard dependency: missing means broken

from bdgf.diffusion.loss import concat_mse  # noqa: E402
from bdgf.diffusion.masking import AdaptiveModalityMasking  # noqa: E402
from bdgf.diffusion.schedules import NoiseSchedule  # noqa: E402
from bdgf.diffusion.step import diffusion_training_step  # noqa: E402
from bdgf.diffusion.unet import DenoiserUNet, UNetConfig  # noqa: E402
from torch import nn  # noqa: E402

C_HSI, C_LIDAR = 6, 1
CHANNEL_MODALITY = torch.tensor([0] * C_HSI + [1] * C_LIDAR)
NAMES = ["hsi", "lidar"]


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: 1 thread beats 2 on a loaded 2-core box


def make_model(seed=0):
    torch.manual_seed(seed)
    return DenoiserUNet(UNetConfig(in_channels=C_HSI + C_LIDAR, num_modalities=2, base_channels=16,
                                   channel_mults=(1, 2, 2)))


def structured_batch(b=8, h=16, w=16, seed=0):
    """Smooth random fields: each tile mixes a few low-frequency patterns; LiDAR is a band sum."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    basis = torch.stack([torch.ones_like(xx), xx, yy, torch.sin(3 * xx), torch.cos(3 * yy)])  # (5,H,W)
    coef = torch.randn(b, C_HSI, 5, generator=g)
    hsi = torch.einsum("bck,khw->bchw", coef, basis)
    lidar = hsi.mean(1, keepdim=True) * 2
    x = torch.cat([hsi, lidar], 1)
    return (x - x.mean()) / x.std()


def test_logs_and_balanced_loss_value():
    model, sched = make_model(), NoiseSchedule(kind="cosine", num_timesteps=100)
    mk = AdaptiveModalityMasking(2, warmup_steps=0)
    x0 = structured_batch()
    loss, logs = diffusion_training_step(model, sched, mk, x0, CHANNEL_MODALITY, torch.Generator().manual_seed(0),
                                         modality_names=NAMES)
    # B = 8 gives 2 pairs, one per modality: D has a value but no standard error yet, so no dep keys
    expected = {"loss", "t_mean"} | {f"{k}/{n}" for k in ("loss", "p_mask", "present") for n in NAMES}
    assert set(logs) == expected
    assert all(isinstance(v, float) for v in logs.values())
    assert loss.ndim == 0 and loss.requires_grad
    # balanced loss with no weights = batch mean of the per-modality mean = mean of the two log values
    assert logs["loss"] == pytest.approx((logs["loss/hsi"] + logs["loss/lidar"]) / 2, rel=1e-5)
    assert mk.step == 1
    assert [logs["p_mask/hsi"], logs["p_mask/lidar"]] == pytest.approx(mk.probabilities.tolist())
    # a second step: two pairs per modality, so D_m ± se_m are logged, and the record is valid JSON
    _, logs = diffusion_training_step(model, sched, mk, x0, CHANNEL_MODALITY, torch.Generator().manual_seed(1),
                                      modality_names=NAMES)
    assert set(logs) == expected | {f"{k}/{n}" for k in ("dep", "dep_se") for n in NAMES}
    assert [logs["dep/hsi"], logs["dep/lidar"]] == pytest.approx(mk.dependence.tolist())
    assert [logs["dep_se/hsi"], logs["dep_se/lidar"]] == pytest.approx(mk.dependence_se.tolist())
    json.dumps(logs, allow_nan=False)
    # unnamed modalities are logged by index
    _, logs = diffusion_training_step(model, sched, mk, x0, CHANNEL_MODALITY, torch.Generator().manual_seed(0))
    assert "loss/0" in logs and "p_mask/1" in logs and "dep/1" in logs


def test_concat_kind_and_errors():
    model, sched = make_model(), NoiseSchedule(kind="linear", num_timesteps=100)
    x0 = structured_batch(b=4)
    mk = AdaptiveModalityMasking(2, mode="none")
    loss, logs = diffusion_training_step(model, sched, mk, x0, CHANNEL_MODALITY, torch.Generator().manual_seed(1),
                                         loss_kind="concat")
    # concat MSE = channel-weighted mean of the per-modality means: (6 * L_hsi + 1 * L_lidar) / 7
    assert logs["loss"] == pytest.approx((6 * logs["loss/0"] + logs["loss/1"]) / 7, rel=1e-5)
    assert logs["present/0"] == logs["present/1"] == 1.0
    with pytest.raises(ValueError, match="loss_kind"):
        diffusion_training_step(model, sched, mk, x0, CHANNEL_MODALITY, None, loss_kind="mse")
    with pytest.raises(ValueError, match="channel_modality"):
        diffusion_training_step(model, sched, mk, x0, CHANNEL_MODALITY[:-1], None)
    assert concat_mse is not None


def test_deterministic_and_mask_embedding_gets_gradient():
    sched = NoiseSchedule(kind="cosine", num_timesteps=100)
    x0 = structured_batch(b=8)
    out = []
    for _ in range(2):
        model = make_model()
        mk = AdaptiveModalityMasking(2, p0=0.7, p_max=0.7)
        loss, logs = diffusion_training_step(model, sched, mk, x0, CHANNEL_MODALITY, torch.Generator().manual_seed(5))
        loss.backward()
        out.append((loss.item(), logs, model.mask_embedding.grad))
    assert out[0][0] == out[1][0] and out[0][1] == out[1][1]
    assert out[0][1]["present/0"] < 1.0 and out[0][1]["present/1"] < 1.0  # both modalities masked somewhere
    grad = out[0][2]
    assert grad is not None and bool((grad != 0).all())  # every channel was masked in some sample


def test_few_steps_reduce_the_loss():
    sched = NoiseSchedule(kind="cosine", num_timesteps=100)
    model = make_model()
    x0 = structured_batch(b=8, h=8, w=8)
    train_mk = AdaptiveModalityMasking(2, warmup_steps=0)
    eval_mk = AdaptiveModalityMasking(2, mode="uniform")

    def evaluate():
        with torch.no_grad():
            mk = copy.deepcopy(eval_mk)
            return sum(diffusion_training_step(model, sched, mk, x0, CHANNEL_MODALITY,
                                               torch.Generator().manual_seed(100 + i))[0].item() for i in range(3))

    before = evaluate()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(7)
    for _ in range(25):
        loss, _ = diffusion_training_step(model, sched, train_mk, x0, CHANNEL_MODALITY, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate()
    assert after < 0.5 * before
    assert len(train_mk.history) == 25


class PerModalityDenoiser(nn.Module):
    """Each modality's output channels come from its own DenoiserUNet that sees only that modality's
    input channels and t (presence flags ignored): masking one modality cannot change another's
    reconstruction. With ``junk`` (S, S) bool, +10 is added to the LiDAR output there whenever HSI is
    masked (an error that sits only in those pixels)."""

    def __init__(self, junk=None):
        super().__init__()
        torch.manual_seed(3)
        self.mask_embedding = nn.Parameter(torch.randn(C_HSI + C_LIDAR))
        self.nets = nn.ModuleList([DenoiserUNet(UNetConfig(in_channels=c, num_modalities=1, base_channels=8,
                                                           channel_mults=(1, 2), feature_levels=(0, 1, 1)))
                                   for c in (C_HSI, C_LIDAR)])
        self.junk = junk

    def forward(self, x_t, t, present):
        ones = torch.ones(x_t.shape[0], 1)
        out = torch.cat([net(x_t[:, CHANNEL_MODALITY == k], t, ones) for k, net in enumerate(self.nets)], 1)
        if self.junk is not None:
            lidar_junk = 10.0 * (1 - present[:, 0, None, None]) * self.junk.float()  # (B, S, S)
            out = out + torch.cat([torch.zeros_like(out[:, :C_HSI]), lidar_junk[:, None]], 1)
        return out


def _dependence_after(model, steps=3, valid=None, **masking):
    sched = NoiseSchedule(kind="cosine", num_timesteps=1000)
    mk = AdaptiveModalityMasking(2, warmup_steps=0, **masking)
    g = torch.Generator().manual_seed(4)
    for i in range(steps):
        diffusion_training_step(model, sched, mk, structured_batch(b=8, seed=i), CHANNEL_MODALITY, g, valid=valid)
    return mk


def test_paired_rows_are_the_same_rows_denoised_twice():
    # the others' reconstruction cannot depend on the masked modality here, so each pair's two
    # losses are equal if and only if both halves had the same x0, t and eps: D = 0 with se = 0.
    # (with another t or eps per half the ratio of two x0-MSEs would be far from 1)
    mk = _dependence_after(PerModalityDenoiser(), paired_fraction=0.5)
    assert mk.dependence.abs().max() < 1e-6 and mk.dependence_se.max() < 1e-6
    assert mk.w_sum.min() > 0  # both modalities were paired
    # the real denoiser does mix modalities: the same pairs show a dependence
    mk = _dependence_after(make_model(), paired_fraction=0.5)
    assert mk.dependence.abs().min() > 1e-4


def test_dependence_uses_only_valid_pixels():
    valid = torch.ones(8, 16, 16, dtype=torch.bool)
    valid[:, :4] = False
    junk = ~valid[0]
    # without the mask the junk counts: masking HSI "hurts" LiDAR a lot
    mk = _dependence_after(PerModalityDenoiser(junk))
    assert float(mk.dependence[0]) > 1.0 and abs(float(mk.dependence[1])) < 1e-6
    # with it, the junk pixels are out of every loss: no dependence
    mk = _dependence_after(PerModalityDenoiser(junk), valid=valid)
    assert mk.dependence.abs().max() < 1e-6


def test_pairs_leave_the_training_loss_and_gradients_unchanged():
    # the pair plan is drawn after t, eps and the flags, so with or without pairs the training rows
    # are the same; the paired forward runs without gradient and restores train mode
    sched = NoiseSchedule(kind="cosine", num_timesteps=100)
    x0 = structured_batch(b=8)
    out = []
    for f in (0.0, 0.5):
        model = make_model()
        mk = AdaptiveModalityMasking(2, paired_fraction=f)
        loss, _ = diffusion_training_step(model, sched, mk, x0, CHANNEL_MODALITY, torch.Generator().manual_seed(2))
        loss.backward()
        assert model.training
        out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(out[0][0], out[1][0])
    assert all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1]))
