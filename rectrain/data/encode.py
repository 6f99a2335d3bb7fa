"""Vectorised column transforms and vocabulary encoding (Arrow compute, no per-row Python).

Encoded ids are int64 in ``[0, len(vocab)]``: 0 is reserved for padding / unknown / null, and a
vocabulary's i-th value (sorted ascending) gets id ``i + 1``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rectrain.config import Transform


def apply_transform(arr: pa.ChunkedArray | pa.Array, t: Transform | None) -> pa.ChunkedArray:
    """Apply one :class:`~rectrain.config.Transform` to a column.

    - ``floor_div``: integer floor division of a numeric column (nulls stay null).
    - ``prefix``: the first N characters of a string column (cast to string first).
    - ``year``: calendar year of a date/timestamp column, int64; nulls become 0.
    - ``first``: first element of a list column (empty or null list -> null).
    """
    if t is None:
        return arr
    if t.floor_div is not None:
        if not pa.types.is_integer(arr.type) and not pa.types.is_floating(arr.type):
            raise TypeError(f"floor_div needs a numeric column, got {arr.type}")
        return pc.cast(pc.floor(pc.divide(pc.cast(arr, pa.float64()), t.floor_div)), pa.int64())
    if t.prefix is not None:
        if not pa.types.is_string(arr.type) and not pa.types.is_large_string(arr.type):
            arr = pc.cast(arr, pa.string())
        return pc.utf8_slice_codeunits(arr, 0, t.prefix)
    if t.year:
        if pa.types.is_integer(arr.type):  # unix seconds
            arr = pc.cast(pc.multiply(arr, 1_000_000), pa.timestamp("us"))
        return pc.fill_null(pc.cast(pc.year(arr), pa.int64()), 0)
    if t.first:
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        arr = pc.fill_null(arr, pa.scalar([], arr.type))
        starts = pc.subtract(arr.offsets[:-1], arr.offsets[0])
        idx = pc.if_else(pc.greater(pc.list_value_length(arr), 0), starts,
                         pa.scalar(None, starts.type))
        return arr.flatten().take(idx)
    raise AssertionError("unreachable: Transform validates exactly one field")


def positions_in_lists(lengths: np.ndarray) -> np.ndarray:
    """For lists of the given lengths laid end to end, each element's 0-based position inside
    its own list (``[2, 0, 3] -> [0, 1, 0, 1, 2]``), vectorised."""
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    return np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths)


def _flat(arr) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        arr = pc.list_flatten(arr)
    return arr


def build_vocab(arr) -> pa.Array:
    """Sorted distinct non-null values of a column (list columns are flattened)."""
    values = pc.unique(pc.drop_null(_flat(arr)))
    return pc.take(values, pc.sort_indices(values))


def grow_vocab(arr, previous: pa.Array | None, capacity: int | None,
               where: str = "") -> tuple[pa.Array, dict]:
    """A vocabulary that extends ``previous`` (raw values in id order, id = index + 1) with
    the values of ``arr`` it lacks, never renumbering: known values keep their id, new ones
    (sorted ascending) take the next ids up to ``capacity`` values, the rest stay out of the
    vocabulary and encode to id 0 (:func:`encode`), the counted out-of-vocabulary row.
    ``previous=None``, ``capacity=None`` is :func:`build_vocab`.

    Returns ``(vocab, report)``; report: ``{"known", "seen", "new", "oov_values",
    "capacity", "size"}`` (distinct values: in ``previous``, in ``arr``, admitted now, left
    out for want of room; ``size`` = ``len(vocab)``).

    Raises:
        ValueError: ``previous`` holds more values than ``capacity`` (``where`` names the
            feature), or ``arr``'s values cannot be cast to ``previous``'s type.
    """
    seen = build_vocab(arr)
    if previous is None:
        previous = seen.slice(0, 0)
    elif capacity is not None and len(previous) > capacity:
        raise ValueError(f"{where}: capacity {capacity} is below the {len(previous)} values of "
                         f"the vocabulary it extends; capacity may only grow with a new table")
    elif len(seen) and seen.type != previous.type:
        try:
            seen = pc.cast(seen, previous.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise ValueError(f"{where}: values of type {seen.type} cannot extend a vocabulary "
                             f"of type {previous.type}: {e}") from None
    new = pc.filter(seen, pc.invert(pc.is_in(seen, value_set=previous))) if len(previous) \
        else seen
    room = len(new) if capacity is None else max(0, capacity - len(previous))
    admitted = min(room, len(new))
    vocab = pa.concat_arrays([previous, new.slice(0, admitted)]) if len(previous) else \
        new.slice(0, admitted)
    vocab = vocab.take(pa.array(np.arange(len(vocab))))  # compact buffers: stable digests
    return vocab, {"known": len(previous), "seen": len(seen), "new": int(admitted),
                   "oov_values": int(len(new) - admitted), "capacity": capacity,
                   "size": len(vocab)}


def oov_count(arr, ids) -> int:
    """Values (list elements for a list column) of ``arr`` that are not null yet encoded to id
    0 in ``ids`` (same shape, from :func:`encode`): the rows sent to the OOV row."""
    a, i = _flat(arr), _flat(ids)
    return int(pc.sum(pc.and_(pc.is_valid(a), pc.equal(i, 0))).as_py() or 0)


def _per_element(arr, fn):
    """``(arr, lists)``: ``arr`` as one Arrow array, and for a list column ``fn`` applied to its
    flattened elements under its own offsets as ``list<...>`` (a null list becomes an empty
    list), else ``lists = None``."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
        return arr, None
    arr = pc.fill_null(arr, pa.scalar([], arr.type))
    offsets = pc.subtract(arr.offsets, arr.offsets[0])
    return arr, pa.ListArray.from_arrays(pc.cast(offsets, pa.int32()), fn(arr.flatten()))


def encode(arr, vocab: pa.Array) -> pa.Array:
    """Map values to ids ``1..len(vocab)``; null or out-of-vocabulary -> 0.

    List columns keep their offsets: the result is a ``list<int64>`` column with the same
    lengths (null list -> empty list).
    """
    arr, lists = _per_element(arr, lambda values: encode(values, vocab))
    if lists is not None:
        return lists
    if len(vocab) and arr.type != vocab.type:
        arr = pc.cast(arr, vocab.type)
    idx = pc.index_in(arr, value_set=vocab)
    return pc.fill_null(pc.add(pc.cast(idx, pa.int64()), 1), 0)


def hash_encode(arr, buckets: int) -> pa.Array:
    """Map values to ids ``1..buckets`` by a stable hash; null -> 0 (vectorised, no vocabulary).

    The hash is pandas' ``hash_array`` (SipHash-2-4 with a fixed key, implemented in C), so the
    same value gets the same id in every process, on every machine and in every run, unlike
    Python's salted ``hash()``. Integers of any width are hashed as int64 (an id read as int32
    in one file and int64 in another gets one id; uint64 above 2**63 by its bit pattern) and
    booleans as 0/1; other types by their value (strings as UTF-8 text), so ``5`` and ``"5"``
    differ. ``id = 1 + hash mod buckets``: distinct values may share an id (a collision);
    :func:`hash_collisions` counts them. List columns keep their offsets (``list<int64>``,
    null list -> empty list), as :func:`encode`.

    Raises:
        ValueError: ``buckets < 1``.
    """
    if buckets < 1:
        raise ValueError(f"hash_buckets must be >= 1, got {buckets}")
    return stable_hash_ids(arr, buckets)


def stable_hash_ids(arr, modulus: int) -> pa.Array:
    """``1 + SipHash(value) mod modulus`` per value (pandas ``hash_array``, fixed key), null ->
    0; list columns keep their offsets. Integers of any width hash as int64 (uint64 above 2**63
    by its bit pattern), other types by value. Shared by ``hash`` and ``zch`` encodings."""
    from pandas.util import hash_array

    arr, lists = _per_element(arr, lambda values: stable_hash_ids(values, modulus))
    if lists is not None:
        return lists
    if pa.types.is_integer(arr.type) or pa.types.is_boolean(arr.type):
        # uint64 above 2**63 by its bit pattern (a bijection onto int64: no added collisions)
        values = pc.fill_null(pc.cast(arr, pa.int64(), safe=not pa.types.is_uint64(arr.type)),
                              0).to_numpy()
    else:
        values = np.asarray(arr.to_numpy(zero_copy_only=False), dtype=object)
    ids = (hash_array(values) % np.uint64(modulus)).astype(np.int64) + 1
    valid = pc.is_valid(arr).to_numpy(zero_copy_only=False)
    return pa.array(np.where(valid, ids, 0))


def hash_collisions(distinct_values, buckets: int) -> dict:
    """Collision report for hashing ``distinct_values`` (a column of distinct non-null values,
    list columns flattened) into ``buckets``: ``{"buckets", "distinct_values", "ids_used",
    "values_sharing_an_id"}`` where the last is ``distinct_values - ids_used`` (each id shared
    by k values counts k - 1)."""
    vals = pc.unique(pc.drop_null(_flat(distinct_values)))
    ids = hash_encode(vals, buckets)
    used = len(pc.unique(ids)) if len(ids) else 0
    return {"buckets": int(buckets), "distinct_values": len(vals), "ids_used": int(used),
            "values_sharing_an_id": int(len(vals) - used)}
