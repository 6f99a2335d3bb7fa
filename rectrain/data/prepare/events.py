"""The per-file stage of prepare: read, validate, label, join and encode one events file
(a Ray task per file), and the driver side that runs the tasks and sums their counts.

Side tables are joined by row index (``pc.index_in`` of the event's id in the side table's
key column), so list-valued side features are taken, not re-encoded, per event.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rectrain.config import DatasetSpec, FeatureSpec, JobConfig
from rectrain.data import storage
from rectrain.data.encode import encode, hash_encode, oov_count
from rectrain.data.prepare.rawids import raw_id_encode
from rectrain.data.prepare.validate import (ROW, DataValidationError, check_event_values,
                                            drop_null_required, fail_or_mask, null_list_elements)
from rectrain.data.prepare.vocab import UID, SideTables, Vocabularies, transform
from rectrain.data.schema import ITEM, LABEL, LABEL_VALUE, TS, USER

BUCKET, FILE = "_bucket", "_file"  # user bucket of a row; index of its events file
#: key prefix, in a task's ``null_values`` counts, of a feature's values sent to the OOV row
#: (moved to the manifest's ``vocab_growth`` by :func:`read_events`)
OOV_PREFIX = "oov:"


def read_events_file(path: str, file_id: int, spec: DatasetSpec, event_cols: list[str],
                     side: dict[str, pa.Table], keys: dict[str, pa.Array],
                     event_vocabs: dict[str, pa.Array], features: list[dict],
                     num_buckets: int, col_types: dict[str, pa.DataType] | None = None
                     ) -> tuple[pa.Table, dict]:
    """Read, validate, label, join and encode one events file (runs as a Ray task).

    ``side``: role -> encoded side features (one row per key, in ``keys[role]`` order);
    ``col_types``: each column's type over all files (a column all null in this file gets it).
    Returns ``(table, stats)`` where ``table`` has the encoded feature columns plus the meta
    columns and ``stats`` = ``{"file", "rows_read", "rows_used", "rejected": {reason: n},
    "remapped": {reason: n}}`` (remapped rows are used, with an unknown id or a null list
    element mapped to id 0, under ``on_invalid: oov``) and, for a file with used rows, its
    ``"schema"``. Column types were checked on every file's footer
    (:func:`~rectrain.data.prepare.validate.check_event_schemas`).
    Raises :class:`DataValidationError` with ``on_invalid: error``.
    """
    return _file_table(storage.read_parquet(path), path, file_id, spec, event_cols, side, keys,
                       event_vocabs, features, num_buckets, col_types)


def _file_table(t: pa.Table, path: str, file_id: int, *args) -> tuple[pa.Table, dict]:
    """:func:`read_events_file` on file ``path`` already read as ``t``."""
    if t.num_rows == 0:
        return pa.table({}), {"file": path, "rows_read": 0, "rows_used": 0, "rejected": {},
                              "remapped": {}}
    return _events_table(t, path, pa.array(np.arange(t.num_rows, dtype=np.int64)),
                         pa.array(np.full(t.num_rows, file_id, dtype=np.int32)), *args)


def _events_table(t: pa.Table, path: str, rows: pa.Array, file_ids: pa.Array, spec: DatasetSpec,
                  event_cols: list[str], side: dict[str, pa.Table], keys: dict[str, pa.Array],
                  event_vocabs: dict[str, pa.Array], features: list[dict], num_buckets: int,
                  col_types: dict[str, pa.DataType] | None) -> tuple[pa.Table, dict]:
    """:func:`read_events_file` on a table already read: ``rows`` (int64) is each row's index
    in its own file and ``file_ids`` (int32) its file's index; ``path`` names it in errors."""
    stats: Counter = Counter()
    remapped: Counter = Counter()
    feats = [FeatureSpec.model_validate(f) for f in features]
    rows_read = t.num_rows
    required = [spec.user_column, spec.item_column, spec.timestamp_column, spec.label.column]
    empty = {"file": path, "rows_read": rows_read, "rows_used": 0, "rejected": {}, "remapped": {}}
    t = t.select(list(dict.fromkeys(required + event_cols)))
    for c, ty in (col_types or {}).items():  # a column all null in this file: the others' type
        if c in t.column_names and pa.types.is_null(t[c].type):
            t = t.set_column(t.schema.get_field_index(c), c, pa.nulls(t.num_rows, ty))
    t = t.append_column(ROW, rows).append_column(FILE, file_ids)
    t = drop_null_required(t, path, spec, stats)
    if t.num_rows == 0:  # every row had a null required value (a column of type null included)
        return pa.table({}), {**empty, "rejected": dict(stats)}
    t = check_event_values(t, path, spec, stats)
    oov = remapped if spec.on_invalid == "oov" else None
    t = _join_rows(t, path, spec, side, keys, stats, oov)
    side_cols = {n for tb in side.values() for n in tb.column_names}
    for f in feats:
        if f.kind == "multi_hot" and f.source in t.column_names and f.name not in side_cols:
            col = t[f.source]
            if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                t = fail_or_mask(t, null_list_elements(col), path, f.source,
                                 "null element in a list", spec.on_invalid, stats,
                                 f"null_element_{f.source}", oov)
    rows_of = {role: t[f"_{role}_row"] for role in ("users", "items")
               if f"_{role}_row" in t.column_names}  # read after all filters: lengths agree
    nulls: Counter = Counter()
    out = _encode_features(t, path, feats, side, rows_of, event_vocabs, nulls)
    if "users" in rows_of:
        uid = pc.add(pc.cast(rows_of["users"], pa.int64()), 1)
        if uid.null_count:  # oov users: a stable id above the users table, from the raw id
            other = pc.add(hash_encode(t[spec.user_column], 2**62), len(keys["users"]))
            uid = pc.if_else(pc.is_null(uid), other, uid)
    else:
        uid = encode(t[spec.user_column], event_vocabs[UID])
    out[UID] = uid
    out[BUCKET] = pa.array(uid.to_numpy(zero_copy_only=False) % num_buckets)
    out[USER] = t[spec.user_column]
    out[ITEM] = t[spec.item_column]
    out[TS] = pc.cast(t[spec.timestamp_column], pa.int64())
    out[LABEL] = t[LABEL]
    out[LABEL_VALUE] = t[LABEL_VALUE]
    out[FILE] = t[FILE]
    out[ROW] = t[ROW]
    table = pa.table({k: (v.combine_chunks() if isinstance(v, pa.ChunkedArray) else v)
                      for k, v in out.items()})
    return table, {"file": path, "rows_read": rows_read, "rows_used": table.num_rows,
                   "schema": table.schema,
                   "rejected": dict(stats), "remapped": dict(remapped),
                   "null_values": dict(nulls)}


def read_events_group(paths: list[str], file_ids: list[int], spec: DatasetSpec,
                      event_cols: list[str], side: dict[str, pa.Table],
                      keys: dict[str, pa.Array], event_vocabs: dict[str, pa.Array],
                      features: list[dict], num_buckets: int,
                      col_types: dict[str, pa.DataType] | None = None) -> tuple[pa.Table, dict]:
    """:func:`read_events_file` over a group of events files in one Ray task (see
    :mod:`.readtasks`). Files whose job columns have one schema go through the checks and
    encoding as one table; when that rejects or remaps a row, or raises, or the schemas
    differ, the group is done file by file, so counts per file and errors (the first bad
    file's own message) are exactly those of one task per file. Returns ``(table, stats)``:
    the group's rows (file order) and ``{"files": [read_events_file's stats per file],
    "null_values": {...}}``.
    """
    needed = list(dict.fromkeys([spec.user_column, spec.item_column, spec.timestamp_column,
                                 spec.label.column] + event_cols))
    tables = [storage.read_parquet(p) for p in paths]
    full = [i for i, t in enumerate(tables) if t.num_rows]
    blank = {"rows_read": 0, "rows_used": 0, "rejected": {}, "remapped": {}}
    if len(full) > 1 and all(set(needed) <= set(tables[i].column_names) for i in full):
        parts = [tables[i].select(needed) for i in full]
        if all(p.schema == parts[0].schema for p in parts):
            n = np.array([p.num_rows for p in parts])
            rows = np.arange(n.sum(), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
            fids = np.repeat(np.array([file_ids[i] for i in full], dtype=np.int32), n)
            one = pa.concat_tables(parts).combine_chunks()
            try:
                table, st = _events_table(one, paths[full[0]], pa.array(rows), pa.array(fids),
                                          spec, event_cols, side, keys, event_vocabs, features,
                                          num_buckets, col_types)
            except (ValueError, pa.ArrowException):
                st = None  # redone file by file below, which names the file and row
            if st is not None and not st["rejected"] and not st["remapped"]:
                files = [{"file": p, **blank} for p in paths]
                for i, k in zip(full, n):
                    files[i].update(rows_read=int(k), rows_used=int(k), schema=table.schema)
                return table, {"files": files, "null_values": st.get("null_values", {}),
                               "ts": _ts_range(table)}
    outs = [_file_table(t, p, i, spec, event_cols, side, keys, event_vocabs, features,
                        num_buckets, col_types) for t, p, i in zip(tables, paths, file_ids)]
    nulls: Counter = Counter()
    for _, st in outs:
        nulls.update(st.pop("null_values", {}))
    used = [t for t, st in outs if st["rows_used"]]
    table = (pa.concat_tables(used, promote_options="permissive") if len(used) > 1
             else used[0] if used else pa.table({}))
    return table, {"files": [st for _, st in outs], "null_values": dict(nulls),
                   "ts": _ts_range(table)}


def _ts_range(table: pa.Table) -> list[int] | None:
    """[min, max] of the read rows' timestamps (unix s), None without rows."""
    if not table.num_rows:
        return None
    mm = pc.min_max(table[TS])
    return [mm["min"].as_py(), mm["max"].as_py()]


def _join_rows(t: pa.Table, path: str, spec: DatasetSpec, side: dict[str, pa.Table],
               keys: dict[str, pa.Array], stats: Counter, oov: Counter | None) -> pa.Table:
    """Append ``_<role>_row`` (int32: the event's row in each side table; null when unknown)
    and apply ``on_invalid`` to unknown ids."""
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
            t = fail_or_mask(t, pc.is_null(idx), path, col, f"id not in the {role} table",
                             spec.on_invalid, stats, f"unknown_{role[:-1]}", oov)
    return t


def _encode_features(t: pa.Table, path: str, feats: list[FeatureSpec],
                     side: dict[str, pa.Table], rows_of: dict[str, pa.Array],
                     event_vocabs: dict[str, pa.Array], nulls: Counter) -> dict[str, Any]:
    """Feature columns of the surviving rows: side features taken by row, event features
    transformed and encoded (vocabulary or hash). ``nulls`` counts, per ``events.<feature>``,
    the rows whose event-level value was null (encoded as id 0, or an empty list)."""
    out: dict[str, Any] = {}
    for f in feats:
        if f.kind in ("sequence", "text_embedding", "match"):
            continue
        role = next((r for r in ("users", "items") if r in rows_of
                     and f.name in side[r].column_names), None)
        if role is not None:
            col = side[role][f.name].take(rows_of[role])  # unknown id (oov): null -> id 0
            if f.kind == "sparse":
                col = pc.fill_null(col, 0)
            elif f.kind == "multi_hot":
                col = pc.fill_null(col, pa.scalar([], col.type))
            out[f.name] = col
        else:
            col = transform(f, t[f.source], path)
            if f.kind != "dense" and col.null_count:  # dense nulls: dense_stats' imputed count
                nulls[f"events.{f.name}"] += col.null_count
            if f.kind == "dense":
                out[f.name] = col
            elif f.encoding == "hash":
                out[f.name] = hash_encode(col, f.hash_buckets)
            elif f.encoding == "zch":
                out[f.name] = raw_id_encode(col)
            else:
                out[f.name] = encode(col, event_vocabs[f.name])
                if f.capacity is not None:  # values the full table had no row for
                    n_oov = oov_count(col, out[f.name])
                    if n_oov:
                        nulls[f"{OOV_PREFIX}{f.name}"] += n_oov
    return out


@dataclass
class EventCounts:
    """The per-file tasks' results: their stats (file order), the refs of the tables with
    used rows, and the sums over files."""

    file_stats: list[dict]
    tables: list  # ray.ObjectRef of each read task's table that has used rows
    rows_read: int
    rejected: Counter
    remapped: Counter
    null_values: Counter  # "events.<feature>" -> rows with a null value (id 0 / empty list)
    ts_range: list[int] | None = None  # [min, max] timestamp of the used rows (unix s)


def read_events(cfg: JobConfig, files: list[str], side: SideTables, vocab: Vocabularies,
                col_types: dict[str, pa.DataType], event_feats: list[FeatureSpec],
                num_buckets: int, groups: list[list[int]] | None = None) -> EventCounts:
    """Run :func:`read_events_group` as a Ray task per group of files (``groups``: indices
    into ``files``, from :func:`.readtasks.group_files`; default one file per task) and sum
    the counts.

    Raises:
        DataValidationError: the first file in listing order with a bad row (the task's own
            message), or no usable row in any file.
    """
    import ray

    spec = cfg.dataset
    read_task = ray.remote(num_returns=2)(read_events_group)
    side_ref = ray.put({r: pa.table(c) for r, c in side.encoded.items()})
    feats_dump = [f.model_dump() for f in cfg.features]
    event_cols = sorted({f.source for f in event_feats})
    groups = groups if groups is not None else [[i] for i in range(len(files))]
    refs = [read_task.remote([files[i] for i in g], g, spec, event_cols, side_ref, side.keys,
                             vocab.event, feats_dump, num_buckets, col_types) for g in groups]
    # Results in file order, so a log with several bad files always names the first one in
    # listing order. On an error the other files' tasks are left to finish and their output is
    # dropped: ray.cancel here (plain or force=True) raced with task completion and killed this
    # process in Ray 2.60 ("Check failed: ... Tried to complete task that was not pending",
    # ray-project/ray#54846) in 3 of ~12 runs of the validation tests.
    group_stats = []
    for r in refs:
        try:
            group_stats.append(ray.get(r[1]))
        except ray.exceptions.RayTaskError as e:
            # surface the task's own error (file, column, row, value), not Ray's wrapper
            cause = e.cause if e.cause is not None else e
            raise (DataValidationError(str(cause)) if isinstance(cause, ValueError)
                   else cause) from None
    file_stats = [st for g in group_stats for st in g["files"]]
    rejected: Counter = Counter()
    remapped: Counter = Counter()
    nulls: Counter = Counter()
    for s in file_stats:
        rejected.update(s["rejected"])
        remapped.update(s["remapped"])
    oov: Counter = Counter()
    for g in group_stats:
        for k, n in g["null_values"].items():
            (oov if k.startswith(OOV_PREFIX) else nulls)[k.removeprefix(OOV_PREFIX)] += n
    for name, n in oov.items():
        vocab.growth[name]["oov_rows"] += n
    rows_read = sum(s["rows_read"] for s in file_stats)
    nonempty = [r[0] for r, g in zip(refs, group_stats) if any(s["rows_used"] for s in g["files"])]
    if not nonempty:
        raise DataValidationError(f"{spec.events}: no usable event rows ({rows_read} read, "
                                  f"rejected {dict(rejected)})")
    ranges = [g["ts"] for g in group_stats if g.get("ts")]
    ts_range = [min(r[0] for r in ranges), max(r[1] for r in ranges)] if ranges else None
    return EventCounts(file_stats, nonempty, rows_read, rejected, remapped, nulls, ts_range)
