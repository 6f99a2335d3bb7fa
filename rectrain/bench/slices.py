"""Test metrics on slices of the test rows: items with little or no train history.

A model's overall test AUC is dominated by popular items; side features such as
``text_embedding`` matter most for cold items (few or no train events), so the quality
benchmark reports AUC on those rows separately. Computed after training from the run's
``predictions/test.parquet`` (``item_id, label, score``) and the prepared train split's
``_item`` column, with Arrow group-by/join (no per-row Python) and scikit-learn's
``roc_auc_score``.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from sklearn.metrics import roc_auc_score

from rectrain.data import storage
from rectrain.data.schema import ITEM


def item_train_events(prepared_dir: str) -> pa.Table:
    """Train events per item of a prepared folder: table ``item_id`` (int64), ``train_events``
    (int64). Items without train events are absent.

    Raises:
        FileNotFoundError: the folder has no ``train`` split.
    """
    url = storage.join(prepared_dir, "train")
    if not storage.exists(url):
        raise FileNotFoundError(f"{prepared_dir}: no train split; run `rectrain prepare` first")
    files, _ = storage.list_parquet_files(url)
    items = pa.chunked_array([storage.read_parquet(f, columns=[ITEM])[ITEM] for f in files])
    counts = pa.table({"item_id": items}).group_by("item_id").aggregate([("item_id", "count")])
    return counts.rename_columns(["item_id", "train_events"])


def _auc(label: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC, NaN when the rows hold one class only (AUC is undefined there)."""
    if len(label) == 0 or label.min() == label.max():
        return math.nan
    return float(roc_auc_score(label, score))


def cold_item_metrics(predictions: pa.Table, train_events: pa.Table, below: int = 5,
                      k: int = 10) -> dict:
    """Test metrics on the rows whose item had fewer than ``below`` train events, and on those
    whose item had none.

    Args:
        predictions: a run's ``predictions/test.parquet``: a ranking run's ``item_id`` (int64),
            ``label`` (float, 0/1), ``score`` (float) per test row, or a retrieval run's
            ``item_id``, ``rank`` (1-based full-ranking rank of the held-out item) per user.
        train_events: :func:`item_train_events` of the run's prepared folder.
        below: the cold threshold, in train events (exclusive).
        k: the cut-off of HR@K for retrieval runs.

    Returns:
        ranking: ``{"test_auc_all", "test_auc_cold", "test_auc_unseen", "cold_below",
        "cold_rows", "unseen_rows"}``; an AUC is NaN when its rows hold one class only.
        Retrieval: the same with ``test_hr@K_all``, ``test_hr@K_cold``, ``test_hr@K_unseen``
        instead of the AUCs (NaN for no rows).

    Raises:
        KeyError: ``predictions`` lacks ``item_id`` or both ``score``/``label`` and ``rank``.
    """
    cols = set(predictions.column_names)
    ranking = {"item_id", "label", "score"} <= cols
    if not ranking and not {"item_id", "rank"} <= cols:
        raise KeyError(f"predictions have {predictions.column_names}: cold-item metrics need "
                       "item_id with label and score (ranking run) or rank (retrieval run)")
    keep = ["item_id", "label", "score"] if ranking else ["item_id", "rank"]
    j = predictions.select(keep).join(train_events, "item_id", join_type="left outer")
    n = pc.fill_null(j["train_events"], 0).to_numpy()
    cold, unseen = n < below, n == 0
    out = {"cold_below": below, "cold_rows": int(cold.sum()), "unseen_rows": int(unseen.sum())}
    if ranking:
        label = j["label"].to_numpy(zero_copy_only=False).astype(np.float64)
        score = j["score"].to_numpy(zero_copy_only=False).astype(np.float64)
        return {**out, "test_auc_all": _auc(label, score),
                "test_auc_cold": _auc(label[cold], score[cold]),
                "test_auc_unseen": _auc(label[unseen], score[unseen])}
    hit = j["rank"].to_numpy(zero_copy_only=False) <= k
    rate = (lambda m: float(hit[m].mean()) if m.any() else math.nan)
    return {**out, f"test_hr@{k}_all": rate(np.ones_like(hit)), f"test_hr@{k}_cold": rate(cold),
            f"test_hr@{k}_unseen": rate(unseen)}


def run_cold_item_metrics(run_dir: str, prepared_dir: str, below: int = 5) -> dict:
    """:func:`cold_item_metrics` of a finished ranking run.

    Raises:
        FileNotFoundError: the run has no ``predictions/test.parquet`` or the folder no train split.
    """
    url = storage.join(run_dir, "predictions", "test.parquet")
    if not storage.exists(url):
        raise FileNotFoundError(f"{run_dir}: no predictions/test.parquet (train the run first)")
    return cold_item_metrics(storage.read_parquet(url), item_train_events(prepared_dir), below)
