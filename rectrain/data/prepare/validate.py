"""Data-contract checks of the prepare stage (Arrow compute, vectorised).

Every check runs once: paths (shared storage), side-table keys, the events files' footers
(columns and types, before any data is read) and, per file, the row-level values (nulls, id
and timestamp ranges, label domain) under the job's ``dataset.on_invalid`` policy. Errors name
file, column, row and value.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rectrain.config import DatasetSpec, JobConfig
from rectrain.data import storage
from rectrain.data.schema import LABEL, LABEL_VALUE

ROW = "_row"  # 0-based row of an event in its own file (carried until the sequences stage)


class DataValidationError(ValueError):
    """A raw input violates the job's data contract; the message names file, column, row, value."""


def check_paths(cfg: JobConfig) -> None:
    """Every input and the output folder must be on storage all Ray nodes can read
    (:func:`rectrain.data.storage.require_shared`; the error names the config field)."""
    spec = cfg.dataset
    for what, url in (("dataset.events", spec.events), ("prepared_dir", cfg.prepared_dir),
                      ("dataset.users.path", spec.users.path if spec.users else None),
                      ("dataset.items.path", spec.items.path if spec.items else None)):
        if url is not None:
            storage.require_shared(url, what)


# ----------------------------------------------------------------------------- side tables
def read_side_table(url: str, what: str, key: str) -> tuple[pa.Table, list[str]]:
    """All Parquet files under ``url`` as one table (schemas promoted), its key column checked
    (:func:`check_key`); returns ``(table, files)``. The files' row counts ride in the schema
    metadata, so :func:`locate` can name the file of a bad row.

    Raises:
        DataValidationError: the files disagree on schema, or the key is missing/null/duplicate.
    """
    files, _ = storage.list_parquet_files(url)
    tables = [storage.read_parquet(f) for f in files]
    try:
        t = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DataValidationError(f"{what} {url}: files disagree on schema: {e}") from None
    t = t.replace_schema_metadata({"rectrain_file_rows": ",".join(
        str(x.num_rows) for x in tables)})
    check_key(t, key, url)
    return t, files


def check_key(table: pa.Table, key: str, url: str) -> None:
    """``key`` exists, has no null and no duplicate (the error names the first bad row)."""
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


def locate(table: pa.Table, files: list[str], row: int) -> tuple[str, int]:
    """(file, row in that file) of row ``row`` of a side table read by :func:`read_side_table`."""
    sizes = np.array([int(x) for x in
                      table.schema.metadata[b"rectrain_file_rows"].decode().split(",")])
    i = int(np.searchsorted(np.cumsum(sizes), row, side="right"))
    return files[i], int(row - (np.cumsum(sizes)[i - 1] if i else 0))


def null_list_elements(col) -> pa.Array:
    """Per row of a list column: whether the row's list holds a null element (bool array)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    flat_null = pc.is_null(pc.list_flatten(col)).to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(col).to_numpy()
    bad = np.zeros(n, dtype=bool)
    bad[parents[flat_null]] = True
    return pa.array(bad)


# ----------------------------------------------------------------------------- footers
def check_event_schemas(files: list[str], spec: DatasetSpec, feature_sources: list[str]
                        ) -> tuple[dict[str, pa.DataType], int]:
    """Read every events file's footer (no data) and check that the job's columns exist and
    have the same type in every file, naming the first file that disagrees. Integer widths
    may differ (compared as int64), and a column of type ``null`` (all values null in that
    file) agrees with any type: its rows are then caught by the per-row null checks.
    Returns each column's type (from the first file where it is not ``null``) and the rows of
    all the files (from the footers).

    Raises:
        DataValidationError: a file is not Parquet, lacks a column or has a wrong type; or no
            file holds a row (``dataset.events`` names them): an empty log cannot give the
            valid and test splits, and prepare stops before removing the last output.
    """
    needed = list(dict.fromkeys([spec.user_column, spec.item_column, spec.timestamp_column,
                                 spec.label.column] + feature_sources))
    first: dict[str, tuple[str, pa.DataType]] = {}
    rows = 0
    for path in files:
        fs, p = storage.url_to_fs(path)
        try:
            with fs.open(p, "rb") as fh:
                pf = pq.ParquetFile(fh)
                schema, n = pf.schema_arrow, pf.metadata.num_rows
        except (pa.ArrowInvalid, OSError) as e:
            raise DataValidationError(f"{path}: cannot read as Parquet: {e}") from None
        rows += n
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
    if rows == 0:
        shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        raise DataValidationError(
            f"dataset.events {spec.events}: no events: " + (
                f"every events file has 0 rows ({len(files)} file(s): {shown})" if files else
                "no events file") + "; point dataset.events at a log with events")
    return {c: ty for c, (_, ty) in first.items()}, rows


# ----------------------------------------------------------------------------- rows
def fail_or_mask(table: pa.Table, bad: pa.Array, path: str, col: str, problem: str,
                 policy: str, stats: Counter, reason: str,
                 remap: Counter | None = None) -> pa.Table:
    """Apply ``policy`` to the rows flagged in ``bad``: raise naming the first one
    (``error``), count them in ``remap[reason]`` and keep them (when ``remap`` is given, i.e.
    ``oov`` for a remappable problem), or count them in ``stats[reason]`` and drop them.
    ``table`` must carry the :data:`ROW` column (the row's index in its file)."""
    n_bad = pc.sum(bad).as_py() or 0
    if not n_bad:
        return table
    row_idx = pc.index(bad, True).as_py()
    if policy == "error":
        value = table[col][row_idx].as_py() if col in table.column_names else None
        row = table[ROW][row_idx].as_py()
        raise DataValidationError(
            f"{path}: column {col!r} row {row}: {problem} (value {value!r}); "
            f"{n_bad} such row(s) in this file. Set dataset.on_invalid: skip to drop and count them."
        )
    if remap is not None:  # on_invalid: oov: keep the rows, count them as remapped
        remap[reason] += n_bad
        return table
    stats[reason] += n_bad
    return table.filter(pc.invert(bad))


def drop_null_required(t: pa.Table, path: str, spec: DatasetSpec, stats: Counter) -> pa.Table:
    """Apply ``on_invalid`` to rows with a null user, item, timestamp or label."""
    for c in (spec.user_column, spec.item_column, spec.timestamp_column, spec.label.column):
        t = fail_or_mask(t, pc.is_null(t[c]), path, c, "null value", spec.on_invalid, stats,
                         f"null_{c}")
    return t


def check_event_values(t: pa.Table, path: str, spec: DatasetSpec, stats: Counter) -> pa.Table:
    """Row-level checks of one events file's ids, timestamps and labels, after
    :func:`drop_null_required` and with types already checked on the footer
    (:func:`check_event_schemas`). Appends :data:`~rectrain.data.schema.LABEL` (float32: 0/1, or
    ``value >= threshold``) and :data:`~rectrain.data.schema.LABEL_VALUE` (the raw label as
    float32); the timestamp column comes back as int64 unix seconds.

    Raises:
        DataValidationError: a bad row under ``on_invalid: error``.
    """
    pol, ts_col = spec.on_invalid, spec.timestamp_column
    for c in (spec.user_column, spec.item_column):
        if pa.types.is_uint64(t[c].type):  # raw ids are kept as int64 in the samples
            t = fail_or_mask(t, pc.greater(t[c], pa.scalar(2**63 - 1, pa.uint64())), path, c,
                             "id above 2**63-1 (raw ids are stored as int64)", pol, stats,
                             "id_out_of_range")
        if pa.types.is_integer(t[c].type) and (spec.min_id is not None or spec.max_id is not None):
            ids = pc.cast(t[c], pa.int64()) if not pa.types.is_uint64(t[c].type) else t[c]
            lo = pc.less(ids, spec.min_id) if spec.min_id is not None else None
            hi = pc.greater(ids, spec.max_id) if spec.max_id is not None else None
            bad = lo if hi is None else hi if lo is None else pc.or_(lo, hi)
            t = fail_or_mask(t, bad, path, c, f"id outside [{spec.min_id}, {spec.max_id}]",
                             pol, stats, "id_out_of_range")
    ts = t[ts_col]
    if pa.types.is_unsigned_integer(ts.type):
        if ts.type == pa.uint64():  # the only unsigned type that can exceed int64
            t = fail_or_mask(t, pc.greater(ts, pa.scalar(2**63 - 1, ts.type)), path, ts_col,
                             "timestamp beyond int64", pol, stats, "bad_timestamp")
        t = t.set_column(t.schema.get_field_index(ts_col), ts_col, pc.cast(t[ts_col], pa.int64()))
    t = fail_or_mask(t, pc.less(t[ts_col], 0), path, ts_col, "negative timestamp", pol, stats,
                     "bad_timestamp")
    tsc = t[ts_col]
    bad = pc.less(tsc, spec.min_timestamp)
    if spec.max_timestamp is not None:
        bad = pc.or_(bad, pc.greater(tsc, spec.max_timestamp))
    t = fail_or_mask(t, bad, path, ts_col,
                     f"timestamp outside [{spec.min_timestamp}, {spec.max_timestamp}] (unix "
                     f"seconds; dataset.min_timestamp / dataset.max_timestamp)", pol, stats,
                     "bad_timestamp")
    lab = pc.cast(t[spec.label.column], pa.float64())
    if spec.label.threshold is None:
        bad = pc.invert(pc.is_in(lab, value_set=pa.array([0.0, 1.0])))
        problem = "label not 0/1"
    else:
        bad = pc.invert(pc.is_finite(lab))
        problem = "label not finite"
    t = fail_or_mask(t, bad, path, spec.label.column, problem, pol, stats, "label_out_of_domain")
    lab = pc.cast(t[spec.label.column], pa.float64())
    label = (pc.cast(pc.greater_equal(lab, spec.label.threshold), pa.float32())
             if spec.label.threshold is not None else pc.cast(lab, pa.float32()))
    t = t.append_column(LABEL, label)
    return t.append_column(LABEL_VALUE, pc.cast(lab, pa.float32()))
