"""Parsing MovieLens-100K (the widedeep Parquet files or a GroupLens ``ml-100k`` folder) into
the three tables ``EVENTS_SCHEMA``, ``USERS_SCHEMA`` and ``ITEMS_SCHEMA``, rows in the order of
the original files. Both readers give identical tables; neither checks row counts (see
:func:`rectrain.data.sources.movielens.load_movielens_100k`).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

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

GROUPLENS_FILES: dict[str, str] = {"events": "u.data", "users": "u.user", "items": "u.item"}

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


# --------------------------------------------------------------------------- readers


def read_widedeep(paths: Mapping[str, str]) -> dict[str, pa.Table]:
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


def grouplens_paths(path: str | os.PathLike[str]) -> dict[str, str]:
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


def read_grouplens(path: str | os.PathLike[str]) -> dict[str, pa.Table]:
    """Parse a GroupLens ``ml-100k`` folder into the output tables.

    ``u.data``: tab-separated ``user item rating timestamp``; ``u.user``:
    ``|``-separated ``user id|age|gender|occupation|zip code``; ``u.item``:
    ``|``-separated latin-1 ``movie id|title|release date|video release date|URL|``
    followed by the 19 genre flags of ``GENRES``.  No row-count check, so small
    folders of the same format parse too.
    """
    paths = grouplens_paths(path)

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

