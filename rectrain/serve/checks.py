"""Checks of what serving reads from a prepared folder, beyond the door's id bounds
(:mod:`rectrain.data.door`): the key columns of the events (``_user``, ``_item``, ``_pos``:
raw ids and positions, which no embedding table bounds), one schema across every event file
read together, and catalogs keyed by unique ids. Each error names the file, and the column,
row and value where it is a data problem; the checks are vectorised (Arrow null counts, one
sort), the row looked up only once a finding is made.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rectrain.data.door import PreparedDataError
from rectrain.data.schema import ITEM, POS, USER

_HINT = ("run `rectrain prepare` again, or fix the code that wrote these files")


def check_keys(t: pa.Table, source: str) -> None:
    """No null in ``t``'s ``_user``, ``_item`` and ``_pos`` columns (those it has); rows are
    counted within ``t`` (one file, ``source``).

    Raises:
        PreparedDataError: ``SOURCE: column '_user' row R: null ...``."""
    for c in (USER, ITEM, POS):
        if c in t.column_names and t[c].null_count:
            row = int(np.flatnonzero(pc.is_null(t[c]).to_numpy(zero_copy_only=False))[0])
            raise PreparedDataError(f"{source}: column '{c}' row {row}: null (value None); "
                                    f"serving needs every event's user, item and position; "
                                    f"{_HINT}")


def conform(t: pa.Table, first: pa.Table, source: str, first_source: str) -> pa.Table:
    """``t`` (file ``source``) with the schema of ``first`` (file ``first_source``), both read
    with the same columns: equal types are required; nullability and metadata may differ
    (cast), so that ``pa.concat_tables`` takes them.

    Raises:
        PreparedDataError: a column whose type differs (names both files and types)."""
    if t.schema == first.schema:
        return t
    for want in first.schema:
        got = t.schema.field(want.name).type
        if got != want.type:
            raise PreparedDataError(f"{source}: column '{want.name}' has type {got}, but "
                                    f"{first_source} has {want.type}: every prepared file "
                                    f"serving reads needs the same schema; {_HINT}")
    return t.cast(first.schema)


def unique_keys(keys: pa.Array | pa.ChunkedArray, source: str, column: str) -> None:
    """``keys`` (a catalog's id column) has no null and no id twice.

    Raises:
        PreparedDataError: ``SOURCE: column 'C' row R: ...`` with the value (a duplicate
            names the row of its second occurrence and the first's)."""
    if keys.null_count:
        row = int(np.flatnonzero(pc.is_null(keys).to_numpy(zero_copy_only=False))[0])
        raise PreparedDataError(f"{source}: column '{column}' row {row}: null id (value None); "
                                f"a catalog needs one row per id; {_HINT}")
    if len(pc.unique(keys)) == len(keys):
        return
    v = keys.to_numpy(zero_copy_only=False)
    order = np.argsort(v, kind="stable")
    dup = np.flatnonzero(v[order][1:] == v[order][:-1])
    # the duplicate that occurs first in the file (its second occurrence)
    second = order[dup + 1]
    k = int(np.argmin(second))
    row, prev = int(second[k]), int(order[dup[k]])
    raise PreparedDataError(f"{source}: column '{column}' row {row}: duplicate id (value "
                            f"{keys[row].as_py()!r}, also at row {prev}); a catalog needs one "
                            f"row per id; {_HINT}")


def key_rows(keys: pa.Array, values: pa.Array, source: str = "ids") -> np.ndarray:
    """Row of each of ``keys`` in ``values`` (int64, -1 where absent).

    Raises:
        PreparedDataError: types Arrow cannot match (string ids against integer keys), the
            message starting with ``source``."""
    try:
        idx = pc.index_in(keys, value_set=values)
    except (pa.ArrowTypeError, pa.ArrowNotImplementedError, pa.ArrowInvalid):
        raise PreparedDataError(f"{source}: {keys.type} ids cannot be looked up among "
                                f"{values.type} keys: the events and the catalogs need one id "
                                f"type; {_HINT}") from None
    return pc.fill_null(idx, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def event_rows(t: pa.Table, user_keys: pa.Array, item_keys: pa.Array, prepared: str):
    """(user rows, item rows) int64 of a batch's events (:func:`key_rows`)."""
    return tuple(key_rows(t[c], keys, f"{prepared}: the events' column '{c}'")
                 for c, keys in ((USER, user_keys), (ITEM, item_keys)))
