"""Full-ranking metrics (HR@K, NDCG@K, recall@K, MRR) against brute force and scikit-learn."""

import numpy as np
import pytest
import torch
from sklearn.metrics import ndcg_score

from rectrain.train.ranking_metrics import (exclusion_mask, metrics_from_ranks, ndcg_at_k,
                                            recall_at_k, target_ranks)


@pytest.fixture
def case():
    rng = np.random.default_rng(0)
    n, items = 200, 40
    scores = rng.permutation(n * items).reshape(n, items).astype(np.float64)  # no ties
    targets = rng.integers(0, items, n)
    return scores, targets


def test_ranks_and_metrics_match_brute_force(case):
    scores, targets = case
    ranks = target_ranks(torch.from_numpy(scores), torch.from_numpy(targets)).numpy()
    # brute force: position of the target in each row sorted by decreasing score
    for s, t, r in zip(scores, targets, ranks):
        assert list(np.argsort(-s)).index(t) + 1 == r
    relevant = np.zeros_like(scores, dtype=bool)
    relevant[np.arange(len(targets)), targets] = True
    m = metrics_from_ranks(ranks, ks=(1, 5, 10, 20))
    for k in (1, 5, 10, 20):
        hit = [t in np.argsort(-s)[:k] for s, t in zip(scores, targets)]
        assert m[f"hr@{k}"] == pytest.approx(np.mean(hit))
        assert m[f"recall@{k}"] == pytest.approx(recall_at_k(scores, relevant, k))
        assert m[f"ndcg@{k}"] == pytest.approx(ndcg_at_k(scores, relevant, k))
        # scikit-learn's NDCG (one relevant item per row, no ties)
        assert m[f"ndcg@{k}"] == pytest.approx(ndcg_score(relevant.astype(int), scores, k=k))
    assert m["mrr"] == pytest.approx(np.mean(1.0 / ranks))
    assert m["users"] == len(targets)
    assert 0 < m["hr@1"] < m["hr@10"] < m["hr@20"] < 1


def test_multi_target_reference_against_sklearn():
    rng = np.random.default_rng(1)
    scores = rng.random((50, 30))
    relevant = rng.random((50, 30)) < 0.15
    relevant[:, 0] |= ~relevant.any(1)  # every row has a relevant item
    for k in (3, 10):
        assert ndcg_at_k(scores, relevant, k) == pytest.approx(
            ndcg_score(relevant.astype(int), scores, k=k))
        top = np.argsort(-scores, 1)[:, :k]
        direct = [relevant[i, top[i]].sum() / relevant[i].sum() for i in range(50)]
        assert recall_at_k(scores, relevant, k) == pytest.approx(np.mean(direct))


def test_exclusion_and_ties():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0],
                           [1.0, 1.0, 1.0, 1.0, 1.0]])
    targets = torch.tensor([3, 2])
    assert target_ranks(scores, targets).tolist() == [4, 5]  # ties count against the target
    # user 0 saw items 0 and 3 (3 is the target: still ranked); user 1 saw item 4
    indptr, items = np.array([0, 2, 3]), np.array([0, 3, 4])
    mask = exclusion_mask(np.array([0, 1]), indptr, items, 5)
    assert mask.tolist() == [[True, False, False, True, False],
                             [False, False, False, False, True]]
    assert target_ranks(scores, targets, mask).tolist() == [3, 4]
    no_history = exclusion_mask(np.array([-1]), indptr, items, 5)
    assert not no_history.any()
    m = metrics_from_ranks(np.array([1, 3, 11]), ks=(10,))
    assert m["hr@10"] == pytest.approx(2 / 3)
    assert m["ndcg@10"] == pytest.approx((1.0 + 1.0 / np.log2(4)) / 3)
    with pytest.raises(ValueError, match="target ids"):
        target_ranks(scores, torch.tensor([0, 5]))
