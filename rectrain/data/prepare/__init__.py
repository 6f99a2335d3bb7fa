"""The generic prepare stage (Ray): raw behaviour logs -> training samples + manifest.

::

    events files ──(Ray task per group of files, .readtasks: read, validate, join users/items ────┐
        by index, label, encode)                                                                  │
    users, items (small side tables, encoded once in the driver, broadcast via the object store)  │
    sliced by user bucket → Ray task per bucket, vectorised: order each user's events by          │
        (timestamp, file, row), behaviour sequences from list offsets, chronological split ←──────┘
    → valid / test Parquet (per bucket); train dealt at random over parts → Ray task per part:
      permute, write (a seeded global shuffle) + catalog (users, items) + vocabularies
    → manifest.json (schema, cardinalities, counts per split and file, rejected rows by reason)

Stages, one module each: :mod:`.validate` (paths, keys, footers, row values), :mod:`.vocab`
(side tables, vocabularies), :mod:`.events` (the per-file task), :mod:`.sequences` (buckets,
sequences, split, shuffle), :mod:`.negatives` (``dataset.negatives``: sampled negatives,
added per bucket), :mod:`.manifest` (accounting, catalog, manifest).

Nothing is dropped silently: every row read is either in exactly one split or counted in
``rejected`` by reason; the manifest asserts ``rows_read == rows_used + rows_rejected``.
No MovieLens-specific code lives here: the job config names the columns (see
:class:`rectrain.config.DatasetSpec` and :class:`rectrain.config.FeatureSpec`).
"""

from __future__ import annotations

import logging
import numbers
import time

from rectrain.config import JobConfig
from rectrain.data import storage
from rectrain.data.prepare import manifest as mf
from rectrain.data.schema import empty_split_reason
from rectrain.data.prepare.events import read_events
from rectrain.data.prepare.negatives import check_pool, item_pool
from rectrain.data.prepare.readtasks import describe, group_files
from rectrain.data.prepare.windows import window_bounds
from rectrain.data.prepare.sequences import (build_sequences, merge_dense_stats,
                                             sequence_buckets, write_train)
from rectrain.data.prepare.validate import DataValidationError, check_event_schemas, check_paths
from rectrain.data.prepare.vocab import (Vocabularies, encode_side_features, event_vocabularies,
                                         feature_roles, previous_vocabularies,
                                         read_side_tables)

__all__ = ["DataValidationError", "build_sequences", "prepare"]

log = logging.getLogger(__name__)


#: user buckets grow with the log so that one sequence task holds about this many events at most
EVENTS_PER_BUCKET = 500_000
MIN_BUCKETS = 16


def bucket_count(rows: int, per_bucket: int = EVENTS_PER_BUCKET, minimum: int = MIN_BUCKETS
                 ) -> int:
    """User buckets for a log of ``rows`` events: at least ``minimum``, and enough that a
    bucket averages at most ``per_bucket`` events (users are bucketed by id modulo the count,
    so a bucket's memory follows its events, not the log's).

    Raises:
        ValueError: ``rows`` is not an integer >= 0, or ``per_bucket`` / ``minimum`` not an
            integer >= 1 (the message names the argument and the value).
    """
    for name, v, low in (("rows", rows, 0), ("per_bucket", per_bucket, 1),
                         ("minimum", minimum, 1)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
            raise ValueError(f"bucket_count: {name} must be an integer >= {low}, got {v!r}")
    return int(max(minimum, -(-rows // per_bucket)))


def prepare(cfg: JobConfig, num_buckets: int | None = None, rows_per_file: int = 20_000
            ) -> dict:
    """Run the prepare stage for ``cfg`` on the connected Ray cluster; returns the manifest
    (:meth:`rectrain.data.schema.Manifest.to_dict`, as written to ``manifest.json``).

    Writes under ``cfg.prepared_dir``: ``{train,valid,test}/*.parquet`` (train globally
    shuffled with ``cfg.train.seed``), ``catalog/{users,items}.parquet`` (encoded side
    features per id), ``vocab/<feature>.parquet`` (raw value -> id) and ``manifest.json``.
    With ``dataset.vocab_from`` the vocabularies extend that folder's (known values keep
    their ids) and features with a ``capacity`` get fixed table sizes (docs/data.md).
    ``num_buckets`` user buckets (bucket tasks; None: :func:`bucket_count` of the log's rows,
    16 up to 8M events); output files of at most ``rows_per_file`` rows.

    Raises:
        DataValidationError: bad input under ``on_invalid: error`` (names file/column/row/value).
        FileNotFoundError: an input path does not exist.
        ValueError: the valid or test split came out empty (the message says which and what
            to change; ``manifest.json`` is still written with the counts).
    """
    t0 = time.perf_counter()
    spec, out = cfg.dataset, cfg.prepared_dir
    check_paths(cfg)
    event_files, markers = storage.list_parquet_files(spec.events)
    sizes = storage.file_sizes(event_files)
    groups = group_files(sizes)  # small files share a read task
    read_tasks = describe(groups, sizes, spec.events)
    side = read_side_tables(spec)
    roles = feature_roles(cfg, side)
    vocab = Vocabularies(previous=previous_vocabularies(
        spec.vocab_from, [f.name for f in cfg.features
                          if f.kind in ("sparse", "multi_hot") and f.encoding == "vocab"]))
    encode_side_features(cfg, side, roles, vocab)
    event_feats = [f for f in cfg.features if roles.get(f.name) == "events"]
    col_types, n_rows = check_event_schemas(event_files, spec, [f.source for f in event_feats])
    num_buckets = num_buckets or bucket_count(n_rows)
    read_tasks["user_buckets"] = num_buckets
    event_vocabularies(event_files, spec, event_feats, col_types, "users" not in side.raw, vocab,
                       groups)
    events = read_events(cfg, event_files, side, vocab, col_types, event_feats, num_buckets,
                         groups)
    t_read = time.perf_counter()
    window = (window_bounds(spec, *events.ts_range) if spec.windows is not None else None)
    pool = item_pool(cfg, events, roles) if spec.negatives is not None else None
    if pool is not None:
        check_pool(cfg, pool)
    storage.remove(out)  # only now: a job that fails validation leaves the last good output
    buckets = sequence_buckets(cfg, events, num_buckets, rows_per_file, window, pool)
    t_seq = time.perf_counter()
    write_train(cfg, buckets, rows_per_file)
    t_train = time.perf_counter()
    split_counts, files_per_split = mf.check_row_accounting(out, events, buckets.stats)
    dense_stats = merge_dense_stats(buckets.stats, [f.name for f in cfg.features
                                                    if f.kind == "dense"])
    mf.write_catalog_and_vocabularies(out, side, vocab)
    text = mf.text_embeddings(cfg, side, vocab)
    seconds = {"read_validate_join": round(t_read - t0, 3),
               "sequences_split": round(t_seq - t_read, 3),
               "shuffle_write_train": round(t_train - t_seq, 3),
               "total": round(time.perf_counter() - t0, 3)}
    manifest = mf.build_manifest(cfg, markers, side, vocab, events, buckets.stats, split_counts,
                                 files_per_split, dense_stats, text, seconds, window)
    manifest.read_tasks = read_tasks
    if pool is not None:
        manifest.negatives = mf.negatives_summary(spec.negatives, cfg.train.seed, pool.num_rows,
                                                  buckets.stats)
    manifest.save(out)  # kept also when a split is empty: its counts explain why
    # valid and test only: an empty train split (every user short) is a legal prepare result
    # (counted in the manifest), which `rectrain train` rejects on its driver
    reason = (empty_split_reason(split_counts, cfg.dataset.split.model_dump(),
                                 manifest.rows_used, out, ("valid", "test")) if window is None
              else _empty_window_reason(split_counts, window, out))
    if reason:
        raise ValueError(reason)
    log.info("prepared %s: %s", out, split_counts)
    return manifest.to_dict()


def _empty_window_reason(split_counts: dict[str, int], window: dict, out: str) -> str | None:
    """Why a window prepare cannot be trained on (valid or test of window N+1 empty)."""
    empty = [s for s in ("valid", "test") if not split_counts[s]]
    if not empty:
        return None
    return (f"{out}: the {' and '.join(empty)} split of window {window['index'] + 1} "
            f"({', '.join(f'{s} {window[s]}' for s in empty)}, unix s) is empty: change "
            f"dataset.windows (size, boundaries or valid_fraction) or dataset.window")
