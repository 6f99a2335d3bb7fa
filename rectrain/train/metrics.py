"""Binary-classification metrics over ALL rows of an evaluation set, merged across ranks.

Each rank scores its own shard; :func:`gather_arrays` concatenates the per-rank arrays on every
rank (``torch.distributed.all_gather_object``), and the metrics are computed once over the union,
so the result equals the single-process value (it is not an average of per-rank AUCs).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from torchmetrics.functional.classification import binary_auroc

_EPS = 1e-7


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (exact, ties counted as 1/2), via torchmetrics ``binary_auroc``.

    ``scores``: float ``[N]`` (logits or probabilities), ``labels``: ``[N]`` in {0, 1}.
    Returns NaN when only one class is present.
    """
    y = np.asarray(labels)
    if y.size == 0 or y.min() == y.max():
        return float("nan")
    return float(binary_auroc(torch.as_tensor(np.asarray(scores, dtype=np.float64)),
                              torch.as_tensor(y.astype(np.int64))))


def logloss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean binary cross-entropy in nats; probabilities clipped to ``[1e-7, 1 - 1e-7]``."""
    p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1 - _EPS)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def one_class_reason(labels: np.ndarray) -> str | None:
    """Why AUC and NE are undefined for ``labels`` ``[N]`` in {0, 1}, or None when both classes
    are present: AUC needs a positive and a negative to order, NE divides by the entropy of the
    positive rate, which is 0 when every label is the same."""
    y = np.asarray(labels)
    if y.size == 0:
        return "AUC and NE are undefined: no rows were evaluated"
    pos = int(np.count_nonzero(y))
    if 0 < pos < y.size:
        return None
    return (f"AUC and NE are undefined: all {y.size} labels are "
            f"{'positive' if pos else 'negative'} (one class only; NE divides by the label "
            f"entropy, which is 0)")


def normalized_entropy(probs: np.ndarray, labels: np.ndarray) -> float:
    """NE (He et al., "Practical Lessons from Predicting Clicks on Ads at Facebook", 2014):
    logloss divided by the entropy of the empirical positive rate (lower is better, 1 = prior).
    NaN when the labels have one class only (the entropy is 0; see :func:`one_class_reason`)."""
    y = np.asarray(labels, dtype=np.float64)
    if one_class_reason(y) is not None:
        return float("nan")
    p = float(y.mean())
    base = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    return logloss(probs, labels) / base


def binary_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    """``{"auc", "logloss", "ne", "rows", "positive_rate"}`` for logits ``[N]`` and labels
    ``[N]``; with one class only, AUC and NE are NaN and ``"undefined"`` (str) says why."""
    probs = 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))
    out = {"auc": auc(logits, labels), "logloss": logloss(probs, labels),
           "ne": normalized_entropy(probs, labels), "rows": int(len(labels)),
           "positive_rate": float(np.mean(labels)) if len(labels) else float("nan")}
    reason = one_class_reason(labels)
    if reason is not None:
        out["undefined"] = reason
    return out


def gather_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenate each named array over all ranks (rank order); identity without a process
    group. Every rank gets the full result."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return arrays
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, arrays)
    # skip empty parts: a rank without rows has untyped (float64) empty arrays
    return {k: np.concatenate([p[k] for p in parts if len(p[k])] or [arrays[k]])
            for k in arrays}


def gauc(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """Group AUC (Zhu et al., "Optimized Cost per Click in Taobao Display Advertising", KDD 2017;
    used by DIN, Zhou et al. 2018, Eq. 11): per-user AUC weighted by the user's impressions,
    ``sum_u n_u * AUC_u / sum_u n_u`` over users with both classes; users with one class only
    are skipped and counted.

    ``scores`` float ``[N]``, ``labels`` ``[N]`` in {0, 1}, ``groups`` int ``[N]`` (user ids).
    Vectorised: one lexsort by (group, score), tie-averaged ranks within each group
    (Mann-Whitney U), per-group sums with ``np.add.reduceat``; exact, ties counted as 1/2.
    Returns ``{"gauc", "users", "users_skipped"}``; ``gauc`` is NaN when no user has both
    classes.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    g = np.asarray(groups)
    if s.size == 0:
        return {"gauc": float("nan"), "users": 0, "users_skipped": 0}
    order = np.lexsort((s, g))
    s, y, g = s[order], y[order], g[order]
    n = s.size
    # tie groups of equal (group, score): average 0-based position
    new_tie = np.r_[True, (g[1:] != g[:-1]) | (s[1:] != s[:-1])]
    tie_start = np.flatnonzero(new_tie)
    tie_end = np.r_[tie_start[1:], n]
    tie_id = np.cumsum(new_tie) - 1
    avg_pos = ((tie_start + tie_end - 1) / 2.0)[tie_id]
    new_grp = np.r_[True, g[1:] != g[:-1]]
    grp_start = np.flatnonzero(new_grp)
    grp_id = np.cumsum(new_grp) - 1
    rank = avg_pos - grp_start[grp_id] + 1.0  # 1-based rank within the group
    n_u = np.diff(np.r_[grp_start, n]).astype(np.float64)
    pos = np.add.reduceat(y, grp_start)
    neg = n_u - pos
    rank_pos = np.add.reduceat(rank * y, grp_start)
    both = (pos > 0) & (neg > 0)
    auc_u = (rank_pos[both] - pos[both] * (pos[both] + 1) / 2.0) / (pos[both] * neg[both])
    w = n_u[both]
    value = float(np.sum(w * auc_u) / np.sum(w)) if both.any() else float("nan")
    return {"gauc": value, "users": int(both.sum()), "users_skipped": int((~both).sum())}


def regression_metrics(preds: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """``{"rmse", "mae", "rows"}`` of predictions ``[N]`` against targets ``[N]`` (e.g. ratings),
    via torchmetrics ``mean_squared_error`` / ``mean_absolute_error`` in float64."""
    from torchmetrics.functional import mean_absolute_error, mean_squared_error

    p = torch.as_tensor(np.asarray(preds, dtype=np.float64))
    t = torch.as_tensor(np.asarray(targets, dtype=np.float64))
    if p.numel() == 0:
        return {"rmse": float("nan"), "mae": float("nan"), "rows": 0}
    return {"rmse": float(mean_squared_error(p, t, squared=False)),
            "mae": float(mean_absolute_error(p, t)), "rows": int(p.numel())}
