"""Balanced vs concatenated loss: a 1-band modality counts as much as a 144-band one."""

import pytest
import torch

from bdgf.diffusion.loss import balanced_loss, concat_mse, per_modality_mse, valid_row_scale

HSI, LIDAR = 144, 1
CHANNEL_MODALITY = torch.tensor([0] * HSI + [1] * LIDAR)


def _pair(err_hsi: float, err_lidar: float):
    """target 0, prediction off by err_hsi on every HSI band and err_lidar on the LiDAR band."""
    target = torch.zeros(2, HSI + LIDAR, 4, 4)
    pred = target.clone()
    pred[:, :HSI] = err_hsi
    pred[:, HSI:] = err_lidar
    return pred, target


def test_balanced_loss_hand_values():
    per_mod = torch.tensor([[1.0, 3.0], [2.0, 6.0]])
    assert balanced_loss(per_mod).item() == pytest.approx(3.0)  # (1 + 3 + 2 + 6) / 4
    w = torch.tensor([0.25, 0.75])
    # per sample: 0.25 + 2.25 = 2.5 and 0.5 + 4.5 = 5.0 -> mean 3.75
    assert balanced_loss(per_mod, w).item() == pytest.approx(3.75)
    with pytest.raises(ValueError, match="weights"):
        balanced_loss(per_mod, torch.ones(3))
    with pytest.raises(ValueError, match="per_mod"):
        balanced_loss(torch.ones(4))


def test_concat_mse_is_dominated_by_hsi():
    # all error on HSI: 144 of 145 channels have squared error 1 -> 144/145; all on LiDAR: 1/145
    assert concat_mse(*_pair(1.0, 0.0)).item() == pytest.approx(144 / 145)
    assert concat_mse(*_pair(0.0, 1.0)).item() == pytest.approx(1 / 145)
    with pytest.raises(ValueError, match="shapes"):
        concat_mse(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4))


def test_balanced_weighs_one_band_like_144_bands_hand_per_modality():
    # per-modality means written by hand: HSI error 1 -> (1, 0); LiDAR error 1 -> (0, 1)
    hsi_off = balanced_loss(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    lidar_off = balanced_loss(torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    assert hsi_off.item() == pytest.approx(0.5) and lidar_off.item() == pytest.approx(0.5)


def test_balanced_weighs_one_band_like_144_bands_through_kernel():
    import kernels.dispatch as dispatch
    for (eh, el), expected in (((1.0, 0.0), [1.0, 0.0]), ((0.0, 1.0), [0.0, 1.0]), ((2.0, 1.0), [4.0, 1.0])):
        pred, target = _pair(eh, el)
        per_mod = dispatch.balanced_mse(pred, target, CHANNEL_MODALITY, 2)
        torch.testing.assert_close(per_mod, torch.tensor([expected, expected]))
        assert balanced_loss(per_mod).item() == pytest.approx(sum(expected) / 2)
    # same total error budget, swapped between modalities: concat changes 144x, balanced not at all
    a, b = _pair(1.0, 0.0), _pair(0.0, 1.0)
    la = balanced_loss(dispatch.balanced_mse(*a, CHANNEL_MODALITY, 2))
    lb = balanced_loss(dispatch.balanced_mse(*b, CHANNEL_MODALITY, 2))
    assert la.item() == pytest.approx(lb.item())
    assert concat_mse(*a).item() == pytest.approx(144 * concat_mse(*b).item())


def _valid_case(seed=0):
    """Random pred/target (3, 145, 4, 4) and a validity mask: row 0 all valid, row 1 five valid
    pixels, row 2 none."""
    g = torch.Generator().manual_seed(seed)
    pred, target = torch.randn(3, HSI + LIDAR, 4, 4, generator=g), torch.randn(3, HSI + LIDAR, 4, 4, generator=g)
    valid = torch.zeros(3, 4, 4, dtype=torch.bool)
    valid[0] = True
    valid[1].view(-1)[[0, 3, 6, 9, 15]] = True
    return pred, target, valid


def test_per_modality_mse_with_valid_is_the_mean_over_valid_pixels():
    pred, target, valid = _valid_case()
    per_mod = per_modality_mse(pred, target, CHANNEL_MODALITY, 2, valid)
    for b in range(2):
        v = valid[b]
        err = (pred[b] - target[b])[:, v] ** 2  # (C, n_valid)
        expected = torch.stack([err[:HSI].mean(), err[HSI:].mean()])
        torch.testing.assert_close(per_mod[b], expected)
    assert per_mod[2].tolist() == [0.0, 0.0]  # no valid pixel: weight 0
    # without a mask: the plain kernel value; with an all-valid mask: the same
    full = per_modality_mse(pred, target, CHANNEL_MODALITY, 2)
    torch.testing.assert_close(per_modality_mse(pred, target, CHANNEL_MODALITY, 2, torch.ones(3, 4, 4)), full)
    with pytest.raises(ValueError, match="valid"):
        per_modality_mse(pred, target, CHANNEL_MODALITY, 2, valid[:, :3])


def test_losses_ignore_whatever_sits_in_invalid_pixels():
    pred, target, valid = _valid_case()
    junk_pred, junk_target = pred.clone(), target.clone()
    for b in (1, 2):
        junk_pred[b][:, ~valid[b]] = 1e6
        junk_target[b][:, ~valid[b]] = -3e5
    assert torch.equal(per_modality_mse(junk_pred, junk_target, CHANNEL_MODALITY, 2, valid),
                       per_modality_mse(pred, target, CHANNEL_MODALITY, 2, valid))
    assert concat_mse(junk_pred, junk_target, valid).item() == concat_mse(pred, target, valid).item()


def test_concat_mse_with_valid_averages_rows_over_their_valid_pixels():
    pred, target, valid = _valid_case(1)
    rows = [((pred[b] - target[b])[:, valid[b]] ** 2).mean() for b in range(2)]
    expected = (rows[0] + rows[1] + 0.0) / 3  # the row without a valid pixel weighs 0
    assert concat_mse(pred, target, valid).item() == pytest.approx(expected.item(), rel=1e-5)
    assert concat_mse(pred, target, torch.ones(3, 4, 4)).item() == pytest.approx(concat_mse(pred, target).item(),
                                                                                  rel=1e-6)
    assert valid_row_scale(valid).tolist() == pytest.approx([1.0, 16 / 5, 0.0])


def test_bf16_prediction_against_fp32_target_is_computed_in_float32():
    """Under bf16 autocast the denoiser returns bf16 and the target stays float32: the losses take
    the pair (no dtype error), compute in float32, and pass the gradient back to the bf16 output."""
    pred, target = _pair(0.5, 2.0)  # exact in bf16
    pred = pred.bfloat16().requires_grad_(True)
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    valid[1, :2] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        per_mod = per_modality_mse(pred, target, CHANNEL_MODALITY, 2)
        per_mod_v = per_modality_mse(pred, target, CHANNEL_MODALITY, 2, valid)
        concat = concat_mse(pred, target, valid)
        loss = balanced_loss(per_mod)
    assert per_mod.dtype == per_mod_v.dtype == concat.dtype == loss.dtype == torch.float32
    torch.testing.assert_close(per_mod, torch.tensor([[0.25, 4.0], [0.25, 4.0]]))
    torch.testing.assert_close(per_mod_v, per_mod)  # same error on every pixel: the valid mean is the same
    assert loss.item() == pytest.approx((0.25 + 4.0) / 2)
    assert concat.item() == pytest.approx((HSI * 0.25 + 4.0) / (HSI + 1))
    loss.backward()
    assert pred.grad is not None and pred.grad.dtype == torch.bfloat16 and bool(pred.grad.abs().sum() > 0)


def test_float64_stays_float64():
    pred, target = _pair(0.5, 2.0)
    per_mod = per_modality_mse(pred.double(), target.double(), CHANNEL_MODALITY, 2)
    assert per_mod.dtype == torch.float64 and balanced_loss(per_mod).dtype == torch.float64
    assert concat_mse(pred.double(), target.double()).dtype == torch.float64
