"""What serving needs of one training run, loaded once per process: the unsharded model, the
catalogs (users optional), each user's latest behaviour state, the exclusion sets and the
train popularity, and the Arrow ``take`` that turns (user row, item row) pairs into a model
batch without per-row Python.

Rows: users and items are addressed by *rows* (0-based positions in :attr:`RunContext.user_keys`
/ :attr:`RunContext.item_keys`, the raw ids); two runs (retrieval and ranking) meet on raw ids.
What is read from the events is reduced by batches of files (:func:`iter_split_batches`):
memory is what is kept plus one batch, never a whole-log array.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rectrain.data import storage
from rectrain.data.encode import positions_in_lists
from rectrain.data.schema import ITEM, LABEL, LABEL_VALUE, POS, USER
from rectrain.models import task_of
from rectrain.models.base import RETRIEVAL
from rectrain.serve.checks import key_rows as _key_rows  # noqa: F401 - used by blocks, explain
from rectrain.serve.checks import unique_keys
from rectrain.serve.loading import load_model
from rectrain.serve.reductions import (  # noqa: F401 - re-exported for the serving modules
    _last_events, iter_split_batches, rank_in_runs, recent_csr, seen_csr, serve_users,
    train_counts)

log = logging.getLogger(__name__)

#: splits whose events count as seen, per ``recommend.exclude`` policy
EXCLUDE_SPLITS = {"none": (), "train": ("train",), "all_seen": ("train", "valid", "test")}
#: the splits a served user's history comes from: every event, or (``recommend.evaluate``)
#: the events before the test split, so the lists can be scored against the held-out test
HISTORY = {False: ("train", "valid", "test"), True: ("train", "valid")}


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
                 max_len: int, extra: list[str],
                 splits: tuple[str, ...] = ("train", "valid", "test")) -> pa.Table:
    """Per user (rows aligned with ``user_keys``, the raw ids of the users catalog): each
    behaviour sequence ``name`` as it would be for a new event, i.e. the sequence of the user's
    last event with that event's ``source`` id appended (truncated to ``max_len``), plus the
    last event's ``extra`` columns, over the events of ``splits``. Users without events there
    get empty sequences and zeros."""
    cols = list(dict.fromkeys([USER, POS] + [c for pair in sequences for c in pair] + extra))
    ev = _last_events(prepared, splits, cols)
    state = {name: append_truncate(ev[name].combine_chunks(), ev[src].to_numpy(), max_len)
             for name, src in sequences}
    state.update({c: ev[c] for c in extra})
    rows = _key_rows(user_keys, ev[USER], f"{prepared}: the users against the events' "
                                          f"column '{USER}'")
    has, take = pa.array(rows >= 0), pa.array(np.maximum(rows, 0))
    out = {}
    for c, col in state.items():
        # no events at all (0-row files): nothing to take, every user gets the empty value
        col = col.take(take) if len(col) else pa.nulls(len(take), col.type)
        empty = pa.array([[]] * len(col), col.type) if pa.types.is_list(col.type) else \
            pc.cast(pa.array(np.zeros(len(col), dtype=np.int64)), col.type)
        out[c] = pc.if_else(has, col, empty)
    return pa.table(out)


def _padded(seq: pa.ListArray, width: int) -> np.ndarray:
    """``[n, width]`` int64 matrix of a list column, left-aligned, padded with -1."""
    seq = seq.combine_chunks() if isinstance(seq, pa.ChunkedArray) else seq
    lengths = pc.fill_null(pc.list_value_length(seq), 0).to_numpy(zero_copy_only=False)
    values = seq.flatten().to_numpy(zero_copy_only=False)
    out = np.full((len(lengths), width), -1, dtype=np.int64)
    out[np.repeat(np.arange(len(lengths)), lengths), positions_in_lists(lengths)] = values
    return out



class RunContext:
    """One run's model and data for serving (see module docstring).

    ``path``: a run directory (its best ``checkpoint/``) or a checkpoint folder. Without
    ``catalog/users.parquet`` (a job with no users table) the users are the distinct users of
    the prepared events, sorted by raw id, and every user feature comes from the user's last
    event. Without ``catalog/items.parquet`` the items are the distinct items of the events with
    the item-side feature columns of their first event. With ``holdout`` each user's state
    comes from the train and valid events only (:data:`HISTORY`), as of the start of the test
    split, so lists can be scored against the test events without the ranker seeing them.
    ``loader(path) -> LoadedModel`` loads the model (default
    :func:`~rectrain.serve.loading.load_model`, unsharded).

    Raises:
        FileNotFoundError: no complete checkpoint, or its prepared data is gone.
    """

    def __init__(self, path: str, holdout: bool = False, loader=load_model):
        t0 = time.perf_counter()
        loaded = loader(path)  # a LoadedModel; the sharded path passes its own loader
        t1 = time.perf_counter()
        self.history = HISTORY[holdout]
        self.model, self.layout, self.cfg = loaded.model, loaded.layout, loaded.cfg
        self.retrieval = task_of(self.model) == RETRIEVAL
        prepared = self.prepared = self.cfg.prepared_dir
        cat = storage.join(prepared, "catalog")
        self.users = (storage.read_parquet(storage.join(cat, "users.parquet"))
                      if storage.exists(storage.join(cat, "users.parquet")) else None)
        feature_cols = [c for c in self.layout.columns if c not in (LABEL, LABEL_VALUE)]
        self.sequences = [(f.name, f.source) for f in self.cfg.features if f.kind == "sequence"
                          ] + self.layout.meta_sequences  # match features' event times
        seq_names = [n for n, _ in self.sequences]
        self.items = self._items(storage.join(cat, "items.parquet"), feature_cols, seq_names)
        self.from_items = [c for c in feature_cols if c in self.items.column_names]
        self.from_users = [] if self.users is None else [
            c for c in feature_cols if c in self.users.column_names and c not in self.from_items]
        self.from_events = [c for c in feature_cols
                            if c not in self.from_items + self.from_users + seq_names]
        self.seq_names = seq_names
        self.item_keys = self.items[ITEM].combine_chunks() \
            if isinstance(self.items[ITEM], pa.ChunkedArray) else self.items[ITEM]
        unique_keys(self.item_keys, storage.join(cat, "items.parquet"), ITEM)
        self.user_keys = serve_users(prepared, self.users)
        if self.users is None:
            self.users = pa.table({USER: self.user_keys})
        self.state = latest_state(prepared, self.user_keys, self.sequences,
                                  self.layout.max_sequence_length, self.from_events,
                                  self.history)
        self.n_users, self.n_items = len(self.user_keys), len(self.item_keys)
        #: user rows with train events; train events per item row (int64)
        self.train_users, self.popularity = train_counts(prepared, self.user_keys,
                                                         self.item_keys)
        #: wall seconds: loading the model, building the rest (``rectrain.serve.timing``)
        self.timings = {"models_s": t1 - t0, "context_s": time.perf_counter() - t1}

    def _items(self, url: str, feature_cols: list[str], seq_names: list[str]) -> pa.Table:
        if storage.exists(url):
            return storage.read_parquet(url)
        item_feats = [f.name for f in self.cfg.features if f.source == self.cfg.dataset.item_column
                      and f.kind in ("sparse", "multi_hot") and f.name in feature_cols]
        firsts = []  # each item's first event so far, sorted by raw id, merged batch by batch
        for t in iter_split_batches(self.prepared, ("train", "valid", "test"),
                                    [ITEM] + item_feats):
            ev = pa.concat_tables(firsts + [t])  # earlier events first: they win
            _, first = np.unique(ev[ITEM].to_numpy(), return_index=True)
            firsts = [ev.take(pa.array(first))]
        if not firsts:
            raise FileNotFoundError(f"{self.prepared}: no items to recommend: neither {url} "
                                    f"nor train/valid/test samples; prepare the data again")
        return firsts[0]

    def rows(self, users: pa.Array, items: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """(user rows, item rows) int64 of raw ids; -1 where an id is not in this run."""
        return _key_rows(users, self.user_keys), _key_rows(items, self.item_keys)

    def batch(self, uu: np.ndarray, ii: np.ndarray):
        """Model :class:`Batch` of (user row, item row) pairs, int64 ``[B]`` each: item, user and
        latest-event features (label 0)."""
        uu, ii = pa.array(uu), pa.array(ii)
        cols = {c: self.items[c].take(ii) for c in self.from_items}
        cols.update({c: self.users[c].take(uu) for c in self.from_users})
        cols.update({c: self.state[c].take(uu) for c in self.from_events + self.seq_names})
        cols[LABEL] = pa.array(np.zeros(len(uu), dtype=np.float32))
        if self.layout.aux_thresholds or self.layout.regression:
            cols[LABEL_VALUE] = cols[LABEL]
        return self.layout.to_batch(pa.table(cols))

    def seen(self, splits: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Items each user has events of in ``splits``, as CSR ``(indptr int64 [n_users + 1],
        item rows int32, sorted within each user)`` (:func:`seen_csr`): memory 4 bytes per
        distinct (user, item), not users x items."""
        return seen_csr(self.prepared, splits, self.user_keys, self.item_keys)

    def recent(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Each user's ``n`` most recent distinct train items (most recent first) as CSR
        ``(indptr, item rows)`` (:func:`recent_csr`)."""
        return recent_csr(self.prepared, n, self.user_keys, self.item_keys)
