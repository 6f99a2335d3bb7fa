"""Top-k recommendation from a training run's checkpoint (one process, unsharded model).

For every user in the users catalog, every item in the items catalog is scored with the user's
*latest* behaviour sequence (the sequence of their last event with that event's item appended,
truncated to ``sequence_length``), items the user interacted with in the train split are
excluded, and the ``k`` highest-scoring items are written as Parquet
``(user_id, rank, item_id, score)`` with rank 1 = best and score = the predicted probability
(``model.loss: bce``) or the predicted label value (``model.loss: mse``, e.g. the rating).
Retrieval models (two_tower, sasrec) score ``<u, v> / temperature`` (:func:`retrieval_top_k`).
Candidate rows are built with Arrow ``take`` (no per-row Python); users are scored in chunks.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from rectrain.data import storage
from rectrain.data.encode import positions_in_lists
from rectrain.data.schema import ITEM, LABEL, LABEL_VALUE, POS, USER, read_split
from rectrain.models import task_of
from rectrain.models.base import RETRIEVAL, label_prediction
from rectrain.serve.loading import load_model

log = logging.getLogger(__name__)


def append_truncate(seq: pa.ListArray, last: np.ndarray, max_len: int) -> pa.ListArray:
    """Per row: ``(seq + [last])[-max_len:]``, vectorised over list offsets."""
    offsets = seq.offsets.to_numpy()
    offsets = offsets - offsets[0]
    values = seq.flatten().to_numpy()
    lengths = np.diff(offsets)
    new_len = np.minimum(lengths + 1, max_len)
    keep = new_len - 1  # elements kept from the old sequence (its most recent ones)
    new_off = np.zeros(len(new_len) + 1, dtype=np.int64)
    np.cumsum(new_len, out=new_off[1:])
    within = positions_in_lists(keep)
    src = np.repeat(offsets[1:] - keep, keep) + within
    dst = np.repeat(new_off[:-1], keep) + within
    out = np.empty(int(new_off[-1]), dtype=np.int64)
    out[dst] = values[src]
    out[new_off[1:] - 1] = last
    return pa.ListArray.from_arrays(pa.array(new_off.astype(np.int32)), pa.array(out))


def latest_state(prepared: str, user_keys: pa.Array, sequences: list[tuple[str, str]],
                 max_len: int, extra: list[str]) -> pa.Table:
    """Per user (rows aligned with ``user_keys``, the raw ids of the users catalog): each
    behaviour sequence ``name`` as it would be for a new event, i.e. the sequence of the user's
    last event with that event's ``source`` id appended (truncated to ``max_len``), plus the
    last event's ``extra`` columns. Users without events get empty sequences and zeros."""
    cols = list(dict.fromkeys([USER, POS] + [c for pair in sequences for c in pair] + extra))
    parts = [t for t in (read_split(prepared, s, cols) for s in ("train", "valid", "test")) if t]
    events = pa.concat_tables(parts)
    order = pc.sort_indices(events, [(USER, "ascending"), (POS, "ascending")])
    ev = events.take(order)
    users = ev[USER].to_numpy()
    last = np.flatnonzero(np.r_[users[1:] != users[:-1], True])  # last row of each user
    ev = ev.take(pa.array(last))
    state = {name: append_truncate(ev[name].combine_chunks(), ev[src].to_numpy(), max_len)
             for name, src in sequences}
    state.update({c: ev[c] for c in extra})
    idx = pc.index_in(user_keys, value_set=ev[USER])
    has, take = pc.is_valid(idx), pc.fill_null(idx, 0)
    out = {}
    for c, col in state.items():
        col = col.take(take)
        empty = pa.array([[]] * len(col), col.type) if pa.types.is_list(col.type) else \
            pc.cast(pa.array(np.zeros(len(col), dtype=np.int64)), col.type)
        out[c] = pc.if_else(has, col, empty)
    return pa.table(out)


def _explain(table, u_idx, i_idx, candidates, model, state, items, cfg, m: int,
             rows_per_chunk: int = 8192) -> pa.Table:
    """Add ``explain_item_ids`` / ``explain_weights``: the ``m`` history items with the largest
    attention weights for each recommended (user, item) row."""
    if not hasattr(model, "forward_with_attention"):
        raise ValueError(f"model {cfg.model.name!r} has no attention to explain")
    seq_name = cfg.model.sequence_features[0]
    source = next(f.source for f in cfg.features if f.name == seq_name)
    raw_of = np.zeros(int(pc.max(items[source]).as_py()) + 1, dtype=np.int64)
    raw_of[items[source].to_numpy()] = items[ITEM].to_numpy()  # encoded item id -> raw id
    hist = _padded(state[seq_name].take(pa.array(u_idx)), cfg.dataset.sequence_length)
    weights = []
    with torch.no_grad():
        for lo in range(0, len(u_idx), rows_per_chunk):
            sl = slice(lo, lo + rows_per_chunk)
            weights.append(model.forward_with_attention(candidates(u_idx[sl], i_idx[sl]))[1])
    w = torch.cat(weights).numpy()
    w = np.where(hist >= 0, w, -np.inf)
    top = np.argsort(-w, axis=1, kind="stable")[:, :m]
    valid = np.take_along_axis(hist, top, 1) >= 0
    n = valid.sum(1)
    ids = raw_of[np.take_along_axis(hist, top, 1)[valid]]
    offsets = pa.array(np.r_[0, np.cumsum(n)].astype(np.int32))
    table = table.append_column("explain_item_ids", pa.ListArray.from_arrays(offsets, ids))
    return table.append_column("explain_weights", pa.ListArray.from_arrays(
        offsets, pa.array(np.take_along_axis(w, top, 1)[valid].astype(np.float32))))


def _padded(seq: pa.ListArray, width: int) -> np.ndarray:
    """``[n, width]`` int64 matrix of a list column, left-aligned, padded with -1."""
    seq = seq.combine_chunks() if isinstance(seq, pa.ChunkedArray) else seq
    lengths = pc.fill_null(pc.list_value_length(seq), 0).to_numpy(zero_copy_only=False)
    values = seq.flatten().to_numpy(zero_copy_only=False)
    out = np.full((len(lengths), width), -1, dtype=np.int64)
    out[np.repeat(np.arange(len(lengths)), lengths), positions_in_lists(lengths)] = values
    return out


def recommend(run_dir: str, k: int = 10, out: str | None = None, users_per_chunk: int = 16,
              explain: int = 0) -> tuple[str, int]:
    """Write top-``k`` recommendations for every user of a run; returns ``(path, n_users)``.

    With ``explain = m > 0`` (attention models), each recommendation also lists the ``m`` items
    of the user's behaviour sequence with the largest DIN attention weights for that candidate
    (``explain_item_ids``, ``explain_weights``; unnormalised activation weights as in the DIN
    paper, larger = more influence on this score).

    ``run_dir`` is a run directory (its best ``checkpoint/``) or a checkpoint folder.

    Raises:
        FileNotFoundError: ``run_dir`` has no complete checkpoint, or its prepared data is gone.
    """
    loaded = load_model(run_dir)
    model, layout, cfg = loaded.model, loaded.layout, loaded.cfg

    prepared = cfg.prepared_dir
    users = storage.read_parquet(storage.join(prepared, "catalog", "users.parquet"))
    items = storage.read_parquet(storage.join(prepared, "catalog", "items.parquet"))
    sequences = [(f.name, f.source) for f in cfg.features if f.kind == "sequence"]
    seq_names = [n for n, _ in sequences]
    feature_cols = [c for c in layout.columns if c not in (LABEL, LABEL_VALUE)]
    from_items = [c for c in feature_cols if c in items.column_names]
    from_users = [c for c in feature_cols if c in users.column_names and c not in from_items]
    from_events = [c for c in feature_cols if c not in from_items + from_users + seq_names]
    state = latest_state(prepared, users[USER], sequences, layout.max_sequence_length,
                         from_events)
    n_users, n_items = users.num_rows, items.num_rows

    # train interactions to exclude, as (user row, item row) pairs
    train = read_split(prepared, "train", [USER, ITEM])
    u_rows = pc.index_in(train[USER], value_set=users[USER]).to_numpy(zero_copy_only=False)
    i_rows = pc.index_in(train[ITEM], value_set=items[ITEM]).to_numpy(zero_copy_only=False)
    seen = np.zeros((n_users, n_items), dtype=bool)
    seen[u_rows.astype(np.int64), i_rows.astype(np.int64)] = True

    def candidates(uu: np.ndarray, ii: np.ndarray):
        """Batch of (user row, item row) pairs: item, user and latest-event features."""
        cols = {c: items[c].take(pa.array(ii)) for c in from_items}
        cols.update({c: users[c].take(pa.array(uu)) for c in from_users})
        cols.update({c: state[c].take(pa.array(uu)) for c in from_events + seq_names})
        cols[LABEL] = pa.array(np.zeros(len(uu), dtype=np.float32))
        if layout.aux_thresholds or layout.regression:
            cols[LABEL_VALUE] = cols[LABEL]
        return layout.to_batch(pa.table(cols))

    if task_of(model) == RETRIEVAL:  # two-tower, SASRec: <u, v> scores
        table = retrieval_top_k(model, candidates, users, items, prepared, k)
        path = out or storage.join(run_dir, "recommendations", "top_k.parquet")
        storage.write_parquet(table, path)
        return path, n_users

    out_u, out_r, out_i, out_s = [], [], [], []
    with torch.no_grad():
        for lo in range(0, n_users, users_per_chunk):
            hi = min(lo + users_per_chunk, n_users)
            batch = candidates(np.repeat(np.arange(lo, hi), n_items),
                               np.tile(np.arange(n_items), hi - lo))
            scores = label_prediction(model(batch), layout.regression).view(hi - lo, n_items)
            # seen items go last: below any probability; a predicted value has no lower bound
            scores[torch.from_numpy(seen[lo:hi])] = float("-inf") if layout.regression else -1.0
            top = torch.topk(scores, k=min(k, n_items), dim=1)
            out_u.append(np.repeat(np.arange(lo, hi), top.indices.shape[1]))
            out_r.append(np.tile(np.arange(1, top.indices.shape[1] + 1), hi - lo))
            out_i.append(top.indices.reshape(-1).numpy())
            out_s.append(top.values.reshape(-1).numpy())
    u_idx, i_idx = np.concatenate(out_u), np.concatenate(out_i)
    table = pa.table({"user_id": users[USER].take(pa.array(u_idx)),
                      "rank": pa.array(np.concatenate(out_r).astype(np.int32)),
                      "item_id": items[ITEM].take(pa.array(i_idx)),
                      "score": pa.array(np.concatenate(out_s).astype(np.float32))})
    if explain:
        table = _explain(table, u_idx, i_idx, candidates, model, state, items, cfg, explain)
    path = out or storage.join(run_dir, "recommendations", "top_k.parquet")
    tmp = f"{path}.tmp-{os.getpid()}"  # renamed in when complete: a failure keeps the old file
    storage.write_parquet(table, tmp)
    storage.move(tmp, path)
    return path, n_users


def retrieval_top_k(model, candidates, users: pa.Table, items: pa.Table, prepared: str, k: int,
                    users_per_chunk: int = 1024) -> pa.Table:
    """Top-``k`` items per user of a retrieval model (one process, unsharded model).

    ``candidates(user_rows, item_rows)`` builds a :class:`Batch` of (users-catalog row,
    items-catalog row) pairs with each user's latest behaviour sequence (see :func:`recommend`).
    Every item of the catalog is scored by ``<u, v> / temperature`` (the model's training
    logit, not a probability); the items of every event the user has in the prepared data
    (train, valid and test) are excluded. Returns ``(user_id, rank, item_id, score)``, rank 1 =
    best, ``k`` rows per user.
    """
    n_users, n_items = users.num_rows, items.num_rows
    with torch.no_grad():
        _, v = model(candidates(np.zeros(n_items, np.int64), np.arange(n_items)), n_queries=0)
        us = [model(candidates(np.arange(lo, min(lo + users_per_chunk, n_users)),
                               np.zeros(min(users_per_chunk, n_users - lo), np.int64)))[0]
              for lo in range(0, n_users, users_per_chunk)]
    scores = torch.cat(us) @ v.t() / model.temperature  # [n_users, n_items]
    parts = [t for t in (read_split(prepared, s, [USER, ITEM]) for s in
                         ("train", "valid", "test")) if t]
    events = pa.concat_tables(parts)
    u_rows = pc.index_in(events[USER], value_set=users[USER]).to_numpy(zero_copy_only=False)
    i_rows = pc.index_in(events[ITEM], value_set=items[ITEM]).to_numpy(zero_copy_only=False)
    ok = ~(np.isnan(u_rows.astype(np.float64)) | np.isnan(i_rows.astype(np.float64)))
    scores[torch.from_numpy(u_rows[ok].astype(np.int64)),
           torch.from_numpy(i_rows[ok].astype(np.int64))] = float("-inf")
    top = torch.topk(scores, k=min(k, n_items), dim=1)
    kk = top.indices.shape[1]
    u_idx = np.repeat(np.arange(n_users), kk)
    return pa.table({"user_id": users[USER].take(pa.array(u_idx)),
                     "rank": pa.array(np.tile(np.arange(1, kk + 1), n_users).astype(np.int32)),
                     "item_id": items[ITEM].take(pa.array(top.indices.reshape(-1).numpy())),
                     "score": pa.array(top.values.reshape(-1).numpy().astype(np.float32))})
