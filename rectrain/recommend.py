"""Top-k recommendation from a training run's checkpoint (one process, unsharded model).

For every user in the users catalog, every item in the items catalog is scored with the user's
*latest* behaviour sequence (the sequence of their last event with that event's item appended,
truncated to ``sequence_length``), items the user interacted with in the train split are
excluded, and the ``k`` highest-scoring items are written as Parquet
``(user_id, rank, item_id, score)`` with rank 1 = best and score = predicted probability.
Candidate rows are built with Arrow ``take`` (no per-row Python); users are scored in chunks.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from rectrain.config import config_from_dict
from rectrain.data import storage
from rectrain.data.features import FeatureLayout
from rectrain.data.prepare import ITEM, POS, USER, load_manifest
from rectrain.models import build_model
from rectrain.train.checkpoint import load_checkpoint

log = logging.getLogger(__name__)


def _read_split(prepared: str, split: str, columns: list[str]) -> pa.Table:
    url = storage.join(prepared, split)
    if not storage.exists(url):
        return None
    files, _ = storage.list_parquet_files(url)
    return pa.concat_tables([storage.read_parquet(f, columns) for f in files])


def latest_state(prepared: str, user_col_rows: pa.Array, seq_name: str, query_name: str,
                 max_len: int, extra: list[str]) -> pa.Table:
    """Per user (aligned with ``user_col_rows`` = raw user ids of the users catalog): the latest
    behaviour sequence (``list<int64>``) and the latest event's ``extra`` columns. Users without
    events get an empty sequence and zeros."""
    cols = [USER, POS, query_name, seq_name] + extra
    parts = [t for t in (_read_split(prepared, s, cols) for s in ("train", "valid", "test")) if t]
    events = pa.concat_tables(parts)
    # last event per user: sort by (user, pos) and keep the last row of each user
    order = pc.sort_indices(events, [(USER, "ascending"), (POS, "ascending")])
    ev = events.take(order)
    users = ev[USER].to_numpy()
    last = np.flatnonzero(np.r_[users[1:] != users[:-1], True])
    ev = ev.take(pa.array(last))
    seq = ev[seq_name].combine_chunks()
    item = ev[query_name].to_numpy()
    # new sequence = (old sequence + [last item])[-max_len:]
    offsets = seq.offsets.to_numpy()
    lengths = np.diff(offsets)
    values = seq.values.to_numpy()
    new_len = np.minimum(lengths + 1, max_len)
    drop = lengths + 1 - new_len
    new_off = np.zeros(len(new_len) + 1, dtype=np.int64)
    np.cumsum(new_len, out=new_off[1:])
    out_vals = np.empty(int(new_off[-1]), dtype=np.int64)
    # old kept part: offsets[i] + drop[i] .. offsets[i+1]; then the last item
    keep_len = new_len - 1
    src = np.repeat(offsets[:-1] + drop, keep_len) + (
        np.arange(int(keep_len.sum())) - np.repeat(np.cumsum(keep_len) - keep_len, keep_len))
    dst_old = np.repeat(new_off[:-1], keep_len) + (
        np.arange(int(keep_len.sum())) - np.repeat(np.cumsum(keep_len) - keep_len, keep_len))
    out_vals[dst_old] = values[src]
    out_vals[new_off[1:] - 1] = item
    new_seq = pa.ListArray.from_arrays(pa.array(new_off.astype(np.int32)), pa.array(out_vals))
    state = pa.table({USER: ev[USER], seq_name: new_seq,
                      **{c: ev[c] for c in extra}})
    # align with the catalog's users (missing users: empty sequence / zeros)
    idx = pc.index_in(user_col_rows, value_set=state[USER])
    has = pc.is_valid(idx)
    take = pc.fill_null(idx, 0)
    out = {}
    for c in [seq_name] + extra:
        col = state[c].take(take)
        empty = pa.array([[]] * len(col), col.type) if pa.types.is_list(col.type) else \
            pc.cast(pa.array(np.zeros(len(col), dtype=np.int64)), col.type)
        out[c] = pc.if_else(has, col, empty)
    return pa.table(out)


def recommend(run_dir: str, k: int = 10, out: str | None = None, users_per_chunk: int = 16
              ) -> tuple[str, int]:
    """Write top-``k`` recommendations for every user of a run; returns ``(path, n_users)``.

    Raises:
        FileNotFoundError: ``run_dir`` has no complete checkpoint, or its prepared data is gone.
    """
    ckpt = storage.join(run_dir, "checkpoint")
    meta_url = storage.join(ckpt, "meta.json")
    if not storage.exists(meta_url):
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint (expected {meta_url})")
    cfg = config_from_dict(storage.read_json(meta_url)["config"])
    manifest = load_manifest(cfg.prepared_dir)
    layout = FeatureLayout(cfg, manifest)
    model = build_model(layout, cfg.model)
    load_checkpoint(ckpt, model)
    model.eval()

    prepared = cfg.prepared_dir
    users = storage.read_parquet(storage.join(prepared, "catalog", "users.parquet"))
    items = storage.read_parquet(storage.join(prepared, "catalog", "items.parquet"))
    seq_name, query = cfg.model.sequence_feature, cfg.model.query_feature
    other_seq = [f.name for f in cfg.features if f.kind == "sequence" and f.name != seq_name]
    if other_seq:
        raise NotImplementedError(f"recommend supports one sequence feature, got {other_seq}")
    feature_cols = [c for c in layout.columns if c != "label"]
    from_items = [c for c in feature_cols if c in items.column_names]
    from_users = [c for c in feature_cols if c in users.column_names and c not in from_items]
    from_events = [c for c in feature_cols if c not in from_items + from_users + [seq_name]]
    state = latest_state(prepared, users[USER], seq_name, query, layout.max_sequence_length,
                         from_events)
    n_users, n_items = users.num_rows, items.num_rows

    # train interactions to exclude, as (user row, item row) pairs
    train = _read_split(prepared, "train", [USER, ITEM])
    u_rows = pc.index_in(train[USER], value_set=users[USER]).to_numpy(zero_copy_only=False)
    i_rows = pc.index_in(train[ITEM], value_set=items[ITEM]).to_numpy(zero_copy_only=False)
    seen = np.zeros((n_users, n_items), dtype=bool)
    seen[u_rows.astype(np.int64), i_rows.astype(np.int64)] = True

    out_u, out_r, out_i, out_s = [], [], [], []
    with torch.no_grad():
        for lo in range(0, n_users, users_per_chunk):
            hi = min(lo + users_per_chunk, n_users)
            uu = np.repeat(np.arange(lo, hi), n_items)
            ii = np.tile(np.arange(n_items), hi - lo)
            cols = {c: items[c].take(pa.array(ii)) for c in from_items}
            cols.update({c: users[c].take(pa.array(uu)) for c in from_users})
            cols.update({c: state[c].take(pa.array(uu)) for c in from_events + [seq_name]})
            cols["label"] = pa.array(np.zeros(len(uu), dtype=np.float32))
            batch = layout.to_batch(pa.table(cols))
            scores = torch.sigmoid(model(batch)).view(hi - lo, n_items)
            scores[torch.from_numpy(seen[lo:hi])] = -1.0
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
    path = out or storage.join(run_dir, "recommendations", "top_k.parquet")
    storage.write_parquet(table, path)
    return path, n_users
