"""GAUC, RMSE and MAE against scikit-learn / direct formulas, and their use on test rows."""

import numpy as np
import pytest
from sklearn.metrics import mean_absolute_error, mean_squared_error, roc_auc_score

from rectrain.train.metrics import gauc, regression_metrics


def _reference_gauc(scores, labels, users):
    num, den, skipped = 0.0, 0.0, 0
    for u in np.unique(users):
        m = users == u
        if labels[m].min() == labels[m].max():
            skipped += 1
            continue
        num += m.sum() * roc_auc_score(labels[m], scores[m])
        den += m.sum()
    return num / den, skipped


@pytest.mark.parametrize("seed", [0, 1])
def test_gauc_matches_per_user_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = 3000
    users = rng.integers(0, 200, n)
    labels = rng.integers(0, 2, n).astype(np.float32)
    scores = np.round(rng.normal(size=n) + 0.5 * labels, 1)  # rounded: many ties
    users[:7] = 10_000  # a one-class user is skipped and counted
    labels[:7] = 1
    ref, skipped = _reference_gauc(scores, labels, users)
    g = gauc(scores, labels, users)
    assert g["gauc"] == pytest.approx(ref, abs=1e-12)
    assert g["users_skipped"] == skipped >= 1
    assert g["users"] + g["users_skipped"] == len(np.unique(users))


def test_gauc_edge_cases():
    assert np.isnan(gauc(np.array([0.1, 0.2]), np.array([1, 1]), np.array([1, 1]))["gauc"])
    g = gauc(np.array([0.9, 0.1, 0.3, 0.3]), np.array([1, 0, 1, 0]), np.array([5, 5, 7, 7]))
    assert g["gauc"] == pytest.approx(0.5 * 1.0 + 0.5 * 0.5)  # a perfect user, a tied user
    assert np.isnan(gauc(np.zeros(0), np.zeros(0), np.zeros(0))["gauc"])


def test_rmse_mae_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(1, 6, 500).astype(np.float32)
    p = y + rng.normal(scale=0.8, size=500)
    m = regression_metrics(p, y)
    assert m["rmse"] == pytest.approx(np.sqrt(mean_squared_error(y, p)), rel=1e-9)
    assert m["mae"] == pytest.approx(mean_absolute_error(y, p), rel=1e-9)
    assert m["rows"] == 500
