"""Reductions of a prepared run's events for serving, by batches of files
(:func:`iter_split_batches`): each user's last event, the users to serve, train counts, the
exclusion CSR and the recent items. Memory is what is kept (O(users) arrays, 4 bytes per
distinct (user, item)) plus one batch, never a whole-log array. Used by
:class:`rectrain.serve.context.RunContext`.
"""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rectrain.data import storage
from rectrain.data.schema import ITEM, LABEL, POS, USER, negative_splits
from rectrain.serve.checks import check_keys, conform, event_rows as _event_rows, unique_keys


def _event_files(prepared: str, splits: tuple[str, ...]) -> list[str]:
    """The Parquet files of ``splits`` (in split order, each split's files sorted)."""
    return [f for s in splits if storage.exists(storage.join(prepared, s))
            for f in storage.list_parquet_files(storage.join(prepared, s))[0]]


#: rows of the event files read as one batch by this module's reductions: their transient
#: memory is bounded by a batch (~100-150 MiB at 2**19 rows), whatever the log's size
BATCH_ROWS = 1 << 19
#: pairs per user range in :func:`_merge_csr` (int64 keys exist for one range at a time)
MERGE_PAIRS = 1 << 20


def iter_split_batches(prepared: str, splits: tuple[str, ...], columns: list[str],
                       rows: int | None = None):
    """``columns`` of the observed events of ``splits`` as Arrow tables of consecutive files
    (the order of :func:`_event_files`), each of about ``rows`` rows (one file, when a file
    is larger): what :func:`rectrain.data.schema.read_split` reads, checked at the door the
    same way (sampled negatives left out), without holding the whole split. ``rows``:
    :data:`BATCH_ROWS` by default.

    Raises:
        rectrain.data.door.PreparedDataError: a bad id in a file, a null ``_user``,
            ``_item`` or ``_pos`` (:func:`~rectrain.serve.checks.check_keys`), or a file whose
            column types differ from the first file read (names both files and types).
        FileNotFoundError: a split folder that holds no data file (names the folder).
    """
    from rectrain.data.door import prepared_bounds, read_checked

    bounds, neg = prepared_bounds(prepared), negative_splits(prepared)
    rows = BATCH_ROWS if rows is None else rows
    buf, n, first = [], 0, None  # first: (file, table) whose schema every file must have
    for s in splits:
        cols = list(dict.fromkeys([*columns, LABEL])) if s in neg else columns
        for f in _event_files(prepared, (s,)):
            t = read_checked([f], cols, bounds)
            check_keys(t, f)
            if s in neg:
                t = t.filter(pc.greater_equal(t[LABEL], 0.5)).select(columns)
            first = first or (f, t)  # across splits too: one batch may span two
            buf.append(conform(t, first[1], f, first[0]))
            n += buf[-1].num_rows
            if n >= rows:
                yield pa.concat_tables(buf)
                buf, n = [], 0
    if buf:
        yield pa.concat_tables(buf)


def _last_per_user(user: np.ndarray, *cols: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(user, *cols)`` at each user's last row by ``cols[0]`` (the position), sorted by user;
    ties go to the later row (stable sort), so a running merge equals one sort of the whole."""
    if not len(user):  # 0-row files only
        return (user, *cols)
    order = np.lexsort((cols[0], user))
    u = user[order]
    last = order[np.r_[u[1:] != u[:-1], True]]
    return (user[last], *(c[last] for c in cols))


def _last_events(prepared: str, splits: tuple[str, ...], cols: list[str]) -> pa.Table:
    """``cols`` of each user's last event (largest ``POS``) over ``splits``, one row per user
    sorted by user id. Two passes over the files, so memory is O(users) plus a batch, never
    the whole log: (user, position) of each file's rows merged into a running per-user last
    (user, position, file, row); then the full columns of the chosen rows, file by file.

    Raises:
        ValueError: the splits have no event files.
        rectrain.data.door.PreparedDataError: as :func:`iter_split_batches`.
    """
    from rectrain.data.door import prepared_bounds, read_checked

    bounds = prepared_bounds(prepared)
    files = _event_files(prepared, splits)
    if not files:
        raise ValueError(f"{prepared}: no event files in splits {list(splits)}")
    neg = bool(negative_splits(prepared))
    best, buf, n = None, [], 0  # (user, pos, file, row) of each user's last event so far
    for k, f in enumerate(files):
        t = read_checked([f], [USER, POS, LABEL] if neg else [USER, POS], bounds)
        check_keys(t, f)
        pos = t[POS].to_numpy()
        if neg:  # a sampled negative (label 0) shares its event's position: never the last
            pos = np.where(t[LABEL].to_numpy() >= 0.5, pos, -1)
        buf.append((t[USER].to_numpy(), pos, np.full(t.num_rows, k, dtype=np.int32),
                    np.arange(t.num_rows, dtype=np.int64)))
        n += t.num_rows
        # merged once per batch (not per file): O(users) work per merge
        if n >= max(BATCH_ROWS, 0 if best is None else len(best[0])) or k == len(files) - 1:
            # earlier rows first: a tie on position goes to the later file, as one sort would
            best = _last_per_user(*(np.concatenate(x) for x in zip(
                *([best] if best is not None else []), *buf)))
            buf, n = [], 0
    _, _, sel_file, sel_row = best
    if not len(sel_file):  # every file has 0 rows: no user has a last event
        return read_checked(files[:1], cols, bounds).slice(0, 0)
    where, parts = [], []
    for f in np.unique(sel_file):
        m = np.flatnonzero(sel_file == f)
        t = read_checked([files[f]], cols, bounds).take(pa.array(sel_row[m]))
        parts.append(conform(t, parts[0] if parts else t, files[f], files[sel_file.min()]))
        where.append(m)
    ev = pa.concat_tables(parts)
    return ev.take(pa.array(np.argsort(np.concatenate(where), kind="stable")))


def serve_users(prepared: str, users: pa.Table | None = None) -> pa.Array:
    """Raw ids of the users to recommend for: the users catalog (``users``, or
    ``catalog/users.parquet``) when there is one, else the distinct users of the prepared
    events (train, valid, test) sorted by id.

    Raises:
        rectrain.data.door.PreparedDataError: the catalog has a null or duplicate id (names
            the file, row and value), or as :func:`iter_split_batches`.
        FileNotFoundError: no catalog and no observed events."""
    url = storage.join(prepared, "catalog", "users.parquet")
    if users is None and storage.exists(url):
        users = storage.read_parquet(url, columns=[USER])
    if users is not None:
        unique_keys(users[USER], url, USER)
        return pa.array(users[USER].to_numpy())
    seen = None  # the distinct users so far, merged file by file
    for t in iter_split_batches(prepared, ("train", "valid", "test"), [USER]):
        u = pc.unique(t[USER])
        seen = u if seen is None else pc.unique(pa.concat_arrays([seen, u]))
    if seen is None or not len(seen):
        raise FileNotFoundError(f"{prepared}: no users to recommend for: neither "
                                f"catalog/users.parquet nor train/valid/test samples; prepare "
                                f"the data again")
    return seen.sort()


def train_counts(prepared: str, user_keys: pa.Array, item_keys: pa.Array
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(train_users bool [n_users], popularity int64 [n_items])``: which user rows have train
    events, and the train events per item row, summed file by file (``np.bincount``)."""
    train_users = np.zeros(len(user_keys), dtype=bool)
    popularity = np.zeros(len(item_keys), dtype=np.int64)
    for t in iter_split_batches(prepared, ("train",), [USER, ITEM]):
        u, i = _event_rows(t, user_keys, item_keys, prepared)
        train_users[u[u >= 0]] = True
        popularity += np.bincount(i[i >= 0], minlength=len(item_keys))
    return train_users, popularity


def _row_dtype(n: int):
    """int32 for rows below 2**31 (half the memory of the CSR's values), else int64."""
    return np.int32 if n < 2**31 else np.int64


def _sorted_unique(a: np.ndarray, kind: str = "quicksort") -> np.ndarray:
    """``np.unique(a)`` by a sort (numpy 2's hash-based ``np.unique`` takes ~5x the time and
    memory on int64 keys); ``kind="stable"`` (timsort) merges sorted runs in linear time."""
    a = np.sort(a, kind=kind)
    return a[np.r_[True, a[1:] != a[:-1]]] if len(a) else a


def _merge_csr(indptr: np.ndarray, items: np.ndarray, key: np.ndarray, n_items: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """The union of CSR ``(indptr int64 [n_users + 1], items, sorted within each user)`` and
    the sorted unique pair keys ``key`` (``user row * n_items + item row``, int64), as CSR of
    the same dtypes. Merged in user ranges of about :data:`MERGE_PAIRS` pairs, so the int64
    keys exist for one range at a time, not for every pair."""
    n_users, chunk = len(indptr) - 1, MERGE_PAIRS
    new_ptr = np.searchsorted(key, np.arange(n_users + 1, dtype=np.int64) * n_items)
    total = indptr + new_ptr
    cuts = np.unique(np.r_[np.searchsorted(total, np.arange(0, total[-1], chunk), "right") - 1,
                           n_users])
    cuts = cuts[cuts >= 0]
    counts, parts = [np.diff(indptr[:cuts[0] + 1])], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        old = np.repeat(np.arange(a, b, dtype=np.int64), np.diff(indptr[a:b + 1])) * n_items
        # two sorted runs: the stable sort (timsort) merges them in linear time
        k = _sorted_unique(np.concatenate([old + items[indptr[a]:indptr[b]],
                                           key[new_ptr[a]:new_ptr[b]]]), kind="stable")
        counts.append(np.bincount(k // n_items - a, minlength=b - a))
        parts.append((k % n_items).astype(items.dtype))
    out = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.concatenate(counts), out=out[1:])
    return out, np.concatenate([items[:indptr[cuts[0]]]] + parts)


def seen_csr(prepared: str, splits: tuple[str, ...], user_keys: pa.Array, item_keys: pa.Array
             ) -> tuple[np.ndarray, np.ndarray]:
    """Items each user row has events of in ``splits``, as CSR ``(indptr int64 [n_users + 1],
    item rows int32 (int64 from 2**31 items), sorted within each user)``; ids not in the keys
    are left out. Each batch's unique (user, item) keys are buffered, and merged into the
    running CSR (:func:`_merge_csr`) once the buffer holds a quarter of its pairs (few merges,
    each O(pairs)): memory 4 bytes per distinct pair, plus 2 of buffer, plus one batch."""
    n_users, n_items = len(user_keys), len(item_keys)
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    items = np.zeros(0, dtype=_row_dtype(n_items))
    buf, n = [], 0
    for t in itertools.chain(iter_split_batches(prepared, splits, [USER, ITEM]), [None]):
        if t is not None:
            u, i = _event_rows(t, user_keys, item_keys, prepared)
            ok = (u >= 0) & (i >= 0)
            buf.append(_sorted_unique(u[ok] * n_items + i[ok]))
            n += len(buf[-1])
        if buf and (t is None or n >= max(BATCH_ROWS, len(items) // 4)):
            key = _sorted_unique(np.concatenate(buf)) if len(buf) > 1 else buf[0]
            indptr, items = _merge_csr(indptr, items, key, n_items)
            buf, n = [], 0
    return indptr, items


def recent_csr(prepared: str, n: int, user_keys: pa.Array, item_keys: pa.Array
               ) -> tuple[np.ndarray, np.ndarray]:
    """Each user row's ``n`` most recent distinct train items (most recent first; equal
    positions in file order) as CSR ``(indptr int64, item rows int64)``. Each file's
    (user, item, position, event number) rows are merged into the running top ``n`` per user
    and reduced again (a user's top ``n`` over all files is within the union of the per-file
    top ``n``): memory O(users x n) plus a batch."""
    n_users, n_items = len(user_keys), len(item_keys)
    top = tuple(np.zeros(0, dtype=np.int64) for _ in range(4))  # (user, item, pos, event)
    done = 0
    for t in iter_split_batches(prepared, ("train",) if n > 0 else (), [USER, ITEM, POS],
                                max(BATCH_ROWS, len(user_keys))):  # O(users) per merge
        u, i = _event_rows(t, user_keys, item_keys, prepared)
        ev = np.arange(done, done + t.num_rows, dtype=np.int64)
        done += t.num_rows
        ok = (u >= 0) & (i >= 0)
        part = (u[ok], i[ok], t[POS].to_numpy()[ok], ev[ok])
        u, i, pos, ev = (np.concatenate(x) for x in zip(top, part))
        order = np.lexsort((ev, -pos, u))  # by user, most recent first, then file order
        u, i, pos, ev = u[order], i[order], pos[order], ev[order]
        _, first = np.unique(u * n_items + i, return_index=True)
        first = np.sort(first)  # the most recent occurrence of each (user, item), in order
        keep = first[rank_in_runs(u[first]) < n]
        top = (u[keep], i[keep], pos[keep], ev[keep])
    return np.searchsorted(top[0], np.arange(n_users + 1)).astype(np.int64), top[1]


def rank_in_runs(group: np.ndarray) -> np.ndarray:
    """0-based position of each element within its run of equal values (``group`` sorted)."""
    n = len(group)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    start = np.r_[0, np.flatnonzero(group[1:] != group[:-1]) + 1]
    return np.arange(n) - np.repeat(start, np.diff(np.r_[start, n]))
