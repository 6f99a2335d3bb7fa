"""Top-K ranking metrics for full-ranking evaluation of retrieval / next-item models.

Protocol (leave-last-out, one held-out target per user and evaluation set): every candidate item
is scored, the items the user already interacted with before the target are excluded (except the
target itself), and the target's 1-based **rank** among the remaining items is computed. Ties
count against the target (``rank = 1 + #{j != t, not excluded: s_j >= s_t}``), so a model (or a
baseline) gains nothing from tied scores.

With a single relevant item per user the metrics reduce to functions of that rank
(Järvelin & Kekäläinen, "Cumulated gain-based evaluation of IR techniques", TOIS 2002, for DCG;
Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018, Sec. IV, for HR/NDCG in
next-item evaluation):

- ``HR@K`` (hit rate) = ``1[rank <= K]``;
- ``recall@K`` = ``|relevant ∩ top-K| / |relevant|`` = ``HR@K`` with one relevant item;
- ``NDCG@K`` = ``DCG@K / IDCG@K`` with ``DCG@K = sum_{i<=K} rel_i / log2(i + 1)``; with one
  relevant item ``IDCG@K = 1`` and ``NDCG@K = 1[rank <= K] / log2(rank + 1)``;
- ``MRR`` = ``1 / rank`` (over the full ranking, no cut-off).

Each is averaged over users (every user counted exactly once). :func:`recall_at_k` and
:func:`ndcg_at_k` are the general (several relevant items) definitions from top-K lists; they
serve as the brute-force reference in the tests.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def exclusion_mask(rows_users: np.ndarray, seen_indptr: np.ndarray, seen_items: np.ndarray,
                   n_items: int) -> torch.Tensor:
    """Bool ``[N, n_items]`` mask, True where row ``r``'s user has seen the item.

    ``rows_users`` int64 ``[N]`` indexes a CSR structure (``seen_indptr`` int64 ``[U + 1]``,
    ``seen_items`` int64 item ids ``< n_items``); ``-1`` marks a row whose user has no history.
    Vectorised: no per-row Python.
    """
    n = len(rows_users)
    mask = torch.zeros(n, n_items, dtype=torch.bool)
    u = np.asarray(rows_users, dtype=np.int64)
    has = u >= 0
    lo = np.where(has, seen_indptr[np.where(has, u, 0)], 0)
    hi = np.where(has, seen_indptr[np.where(has, u, 0) + 1], 0)
    lengths = hi - lo
    if lengths.sum():
        rows = np.repeat(np.arange(n), lengths)
        starts = np.repeat(lo - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        cols = seen_items[starts + np.arange(lengths.sum())]
        mask[torch.from_numpy(rows), torch.from_numpy(cols)] = True
    return mask


def target_ranks(scores: torch.Tensor, targets: torch.Tensor,
                 exclude: torch.Tensor | None = None) -> torch.Tensor:
    """1-based rank of each row's target among the non-excluded items (ties count against it).

    Args:
        scores: float ``[N, I]`` scores of every item (higher = better).
        targets: int64 ``[N]`` target item index per row, in ``[0, I)``.
        exclude: bool ``[N, I]`` items not to rank (already seen, padding id); the target's own
            entry is ignored (a target is always ranked).

    Returns:
        int64 ``[N]``, in ``[1, I]``.

    Raises:
        ValueError: shapes disagree or a target is out of range.
    """
    if scores.dim() != 2 or targets.shape != scores.shape[:1]:
        raise ValueError(f"scores [N, I] and targets [N] expected, got {tuple(scores.shape)} and "
                         f"{tuple(targets.shape)}")
    if len(targets) and (targets.min() < 0 or targets.max() >= scores.shape[1]):
        raise ValueError(f"target ids must lie in [0, {scores.shape[1]}), got "
                         f"[{int(targets.min())}, {int(targets.max())}]")
    rows = torch.arange(len(targets))
    s_t = scores[rows, targets].unsqueeze(1)
    better = scores >= s_t
    better[rows, targets] = False
    if exclude is not None:
        better &= ~exclude
    return better.sum(1) + 1


def metrics_from_ranks(ranks: np.ndarray | torch.Tensor, ks: Sequence[int] = (10, 20)
                       ) -> dict[str, float]:
    """``{"hr@K", "ndcg@K", "recall@K" for K in ks, "mrr", "users"}`` averaged over rows.

    ``ranks``: 1-based target ranks ``[N]`` (one target per user). Empty input gives NaNs.
    """
    r = np.asarray(ranks, dtype=np.float64)
    out: dict[str, float] = {}
    for k in ks:
        hit = r <= k
        out[f"hr@{k}"] = float(hit.mean()) if r.size else float("nan")
        out[f"recall@{k}"] = out[f"hr@{k}"]
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(r + 1.0), 0.0).mean()) \
            if r.size else float("nan")
    out["mrr"] = float((1.0 / r).mean()) if r.size else float("nan")
    out["users"] = int(r.size)
    return out


def recall_at_k(scores: np.ndarray, relevant: np.ndarray, k: int) -> float:
    """Mean over rows of ``|top-K ∩ relevant| / |relevant|`` (rows without relevant items are
    skipped). ``scores`` float ``[N, I]``, ``relevant`` bool ``[N, I]``; top-K by a stable sort
    of ``-scores``."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    hits = np.take_along_axis(relevant, top, 1).sum(1)
    n_rel = relevant.sum(1)
    keep = n_rel > 0
    return float((hits[keep] / n_rel[keep]).mean())


def ndcg_at_k(scores: np.ndarray, relevant: np.ndarray, k: int) -> float:
    """Mean over rows of ``DCG@K / IDCG@K`` with binary relevance (rows without relevant items
    skipped); top-K by a stable sort of ``-scores``."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    gains = np.take_along_axis(relevant, top, 1).astype(np.float64)
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (gains * disc[: gains.shape[1]]).sum(1)
    n_rel = relevant.sum(1)
    keep = n_rel > 0
    idcg = np.cumsum(disc)[np.minimum(n_rel[keep], k) - 1]
    return float((dcg[keep] / idcg).mean())
