"""Raw 64-bit ids for ``encoding: zch`` features (no vocabulary, no table-size modulo).

A zch feature's samples carry ``1 + SipHash(value) mod (2**63 - 2)``: the same stable hash as
``encoding: hash`` (pandas ``hash_array``, fixed key; :func:`rectrain.data.encode.hash_encode`)
kept at 63 bits, so every prepare of every window gives a value the same raw id, and the ids
spread evenly over ``[1, 2**63 - 1)``, the input range TorchRec's ``MCHManagedCollisionModule``
bucketises across ranks (row-wise sharding routes an id by ``id // ceil((2**63 - 1) / W)``).
0 stays the null id. Two distinct values share a raw id with probability about n²/2**64 (one
in ~10¹¹ for a million values); :func:`raw_id_report` counts such pairs all the same.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from rectrain.data.encode import _flat, stable_hash_ids

#: MCHManagedCollisionModule's default ``input_hash_size`` (ids must lie below it)
INPUT_HASH_SIZE = 2 ** 63 - 1


def raw_id_encode(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Raw ids int64 in ``[1, 2**63 - 1)`` of a column (null -> 0; list columns keep their
    offsets). Integers of any width hash as int64, as in ``hash_encode``; other types by value.
    """
    return stable_hash_ids(arr, INPUT_HASH_SIZE - 1)


def raw_id_report(distinct_values, capacity: int) -> dict:
    """The manifest's ``hashing.<feature>`` entry of a zch feature: ``{"encoding": "zch",
    "capacity", "distinct_values", "values_sharing_a_raw_id"}`` over a column of distinct
    values (nulls dropped, lists flattened). ``distinct_values`` above ``capacity`` means the
    table cannot hold every value of this prepare at once: the eviction policy decides."""
    vals = pc.unique(pc.drop_null(_flat(distinct_values)))
    ids = raw_id_encode(vals)
    used = len(pc.unique(ids)) if len(ids) else 0
    return {"encoding": "zch", "capacity": int(capacity), "distinct_values": len(vals),
            "values_sharing_a_raw_id": int(len(vals) - used)}
