"""Prepared samples checked at the trainer's door, against the manifest's embedding tables.

Prepared Parquet may be written or edited by a user's own code, so every batch is checked
before it reaches the model (:meth:`rectrain.data.features.FeatureLayout.to_batch`), and every
prepared file as it is read by the file-reading paths (``FileShard``, the deterministic order
``data/order.py``, ``read_split`` for serving), where the error can name the file:

- id columns have an integer type (scalar for ``sparse``, a list of integers for ``multi_hot`` /
  ``sequence``), the same in every file;
- no null id, and no null element inside a list (a null *list* is an empty one);
- ``0 <= id < table size``: FBGEMM's bounds check would zero an id at or beyond its table in
  sharded training, and an unsharded lookup fails with a bare ``IndexError``;
- no null or NaN label.

Vectorised: per id column one ``min``/``max`` over the Arrow buffer (zero-copy numpy view) and
the Arrow null counts; the row of a finding is looked up only once one is found.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rectrain.data import storage

#: column -> (feature kind, table name, table rows)
Bounds = dict[str, tuple[str, str, int]]

_HINT = ("the prepared data no longer matches its manifest.json: run `rectrain prepare` again, "
         "or fix the code that wrote these files")


class PreparedDataError(ValueError):
    """A prepared file or batch the model cannot take; the message names the file (when known),
    column, row and value."""


def bounds_from_manifest(manifest: dict) -> Bounds:
    """:data:`Bounds` of the manifest's ``features`` (empty for a manifest without them)."""
    return {f["name"]: (f["kind"], f["table"], int(f["num_embeddings"]))
            for f in manifest.get("features", [])
            if f.get("num_embeddings") is not None and not f.get("raw_ids") and f["kind"] in
            ("sparse", "multi_hot", "sequence")}


def prepared_bounds(prepared_dir: str) -> Bounds:
    """:data:`Bounds` from ``prepared_dir/manifest.json`` (empty when there is none)."""
    url = storage.join(prepared_dir, "manifest.json")
    return bounds_from_manifest(storage.read_json(url)) if storage.exists(url) else {}


def _is_list(ty: pa.DataType) -> bool:
    return pa.types.is_list(ty) or pa.types.is_large_list(ty)


def _fail(source: str, name: str, row: int, what: str) -> None:
    raise PreparedDataError(f"{source}: column '{name}' row {row}: {what}; {_HINT}")


def _check_type(source: str, name: str, kind: str, ty: pa.DataType) -> None:
    if kind == "sparse":
        ok = pa.types.is_integer(ty)
    else:
        ok = _is_list(ty) and pa.types.is_integer(ty.value_type)
    if not ok:
        want = "an integer id" if kind == "sparse" else "a list of integer ids"
        raise PreparedDataError(f"{source}: column '{name}' has type {ty}; a {kind} feature "
                                f"needs {want} (int64 or list<int64>); {_HINT}")


def _check_chunk(source: str, name: str, spec: tuple[str, str, int], col: pa.Array,
                 offset: int) -> None:
    kind, table, size = spec
    if _is_list(col.type):
        values = col.flatten()  # respects slicing; null lists contribute nothing
        if values.null_count:
            bad = int(pc.index(pc.is_null(values), True).as_py())
            starts = np.cumsum(pc.fill_null(pc.list_value_length(col), 0).to_numpy())
            row = int(np.searchsorted(starts, bad, side="right"))
            _fail(source, name, offset + row, f"null element inside the list (value "
                                              f"{col[row].as_py()})")
    else:
        values = col
        if values.null_count:
            row = int(pc.index(pc.is_null(values), True).as_py())
            _fail(source, name, offset + row, "null id (value None)")
    v = values.to_numpy(zero_copy_only=False)
    if not v.size:
        return
    lo, hi = v.min(), v.max()
    if lo >= 0 and hi < size:
        return
    bad = int(np.flatnonzero((v < 0) | (v >= size))[0])
    row = bad
    if _is_list(col.type):
        starts = np.cumsum(pc.fill_null(pc.list_value_length(col), 0).to_numpy())
        row = int(np.searchsorted(starts, bad, side="right"))
    what = "negative id" if v[bad] < 0 else "id at or beyond its table's size"
    _fail(source, name, offset + row, f"{what} (value {int(v[bad])}); embedding table "
                                      f"'{table}' has {size} rows (ids 0..{size - 1})")


def check_table(table: pa.Table | pa.RecordBatch, bounds: Bounds, source: str = "batch",
                label: str | None = None) -> None:
    """Check the id columns named in ``bounds`` (and the ``label`` column, when given) of
    ``table``; rows are counted from 0 within ``table`` (a file or a batch, per ``source``).

    Raises:
        PreparedDataError: the first finding, naming ``source``, column, row and value.
    """
    for name, spec in bounds.items():
        if name not in table.column_names:
            continue
        col = table.column(name)
        _check_type(source, name, spec[0], col.type)
        chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
        offset = 0
        for chunk in chunks:
            _check_chunk(source, name, spec, chunk, offset)
            offset += len(chunk)
    if label is not None and label in table.column_names:
        y = table.column(label)
        if y.null_count:
            row = int(pc.index(pc.is_null(y), True).as_py())
            _fail(source, label, row, "null label (value None)")
        arr = y.to_numpy() if isinstance(y, pa.ChunkedArray) else y.to_numpy(
            zero_copy_only=False)
        if pa.types.is_floating(y.type) and np.isnan(arr).any():
            _fail(source, label, int(np.flatnonzero(np.isnan(arr))[0]), "NaN label (value nan)")


def parent(url: str) -> str:
    """The folder above ``url`` (a split folder's prepared folder)."""
    return url.rstrip("/").rsplit("/", 1)[0]


def type_differs(f: str, name: str, ty, first_file: str, first_ty) -> PreparedDataError:
    """The error for column ``name`` of file ``f`` having type ``ty`` where the split's first
    file ``first_file`` has ``first_ty`` (None: lacks the column)."""
    return PreparedDataError(f"{f}: column '{name}' has type {ty}, but {first_file} has "
                             f"{first_ty}: every prepared file of a split needs the same "
                             f"schema; {_HINT}")


def require_columns(f: str, schema: pa.Schema, columns, prepared_dir: str) -> None:
    """``f`` (whose footer schema is ``schema``) holds every one of the job's ``columns``.

    Raises:
        PreparedDataError: naming the file and the columns it lacks.
    """
    missing = [c for c in columns or () if c not in schema.names]
    if missing:
        hint = (f" (match features and model.time_bias: true read the event times _ts "
                f"and _hist_ts, which prepare writes only for such jobs; {prepared_dir} "
                f"was prepared without them)" if "_hist_ts" in missing else "")
        raise PreparedDataError(f"{f}: no column {missing}, which this job reads; run "
                                f"`rectrain prepare` with this job's features{hint}")


def read_checked(files: list[str], columns: list[str] | None, bounds: Bounds,
                 use_threads: bool = True) -> pa.Table:
    """The prepared ``files`` read (``columns``; ``use_threads``: on pyarrow's thread pool),
    each checked (:func:`check_table`, rows counted within the file), as one table (every
    column nullable: files that differ only in which columns are marked required concatenate).

    Raises:
        PreparedDataError: a finding in a file, or two files whose schemas differ (names the
            file, column and both types).
    """
    tables = []
    for f in files:
        t = storage.read_parquet(f, columns, use_threads)
        if any(not x.nullable for x in t.schema):
            # a writer's "required" columns: the same data as another writer's optional ones
            # (zero-copy), which would otherwise differ in schema and not concatenate
            t = t.cast(pa.schema([x.with_nullable(True) for x in t.schema], t.schema.metadata))
        check_table(t, bounds, f"{f}")
        if tables and t.schema != tables[0].schema:
            first = tables[0].schema
            for field in t.schema:
                other = first.field(field.name).type if field.name in first.names else None
                if other != field.type:
                    raise type_differs(f, field.name, field.type, files[0], other)
            missing = [n for n in first.names if n not in t.schema.names]
            raise PreparedDataError(f"{f}: columns {missing or t.schema.names} differ from "
                                    f"{files[0]}; {_HINT}")
        tables.append(t)
    return pa.concat_tables(tables)


def check_footers(prepared_dir: str, bounds: Bounds, splits: tuple[str, ...],
                  label: str | None = None, columns: list[str] | None = None) -> None:
    """Driver side, before the streaming (Ray Data) read, from the Parquet footers only:
    every prepared file's id columns are integers of the same type as the split's first file,
    and each row group's column statistics (min, max; null count of scalar columns) are within
    the manifest's tables. A file whose statistics break a bound is then read and checked row
    by row (:func:`check_table`), so the error names the file, column, row within the file and
    value, which a batch inside Ray Data cannot (a batch does not know its file).

    Statistics cannot see NaN (Parquet's min/max skip it) nor a null element inside a list (a
    list column's leaf null count includes empty lists): the per-batch check still catches
    those, naming the batch row.

    With ``columns`` (the job's, :attr:`FeatureLayout.columns`), every non-empty file must hold
    them: Ray Data's ``read_parquet(columns=...)`` silently leaves a missing one out, and the
    workers then fail on it (e.g. ``_hist_ts`` of match features or of HSTU's
    ``model.time_bias``, in a folder prepared without them).

    Raises:
        PreparedDataError: naming the file, column and types, or file, column, row and value,
            or the file and the columns it lacks.
    """
    import pyarrow.parquet as pq

    for split in splits:
        url = storage.join(prepared_dir, split)
        if not storage.exists(url):
            continue
        files, _ = storage.list_parquet_files(url)
        first: pa.Schema | None = None
        for f in files:
            fs, path = storage.url_to_fs(f)
            with fs.open(path, "rb") as fh:
                meta = pq.read_metadata(fh)
            schema = meta.schema.to_arrow_schema()
            if meta.num_rows:
                require_columns(f, schema, columns, prepared_dir)
            for name, spec in bounds.items():
                if name in schema.names:
                    _check_type(f, name, spec[0], schema.field(name).type)
                    if first is not None and name in first.names and \
                            first.field(name).type != schema.field(name).type:
                        raise type_differs(f, name, schema.field(name).type, files[0],
                                           first.field(name).type)
            first = first or schema
            if _stats_out_of_bounds(meta, bounds):
                cols = [n for n in bounds if n in schema.names]
                check_table(storage.read_parquet(f, cols + ([label] if label in schema.names
                                                             else [])), bounds, f, label)


def _stats_out_of_bounds(meta, bounds: Bounds) -> bool:
    """Some row group's statistics of a ``bounds`` column: min < 0, max >= table size, or (a
    scalar column) nulls. Missing statistics count as within bounds (the batch check stays)."""
    cols = {}
    for j in range(meta.num_columns):
        top = meta.schema.column(j).path.split(".")[0]
        if top in bounds:
            cols[j] = (top, "." in meta.schema.column(j).path)
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        for j, (name, is_list) in cols.items():
            st = rg.column(j).statistics
            if st is None:
                continue
            if not is_list and st.has_null_count and st.null_count:
                return True
            if st.has_min_max and (st.min < 0 or st.max >= bounds[name][2]):
                return True
    return False
