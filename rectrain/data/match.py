"""User × item *match features* (``kind: match``): does the behaviour sequence hold the candidate
item, or an item of the candidate's category, how often, how many events ago and how long ago.

These "target in history" signals (TorchEasyRec's match/overlap features; the target-in-history
counts of click models such as Alibaba's DIN/DIEN production features) are the strongest input
of repeat-consumption data (groceries, music, re-watches), and an attention over item embeddings
learns them poorly: two different items can be close, the same item is not special to it.

They are computed on the fly in :meth:`rectrain.data.features.FeatureLayout.to_batch` from
the columns a prepared sample (training) or a served request (:mod:`rectrain.serve.context`,
the user's latest history + each candidate) both carry, so training and serving cannot
disagree. Vectorised over the flattened Arrow list values: no per-row Python.

Per match feature, three float32 dense columns (fed to every ranking model through
``Batch.dense``; bounded, so not z-normalised):

- ``log1p(count)``: matches in the (truncated, ``dataset.sequence_length``) history;
- ``1 / (1 + ago)``: ``ago`` = events between the last match and the candidate (0: the most
  recent history event matches); 0 without a match;
- ``1 / (1 + log1p(hours))``: hours from the last match to the sample's timestamp ``_ts``;
  0 without a match or without timestamps.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rectrain.data.encode import positions_in_lists

#: dense columns per match feature (see the module docstring)
MATCH_DIM = 3
#: the most category ids a multi_hot category can have (ids 1..63 as bits of a uint64)
MAX_MULTI_HOT_IDS = 64


def match_dense(cand: np.ndarray, hist: np.ndarray, lengths: np.ndarray,
                now: np.ndarray | None = None, hist_ts: np.ndarray | None = None,
                key_of: np.ndarray | None = None, bitmask: bool = False) -> np.ndarray:
    """Match features of ``B`` candidates against their behaviour sequences.

    Args:
        cand: int64 ``[B]`` candidate item ids (0 = unknown: never matches).
        hist: int64 ``[N]`` history item ids of all rows laid end to end (most recent last
            within a row), ``N = lengths.sum()``.
        lengths: int ``[B]`` history length of each row.
        now: int64 ``[B]`` unix seconds of each sample, or None (time column 0).
        hist_ts: int64 ``[N]`` unix seconds of each history event, aligned with ``hist``.
        key_of: None (match the item itself), or ``[num_items]`` per item id its category
            id (int64, 0 = none) or, with ``bitmask``, its set of category ids as bits
            (uint64): a history item matches when it shares a category with the candidate.
        bitmask: ``key_of`` holds bit sets (multi_hot categories).

    Returns:
        float32 ``[B, 3]``: ``log1p(count)``, ``1 / (1 + ago)``, ``1 / (1 + log1p(hours))``.

    Raises:
        ValueError: ``hist``/``hist_ts`` sizes disagree with ``lengths``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    B, N = len(cand), int(lengths.sum())
    if len(hist) != N or (hist_ts is not None and len(hist_ts) != N):
        raise ValueError(f"match features: {N} history elements by the lengths, "
                         f"{len(hist)} item ids, {None if hist_ts is None else len(hist_ts)} "
                         f"timestamps")
    row = np.repeat(np.arange(B), lengths)
    if key_of is None:
        ck, hk = cand, hist
    else:  # ids beyond the catalog (a grown vocabulary) have no category
        ck = key_of[np.where(cand < len(key_of), cand, 0)]
        hk = key_of[np.where(hist < len(key_of), hist, 0)]
    ck_row = ck[row]
    hit = (hk & ck_row) != 0 if bitmask else (hk == ck_row) & (ck_row != 0)
    out = np.zeros((B, MATCH_DIM), dtype=np.float32)
    hits = np.flatnonzero(hit)
    if not len(hits):
        return out
    r = row[hits]
    out[:, 0] = np.log1p(np.bincount(r, minlength=B))
    # flat order is row-major with positions increasing: the last hit of a run is the latest
    is_last = np.r_[r[1:] != r[:-1], True]
    last, rows = hits[is_last], r[is_last]
    pos = positions_in_lists(lengths)
    out[rows, 1] = 1.0 / (1.0 + lengths[rows] - 1 - pos[last])
    if now is not None and hist_ts is not None:
        hours = np.maximum(np.asarray(now)[rows] - hist_ts[last], 0) / 3600.0
        out[rows, 2] = 1.0 / (1.0 + np.log1p(hours))
    return out


def item_keys(catalog: pa.Table, item_col: str, cat_col: str, num_items: int,
              num_categories: int) -> tuple[np.ndarray, bool]:
    """Per item id its category key, from the prepared items catalog (encoded columns).

    Args:
        catalog: ``catalog/items.parquet`` of the prepared folder (one row per item).
        item_col: the candidate's item-id feature (e.g. ``item_id``).
        cat_col: an item-side ``sparse`` feature (one id per item) or ``multi_hot`` feature
            (a list of ids per item, e.g. MovieLens ``genres``).
        num_items: rows of the item table (ids ``0..num_items-1``).
        num_categories: rows of ``cat_col``'s table.

    Returns:
        ``(key_of, bitmask)``: int64 ``[num_items]`` category ids (sparse), or uint64 bit sets
        (multi_hot) and ``True``.

    Raises:
        KeyError: the catalog lacks either column.
        ValueError: a multi_hot category with more than 63 ids.
    """
    for c in (item_col, cat_col):
        if c not in catalog.column_names:
            raise KeyError(f"catalog/items.parquet: no column {c!r} (has {catalog.column_names})")
    items = catalog[item_col].to_numpy().astype(np.int64)
    col = catalog[cat_col].combine_chunks()
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        key_of = np.zeros(num_items, dtype=np.int64)
        key_of[items] = np.nan_to_num(col.to_numpy(zero_copy_only=False)).astype(np.int64)
        return key_of, False
    if num_categories > MAX_MULTI_HOT_IDS:
        raise ValueError(f"match category {cat_col!r}: a multi_hot category needs at most "
                         f"{MAX_MULTI_HOT_IDS - 1} ids, its table has {num_categories - 1}")
    lens = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False)
    values = col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    bits = np.left_shift(np.uint64(1), values.astype(np.uint64)) * (values > 0)
    key_of = np.zeros(num_items, dtype=np.uint64)
    np.bitwise_or.at(key_of, np.repeat(items, lens), bits.astype(np.uint64))
    return key_of, True


def history_rule_scores(table: pa.Table, item: str = "item_id",
                        sequence: str = "hist_item_id") -> np.ndarray:
    """The "candidate in history" rule: per row, how often the candidate ``item`` occurs in its
    behaviour sequence ``sequence`` (int64 ``[B]``; 0 when absent), a baseline for
    repeat-consumption data. Vectorised like :func:`match_dense`."""
    col = table[sequence].combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False)
    hist = col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    cand = table[item].to_numpy().astype(np.int64)
    row = np.repeat(np.arange(len(cand)), lengths)
    hit = (hist == cand[row]) & (cand[row] != 0)
    return np.bincount(row[hit], minlength=len(cand))


def history_rule_auc(prepared_dir: str, split: str = "test", item: str = "item_id",
                     sequence: str = "hist_item_id", label: str = "label") -> dict:
    """AUC (``sklearn.metrics.roc_auc_score``) of :func:`history_rule_scores` on the rows of a
    prepared split: ``{"auc", "rows", "in_history"}`` (``in_history``: the share of rows whose
    candidate is in the history).

    Raises:
        FileNotFoundError: the prepared folder has no ``split`` files.
    """
    from sklearn.metrics import roc_auc_score

    from rectrain.data.schema import read_split

    t = read_split(prepared_dir, split, [item, sequence, label])
    if t is None:
        raise FileNotFoundError(f"{prepared_dir}/{split}: no prepared files")
    s = history_rule_scores(t, item, sequence)
    y = t[label].to_numpy()
    return {"auc": float(roc_auc_score(y, s)), "rows": int(t.num_rows),
            "in_history": float((s > 0).mean())}
