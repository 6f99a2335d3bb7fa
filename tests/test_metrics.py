"""Metrics against scikit-learn, and the cross-rank merge."""

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from rectrain.train.metrics import auc, binary_metrics, logloss, normalized_entropy


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_and_logloss_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 5000)
    s = np.round(rng.normal(y * 0.7, 1.0), 1)  # rounded: many ties
    assert auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    p = 1 / (1 + np.exp(-s))
    assert logloss(p, y) == pytest.approx(log_loss(y, p), rel=1e-9)


def test_ne_is_logloss_over_prior_entropy():
    y = np.array([1, 0, 0, 0])
    p = np.full(4, 0.25)  # predicting the prior gives NE 1
    assert normalized_entropy(p, y) == pytest.approx(1.0)
    m = binary_metrics(np.array([3.0, -3.0, -3.0, -3.0]), y)
    assert m["auc"] == 1.0 and m["ne"] < 0.2 and m["rows"] == 4


def test_single_class_auc_is_nan():
    assert np.isnan(auc(np.array([0.1, 0.2]), np.array([1, 1])))


@pytest.mark.parametrize("label", [0, 1])
def test_one_class_ne_is_undefined_with_the_reason(label):
    """Only positives (or only negatives): NE divides by a zero label entropy, so it is NaN
    like AUC (it was 436877.6 before), and the metrics say why."""
    y = np.full(50, label)
    m = binary_metrics(np.linspace(-2, 2, 50), y)
    assert np.isnan(m["auc"]) and np.isnan(m["ne"])
    assert np.isnan(normalized_entropy(np.full(50, 0.3), y))
    assert "one class" in m["undefined"] and ("positive" if label else "negative") in m["undefined"]
    assert np.isfinite(m["logloss"])
    assert "undefined" not in binary_metrics(np.array([1.0, -1.0]), np.array([1, 0]))
