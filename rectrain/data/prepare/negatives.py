"""Sampled negatives for implicit feedback (``dataset.negatives``, docs/data.md).

Each observed event of the chosen splits becomes a positive (label 1) and gets ``count`` rows
for items its user has no event of (label 0), sampled uniformly or by popularity^alpha: the
setup of DIN on Amazon (Zhou et al., "Deep Interest Network for Click-Through Rate
Prediction", KDD 2018, sec. 6.1: "for each positive, one negative sampled from the items the
user did not click") and of word2vec's unigram^0.75 noise distribution (Mikolov et al., NIPS
2013) for ``sampling: popularity``. A negative row is a copy of its event (user, context,
behaviour sequence, timestamp, position) with the item-level columns of the sampled item, so
the prepared schema is unchanged and every ranking model trains on it as is.

Two steps: :func:`item_pool` (driver + one Ray task per read table) gathers the sampling
pool, the distinct items of all events read with their item-level columns and event counts;
:func:`add_negatives` (inside each user-bucket task, after the sequences) draws and writes
the rows, vectorised in NumPy, collisions with the user's own items redrawn.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rectrain.config import JobConfig
from rectrain.data.prepare.events import EventCounts
from rectrain.data.prepare.vocab import UID
from rectrain.data.schema import ITEM, LABEL, LABEL_VALUE, SPLIT, SPLITS

COUNT = "_count"  # events per item in the pool
#: redraw rounds for negatives that hit one of the user's items; what still collides after
#: them (a user with events on nearly every item) is dropped and counted
MAX_ROUNDS = 64


def item_columns(cfg: JobConfig, roles: dict[str, str]) -> list[str]:
    """Columns a negative row takes from its sampled item: ``_item`` and every pooled feature
    read from the items table or from the events' item column (``roles``:
    :func:`rectrain.data.prepare.vocab.feature_roles`)."""
    return [ITEM] + [f.name for f in cfg.features
                     if f.kind not in ("sequence", "text_embedding", "dense")
                     and (roles.get(f.name) == "items" or f.source == cfg.dataset.item_column)]


def _items_of(t: pa.Table, cols: list[str]) -> pa.Table:
    """Distinct items of one table: ``cols`` of each item's first row plus :data:`COUNT`."""
    key = t[ITEM].combine_chunks() if isinstance(t[ITEM], pa.ChunkedArray) else t[ITEM]
    vc = pc.value_counts(key)
    first = pc.index_in(vc.field("values"), value_set=key)
    return t.select(cols).take(first).append_column(COUNT, vc.field("counts"))


def item_pool(cfg: JobConfig, events: EventCounts, roles: dict[str, str]) -> pa.Table:
    """The sampling pool: one row per distinct ``_item`` of the events read (sorted by raw id),
    its item-level columns (:func:`item_columns`) and :data:`COUNT` (int64, its events over
    every split: only the popularity sampling weights use it). One Ray task per read table;
    items of the items table that no event has are not sampled."""
    import ray

    cols = item_columns(cfg, roles)
    task = ray.remote(_items_of)
    parts = ray.get([task.remote(r, cols) for r in events.tables])
    t = pa.concat_tables(parts, promote_options="permissive").combine_chunks()
    counts = t.group_by(ITEM).aggregate([(COUNT, "sum")])
    first = pc.index_in(counts[ITEM], value_set=t[ITEM].combine_chunks())
    pool = t.select(cols).take(first).append_column(COUNT, counts[f"{COUNT}_sum"])
    return pool.take(pc.sort_indices(pool, sort_keys=[(ITEM, "ascending")]))


def check_pool(cfg: JobConfig, pool: pa.Table) -> None:
    """Refuse a ``dataset.negatives.count`` the pool cannot serve: with ``count`` >= the pool's
    items, every event's negatives repeat items (drawn with replacement) and a user with any
    event has fewer unseen items than ``count``.

    Raises:
        ValueError: naming ``dataset.negatives.count``, the pool size and ``dataset.events``.
    """
    k, n = cfg.dataset.negatives.count, pool.num_rows
    if k >= n:
        raise ValueError(f"dataset.negatives.count: {k} negatives per event, but "
                         f"{cfg.dataset.events} has {n} distinct items to sample from; use a "
                         f"count below {n} (1-10 is usual)")


def _sampler(pool: pa.Table, sampling: str, alpha: float, rng: np.random.Generator):
    """``draw(n) -> int64 [n]`` pool rows: uniform, or proportional to COUNT ** alpha."""
    n = pool.num_rows
    if sampling == "uniform":
        return lambda size: rng.integers(0, n, size)
    w = pool[COUNT].to_numpy().astype(np.float64) ** alpha
    cdf = np.cumsum(w / w.sum())
    return lambda size: np.minimum(np.searchsorted(cdf, rng.random(size), side="right"), n - 1)


def add_negatives(t: pa.Table, pool: pa.Table, spec: dict, seed: int, bucket: int
                  ) -> tuple[pa.Table, dict]:
    """``t`` (whole users: :func:`.sequences.build_sequences`'s output, with ``_split``) with
    ``spec["count"]`` negative rows after each event of ``spec["splits"]``.

    A negative copies its event's row and takes ``_item`` and the item columns of a pool row
    (``pool``: :func:`item_pool`) that is none of the user's items in ``t`` (any split);
    ``label`` is 1.0 for every observed event and 0.0 for a negative, whose ``label_value`` is
    0.0. Negatives of one event are drawn with replacement (they may repeat). Deterministic
    in (``seed``, ``bucket``) and ``t``'s row order.

    Returns ``(table, stats)``: stats ``{"rows": {split: negatives}, "dropped": n}``, dropped
    being negatives still colliding after :data:`MAX_ROUNDS` draws (not written).
    """
    k = int(spec["count"])
    codes = [SPLITS.index(s) for s in spec["splits"]]
    n_pool = pool.num_rows
    split = t[SPLIT].to_numpy()
    src = np.flatnonzero(np.isin(split, codes))
    # dense user codes: raw encoded ids may be hashes near 2**62, too large for a pair key
    _, ucode = np.unique(t[UID].to_numpy(), return_inverse=True)
    item_row = pc.index_in(t[ITEM], value_set=pool[ITEM].cast(t.schema.field(ITEM).type)
                          ).to_numpy(zero_copy_only=False)
    seen = np.unique(ucode.astype(np.int64) * n_pool + item_row.astype(np.int64))
    rng = np.random.default_rng([seed, 7_919, bucket])
    draw_fn = _sampler(pool, spec["sampling"], float(spec["alpha"]), rng)
    owner = np.repeat(src, k)
    draw = draw_fn(owner.size).astype(np.int64)
    owner_key = ucode[owner].astype(np.int64) * n_pool
    bad = np.zeros(owner.size, dtype=bool)
    for _ in range(MAX_ROUNDS):
        key = owner_key + draw
        pos = np.minimum(np.searchsorted(seen, key), seen.size - 1)
        bad = seen[pos] == key
        if not bad.any():
            break
        draw[bad] = draw_fn(int(bad.sum()))
    keep = ~bad
    owner, draw = owner[keep], draw[keep]
    neg = t.take(pa.array(owner))
    for c in pool.column_names:
        if c in neg.column_names:
            i = neg.schema.get_field_index(c)
            neg = neg.set_column(i, c, pool[c].take(pa.array(draw)).cast(neg.schema.field(c).type))
    label_type = t.schema.field(LABEL).type
    t = t.set_column(t.schema.get_field_index(LABEL), LABEL,
                     pa.array(np.ones(t.num_rows, dtype=np.float32)).cast(label_type))
    zeros = pa.array(np.zeros(len(owner), dtype=np.float32))
    neg = neg.set_column(neg.schema.get_field_index(LABEL), LABEL, zeros.cast(label_type))
    neg = neg.set_column(neg.schema.get_field_index(LABEL_VALUE), LABEL_VALUE,
                         zeros.cast(t.schema.field(LABEL_VALUE).type))
    # each event followed by its negatives (valid/test files keep the events' order)
    order = np.argsort(np.concatenate([np.arange(t.num_rows), owner]), kind="stable")
    out = pa.concat_tables([t, neg]).take(pa.array(order))
    neg_split = split[owner]
    rows = {name: int((neg_split == code).sum()) for code, name in enumerate(SPLITS)}
    return out, {"rows": rows, "dropped": int(bad.sum())}
