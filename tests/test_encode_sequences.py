"""Transforms, vocabularies and behaviour sequences against straightforward references."""

import datetime

import numpy as np
import pyarrow as pa
import pytest

from rectrain.config import Transform
from rectrain.data.encode import apply_transform, build_vocab, encode
from rectrain.data.prepare import build_sequences


def test_transforms():
    assert apply_transform(pa.array([15, 29, 30, None]), Transform(floor_div=10)).to_pylist() \
        == [1, 2, 3, None]
    assert apply_transform(pa.array(["02215", "T8H1N", None]), Transform(prefix=1)).to_pylist() \
        == ["0", "T", None]
    dates = pa.array([datetime.date(1995, 1, 1), None], pa.date32())
    assert apply_transform(dates, Transform(year=True)).to_pylist() == [1995, 0]


def test_vocab_and_encode_scalars_and_lists():
    v = build_vocab(pa.array(["b", "a", None, "b"]))
    assert v.to_pylist() == ["a", "b"]
    assert encode(pa.array(["b", "zz", None, "a"]), v).to_pylist() == [2, 0, 0, 1]
    lists = pa.array([["a", "b"], [], None, ["c"]], pa.list_(pa.string()))
    assert encode(lists, v).to_pylist() == [[1, 2], [], [], [0]]
    # a sliced list column keeps the right offsets
    assert encode(lists.slice(1, 3), v).to_pylist() == [[], [], [0]]


def _reference(users, ts, items, max_len, n_test, n_valid):
    """Per-event Python loop: the obvious implementation of P-ML100K sequences and split."""
    order = sorted(range(len(users)), key=lambda i: (users[i], ts[i], i))
    seq, split, pos = {}, {}, {}
    by_user = {}
    for i in order:
        by_user.setdefault(users[i], []).append(i)
    for u, idx in by_user.items():
        for p, i in enumerate(idx):
            seq[i] = [items[j] for j in idx[max(0, p - max_len):p]]
            from_end = len(idx) - 1 - p
            split[i] = 2 if from_end < n_test else (1 if from_end < n_test + n_valid else 0)
            pos[i] = p
    return seq, split, pos


@pytest.mark.parametrize("max_len", [1, 3, 50])
def test_build_sequences_matches_reference(max_len):
    rng = np.random.default_rng(0)
    n = 400
    users = rng.integers(1, 12, n)
    ts = rng.integers(0, 30, n)  # many ties: the original row order breaks them
    items = rng.integers(1, 40, n)
    t = pa.table({"_uid": users, "_ts": ts, "_file": np.zeros(n, np.int32),
                  "_row": np.arange(n), "_bucket": users % 4, "item_id": items})
    out = build_sequences(t, [("hist", "item_id")], max_len, n_test=3, n_valid=2)
    seq, split, pos = _reference(users.tolist(), ts.tolist(), items.tolist(), max_len, 3, 2)
    rows = out["_row"].to_pylist() if "_row" in out.column_names else None
    assert rows is None  # helper columns are dropped
    # map output rows back by (user, pos): unique per event
    got = {(u, p): (s, sp) for u, p, s, sp in zip(out["_uid"].to_pylist(), out["_pos"].to_pylist(),
                                                   out["hist"].to_pylist(),
                                                   out["_split"].to_pylist())}
    assert len(got) == n
    for i in range(n):
        assert got[(users[i], pos[i])] == (seq[i], split[i])


def test_build_sequences_orders_ties_by_file_then_row():
    t = pa.table({"_uid": [1, 1, 1], "_ts": [5, 5, 5], "_file": pa.array([1, 0, 0], pa.int32()),
                  "_row": [0, 7, 3], "_bucket": [0, 0, 0], "item_id": [30, 20, 10]})
    out = build_sequences(t, [("hist", "item_id")], 50, n_test=1, n_valid=0)
    assert out["item_id"].to_pylist() == [10, 20, 30]
    assert out["hist"].to_pylist() == [[], [10], [10, 20]]
    assert out["_split"].to_pylist() == [0, 0, 2]


def test_first_transform_of_lists():
    arr = pa.array([["a", "b"], [], None, ["c"]], pa.list_(pa.string()))
    assert apply_transform(arr, Transform(first=True)).to_pylist() == ["a", None, None, "c"]
    assert apply_transform(arr.slice(3), Transform(first=True)).to_pylist() == ["c"]


def test_append_truncate_builds_next_sequence():
    from rectrain.serve.recommend import append_truncate

    seq = pa.array([[9, 1, 2], [], [5], [7, 8]], pa.list_(pa.int64())).slice(0, 4)
    out = append_truncate(seq, np.array([3, 4, 6, 9]), max_len=3)
    assert out.to_pylist() == [[1, 2, 3], [4], [5, 6], [7, 8, 9]]
    out = append_truncate(seq.slice(1), np.array([4, 6, 9]), max_len=1)
    assert out.to_pylist() == [[4], [6], [9]]
