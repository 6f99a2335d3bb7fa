"""The generic prepare stage (Ray): raw behaviour logs -> training samples + manifest.

::

    events files ──(Ray task per file: read, validate, join users/items by index, label, encode)──┐
    users, items (small side tables, encoded once in the driver, broadcast via the object store)  │
    sliced by user bucket → Ray task per bucket, vectorised: order each user's events by          │
        (timestamp, file, row), behaviour sequences from list offsets, chronological split ←──────┘
    → valid / test Parquet (per bucket); train dealt at random over parts → Ray task per part:
      permute, write (a seeded global shuffle) + catalog (users, items) + vocabularies
    → manifest.json (schema, cardinalities, counts per split and file, rejected rows by reason)

Nothing is dropped silently: every row read is either in exactly one split or counted in
``rejected`` by reason; the manifest asserts ``rows_read == rows_used + rows_rejected``.
No MovieLens-specific code lives here: the job config names the columns (see
:class:`rectrain.config.DatasetSpec` and :class:`rectrain.config.FeatureSpec`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rectrain.config import DatasetSpec, FeatureSpec, JobConfig
from rectrain.data import storage
from rectrain.data.encode import (apply_transform, build_vocab, encode, hash_collisions,
                                  hash_encode, positions_in_lists)

log = logging.getLogger(__name__)

from rectrain.data.schema import (ITEM, LABEL, LABEL_VALUE, POS, SPLIT, SPLITS, TS, USER,  # noqa: F401
                                  load_manifest)
_UID, _BUCKET, _FILE, _ROW = "_uid", "_bucket", "_file", "_row"


class DataValidationError(ValueError):
    """A raw input violates the job's data contract; the message names file, column, row, value."""


# ----------------------------------------------------------------------------- side tables
def _read_all(url: str, what: str) -> tuple[pa.Table, list[str]]:
    files, _ = storage.list_parquet_files(url)
    tables = [storage.read_parquet(f) for f in files]
    try:
        t = pa.concat_tables(tables, promote_options="permissive")
        t = t.replace_schema_metadata({"rectrain_file_rows": ",".join(
            str(x.num_rows) for x in tables)})
        return t, files
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DataValidationError(f"{what} {url}: files disagree on schema: {e}") from None


def _check_key(table: pa.Table, key: str, url: str) -> None:
    if key not in table.column_names:
        raise DataValidationError(f"{url}: key column {key!r} missing (has {table.column_names})")
    col = table[key]
    if col.null_count:
        row = pc.index(pc.is_null(col), True).as_py()
        raise DataValidationError(f"{url}: column {key!r} row {row}: null key")
    if pc.count_distinct(col).as_py() != len(col):
        counts = pc.value_counts(col).flatten()
        dup = pc.filter(counts[0], pc.greater(counts[1], 1))[0].as_py()
        row = pc.index(col, dup).as_py()
        raise DataValidationError(f"{url}: column {key!r} row {row}: duplicate key value {dup!r}")


def _locate(table: pa.Table, files: list[str], row: int) -> tuple[str, int]:
    """(file, row in that file) of row ``row`` of a side table read by :func:`_read_all`."""
    sizes = np.array([int(x) for x in
                      table.schema.metadata[b"rectrain_file_rows"].decode().split(",")])
    i = int(np.searchsorted(np.cumsum(sizes), row, side="right"))
    return files[i], int(row - (np.cumsum(sizes)[i - 1] if i else 0))


def _null_list_elements(col) -> pa.Array:
    """Per row of a list column: whether the row's list holds a null element (bool array)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    flat_null = pc.is_null(pc.list_flatten(col)).to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(col).to_numpy()
    bad = np.zeros(n, dtype=bool)
    bad[parents[flat_null]] = True
    return pa.array(bad)


def _transform(f: FeatureSpec, col, where: str):
    """``apply_transform`` with errors that name the feature, source column, type and file."""
    try:
        out = apply_transform(col, f.transform)
        is_list = pa.types.is_list(out.type) or pa.types.is_large_list(out.type)
        if is_list != (f.kind == "multi_hot"):
            raise TypeError(f"a {f.kind} feature needs a {'list' if not is_list else 'scalar'} "
                            f"column, got {out.type}")
        if f.kind == "dense":
            out = pc.cast(out, pa.float64())
            # NaN/inf count as missing: imputed with the train mean (0 after normalisation)
            out = pc.if_else(pc.is_finite(out), out, pa.scalar(None, pa.float64()))
        return out
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, TypeError) as e:
        what = f"transform {f.transform.model_dump(exclude_defaults=True)}" if f.transform \
            else f"a {f.kind} feature"
        raise DataValidationError(
            f"{where}: column {f.source!r} ({col.type}) cannot be used for feature {f.name!r} "
            f"as {what}: {e}") from None


def _check_event_schemas(files: list[str], spec: DatasetSpec, feature_sources: list[str]
                         ) -> dict[str, pa.DataType]:
    """Read every events file's footer (no data) and check that the job's columns exist and
    have the same type in every file, naming the first file that disagrees. Integer widths
    may differ (compared as int64), and a column of type ``null`` (all values null in that
    file) agrees with any type: its rows are then caught by the per-row null checks.
    Returns each column's type (from the first file where it is not ``null``)."""
    needed = list(dict.fromkeys([spec.user_column, spec.item_column, spec.timestamp_column,
                                 spec.label.column] + feature_sources))
    first: dict[str, tuple[str, pa.DataType]] = {}
    for path in files:
        fs, p = storage.url_to_fs(path)
        try:
            with fs.open(p, "rb") as fh:
                pf = pq.ParquetFile(fh)
                schema, n = pf.schema_arrow, pf.metadata.num_rows
        except (pa.ArrowInvalid, OSError) as e:
            raise DataValidationError(f"{path}: cannot read as Parquet: {e}") from None
        if n == 0:
            continue  # an empty file's schema does not matter
        for c in needed:
            if c not in schema.names:
                why = " (a feature's source: it is in neither the users nor the items table " \
                      "either)" if c in feature_sources else ""
                raise DataValidationError(
                    f"{path}: missing column {c!r}{why}; the file has {schema.names}")
            ty = schema.field(c).type
            if pa.types.is_null(ty):
                continue
            if c == spec.timestamp_column and not pa.types.is_integer(ty):
                raise DataValidationError(f"{path}: column {c!r}: expected integer unix seconds, "
                                          f"got {ty}")
            if c == spec.label.column and not (pa.types.is_integer(ty) or pa.types.is_floating(ty)
                                               or pa.types.is_boolean(ty)):
                raise DataValidationError(f"{path}: column {c!r}: label must be numeric, got {ty}")
            if c in first and first[c][1] != ty:
                a, b = first[c][1], ty
                same_kind = ((pa.types.is_integer(a) and pa.types.is_integer(b))
                             or (pa.types.is_floating(a) and pa.types.is_floating(b)))
                if not same_kind:
                    raise DataValidationError(
                        f"{path}: column {c!r} has type {ty}, but {first[c][0]} has {first[c][1]}; "
                        f"all events files must agree")
            first.setdefault(c, (path, ty))
    return {c: ty for c, (_, ty) in first.items()}


def _source_of(f: FeatureSpec, spec: DatasetSpec, side: dict[str, pa.Table]) -> str:
    """Which table a (non-sequence) feature's source column lives in."""
    for role, key_col in (("users", spec.user_column), ("items", spec.item_column)):
        t = side.get(role)
        if t is not None and f.source in t.column_names:
            return role
    return "events"


# ----------------------------------------------------------------------------- per-file task
def _fail_or_mask(table: pa.Table, bad: pa.Array, path: str, col: str, problem: str,
                  policy: str, stats: Counter, reason: str,
                  remap: Counter | None = None) -> pa.Table:
    """Apply ``policy`` to the rows flagged in ``bad``: raise naming the first one
    (``error``), count them in ``remap[reason]`` and keep them (when ``remap`` is given, i.e.
    ``oov`` for a remappable problem), or count them in ``stats[reason]`` and drop them."""
    n_bad = pc.sum(bad).as_py() or 0
    if not n_bad:
        return table
    row_idx = pc.index(bad, True).as_py()
    if policy == "error":
        value = table[col][row_idx].as_py() if col in table.column_names else None
        row = table[_ROW][row_idx].as_py()
        raise DataValidationError(
            f"{path}: column {col!r} row {row}: {problem} (value {value!r}); "
            f"{n_bad} such row(s) in this file. Set dataset.on_invalid: skip to drop and count them."
        )
    if remap is not None:  # on_invalid: oov: keep the rows, count them as remapped
        remap[reason] += n_bad
        return table
    stats[reason] += n_bad
    return table.filter(pc.invert(bad))


def read_events_file(path: str, file_id: int, spec: DatasetSpec, event_cols: list[str],
                     side: dict[str, pa.Table], keys: dict[str, pa.Array],
                     event_vocabs: dict[str, pa.Array], features: list[dict],
                     num_buckets: int, col_types: dict[str, pa.DataType] | None = None
                     ) -> tuple[pa.Table, dict]:
    """Read, validate, label, join and encode one events file (runs as a Ray task).

    Returns ``(table, stats)`` where ``table`` has the encoded feature columns plus the meta
    columns and ``stats`` = ``{"file", "rows_read", "rows_used", "rejected": {reason: n},
    "remapped": {reason: n}}`` (remapped rows are used, with an unknown id or a null list
    element mapped to id 0, under ``on_invalid: oov``).
    Raises :class:`DataValidationError` with ``on_invalid: error``.
    """

    stats: Counter = Counter()
    remapped: Counter = Counter()
    feats = [FeatureSpec.model_validate(f) for f in features]
    t = storage.read_parquet(path)
    rows_read = t.num_rows
    required = [spec.user_column, spec.item_column, spec.timestamp_column, spec.label.column]
    # columns and their types were checked on every file's footer (_check_event_schemas)
    if rows_read == 0:
        return pa.table({}), {"file": path, "rows_read": 0, "rows_used": 0, "rejected": {},
                              "remapped": {}}
    t = t.select(list(dict.fromkeys(required + event_cols)))
    for c, ty in (col_types or {}).items():  # a column all null in this file: the others' type
        if c in t.column_names and pa.types.is_null(t[c].type):
            t = t.set_column(t.schema.get_field_index(c), c, pa.nulls(t.num_rows, ty))
    t = t.append_column(_ROW, pa.array(np.arange(rows_read, dtype=np.int64)))
    pol = spec.on_invalid
    oov = remapped if pol == "oov" else None
    for c in required:
        t = _fail_or_mask(t, pc.is_null(t[c]), path, c, "null value", pol, stats, f"null_{c}")
    for c in (spec.user_column, spec.item_column):
        if pa.types.is_uint64(t[c].type):  # raw ids are kept as int64 in the samples
            t = _fail_or_mask(t, pc.greater(t[c], pa.scalar(2**63 - 1, pa.uint64())), path, c,
                              "id above 2**63-1 (raw ids are stored as int64)", pol, stats,
                              "id_out_of_range")
        if pa.types.is_integer(t[c].type) and (spec.min_id is not None or spec.max_id is not None):
            ids = pc.cast(t[c], pa.int64()) if not pa.types.is_uint64(t[c].type) else t[c]
            lo = pc.less(ids, spec.min_id) if spec.min_id is not None else None
            hi = pc.greater(ids, spec.max_id) if spec.max_id is not None else None
            bad = lo if hi is None else hi if lo is None else pc.or_(lo, hi)
            t = _fail_or_mask(t, bad, path, c, f"id outside [{spec.min_id}, {spec.max_id}]",
                              pol, stats, "id_out_of_range")
    ts = t[spec.timestamp_column]
    if not pa.types.is_integer(ts.type):
        raise DataValidationError(
            f"{path}: column {spec.timestamp_column!r}: expected integer unix seconds, got {ts.type}"
        )
    if pa.types.is_unsigned_integer(ts.type):
        if ts.type == pa.uint64():  # the only unsigned type that can exceed int64
            t = _fail_or_mask(t, pc.greater(ts, pa.scalar(2**63 - 1, ts.type)), path,
                              spec.timestamp_column, "timestamp beyond int64", pol, stats,
                              "bad_timestamp")
        t = t.set_column(t.schema.get_field_index(spec.timestamp_column), spec.timestamp_column,
                         pc.cast(t[spec.timestamp_column], pa.int64()))
    t = _fail_or_mask(t, pc.less(t[spec.timestamp_column], 0), path, spec.timestamp_column,
                      "negative timestamp", pol, stats, "bad_timestamp")
    tsc = t[spec.timestamp_column]
    bad = pc.less(tsc, spec.min_timestamp)
    if spec.max_timestamp is not None:
        bad = pc.or_(bad, pc.greater(tsc, spec.max_timestamp))
    t = _fail_or_mask(t, bad, path, spec.timestamp_column,
                      f"timestamp outside [{spec.min_timestamp}, {spec.max_timestamp}]", pol, stats,
                      "bad_timestamp")
    lab = t[spec.label.column]
    if not (pa.types.is_integer(lab.type) or pa.types.is_floating(lab.type)
            or pa.types.is_boolean(lab.type)):
        raise DataValidationError(
            f"{path}: column {spec.label.column!r}: label must be numeric, got {lab.type}"
        )
    lab = pc.cast(lab, pa.float64())
    if spec.label.threshold is None:
        bad = pc.invert(pc.is_in(lab, value_set=pa.array([0.0, 1.0])))
        t = _fail_or_mask(t, bad, path, spec.label.column, "label not 0/1", pol, stats,
                          "label_out_of_domain")
        lab = pc.cast(t[spec.label.column], pa.float64())
    else:
        bad = pc.invert(pc.is_finite(lab))
        t = _fail_or_mask(t, bad, path, spec.label.column, "label not finite", pol, stats,
                          "label_out_of_domain")
        lab = pc.cast(t[spec.label.column], pa.float64())
    label = (pc.cast(pc.greater_equal(lab, spec.label.threshold), pa.float32())
             if spec.label.threshold is not None else pc.cast(lab, pa.float32()))
    t = t.append_column(LABEL, label)
    t = t.append_column(LABEL_VALUE, pc.cast(lab, pa.float32()))

    # join side tables by row index (vectorised; supports list columns)
    rows_of = {}
    for role, col in (("users", spec.user_column), ("items", spec.item_column)):
        if role in side:
            raw, key = t[col], keys[role]
            if pa.types.is_integer(raw.type) and pa.types.is_integer(key.type):
                raw, key = pc.cast(raw, pa.int64()), pc.cast(key, pa.int64())
            if raw.type != key.type:
                try:
                    raw = pc.cast(raw, key.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    raise DataValidationError(
                        f"{path}: column {col!r}: type {t[col].type} cannot match the {role} "
                        f"table key type {keys[role].type}"
                    ) from None
            idx = pc.index_in(raw, value_set=key)
            t = t.append_column(f"_{role}_row", idx)
            t = _fail_or_mask(t, pc.is_null(idx), path, col, f"id not in the {role} table", pol,
                              stats, f"unknown_{role[:-1]}", oov)
    for f in feats:
        if f.kind == "multi_hot" and f.source in t.column_names and f.name not in side.get(
                "users", pa.table({})).column_names + side.get("items", pa.table({})).column_names:
            col = t[f.source]
            if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                t = _fail_or_mask(t, _null_list_elements(col), path, f.source,
                                  "null element in a list", pol, stats,
                                  f"null_element_{f.source}", oov)
    for role in ("users", "items"):
        if f"_{role}_row" in t.column_names:  # read after all filters, so lengths agree
            rows_of[role] = t[f"_{role}_row"]
    out: dict[str, Any] = {}
    for f in feats:
        if f.kind in ("sequence", "text_embedding"):
            continue
        role = next((r for r in ("users", "items") if r in rows_of
                     and f.name in side.get(r, pa.table({})).column_names), None)
        if role is not None:
            col = side[role][f.name].take(rows_of[role])  # unknown id (oov): null -> id 0
            if f.kind == "sparse":
                col = pc.fill_null(col, 0)
            elif f.kind == "multi_hot":
                col = pc.fill_null(col, pa.scalar([], col.type))
            out[f.name] = col
        else:
            col = _transform(f, t[f.source], path)
            if f.kind == "dense":
                out[f.name] = col
            elif f.encoding == "hash":
                out[f.name] = hash_encode(col, f.hash_buckets)
            else:
                out[f.name] = encode(col, event_vocabs[f.name])
    if "users" in rows_of:
        uid = pc.add(pc.cast(rows_of["users"], pa.int64()), 1)
        if uid.null_count:  # oov users: a stable id above the users table, from the raw id
            other = pc.add(hash_encode(t[spec.user_column], 2**62), len(keys["users"]))
            uid = pc.if_else(pc.is_null(uid), other, uid)
    else:
        uid = encode(t[spec.user_column], event_vocabs[_UID])
    out[_UID] = uid
    out[_BUCKET] = pa.array(uid.to_numpy(zero_copy_only=False) % num_buckets)
    out[USER] = t[spec.user_column]
    out[ITEM] = t[spec.item_column]
    out[TS] = pc.cast(t[spec.timestamp_column], pa.int64())
    out[LABEL] = t[LABEL]
    out[LABEL_VALUE] = t[LABEL_VALUE]
    out[_FILE] = pa.array(np.full(t.num_rows, file_id, dtype=np.int32))
    out[_ROW] = t[_ROW]
    table = pa.table({k: (v.combine_chunks() if isinstance(v, pa.ChunkedArray) else v)
                      for k, v in out.items()})
    return table, {"file": path, "rows_read": rows_read, "rows_used": table.num_rows,
                   "schema": table.schema,
                   "rejected": dict(stats), "remapped": dict(remapped)}


# ----------------------------------------------------------------------------- sequences
def build_sequences(t: pa.Table, seq_features: list[tuple[str, str]], max_len: int,
                    n_test: int, n_valid: int) -> pa.Table:
    """Behaviour sequences and chronological split for whole users (vectorised).

    ``t`` holds all events of some users. Each user's events are ordered by
    ``(timestamp, file, row)``; event ``i`` of a user gets, for each ``(name, source)`` in
    ``seq_features``, the ``source`` ids of that user's up to ``max_len`` strictly earlier events,
    most recent last, as a ``list<int64>`` column ``name``. ``_pos`` is the event's 0-based
    position in its user's history; ``_split`` is 2 (test) for the user's last ``n_test``
    events, 1 (valid) for the ``n_valid`` before, else 0 (train).
    """
    if t.num_rows == 0:
        return t
    order = pc.sort_indices(t, sort_keys=[(_UID, "ascending"), (TS, "ascending"),
                                          (_FILE, "ascending"), (_ROW, "ascending")])
    t = t.take(order)
    uid = t[_UID].to_numpy()
    n = len(uid)
    is_start = np.empty(n, dtype=bool)
    is_start[0] = True
    np.not_equal(uid[1:], uid[:-1], out=is_start[1:])
    starts = np.flatnonzero(is_start)
    group = np.cumsum(is_start) - 1
    pos = np.arange(n, dtype=np.int64) - starts[group]
    sizes = np.diff(np.append(starts, n))
    from_end = sizes[group] - 1 - pos
    split = np.where(from_end < n_test, 2, np.where(from_end < n_test + n_valid, 1, 0))
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
    return t.drop_columns([_BUCKET, _FILE, _ROW])


def _bucket_parts(t: pa.Table, num_buckets: int) -> tuple[pa.Table, ...] | pa.Table:
    """One read task's table split by user bucket (see :func:`_deal`); the table itself when
    there is one bucket (a task with ``num_returns=1`` returns its value as one object)."""
    if num_buckets == 1:
        return t
    return _deal(t, t[_BUCKET].to_numpy(), num_buckets)


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
                     rows_per_file: int, *parts: pa.Table) -> tuple:
    """One user bucket: :func:`build_sequences` over all its events, valid/test rows written to
    ``out/{valid,test}/b<bucket>-K.parquet``, train rows dealt at random (``seed``, bucket)
    over ``n_parts`` tables. Every bucket's input is cast to ``schema`` (the read tables'
    unified schema), so all output files agree on column types whatever the raw files' widths.
    Returns ``(stats, part_0, ..., part_{n_parts-1})``; stats: rows per split, per dense
    feature the train count, mean and sum of squared deviations (combined across buckets by
    Chan et al.'s parallel formula, stable for large offsets) and nulls over all rows, the
    output schema."""
    parts = [p for p in parts if p.num_rows]
    stats = {"rows": {name: 0 for name in SPLITS}, "schema": None,
             "dense": {n: {"n": 0, "mean": 0.0, "m2": 0.0, "missing": 0} for n in dense_names}}
    if not parts:
        return (stats, *[None] * n_parts)
    t = pa.concat_tables([p.select(schema.names).cast(schema) for p in parts])
    t = build_sequences(t, seq_features, max_len, n_test, n_valid)
    split = t[SPLIT].to_numpy()
    body = t.drop_columns([SPLIT, _UID])
    stats["schema"] = {n: str(ty) for n, ty in zip(body.schema.names, body.schema.types)}
    for code, name in enumerate(SPLITS):
        stats["rows"][name] = int((split == code).sum())
    is_train = pa.array(split == 0)
    for n in dense_names:
        col = body[n]
        v = pc.filter(col, is_train).to_numpy(zero_copy_only=False).astype(np.float64)
        v = v[~np.isnan(v)]  # nulls come out as NaN
        mean = float(v.mean()) if v.size else 0.0
        stats["dense"][n] = {"n": int(v.size), "mean": mean,
                             "m2": float(((v - mean) ** 2).sum()), "missing": int(col.null_count)}
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


def _file_distincts(path: str, columns: list[str]) -> dict[str, pa.Array]:
    """Distinct values of each column of one events file (runs as a Ray task).

    List columns give their distinct elements; dictionary-encoded columns their decoded values;
    a null is kept as one value (a transform such as ``year`` maps it to a value of its own).
    An empty file gives ``{}`` (its columns may be missing: the footer check allows that).
    Returns ``{column: pa.Array}``.
    """
    fs, p = storage.url_to_fs(path)
    with fs.open(p, "rb") as fh:
        pf = pq.ParquetFile(fh)
        if pf.metadata.num_rows == 0:
            return {}
        t = pf.read(columns=columns)
    out = {}
    for c in columns:
        col = t[c].combine_chunks()
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            col = pc.list_flatten(col)
        if pa.types.is_dictionary(col.type):
            col = col.dictionary_decode()
        out[c] = pc.unique(col)
    return out


def _unfit_value_error(path: str, column: str, target: pa.DataType) -> DataValidationError:
    """The error for an events file whose ``column`` holds a value that ``target`` (the type
    the other files' values merge into, e.g. int64 when one file has uint64 above 2**63)
    cannot hold, naming the file, column, first such row and its value."""
    col = storage.read_parquet(path, columns=[column])[column].combine_chunks()
    is_list = pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
    flat = pc.list_flatten(col) if is_list else col
    if pa.types.is_dictionary(flat.type):
        flat = flat.dictionary_decode()
    i = -1
    if pa.types.is_integer(flat.type) and pa.types.is_integer(target):
        info = np.iinfo(target.to_pandas_dtype())
        v = pc.fill_null(flat, 0).to_numpy()
        bad = np.flatnonzero((v > info.max) | (v < info.min))
        i = int(bad[0]) if bad.size else -1
    row = (pc.list_parent_indices(col)[i].as_py() if is_list else i) if i >= 0 else None
    where = f"row {row}: value {col[row].as_py()!r}" if row is not None else "a value"
    return DataValidationError(f"{path}: column {column!r} {where} does not fit {target}, the "
                               f"type the events files' values are merged into")


def _event_distincts(files: list[str], columns: list[str], col_types: dict[str, pa.DataType]
                     ) -> dict[str, pa.Array]:
    """Distinct values of event-level columns over all ``files``: a Ray task per file
    (:func:`_file_distincts`), merged here, nulls included. Integer values come back as int64
    (uint64 stays uint64) and floats as float64, since files may differ in width; a list column
    comes back as ONE list row holding its distinct elements. (A Ray Data ``unique`` per column
    did this before; it re-read the files per column and ran Ray Data's executor in the
    driver; the vocabularies, encoded samples and hash reports are the same.)"""
    import ray

    task = ray.remote(_file_distincts)
    parts = ray.get([task.remote(f, columns) for f in files])
    out = {}
    for c in columns:
        ty = col_types.get(c, pa.null())
        is_list = pa.types.is_list(ty) or pa.types.is_large_list(ty)
        elem = ty.value_type if is_list else ty
        if pa.types.is_dictionary(elem):
            elem = elem.value_type
        target = (elem if pa.types.is_uint64(elem) else
                  pa.int64() if pa.types.is_integer(elem) else
                  pa.float64() if pa.types.is_floating(elem) else elem)
        arrays = []
        for path, p in zip(files, parts):
            if c in p and len(p[c]):
                try:
                    arrays.append(pc.cast(p[c], target))
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    raise _unfit_value_error(path, c, target) from None
        values = pc.unique(pa.concat_arrays(arrays)) if arrays else pa.array([], target)
        if is_list:
            values = pa.ListArray.from_arrays(pa.array([0, len(values)], pa.int32()), values)
            values = values.cast(pa.list_(target) if pa.types.is_list(ty)
                                 else pa.large_list(target))
        out[c] = values
    return out


# ----------------------------------------------------------------------------- driver
def prepare(cfg: JobConfig, num_buckets: int = 16, rows_per_file: int = 20_000) -> dict:
    """Run the prepare stage for ``cfg`` on the connected Ray cluster; returns the manifest.

    Writes under ``cfg.prepared_dir``: ``{train,valid,test}/*.parquet`` (train globally
    shuffled with ``cfg.train.seed``), ``catalog/{users,items}.parquet`` (encoded side
    features per id), ``vocab/<feature>.parquet`` (raw value -> id) and ``manifest.json``.

    Raises:
        DataValidationError: bad input under ``on_invalid: error`` (names file/column/row/value).
        FileNotFoundError: an input path does not exist.
    """
    import ray

    t0 = time.perf_counter()
    spec = cfg.dataset
    out = cfg.prepared_dir
    for what, url in (("dataset.events", spec.events), ("prepared_dir", out),
                      ("dataset.users.path", spec.users.path if spec.users else None),
                      ("dataset.items.path", spec.items.path if spec.items else None)):
        if url is not None:
            storage.require_shared(url, what)
    event_files, markers = storage.list_parquet_files(spec.events)
    side_raw: dict[str, pa.Table] = {}
    side_files: dict[str, list[str]] = {}
    for role, s in (("users", spec.users), ("items", spec.items)):
        if s is not None:
            side_raw[role], side_files[role] = _read_all(s.path, role)
            _check_key(side_raw[role], s.key, s.path)

    # encode side-table features once, in the driver
    feats = [f for f in cfg.features if f.kind not in ("sequence", "text_embedding")]
    roles = {f.name: _source_of(f, spec, side_raw) for f in feats}
    vocabs: dict[str, pa.Array] = {}
    side_enc: dict[str, dict[str, pa.Array]] = {r: {} for r in side_raw}
    keys: dict[str, pa.Array] = {}
    for role, s in (("users", spec.users), ("items", spec.items)):
        if s is not None:
            keys[role] = side_raw[role][s.key].combine_chunks()
    hashing: dict[str, dict] = {}
    side_null_elements: dict[str, int] = {}
    for f in feats:
        role = roles[f.name]
        if role == "events":
            continue
        where = spec.users.path if role == "users" else spec.items.path
        col = _transform(f, side_raw[role][f.source], where)
        if f.kind == "multi_hot":
            bad = _null_list_elements(col)
            n_bad = pc.sum(bad).as_py() or 0
            if n_bad and spec.on_invalid == "error":
                row = pc.index(bad, True).as_py()
                file, frow = _locate(side_raw[role], side_files[role], row)
                raise DataValidationError(
                    f"{file}: column {f.source!r} row {frow}: null element in a list (value "
                    f"{side_raw[role][f.source][row].as_py()!r}); {n_bad} such row(s) in the "
                    f"{role} table. Set dataset.on_invalid: oov to map them to id 0 and count them.")
            if n_bad:  # skip / oov: a side-table row cannot be dropped; its nulls encode to 0
                side_null_elements[f"{role}.{f.source}"] = n_bad
        if f.kind == "dense":
            side_enc[role][f.name] = col
        elif f.encoding == "hash":
            side_enc[role][f.name] = hash_encode(col, f.hash_buckets)
            hashing[f.name] = hash_collisions(col, f.hash_buckets)
        else:
            vocabs[f.name] = build_vocab(col)
            side_enc[role][f.name] = encode(col, vocabs[f.name])
    side_tables = {r: pa.table(c) for r, c in side_enc.items()}

    event_feats = [f for f in feats if roles[f.name] == "events"]
    col_types = _check_event_schemas(event_files, spec, [f.source for f in event_feats])

    # vocabularies of event-level columns: one pass, a Ray task per file
    need_uid = "users" not in side_raw
    # (hashed features need no vocabulary; their distinct values give the collision report)
    unique_cols = sorted({f.source for f in event_feats if f.kind != "dense"}
                         | ({spec.user_column} if need_uid else set()))
    event_vocabs: dict[str, pa.Array] = {}
    if unique_cols:
        distinct = _event_distincts(event_files, unique_cols, col_types)
        for c in unique_cols:
            uniq = distinct[c]
            for f in event_feats:
                if f.source == c and f.kind != "dense" and f.encoding == "hash":
                    hashing[f.name] = hash_collisions(_transform(f, uniq, spec.events),
                                                      f.hash_buckets)
                elif f.source == c and f.kind != "dense":
                    event_vocabs[f.name] = build_vocab(_transform(f, uniq, spec.events))
            if need_uid and c == spec.user_column:
                event_vocabs[_UID] = build_vocab(uniq)
        vocabs.update({k: v for k, v in event_vocabs.items() if k != _UID})

    # per-file read/validate/join/encode tasks
    read_task = ray.remote(num_returns=2)(read_events_file)
    side_ref = ray.put(side_tables)
    feats_dump = [f.model_dump() for f in cfg.features]
    event_cols = sorted({f.source for f in event_feats})
    refs = [read_task.remote(p, i, spec, event_cols, side_ref, keys, event_vocabs, feats_dump,
                             num_buckets, col_types) for i, p in enumerate(event_files)]
    table_refs = [r[0] for r in refs]
    # Results in file order, so a log with several bad files always names the first one in
    # listing order. On an error the other files' tasks are left to finish and their output is
    # dropped: ray.cancel here (plain or force=True) raced with task completion and killed this
    # process in Ray 2.60 ("Check failed: ... Tried to complete task that was not pending",
    # ray-project/ray#54846) in 3 of ~12 runs of the validation tests.
    file_stats = []
    for r in refs:
        try:
            file_stats.append(ray.get(r[1]))
        except ray.exceptions.RayTaskError as e:
            # surface the task's own error (file, column, row, value), not Ray's wrapper
            cause = e.cause if e.cause is not None else e
            raise (DataValidationError(str(cause)) if isinstance(cause, ValueError)
                   else cause) from None
    rejected: Counter = Counter()
    remapped: Counter = Counter()
    for s in file_stats:
        rejected.update(s["rejected"])
        remapped.update(s["remapped"])
    rows_read = sum(s["rows_read"] for s in file_stats)
    nonempty = [r for r, s in zip(table_refs, file_stats) if s["rows_used"]]
    if not nonempty:
        raise DataValidationError(f"{spec.events}: no usable event rows ({rows_read} read, "
                                  f"rejected {dict(rejected)})")
    t_read = time.perf_counter()
    storage.remove(out)  # only now: a job that fails validation leaves the last good output

    seq_features = [(f.name, f.source) for f in cfg.features if f.kind == "sequence"]
    dense_names = [f.name for f in cfg.features if f.kind == "dense"]
    # shuffle by user bucket with plain Ray tasks (no Ray Data all-to-all): each read task's
    # output is sliced per bucket; bucket task b sequences its users' events, writes its valid
    # and test rows and deals its train rows at random over P parts; write task p permutes part
    # p (from every bucket) and writes it: a seeded global shuffle of train, one pass
    n_parts = max(1, min(64, -(-sum(s["rows_used"] for s in file_stats) // rows_per_file)))
    part_task = ray.remote(_bucket_parts).options(num_returns=num_buckets)
    part_refs = [part_task.remote(r, num_buckets) for r in nonempty]
    if num_buckets == 1:
        part_refs = [[r] for r in part_refs]
    del table_refs, nonempty
    schema = pa.unify_schemas([s["schema"] for s in file_stats if s["rows_used"]],
                              promote_options="permissive")
    seq_task = ray.remote(_sequence_bucket).options(num_returns=n_parts + 1)
    bucket_refs = [seq_task.remote(b, out, schema, seq_features, spec.sequence_length,
                                   spec.split.test, spec.split.valid, dense_names, n_parts,
                                   cfg.train.seed, rows_per_file,
                                   *[parts[b] for parts in part_refs])
                   for b in range(num_buckets)]
    bucket_stats = ray.get([refs[0] for refs in bucket_refs])
    del part_refs
    t_seq = time.perf_counter()
    write_task = ray.remote(_write_train_part)
    train_files = ray.get([write_task.remote(storage.join(out, "train"), p, cfg.train.seed,
                                             rows_per_file, *[refs[1 + p] for refs in bucket_refs])
                           for p in range(n_parts)])
    del bucket_refs
    t_train = time.perf_counter()

    split_counts = {name: sum(b["rows"][name] for b in bucket_stats) for name in SPLITS}
    rows_used = sum(split_counts.values())
    n_rejected = sum(rejected.values())
    if rows_read != rows_used + n_rejected:
        raise AssertionError(f"row accounting broken: read {rows_read} != used {rows_used} + "
                             f"rejected {n_rejected}")
    files_per_split: dict[str, dict[str, int]] = {}
    for name in SPLITS:
        url = storage.join(out, name)
        files_per_split[name] = _file_rows(url) if storage.exists(url) else {}
        if sum(files_per_split[name].values()) != split_counts[name]:
            raise AssertionError(f"{name}: written rows differ from the counted rows")
    if sum(n for files in train_files for n in files.values()) != split_counts["train"]:
        raise AssertionError("train: shuffled parts differ from the counted rows")

    # normalisation stats for dense features (train split; nulls ignored, sample std ddof=1)
    dense_stats = {}
    for name in dense_names:
        n, mean, m2 = 0, 0.0, 0.0
        for b in bucket_stats:  # Chan, Golub & LeVeque's pairwise update
            nb, mb, m2b = b["dense"][name]["n"], b["dense"][name]["mean"], b["dense"][name]["m2"]
            if nb:
                delta = mb - mean
                n, mean, m2 = n + nb, mean + delta * nb / (n + nb), \
                    m2 + m2b + delta * delta * n * nb / (n + nb)
        std = float(np.sqrt(m2 / (n - 1))) if n > 1 else 0.0
        dense_stats[name] = {"mean": float(mean), "std": std if std else 1.0,
                             "missing_imputed": sum(b["dense"][name]["missing"]
                                                    for b in bucket_stats)}

    # catalog and vocabularies (for recommendation and for mapping ids back)
    for role, s in (("users", spec.users), ("items", spec.items)):
        if s is not None:
            cat = {**side_enc[role], (USER if role == "users" else ITEM): keys[role]}
            storage.write_parquet(pa.table(cat), storage.join(out, "catalog", f"{role}.parquet"))
    for name, v in vocabs.items():
        storage.write_parquet(pa.table({"value": v, "id": pa.array(np.arange(1, len(v) + 1))}),
                              storage.join(out, "vocab", f"{name}.parquet"))

    text_embeddings = _text_embeddings(cfg, side_raw, side_enc, vocabs, out)
    tables = {}
    for f in cfg.features:
        if f.kind in ("dense", "text_embedding"):
            continue
        src = f.source if f.kind == "sequence" else f.name
        tables.setdefault(f.table_name, 0)
        size = hashing[src]["buckets"] + 1 if src in hashing else len(vocabs[src]) + 1
        tables[f.table_name] = max(tables[f.table_name], size)
    schema = next(b["schema"] for b in bucket_stats if b["schema"] is not None)
    manifest = {
        "name": cfg.name,
        "schema": schema,
        "features": [{"name": f.name, "kind": f.kind, "table": f.table_name,
                      "num_embeddings": tables.get(f.table_name),
                      "pooling": f.pooling} for f in cfg.features],
        "tables": tables,
        "num_users": len(keys["users"]) if "users" in keys else len(event_vocabs[_UID]),
        "num_items": len(keys["items"]) if "items" in keys else None,
        "rows_read": rows_read,
        "rows_used": rows_used,
        "rows_rejected": n_rejected,
        "rejected_by_reason": dict(rejected),
        "rows_remapped": sum(remapped.values()),
        "remapped_by_reason": dict(remapped),
        "side_table_null_list_elements": side_null_elements,
        "hashing": hashing,
        "empty_files": [s["file"] for s in file_stats if s["rows_read"] == 0],
        "rows_per_split": split_counts,
        "files_per_split": files_per_split,
        "input_files": {s["file"]: {"rows_read": s["rows_read"], "rows_used": s["rows_used"],
                                    "rejected": s["rejected"], "remapped": s["remapped"]}
                        for s in file_stats},
        "skipped_markers": markers,
        "side_tables": {r: {"files": side_files[r], "rows": side_raw[r].num_rows}
                        for r in side_raw},
        "dense_stats": dense_stats,
        "text_embeddings": text_embeddings,
        "seconds": {"read_validate_join": round(t_read - t0, 3),
                    "sequences_split": round(t_seq - t_read, 3),
                    "shuffle_write_train": round(t_train - t_seq, 3),
                    "total": round(time.perf_counter() - t0, 3)},
        "config": cfg.model_dump(mode="json"),
    }
    storage.write_json(manifest, storage.join(out, "manifest.json"))
    log.info("prepared %s: %s", out, split_counts)
    return manifest


def _text_embeddings(cfg, side_raw, side_enc, vocabs, out) -> dict:
    """Item text -> sentence embeddings (Ray Data batch inference), see rectrain.data.text_embed."""
    if not any(f.kind == "text_embedding" for f in cfg.features):
        return {}
    from rectrain.data.text_embed import prepare_text_embeddings, text_feature_item_key

    key = text_feature_item_key(cfg)
    return prepare_text_embeddings(cfg, side_raw.get("items"), side_enc["items"].get(key),
                                   len(vocabs[key]), out)


def _file_rows(url: str) -> dict[str, int]:
    fs, path = storage.url_to_fs(url)
    rows = {}
    for p in sorted(fs.find(path)):
        if p.endswith(".parquet"):
            with fs.open(p, "rb") as f:
                rows[p if storage.is_local(fs) else fs.unstrip_protocol(p)] = \
                    pq.ParquetFile(f).metadata.num_rows
    return rows
