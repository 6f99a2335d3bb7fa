"""Quality of recommendation lists against held-out events (NumPy/Arrow, no model, no Ray).

Inputs are Arrow tables with the raw ids of the prepared data (the ``_user`` / ``_item`` values
that ``catalog/{users,items}.parquet`` key on, as :mod:`rectrain.serve.recommend` writes them):

- ``lists``: ``user_id, rank, item_id[, score]``, rank 1 = best (a recommend output);
- ``truth``: ``user_id, item_id``, each user's held-out positives (:func:`truth_from_prepared`);
- ``train``: ``user_id, item_id``, the train events (popularity; :func:`events_from_prepared`);
- ``seen``: ``user_id, item_id``, the pairs a recommend run excluded (``exclude``).

Definitions, per evaluated user ``u`` (one with at least one truth item; ``R(u)`` = the set of
truth items, ``L(u)`` = the first ``K`` items of the list by rank, position ``i`` = 1..K), as in
RecBole (Zhao et al., CIKM 2021; ``recbole/evaluator/metrics.py``: Hit, Recall, NDCG, MRR,
ItemCoverage, AveragePopularity, GiniIndex), each averaged over evaluated users:

- ``HR@K`` = ``1[L(u) ∩ R(u) ≠ ∅]``;
- ``recall@K`` = ``|L(u) ∩ R(u)| / |R(u)|`` (the usual definition, also torchmetrics'
  ``RetrievalRecall``; with one truth item it equals HR@K. Liang et al., WWW 2018, divide by
  ``min(K, |R(u)|)`` instead; not used here);
- ``NDCG@K`` = ``DCG / IDCG``, binary relevance, ``DCG = Σ_i 1[L_i ∈ R(u)] / log2(i + 1)``,
  ``IDCG = Σ_{i ≤ min(|R(u)|, K)} 1 / log2(i + 1)`` (Järvelin & Kekäläinen, TOIS 2002);
- ``MRR@K`` = ``1 / i`` of the first hit in ``L(u)``, 0 without a hit.

Over the whole run: ``coverage`` = distinct recommended items / catalogue size; ``gini`` =
Gini index of item exposure (times each item appears in the top-K lists) over the **whole**
catalogue, items never recommended counting with exposure 0: with exposures sorted ascending
``x_1 ≤ … ≤ x_n``, ``G = Σ_i (2i − n − 1) x_i / (n Σ_i x_i)`` (RecBole's GiniIndex; equal to the
mean absolute difference ``Σ_i Σ_j |x_i − x_j| / (2 n² mean(x))``); 0 = every item equally
exposed, ``1 − 1/n`` = one item takes all; ``popularity_recommended`` = mean over evaluated users
of the mean train popularity (number of train events) of their list items (RecBole's
AveragePopularity), ``popularity_test`` = the same over their truth items, and
``popularity_ratio`` = their quotient (> 1: the lists lean to items more popular than what
users went on to consume).

Truth and exclusion: truth pairs are de-duplicated (a repeated test event is one relevant
item). Truth items the user already has in the excluded set (``exclude: train`` → the train
events, ``all_seen`` → ``seen``, usually train + valid) can never be recommended; they stay in
``R(u)`` (so recall and NDCG are bounded below 1 for such users) and are counted
(``truth_pairs_excluded``, ``users_truth_all_excluded``). For ranking data with labels
(P-ML100K: label = rating ≥ 4) truth is the **positive** test events only: an item the user
rated 1 star is not a hit (:func:`truth_from_prepared` with ``positives="label"``); for
leave-last-out implicit data every test event is a positive (``positives="all"``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rectrain.data import storage
from rectrain.data.encode import positions_in_lists

EXCLUDE = ("none", "train", "all_seen")
PAIR = ("user_id", "item_id")


def key_column(table: pa.Table, name: str, what: str) -> pa.Array:
    """One key column as a contiguous array (integers as int64, strings as large_string).

    Raises:
        ValueError: the column is missing or holds a null (names table, column and row).
    """
    if name not in table.column_names:
        raise ValueError(f"{what}: no column {name!r} (columns: {table.column_names})")
    col = table[name].combine_chunks()
    if col.null_count:
        row = int(pc.index(pc.is_null(col), True).as_py())
        raise ValueError(f"{what}: column {name!r} row {row}: null value")
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if pa.types.is_integer(col.type):
        return pc.cast(col, pa.int64())
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return pc.cast(col, pa.large_string())
    return col


class _Vocab:
    """Dense codes ``0..n-1`` for the raw ids of several columns (sorted ascending, so ties
    broken by code are broken by raw id)."""

    def __init__(self, cols: list[pa.Array], what: str):
        types = {c.type for c in cols}
        if len(types) > 1:
            raise ValueError(f"{what}: the id columns have different types {sorted(map(str, types))}")
        uniq = pc.unique(pa.chunked_array(cols, cols[0].type))
        self.values = uniq.take(pc.sort_indices(uniq))
        self.n = len(self.values)

    def codes(self, col: pa.Array) -> np.ndarray:
        """int64 codes of ``col``; -1 where a value is not in the vocabulary."""
        if col.type != self.values.type:
            col = pc.cast(col, self.values.type)
        idx = pc.index_in(col, value_set=self.values)
        return pc.fill_null(idx, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def _pair_keys(table: pa.Table | None, users: _Vocab, items: _Vocab, what: str) -> np.ndarray:
    """Sorted unique int64 ``user_code * n_items + item_code`` keys of a pair table; pairs whose
    user or item is outside the vocabularies are dropped (they cannot match anything)."""
    if table is None or table.num_rows == 0:
        return np.zeros(0, np.int64)
    u = users.codes(key_column(table, "user_id", what))
    i = items.codes(key_column(table, "item_id", what))
    ok = (u >= 0) & (i >= 0)
    keys = np.sort(u[ok] * items.n + i[ok])
    return keys[np.r_[True, keys[1:] != keys[:-1]]] if len(keys) else keys


def _member(a: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """bool: which of ``a`` are in ``keys`` (sorted, unique), by binary search (faster than
    ``np.isin``'s hash-based unique on tens of millions of keys)."""
    if not len(keys):
        return np.zeros(len(a), bool)
    return keys[np.minimum(np.searchsorted(keys, a), len(keys) - 1)] == a


def _excluded(exclude: str, train: pa.Table, seen: pa.Table | None) -> pa.Table | None:
    if exclude not in EXCLUDE:
        raise ValueError(f"exclude: {exclude!r} is not one of {list(EXCLUDE)}")
    if exclude == "all_seen" and seen is None:
        raise ValueError("exclude='all_seen' needs `seen` (the pairs the run excluded, e.g. "
                         "events_from_prepared(prepared, ('train', 'valid')))")
    return None if exclude == "none" else (seen if seen is not None else train)


def _sorted_lists(lists: pa.Table, users: _Vocab, items: _Vocab, k: int | None, what: str):
    """Codes of a lists table sorted by (user, rank): ``(u, i, pos)`` with ``pos`` the 0-based
    position inside the user's list, cut to the first ``k`` positions (all when ``k`` is None).

    Raises:
        ValueError: a user has the same item or the same rank twice (names the user).
    """
    u = users.codes(key_column(lists, "user_id", what))
    i = items.codes(key_column(lists, "item_id", what))
    r = key_column(lists, "rank", what).to_numpy(zero_copy_only=False)
    order = np.lexsort((r, u))
    u, i, r = u[order], i[order], r[order]
    same_user = u[1:] == u[:-1]
    dup = np.flatnonzero(same_user & (r[1:] == r[:-1]))
    if len(dup):
        j = dup[0]
        raise ValueError(f"{what}: user {users.values[u[j]].as_py()!r} has rank {int(r[j])} "
                         f"twice (rows {int(order[j])} and {int(order[j + 1])})")
    key = u * items.n + i
    ks = np.sort(key)
    dup = np.flatnonzero(ks[1:] == ks[:-1])
    if len(dup):
        uu, ii = divmod(int(ks[dup[0]]), items.n)
        raise ValueError(f"{what}: user {users.values[uu].as_py()!r} has item "
                         f"{items.values[ii].as_py()!r} more than once")
    starts = np.r_[0, np.flatnonzero(~same_user) + 1]
    lengths = np.diff(np.r_[starts, len(u)])
    pos = positions_in_lists(lengths)
    keep = pos < k if k is not None else np.ones(len(u), bool)
    return u[keep], i[keep], pos[keep]


def gini_index(exposure: np.ndarray, n_items: int) -> float:
    """Gini index of item exposure over a catalogue of ``n_items`` (see the module docstring).

    ``exposure``: counts (any shape) of the items that were recommended at least once; the
    ``n_items - len(exposure)`` others count as 0. NaN when nothing was recommended.

    Raises:
        ValueError: more exposed items than ``n_items``.
    """
    x = np.sort(np.asarray(exposure, dtype=np.float64).ravel())
    n = int(n_items)
    if len(x) > n:
        raise ValueError(f"{len(x)} exposed items but a catalogue of n_items={n}")
    total = x.sum()
    if total <= 0:
        return float("nan")
    idx = np.arange(n - len(x) + 1, n + 1, dtype=np.float64)  # ranks of the non-zero tail
    return float(np.sum((2 * idx - n - 1) * x) / (n * total))


def lorenz_curve(exposure: np.ndarray, n_items: int, points: int = 1001) -> tuple[np.ndarray,
                                                                                   np.ndarray]:
    """Lorenz curve of item exposure: ``(x, y)`` float64 ``[points]``, ``x`` = share of the
    catalogue (least exposed first, zeros included), ``y`` = share of all exposure they get;
    the Gini index is 1 − 2 × the area under it (for large ``n_items``)."""
    x = np.sort(np.asarray(exposure, dtype=np.float64).ravel())
    cum = np.r_[0.0, np.cumsum(x)] / max(x.sum(), 1e-300)
    grid = np.linspace(0.0, 1.0, points)
    # item share q covers the first q*n items, of which the n - len(x) first have exposure 0
    within = np.clip(grid * n_items - (n_items - len(x)), 0, len(x))
    return grid, np.interp(within, np.arange(len(x) + 1), cum)


def item_exposure(lists: pa.Table, k: int) -> np.ndarray:
    """int64 ``[distinct items]``: how often each recommended item appears in the top-``k`` of
    the lists (ascending; the input of :func:`gini_index` / :func:`lorenz_curve`)."""
    users = _Vocab([key_column(lists, "user_id", "lists")], "lists.user_id")
    items = _Vocab([key_column(lists, "item_id", "lists")], "lists.item_id")
    _, i, _ = _sorted_lists(lists, users, items, k, "lists")
    counts = np.bincount(i, minlength=items.n)
    return np.sort(counts[counts > 0])


def evaluate_lists(lists: pa.Table, truth: pa.Table, train: pa.Table, n_items: int, k: int,
                   exclude: str = "train", seen: pa.Table | None = None) -> dict:
    """Quality of top-``k`` lists against held-out positives (definitions: module docstring).

    Args:
        lists: ``user_id, rank, item_id`` (more than ``k`` rows per user: the ``k`` best ranks
            are used; fewer: the list is evaluated as it is and the user counted in
            ``users_with_short_list``). A user in ``lists`` without truth is skipped and counted
            (``users_without_truth``); a user with truth but no list counts as a list without
            hits (``users_without_list``).
        truth: ``user_id, item_id`` positives (duplicates count once).
        train: ``user_id, item_id`` train events: the popularity of an item is its number of
            train events; with ``exclude="train"`` also the excluded pairs.
        n_items: catalogue size (for coverage and the Gini index).
        k: the cut-off ``K``.
        exclude: the recommend run's exclusion policy, ``none | train | all_seen``.
        seen: with ``all_seen``, the excluded pairs (required); ignored otherwise.

    Returns:
        A JSON-ready dict: ``hr@K, ndcg@K, recall@K, mrr@K`` (NaN without evaluated users),
        ``coverage, distinct_items, gini, popularity_recommended, popularity_test,
        popularity_ratio``, and the counts ``users_evaluated, users_without_truth,
        users_without_list, users_with_short_list, truth_pairs, truth_pairs_excluded,
        users_truth_all_excluded, recommended_excluded`` (list rows in the excluded set: 0 for
        a run that applied ``exclude``), plus ``k, exclude, n_items``.

    Raises:
        ValueError: a missing column or null id, ids of different types across tables, a user
            with a duplicated item or rank (names the user), a bad ``exclude`` or ``k``, or more
            distinct recommended items than ``n_items``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    excl = _excluded(exclude, train, seen)
    users = _Vocab([key_column(lists, "user_id", "lists"), key_column(truth, "user_id", "truth")],
                   "user_id (lists, truth)")
    items = _Vocab([key_column(t, "item_id", w) for t, w in
                    ((lists, "lists"), (truth, "truth"), (train, "train"))],
                   "item_id (lists, truth, train)")
    lu, li, pos = _sorted_lists(lists, users, items, k, "lists")
    t_keys = _pair_keys(truth, users, items, "truth")
    tu = t_keys // items.n
    n_truth = np.bincount(tu, minlength=users.n)
    n_list = np.bincount(lu, minlength=users.n)
    listed = np.bincount(users.codes(key_column(lists, "user_id", "lists")), minlength=users.n) > 0
    hit = _member(lu * items.n + li, t_keys)
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    hits = np.bincount(lu, weights=hit, minlength=users.n)
    dcg = np.bincount(lu, weights=hit * disc[pos], minlength=users.n)
    h = np.flatnonzero(hit)
    first = h[np.r_[True, lu[h][1:] != lu[h][:-1]]] if len(h) else h  # first hit of each user
    rr = np.zeros(users.n)
    rr[lu[first]] = 1.0 / (pos[first] + 1)
    ev = n_truth > 0
    n_ev = int(ev.sum())
    idcg = np.cumsum(disc)[np.minimum(n_truth[ev], k) - 1]

    x_keys = _pair_keys(excl, users, items, "seen" if exclude == "all_seen" else "train")
    t_excl = _member(t_keys, x_keys)
    excl_per_user = np.bincount(tu[t_excl], minlength=users.n)

    exposure = np.bincount(li, minlength=items.n)
    distinct = int((exposure > 0).sum())
    if distinct > n_items:
        raise ValueError(f"lists hold {distinct} distinct items but n_items={n_items}")
    pop = np.bincount(items.codes(key_column(train, "item_id", "train")), minlength=items.n)
    rec_pop = np.bincount(lu, weights=pop[li], minlength=users.n)
    test_pop = np.bincount(tu, weights=pop[t_keys % items.n], minlength=users.n)
    has = ev & (n_list > 0)
    p_rec = float(np.mean(rec_pop[has] / n_list[has])) if has.any() else float("nan")
    p_test = float(np.mean(test_pop[ev] / n_truth[ev])) if n_ev else float("nan")

    def mean(v):
        return float(np.mean(v)) if n_ev else float("nan")

    return {
        "k": int(k), "exclude": exclude, "n_items": int(n_items),
        f"hr@{k}": mean(hits[ev] > 0),
        f"ndcg@{k}": mean(dcg[ev] / idcg) if n_ev else float("nan"),
        f"recall@{k}": mean(hits[ev] / n_truth[ev]) if n_ev else float("nan"),
        f"mrr@{k}": mean(rr[ev]),
        "coverage": distinct / n_items if n_items else float("nan"),
        "distinct_items": distinct,
        "gini": gini_index(exposure[exposure > 0], n_items),
        "popularity_recommended": p_rec, "popularity_test": p_test,
        "popularity_ratio": p_rec / p_test if p_test else float("nan"),
        "users_evaluated": n_ev,
        "users_without_truth": int((listed & ~ev).sum()),
        "users_without_list": int((ev & (n_list == 0)).sum()),
        "users_with_short_list": int((ev & (n_list > 0) & (n_list < k)).sum()),
        "truth_pairs": int(len(t_keys)),
        "truth_pairs_excluded": int(t_excl.sum()),
        "users_truth_all_excluded": int((ev & (excl_per_user == n_truth)).sum()),
        "recommended_excluded": int(_member(lu * items.n + li, x_keys).sum()),
    }


def most_popular_lists(train: pa.Table, users: pa.Array, k: int, exclude: str = "train",
                       seen: pa.Table | None = None) -> pa.Table:
    """The most-popular baseline: for each of ``users`` (raw ids, each once), the ``k`` items
    with the most train events, minus the user's excluded pairs (``exclude`` as in
    :func:`evaluate_lists`); ties broken by raw item id, ascending.

    Returns ``user_id, rank, item_id, score`` (rank int32 from 1, score float32 = the number
    of train events), the schema of a recommend output; fewer than ``k`` rows for a user only
    when the train split has fewer non-excluded items. Cost: O(users × k + excluded pairs).

    Raises:
        ValueError: a user appears twice in ``users``, or a bad ``exclude`` / ``k``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    excl = _excluded(exclude, train, seen)
    users = users.combine_chunks() if isinstance(users, pa.ChunkedArray) else users
    u_vocab = _Vocab([key_column(pa.table({"user_id": users}), "user_id", "users")], "users")
    if u_vocab.n != len(users):
        raise ValueError(f"users: {len(users) - u_vocab.n} ids appear more than once")
    items = _Vocab([key_column(train, "item_id", "train")], "train.item_id")
    pop = np.bincount(items.codes(key_column(train, "item_id", "train")), minlength=items.n)
    ranked = np.lexsort((np.arange(items.n), -pop))  # item codes, most popular first
    x_keys = _pair_keys(excl, u_vocab, items, "seen" if exclude == "all_seen" else "train")
    n_seen = np.bincount(x_keys // items.n, minlength=u_vocab.n) if items.n else \
        np.zeros(u_vocab.n, np.int64)
    # a user's top-k survives among the first k + |excluded| popular items
    depth = np.minimum(items.n, k + n_seen)
    u = np.repeat(np.arange(u_vocab.n), depth)
    i = ranked[positions_in_lists(depth)]
    keep = ~_member(u * items.n + i, x_keys)
    u, i = u[keep], i[keep]
    pos = positions_in_lists(np.bincount(u, minlength=u_vocab.n))
    u, i, pos = u[pos < k], i[pos < k], pos[pos < k]
    return pa.table({"user_id": u_vocab.values.take(pa.array(u)),
                     "rank": pa.array((pos + 1).astype(np.int32)),
                     "item_id": items.values.take(pa.array(i)),
                     "score": pa.array(pop[i].astype(np.float32))})


def stage_recall(candidates: pa.Table, reference: pa.Table, k: int | None = None) -> float:
    """Recall of stage 1: per user, the share of the reference (brute-force) top-``k`` pairs
    that the candidates contain, ``|C(u) ∩ B(u)| / |B(u)|``, averaged over the users with a
    reference list (a user without candidates counts 0).

    ``candidates``: ``user_id, item_id`` (any further columns, e.g. ``score, source``, are
    ignored; duplicates across sources count once); ``reference``: a lists table, cut to
    ``rank <= k`` when ``k`` is given. NaN when the reference is empty.
    """
    if k is not None:
        reference = reference.filter(pc.less_equal(key_column(reference, "rank", "reference"), k))
    users = _Vocab([key_column(candidates, "user_id", "candidates"),
                    key_column(reference, "user_id", "reference")], "user_id")
    items = _Vocab([key_column(candidates, "item_id", "candidates"),
                    key_column(reference, "item_id", "reference")], "item_id")
    ref = _pair_keys(reference, users, items, "reference")
    if not len(ref):
        return float("nan")
    got = _member(ref, _pair_keys(candidates, users, items, "candidates"))
    ru = ref // items.n
    n_ref = np.bincount(ru, minlength=users.n)
    has = n_ref > 0
    return float(np.mean(np.bincount(ru, weights=got, minlength=users.n)[has] / n_ref[has]))


def truth_from_prepared(prepared_dir: str, split: str = "test",
                        positives: str = "label") -> pa.Table:
    """``user_id, item_id`` (raw ids, the catalog's keys) of a prepared split's positives:
    ``positives="label"`` keeps rows with ``label`` = 1 (ranking data, e.g. P-ML100K's rating
    ≥ 4), ``"all"`` every row (leave-last-out implicit feedback).

    Raises:
        FileNotFoundError: the split is absent; ValueError: a bad ``positives``.
    """
    from rectrain.data.schema import LABEL, read_split

    if positives not in ("label", "all"):
        raise ValueError(f"positives: {positives!r} is not 'label' or 'all'")
    t = events_from_prepared(prepared_dir, (split,), [LABEL] if positives == "label" else [])
    if positives == "label":
        t = t.filter(pc.greater_equal(t[LABEL], 0.5)).select(list(PAIR))
    return t


def events_from_prepared(prepared_dir: str, splits: tuple[str, ...] = ("train",),
                         extra: list[str] = ()) -> pa.Table:
    """``user_id, item_id`` (plus ``extra`` columns) of every event in ``splits`` of a prepared
    folder (:func:`rectrain.data.schema.read_split`): ``("train",)`` for popularity and
    ``exclude: train``, ``("train", "valid")`` for the pairs ``all_seen`` excludes at test.

    Raises:
        FileNotFoundError: a split is absent (names the folder and split).
    """
    from rectrain.data.schema import ITEM, USER, read_split

    parts = []
    for s in splits:
        t = read_split(prepared_dir, s, [USER, ITEM, *extra])
        if t is None:
            raise FileNotFoundError(f"{prepared_dir}: no {s}/ split with Parquet files")
        parts.append(t.rename_columns(["user_id", "item_id", *extra]))
    return pa.concat_tables(parts)


def catalog_size(prepared_dir: str) -> int:
    """Number of items of a prepared folder: ``manifest.json``'s ``num_items`` (the items
    table), else the distinct items of its events."""
    from rectrain.data.schema import SPLITS, load_manifest

    n = load_manifest(prepared_dir).get("num_items")
    if n:
        return int(n)
    splits = tuple(s for s in SPLITS if storage.exists(storage.join(prepared_dir, s)))
    return len(pc.unique(events_from_prepared(prepared_dir, splits)["item_id"]))
