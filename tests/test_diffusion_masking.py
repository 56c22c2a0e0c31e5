"""Adaptive modality masking: sampling invariants and the p_m update, with hand-computed targets."""

import json

import pytest
import torch

from bdgf.diffusion.masking import AdaptiveModalityMasking, MaskingConfig


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("M", [2, 3])
@pytest.mark.parametrize("ref", [0.0, 0.25])
def test_never_all_masked(M, ref):
    # p = 0.7 for every modality: without the rescue 0.7^M of the rows (34% / 49%) would be empty
    mk = AdaptiveModalityMasking(M, p0=0.7, p_max=0.7, reference_fraction=ref)
    g = gen()
    for _ in range(20):
        present = mk.sample(256, g)
        assert present.shape == (256, M) and present.dtype == torch.float32
        assert set(present.unique().tolist()) <= {0.0, 1.0}
        assert int((present.sum(1) == 0).sum()) == 0


def test_effective_mask_rate_with_rescue():
    # M = 2, p = 0.5, no reference rows: m ends masked if (m masked, other not) = 1/4, or both were
    # masked (1/4) and the rescue unmasked the other (1/2): 1/4 + 1/8 = 0.375. Both masked: never.
    mk = AdaptiveModalityMasking(2, p0=0.5, reference_fraction=0.0)
    present = mk.sample(40000, gen(1))
    rate = 1 - present.mean(0)
    torch.testing.assert_close(rate, torch.full((2,), 0.375), atol=0.01, rtol=0)


def test_reference_rows_are_unmasked():
    # f * B = 0.25 * 8 = 2 exactly: every batch has at least 2 rows with nothing masked
    mk = AdaptiveModalityMasking(3, p0=0.7, p_max=0.7, reference_fraction=0.25)
    g = gen(2)
    for _ in range(50):
        assert int((mk.sample(8, g).sum(1) == 3).sum()) >= 2
    # f * B = 0.25 * 2 = 0.5: one reference row in about half of the batches
    n = sum(int((mk.sample(2, g).sum(1) == 3).sum() >= 1) for _ in range(400))
    assert n > 200  # 0.5 from the reference row, plus rows that happened to draw nothing masked


def _constructed_losses(present, dependent_on, M):
    """Loss 1 everywhere, plus 2 on every other modality where `dependent_on` is masked."""
    loss = torch.ones(present.shape[0], M)
    bump = 2.0 * (1.0 - present[:, dependent_on : dependent_on + 1])
    others = torch.ones(M)
    others[dependent_on] = 0
    return loss + bump * others


def _run(mk, steps, dependent_on, batch=64, seed=3):
    g = gen(seed)
    for _ in range(steps):
        present = mk.sample(batch, g)
        mk.update(_constructed_losses(present, dependent_on, mk.num_modalities), present)


def test_adaptive_raises_p_of_the_modality_others_depend_on():
    # M = 2, losing modality 0 triples the loss on modality 1: L̄_{¬0|0} = 3, L̄_{¬0|none} = 1,
    # L̄_{¬1|1} = L̄_{¬1|none} = 1 -> 1 + D = (3, 1), mean 2 -> p = 0.3 * (1.5, 0.5) = (0.45, 0.15)
    mk = AdaptiveModalityMasking(2, warmup_steps=5)
    _run(mk, 30, dependent_on=0)
    torch.testing.assert_close(mk.dependence, torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(mk.probabilities, torch.tensor([0.45, 0.15]))
    assert mk.history[0] == pytest.approx([0.3, 0.3])  # warm-up
    assert mk.history[-1] == pytest.approx([0.45, 0.15])
    assert len(mk.history) == 30


def test_adaptive_three_modalities():
    # M = 3, others depend on modality 2: 1 + D = (1, 1, 3), mean 5/3 -> p = 0.3 * (0.6, 0.6, 1.8)
    mk = AdaptiveModalityMasking(3, warmup_steps=0)
    _run(mk, 40, dependent_on=2)
    torch.testing.assert_close(mk.probabilities, torch.tensor([0.18, 0.18, 0.54]))


def test_adaptive_clips():
    # 1 + D = (100, 1): p0 * 2 * (100, 1) / 101 = (0.594, 0.00594) -> (0.594, p_min = 0.05)
    mk = AdaptiveModalityMasking(2, warmup_steps=0)
    g = gen(4)
    for _ in range(20):
        present = mk.sample(64, g)
        loss = torch.ones(64, 2)
        loss[:, 1] += 99.0 * (1 - present[:, 0])
        mk.update(loss, present)
    torch.testing.assert_close(mk.probabilities, torch.tensor([0.3 * 200 / 101, 0.05]))
    # with p0 = 0.5 the first is 0.99 -> p_max = 0.7
    mk2 = AdaptiveModalityMasking(2, p0=0.5, warmup_steps=0)
    mk2.load_state_dict({**mk.state_dict(), "config": {**mk.state_dict()["config"], "p0": 0.5}})
    mk2.update(torch.ones(4, 2), torch.ones(4, 2))
    torch.testing.assert_close(mk2.probabilities, torch.tensor([0.7, 0.05]))


def test_ema_follows_the_rule():
    # one modality's "none" EMA: first value taken as is, then 0.9 * old + 0.1 * new
    mk = AdaptiveModalityMasking(2, warmup_steps=1000)
    ones = torch.ones(2, 2)
    mk.update(torch.full((2, 2), 2.0), ones)
    mk.update(torch.full((2, 2), 4.0), ones)
    torch.testing.assert_close(mk.ema_none, torch.tensor([2.2, 2.2], dtype=torch.float64))
    assert not mk.ready  # nothing masked yet
    assert torch.isnan(mk.dependence).all()


def test_warmup_keeps_p0():
    mk = AdaptiveModalityMasking(2, warmup_steps=25)
    _run(mk, 24, dependent_on=0)
    torch.testing.assert_close(mk.probabilities, torch.tensor([0.3, 0.3]))
    _run(mk, 1, dependent_on=0)
    assert mk.probabilities[0] > mk.probabilities[1]


def test_uniform_mode_keeps_p0_but_tracks_dependence():
    mk = AdaptiveModalityMasking(2, mode="uniform", warmup_steps=0)
    _run(mk, 30, dependent_on=0)
    torch.testing.assert_close(mk.probabilities, torch.tensor([0.3, 0.3]))
    torch.testing.assert_close(mk.dependence, torch.tensor([2.0, 0.0]))


def test_none_mode_masks_nothing():
    mk = AdaptiveModalityMasking(3, mode="none")
    assert torch.equal(mk.sample(100, gen()), torch.ones(100, 3))
    _run(mk, 5, dependent_on=0)
    assert torch.equal(mk.probabilities, torch.zeros(3))


def test_state_dict_is_plain_and_roundtrips():
    mk = AdaptiveModalityMasking(2, warmup_steps=5)
    _run(mk, 10, dependent_on=0)
    state = json.loads(json.dumps(mk.state_dict()))  # plain types only
    mk2 = AdaptiveModalityMasking(2)
    mk2.load_state_dict(state)
    assert mk2.config == mk.config and mk2.step == 10 and mk2.history == mk.history
    torch.testing.assert_close(mk2.probabilities, mk.probabilities)
    assert torch.equal(mk.sample(32, gen(9)), mk2.sample(32, gen(9)))
    with pytest.raises(ValueError, match="modalities"):
        AdaptiveModalityMasking(3).load_state_dict(state)


def test_config_errors():
    with pytest.raises(ValueError, match="at least 2"):
        AdaptiveModalityMasking(1)
    with pytest.raises(ValueError, match="mode"):
        MaskingConfig(mode="sometimes")
    with pytest.raises(ValueError, match="p_min"):
        MaskingConfig(p0=0.8)
    mk = AdaptiveModalityMasking(2)
    with pytest.raises(ValueError, match="present"):
        mk.update(torch.ones(4, 2), torch.ones(4, 3))


def test_non_exclusive_statistic_matches_for_two_modalities():
    # with M = 2, "m is the only masked one" and "m masked, others present" are the same samples
    mk = AdaptiveModalityMasking(2, warmup_steps=0, exclusive=False)
    _run(mk, 30, dependent_on=0)
    torch.testing.assert_close(mk.probabilities, torch.tensor([0.45, 0.15]))
