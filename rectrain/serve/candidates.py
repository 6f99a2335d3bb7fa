"""Stage 1 of two-stage recommendation: candidate items per user from several sources, with
the exclusion policy applied, merged and de-duplicated.

A block's candidates are flat arrays, one entry per (user, item) pair: ``u`` (user rows of the
ranking run, int64), ``i`` (item rows of the ranking run, int64), ``src`` (int8, position of
the source in :data:`SOURCES`). Within each source, entries are grouped by user in the source's
order of preference; :func:`merge` keeps each pair once, under the first source that proposed
it (sources in the configured order), and returns the pairs sorted by (user, item row).

Sources:

- ``retrieval``: the top items of a two-tower or SASRec run by ``<u, v>`` (item vectors in an
  index, :mod:`rectrain.serve.index`; user vectors from each user's latest behaviour sequence);
- ``popular``: the most popular items of the ranking run's train split (events per item);
- ``recent``: the user's own most recent distinct train items (repeat consumption: re-orders,
  re-listens; only useful with ``exclude: none``).

Exclusion (``recommend.exclude``): ``none``; ``train``: the items of the user's train-split
events; ``all_seen``: the items of every event of the user in the prepared data (train, valid
and test). It is applied inside each source, before its per-user cap, so each source still
gives its full count of eligible items (when the catalogue has them).
"""

from __future__ import annotations

import numpy as np

from rectrain.data.encode import positions_in_lists
from rectrain.serve.context import rank_in_runs

SOURCES = ("retrieval", "popular", "recent")


class Exclusion:
    """The seen items of a policy as CSR over user rows (:meth:`RunContext.seen`)."""

    def __init__(self, indptr: np.ndarray, items: np.ndarray, n_items: int):
        self.indptr, self.items, self.n_items = indptr, items, n_items

    def counts(self, lo: int, hi: int) -> np.ndarray:
        return np.diff(self.indptr[lo:hi + 1])

    def mask(self, u: np.ndarray, i: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """bool ``[len(u)]``: True where (user row ``u``, item row ``i``) is excluded; ``u`` in
        ``[lo, hi)``."""
        a, b = self.indptr[lo], self.indptr[hi]
        if a == b:
            return np.zeros(len(u), dtype=bool)
        users = np.repeat(np.arange(lo, hi), self.counts(lo, hi))
        return np.isin(u * self.n_items + i, users * self.n_items + self.items[a:b])


def cap(u: np.ndarray, i: np.ndarray, n: int, excl: Exclusion | None, lo: int,
        hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop excluded and invalid (-1) items, then keep the first ``n`` per user (``u`` grouped,
    each user's items in order of preference)."""
    ok = i >= 0
    if excl is not None:
        ok &= ~excl.mask(u, np.maximum(i, 0), lo, hi)
    u, i = u[ok], i[ok]
    keep = rank_in_runs(u) < n
    return u[keep], i[keep]


def popular(order: np.ndarray, n: int, excl: Exclusion | None, lo: int,
            hi: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` most popular eligible items for each user row in ``[lo, hi)``; ``order``:
    item rows by decreasing train popularity. Each user takes ``n`` + their own excluded
    items from the head of ``order`` (pairs: users x n + the block's excluded items, not
    users x the block's largest history)."""
    take = np.full(hi - lo, n, dtype=np.int64)
    if excl is not None:
        take += excl.counts(lo, hi)
    take = np.minimum(take, len(order))
    u = np.repeat(np.arange(lo, hi), take)
    return cap(u, order[positions_in_lists(take)], n, excl, lo, hi)


def recent(indptr: np.ndarray, items: np.ndarray, n: int, excl: Exclusion | None, lo: int,
           hi: int) -> tuple[np.ndarray, np.ndarray]:
    """The users' most recent distinct train items (CSR from :meth:`RunContext.recent`)."""
    u = np.repeat(np.arange(lo, hi), np.diff(indptr[lo:hi + 1]))
    return cap(u, items[indptr[lo]:indptr[hi]], n, excl, lo, hi)


def retrieval(index, user_vectors: np.ndarray, user_rows: np.ndarray, item_map: np.ndarray,
              n: int, excl: Exclusion | None, lo: int, hi: int,
              temperature: float = 1.0, vectors: np.ndarray | None = None,
              ann_max_k: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``n`` eligible items by ``<u, v> / temperature`` for the users ``user_rows``
    (ranking-run rows in ``[lo, hi)``, one per row of ``user_vectors`` float32 ``[b, d]``).

    ``item_map``: ranking-run item row of each index row (-1: not in the ranking run's
    catalogue). Each user asks the index for ``n`` + their own excluded items + the unmapped
    items, so exclusion never leaves a user short; users are searched in groups of similar
    need (powers of two), so one heavy user does not widen the search of the whole block (the
    search cost is ``O(k)`` per query, and HNSW's ``efSearch`` follows ``k``). Returns
    ``(u, i, score)``, grouped by user in the order of ``user_rows``, best first.

    Users who need more than ``ann_max_k`` items (a heavy user who has seen much of the
    catalogue) are scored exactly instead, against ``vectors`` (the index's item vectors
    float32 ``[n_index, d]``), a few rows at a time: an ANN search that deep costs more time
    and memory (HNSW's ``efSearch`` = k) than one pass over the catalogue.
    """
    need = np.full(len(user_rows), n + int((item_map < 0).sum()), dtype=np.int64)
    if excl is not None:
        need += excl.indptr[user_rows + 1] - excl.indptr[user_rows]
    heavy = need > ann_max_k if vectors is not None else np.zeros(len(need), dtype=bool)
    group = np.ceil(np.log2(np.maximum(need, 1))).astype(np.int64)
    us, ids_all, ss = [], [], []
    for g in np.unique(group[~heavy]):
        rows = np.flatnonzero((group == g) & ~heavy)
        scores, ids = index.search(user_vectors[rows], int(need[rows].max()))
        us.append(np.repeat(rows, ids.shape[1]))
        ids_all.append(ids.reshape(-1))
        ss.append(scores.reshape(-1))
    step = max(1, (1 << 22) // max(1, len(item_map)))  # rows x items <= 4M floats
    rows_h = np.flatnonzero(heavy)
    for a in range(0, len(rows_h), step):
        rows = rows_h[a:a + step]
        scores, ids = _exact_top(vectors, user_vectors[rows], user_rows[rows], item_map, n,
                                 excl)
        us.append(np.repeat(rows, ids.shape[1]))
        ids_all.append(ids.reshape(-1))
        ss.append(scores.reshape(-1))
    if not us:
        z = np.zeros(0, dtype=np.int64)
        return z, z, np.zeros(0, dtype=np.float32)
    pos = np.concatenate(us)
    order = np.argsort(pos, kind="stable")  # back to the order of user_rows, ranks kept
    ids, s = np.concatenate(ids_all)[order], np.concatenate(ss)[order]
    u = user_rows[pos[order]]
    i = np.where(ids >= 0, item_map[np.maximum(ids, 0)], -1)
    s = s / temperature
    ok = i >= 0
    if excl is not None:
        ok &= ~excl.mask(u, np.maximum(i, 0), lo, hi)
    u, i, s = u[ok], i[ok], s[ok]
    keep = rank_in_runs(u) < n
    return u[keep], i[keep], s[keep]


def _exact_top(vectors: np.ndarray, q: np.ndarray, users: np.ndarray, item_map: np.ndarray,
               n: int, excl: Exclusion | None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``n`` index rows of queries ``q`` ``[b, d]`` (ranking-run user rows ``users``)
    with unmapped and excluded items removed first: ``(scores [b, n], ids [b, n])``, -inf / -1
    where a user has fewer eligible items; ties by lower index row."""
    s = q @ vectors.T
    s[:, item_map < 0] = -np.inf
    if excl is not None:
        to_index = np.full(excl.n_items, -1, dtype=np.int64)
        ok = item_map >= 0
        to_index[item_map[ok]] = np.flatnonzero(ok)
        for r, u in enumerate(users):  # b <= a few rows, one vectorised mask each
            seen = to_index[excl.items[excl.indptr[u]:excl.indptr[u + 1]]]
            s[r, seen[seen >= 0]] = -np.inf
    n = min(n, s.shape[1])
    ids = np.argsort(-s, axis=1, kind="stable")[:, :n]
    top = np.take_along_axis(s, ids, 1)
    return top.astype(np.float32), np.where(np.isfinite(top), ids, -1)


def merge(parts: list[tuple[int, np.ndarray, np.ndarray]], n_items: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``parts``: ``(source code, u, i)`` in priority order. Returns de-duplicated ``(u, i,
    src int8)`` sorted by (user, item row); a pair proposed by several sources keeps the
    first one's code."""
    if not parts:
        z = np.zeros(0, dtype=np.int64)
        return z, z, z.astype(np.int8)
    u = np.concatenate([p[1] for p in parts])
    i = np.concatenate([p[2] for p in parts])
    src = np.concatenate([np.full(len(p[1]), p[0], dtype=np.int8) for p in parts])
    key = u * n_items + i
    # np.unique's index is the first occurrence: the concatenation is in priority order
    _, first = np.unique(key, return_index=True)
    return u[first], i[first], src[first]


def top_k_per_user(u: np.ndarray, i: np.ndarray, s: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` best-scored entries of each user, ordered by (user, rank); ties by
    lower item row."""
    order = np.lexsort((i, -s, u))
    return order[rank_in_runs(u[order]) < k]
