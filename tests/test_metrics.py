"""Metrics against hand-computed cases."""

import json
import math

import numpy as np
import pytest
import torch

from bdgf.errors import InputError
from bdgf.metrics import (
    average_accuracy,
    classification_report,
    cohen_kappa,
    confusion_matrix,
    overall_accuracy,
    per_class_accuracy,
)


def _from_cm(cm):
    """Expand a confusion matrix (rows true, cols pred) into label vectors."""
    t, p = [], []
    for i, row in enumerate(cm):
        for j, c in enumerate(row):
            t += [i] * c
            p += [j] * c
    rng = np.random.default_rng(0)
    order = rng.permutation(len(t))
    return np.array(t)[order], np.array(p)[order]


def test_hand_computed_three_classes():
    cm = [[5, 1, 0],
          [2, 3, 1],
          [0, 0, 4]]
    t, p = _from_cm(cm)
    np.testing.assert_array_equal(confusion_matrix(t, p, 3), cm)
    # N = 6 + 6 + 4 = 16; diagonal = 5 + 3 + 4 = 12 -> OA = 12/16 = 0.75
    assert overall_accuracy(t, p, 3) == pytest.approx(0.75)
    # recalls: 5/6, 3/6, 4/4 -> AA = (5/6 + 1/2 + 1) / 3 = (14/6) / 3 = 7/9
    np.testing.assert_allclose(per_class_accuracy(t, p, 3), [5 / 6, 0.5, 1.0])
    assert average_accuracy(t, p, 3) == pytest.approx(7 / 9)
    # rows (true) = 6, 6, 4; cols (pred) = 7, 4, 5
    # p_e = (6*7 + 6*4 + 4*5) / 16^2 = (42 + 24 + 20) / 256 = 86/256
    # kappa = (12/16 - 86/256) / (1 - 86/256) = (192 - 86) / (256 - 86) = 106/170
    assert cohen_kappa(t, p, 3) == pytest.approx(106 / 170)


def test_hand_computed_two_classes():
    cm = [[8, 2],
          [1, 9]]
    t, p = _from_cm(cm)
    # OA = 17/20; AA = (8/10 + 9/10)/2 = 0.85
    # rows 10, 10; cols 9, 11 -> p_e = (90 + 110)/400 = 0.5; kappa = (0.85 - 0.5)/0.5 = 0.7
    assert overall_accuracy(t, p) == pytest.approx(0.85)
    assert average_accuracy(t, p) == pytest.approx(0.85)
    assert cohen_kappa(t, p) == pytest.approx(0.7)


def test_perfect_and_all_wrong():
    t = np.array([0, 1, 2, 2, 1, 0, 3])
    assert overall_accuracy(t, t, 4) == 1.0
    assert average_accuracy(t, t, 4) == 1.0
    assert cohen_kappa(t, t, 4) == 1.0
    wrong = (t + 1) % 4
    assert overall_accuracy(t, wrong, 4) == 0.0
    assert average_accuracy(t, wrong, 4) == 0.0
    np.testing.assert_array_equal(per_class_accuracy(t, wrong, 4), [0, 0, 0, 0])
    # rows 2,2,2,1; cols (shifted) 1,2,2,2 -> p_e = (2+4+4+2)/49 = 12/49
    # kappa = (0 - 12/49) / (1 - 12/49) = -12/37
    assert cohen_kappa(t, wrong, 4) == pytest.approx(-12 / 37)


def test_class_absent_from_truth():
    # class 2 never occurs in y_true but is predicted once
    t = np.array([0, 0, 1, 1])
    p = np.array([0, 2, 1, 1])
    pc = per_class_accuracy(t, p, 3)
    assert pc[0] == 0.5 and pc[1] == 1.0 and math.isnan(pc[2])
    # AA over present classes only: (0.5 + 1) / 2
    assert average_accuracy(t, p, 3) == pytest.approx(0.75)
    rep = classification_report(t, p, ["a", "b", "c"])
    assert rep["per_class"] == {"a": 0.5, "b": 1.0, "c": None}
    json.dumps(rep)  # no NaN, no numpy types


def test_chance_level_kappa_near_zero():
    rng = np.random.default_rng(1)
    t = rng.integers(0, 5, 200_000)
    p = rng.integers(0, 5, 200_000)
    assert abs(cohen_kappa(t, p, 5)) < 0.01
    assert overall_accuracy(t, p, 5) == pytest.approx(0.2, abs=0.01)


def test_single_class_kappa():
    t = np.zeros(5, int)
    assert cohen_kappa(t, t, 2) == 1.0


def test_torch_and_report():
    t = torch.tensor([0, 1, 1, 2])
    p = torch.tensor([0, 1, 2, 2])
    # OA 3/4; recalls 1, 1/2, 1 -> AA 5/6
    # rows 1,2,1; cols 1,1,2 -> p_e = (1+2+2)/16 = 5/16; kappa = (12/16-5/16)/(11/16) = 7/11
    rep = classification_report(t, p, ["x", "y", "z"])
    assert rep["n"] == 4
    assert rep["oa"] == pytest.approx(0.75)
    assert rep["aa"] == pytest.approx(5 / 6)
    assert rep["kappa"] == pytest.approx(7 / 11)
    assert rep["confusion"] == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    assert rep["support"] == {"x": 1, "y": 2, "z": 1}
    assert json.loads(json.dumps(rep)) == rep


def test_errors():
    with pytest.raises(InputError, match="3 labels but y_pred has 2"):
        confusion_matrix([0, 1, 1], [0, 1], 2)
    with pytest.raises(InputError, match="outside 0..1"):
        confusion_matrix([0, 1, 2], [0, 1, 1], 2)
    with pytest.raises(InputError, match="y_pred has labels outside"):
        confusion_matrix([0, 1], [0, -1], 2)
    with pytest.raises(InputError, match="outside 0..1"):
        classification_report([0, 1, 2], [0, 1, 1], ["a", "b"])
    with pytest.raises(InputError, match="empty"):
        overall_accuracy([], [])
    with pytest.raises(InputError, match="non-integer"):
        overall_accuracy([0.5], [0])
