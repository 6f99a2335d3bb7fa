"""Behaviour sequences, the chronological split and the seeded global shuffle of train.

A shuffle by user bucket with plain Ray tasks (no Ray Data all-to-all): each read task's
output is sliced per bucket; bucket task b sequences its users' events, writes its valid and
test rows and deals its train rows at random over P parts; write task p permutes part p (from
every bucket) and writes it: a seeded global shuffle of train in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rectrain.config import JobConfig
from rectrain.data import storage
from rectrain.data.encode import positions_in_lists
from rectrain.data.prepare.events import BUCKET, FILE, EventCounts
from rectrain.data.prepare.validate import ROW
from rectrain.data.prepare.vocab import UID
from rectrain.data.prepare.windows import AFTER, BEFORE, split_codes
from rectrain.data.schema import HIST_TS, LABEL, POS, SPLIT, SPLITS, TS, needs_event_times


def build_sequences(t: pa.Table, seq_features: list[tuple[str, str]], max_len: int,
                    n_test: int, n_valid: int, window: dict | None = None) -> pa.Table:
    """Behaviour sequences and chronological split for whole users (vectorised).

    ``t`` holds all events of some users. Each user's events are ordered by
    ``(timestamp, file, row)``; event ``i`` of a user gets, for each ``(name, source)`` in
    ``seq_features``, the ``source`` ids of that user's up to ``max_len`` strictly earlier events,
    most recent last, as a ``list<int64>`` column ``name``. ``_pos`` is the event's 0-based
    position in its user's history; ``_split`` is 2 (test) for the user's last ``n_test``
    events, 1 (valid) for the ``n_valid`` before, else 0 (train); with ``window`` (the
    edges of :func:`.windows.window_bounds`) it is the event's time split instead
    (:func:`.windows.split_codes`: 3 and 4 are events before and after the prepared windows,
    which only feed the sequences).
    """
    if t.num_rows == 0:
        return t
    order = pc.sort_indices(t, sort_keys=[(UID, "ascending"), (TS, "ascending"),
                                          (FILE, "ascending"), (ROW, "ascending")])
    t = t.take(order)
    uid = t[UID].to_numpy()
    n = len(uid)
    is_start = np.empty(n, dtype=bool)
    is_start[0] = True
    np.not_equal(uid[1:], uid[:-1], out=is_start[1:])
    starts = np.flatnonzero(is_start)
    group = np.cumsum(is_start) - 1
    pos = np.arange(n, dtype=np.int64) - starts[group]
    sizes = np.diff(np.append(starts, n))
    from_end = sizes[group] - 1 - pos
    split = (split_codes(t[TS].to_numpy(), window) if window is not None else
             np.where(from_end < n_test, 2, np.where(from_end < n_test + n_valid, 1, 0)))
    lengths = np.minimum(pos, max_len)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # index of each sequence element in t: from i - len_i up to i - 1 (most recent last)
    src_idx = np.repeat(np.arange(n, dtype=np.int64) - lengths, lengths) \
        + positions_in_lists(lengths)
    for name, source in seq_features:
        values = t[source].to_numpy()[src_idx]
        t = t.append_column(name, pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                                           pa.array(values, pa.int64())))
    t = t.append_column(POS, pa.array(pos))
    t = t.append_column(SPLIT, pa.array(split.astype(np.int8)))
    return t.drop_columns([BUCKET, FILE, ROW])


@dataclass
class Buckets:
    """The bucket tasks' results: ``stats`` per bucket (see :func:`_sequence_bucket`, in
    bucket order) and ``parts[b][p]``, the ref of bucket b's train rows dealt to part p."""

    stats: list[dict]
    parts: list[list]
    n_parts: int


def sequence_buckets(cfg: JobConfig, events: EventCounts, num_buckets: int,
                     rows_per_file: int, window: dict | None = None,
                     pool: pa.Table | None = None) -> Buckets:
    """Slice every read table by user bucket, then per bucket (a Ray task): sequences, split,
    ``valid/b<bucket>-K`` and ``test/b<bucket>-K`` Parquet files of at most ``rows_per_file``
    rows under ``cfg.prepared_dir``, train rows dealt over the parts. Releases
    ``events.tables`` once they are handed to the tasks. ``window``: the time split of
    :func:`.windows.window_bounds` (None: the per-user split of ``dataset.split``); ``pool``:
    the items ``dataset.negatives`` samples from (:func:`.negatives.item_pool`)."""
    import ray

    spec = cfg.dataset
    seq_features = [(f.name, f.source) for f in cfg.features if f.kind == "sequence"]
    if needs_event_times(cfg):  # match features' time since the last match, HSTU's time bias
        seq_features.append((HIST_TS, TS))
    dense_names = [f.name for f in cfg.features if f.kind == "dense"]
    rows_used = sum(s["rows_used"] for s in events.file_stats)
    n_parts = max(1, min(64, -(-rows_used // rows_per_file)))
    part_task = ray.remote(_bucket_parts).options(num_returns=num_buckets)
    part_refs = [part_task.remote(r, num_buckets) for r in events.tables]
    if num_buckets == 1:
        part_refs = [[r] for r in part_refs]
    events.tables = []  # the bucket slices hold the rows from here on
    schema = pa.unify_schemas([s["schema"] for s in events.file_stats if s["rows_used"]],
                              promote_options="permissive")
    seq_task = ray.remote(_sequence_bucket).options(num_returns=n_parts + 1)
    neg = None
    if spec.negatives is not None and pool is not None:
        seed = spec.negatives.seed if spec.negatives.seed is not None else cfg.train.seed
        neg = (spec.negatives.model_dump(), seed)
    pool_ref = ray.put(pool) if neg is not None else None
    bucket_refs = [seq_task.remote(b, cfg.prepared_dir, schema, seq_features,
                                   spec.sequence_length, spec.split.test, spec.split.valid,
                                   dense_names, n_parts, cfg.train.seed, rows_per_file, window,
                                   neg, pool_ref, *[parts[b] for parts in part_refs])
                   for b in range(num_buckets)]
    stats = ray.get([refs[0] for refs in bucket_refs])
    return Buckets(stats, [refs[1:] for refs in bucket_refs], n_parts)


def write_train(cfg: JobConfig, buckets: Buckets, rows_per_file: int) -> None:
    """Per train part (a Ray task): its rows from every bucket, permuted, written as
    ``train/p<part>-K.parquet``. Releases ``buckets.parts``."""
    import ray

    write_task = ray.remote(_write_train_part)
    folder = storage.join(cfg.prepared_dir, "train")
    ray.get([write_task.remote(folder, p, cfg.train.seed, rows_per_file,
                               *[parts[p] for parts in buckets.parts])
             for p in range(buckets.n_parts)])
    buckets.parts = []


def merge_dense_stats(bucket_stats: list[dict], dense_names: list[str]) -> dict[str, dict]:
    """Normalisation stats of dense features over the train split (nulls ignored): per feature
    ``{"mean", "std" (sample, ddof=1; 1.0 when 0 or undefined), "missing_imputed"}``, merged
    from the buckets' (n, mean, M2) by Chan, Golub & LeVeque's pairwise update ("Algorithms for
    computing the sample variance", 1983), stable for large offsets."""
    dense_stats = {}
    for name in dense_names:
        n, mean, m2 = 0, 0.0, 0.0
        for b in bucket_stats:
            nb, mb, m2b = b["dense"][name]["n"], b["dense"][name]["mean"], b["dense"][name]["m2"]
            if nb:
                delta = mb - mean
                n, mean, m2 = n + nb, mean + delta * nb / (n + nb), \
                    m2 + m2b + delta * delta * n * nb / (n + nb)
        std = float(np.sqrt(m2 / (n - 1))) if n > 1 else 0.0
        dense_stats[name] = {"mean": float(mean), "std": std if std else 1.0,
                             "missing_imputed": sum(b["dense"][name]["missing"]
                                                    for b in bucket_stats)}
    return dense_stats


def _bucket_parts(t: pa.Table, num_buckets: int) -> tuple[pa.Table, ...] | pa.Table:
    """One read task's table split by user bucket (see :func:`_deal`); the table itself when
    there is one bucket (a task with ``num_returns=1`` returns its value as one object)."""
    if num_buckets == 1:
        return t
    return _deal(t, t[BUCKET].to_numpy(), num_buckets)


def _deal(t: pa.Table, dest: np.ndarray, n: int) -> tuple[pa.Table, ...]:
    """Rows of ``t`` grouped by ``dest`` (ints in ``[0, n)``), keeping their order: one compact
    table per destination (a ``take``, not a slice: pickling an Arrow slice ships the whole
    parent buffers to the object store)."""
    order = np.argsort(dest, kind="stable")
    bounds = np.searchsorted(dest[order], np.arange(n + 1))
    return tuple(t.take(pa.array(order[bounds[i]:bounds[i + 1]])) for i in range(n))


def _write_chunks(t: pa.Table, folder: str, stem: str, rows_per_file: int) -> dict[str, int]:
    """Write ``t`` as ``folder/stem-K.parquet`` files of at most ``rows_per_file`` rows."""
    files = {}
    for k, lo in enumerate(range(0, t.num_rows, rows_per_file)):
        url = storage.join(folder, f"{stem}-{k:04d}.parquet")
        chunk = t.slice(lo, rows_per_file)
        storage.write_parquet(chunk, url)
        files[url] = chunk.num_rows
    return files


def _sequence_bucket(bucket: int, out: str, schema: pa.Schema, seq_features, max_len: int,
                     n_test: int, n_valid: int, dense_names: list[str], n_parts: int, seed: int,
                     rows_per_file: int, window: dict | None, negatives: tuple | None,
                     pool: pa.Table | None, *parts: pa.Table) -> tuple:
    """One user bucket: :func:`build_sequences` over all its events, valid/test rows written to
    ``out/{valid,test}/b<bucket>-K.parquet``, train rows dealt at random (``seed``, bucket)
    over ``n_parts`` tables. Every bucket's input is cast to ``schema`` (the read tables'
    unified schema), so all output files agree on column types whatever the raw files' widths.
    Returns ``(stats, part_0, ..., part_{n_parts-1})``; stats: rows per split, per dense
    feature the train count, mean and sum of squared deviations (see :func:`merge_dense_stats`)
    and nulls over all rows, the output schema, and ``outside``: {before, after} rows of a
    ``window`` prepare that feed only the sequences; ``negatives``: ``(spec dict, seed)`` and
    ``pool`` of :func:`.negatives.add_negatives` (stats ``negatives``: its stats), or None.
    ``rows`` counts observed events; the files also hold the negatives."""
    parts = [p for p in parts if p.num_rows]
    stats = {"rows": {name: 0 for name in SPLITS}, "schema": None,
             "outside": {"before": 0, "after": 0},
             "dense": {n: {"n": 0, "mean": 0.0, "m2": 0.0, "missing": 0} for n in dense_names}}
    if not parts:
        return (stats, *[None] * n_parts)
    t = pa.concat_tables([p.select(schema.names).cast(schema) for p in parts])
    t = build_sequences(t, seq_features, max_len, n_test, n_valid, window)
    for code, name in enumerate(SPLITS):
        stats["rows"][name] = int((t[SPLIT].to_numpy() == code).sum())
    observed = None
    if negatives is not None:
        from rectrain.data.prepare.negatives import add_negatives

        neg_spec, neg_seed = negatives
        t, stats["negatives"] = add_negatives(t, pool, neg_spec, neg_seed, bucket)
        observed = t[LABEL].to_numpy(zero_copy_only=False) > 0.5  # add_negatives: events 1
    split = t[SPLIT].to_numpy()
    stats["outside"] = {"before": int((split == BEFORE).sum()),
                        "after": int((split == AFTER).sum())}
    body = t.drop_columns([SPLIT, UID])
    stats["schema"] = {n: str(ty) for n, ty in zip(body.schema.names, body.schema.types)}
    is_train = pa.array(split == 0)
    obs_train = is_train if observed is None else pa.array((split == 0) & observed)
    for n in dense_names:
        col = body[n]
        v = pc.filter(col, obs_train).to_numpy(zero_copy_only=False).astype(np.float64)
        v = v[~np.isnan(v)]  # nulls come out as NaN
        mean = float(v.mean()) if v.size else 0.0
        missing = col.null_count if observed is None else pc.filter(col, observed).null_count
        stats["dense"][n] = {"n": int(v.size), "mean": mean,
                             "m2": float(((v - mean) ** 2).sum()), "missing": int(missing)}
    for code, name in ((1, "valid"), (2, "test")):
        sub = body.filter(pa.array(split == code))
        if sub.num_rows:
            _write_chunks(sub, storage.join(out, name), f"b{bucket:03d}", rows_per_file)
    train = body.filter(is_train)
    dest = np.random.default_rng([seed, bucket]).integers(0, n_parts, train.num_rows)
    return (stats, *_deal(train, dest, n_parts))


def _write_train_part(folder: str, part: int, seed: int, rows_per_file: int,
                      *tables: pa.Table | None) -> dict[str, int]:
    """Train part ``part`` from every bucket, permuted with (``seed``, ``part``), written as
    ``folder/p<part>-K.parquet``; returns {file url: rows}."""
    tables = [t for t in tables if t is not None and t.num_rows]
    if not tables:
        return {}
    t = pa.concat_tables(tables)  # one schema: the bucket tasks cast to it
    perm = np.random.default_rng([seed, 1_000_003, part]).permutation(t.num_rows)
    return _write_chunks(t.take(pa.array(perm)), folder, f"p{part:03d}", rows_per_file)
