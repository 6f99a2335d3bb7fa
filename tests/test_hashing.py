"""Hash encoding for unbounded id spaces: stable across processes (unlike Python's hash()),
width-independent for integers, nulls -> 0, list columns keep their offsets, collisions counted
in the prepare manifest, and sequences carry the same hashed ids as the candidate feature."""

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from rectrain.config import config_from_dict
from rectrain.data.encode import hash_collisions, hash_encode
from rectrain.data.prepare import prepare
from tests.support.tiny import N_ITEMS, tiny_job, tiny_tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SNIPPET = ("import pyarrow as pa; from rectrain.data.encode import hash_encode; "
            "print(hash_encode(pa.array(['a', 'user-42', 'zz']), 1000).to_pylist(), "
            "hash_encode(pa.array([7, 2**40, -3]), 1000).to_pylist())")


def test_hash_is_stable_across_processes_and_hash_seeds():
    outs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": ROOT}
        outs.add(subprocess.run([sys.executable, "-c", _SNIPPET], env=env, capture_output=True,
                                text=True, check=True).stdout)
    here = (f"{hash_encode(pa.array(['a', 'user-42', 'zz']), 1000).to_pylist()} "
            f"{hash_encode(pa.array([7, 2**40, -3]), 1000).to_pylist()}\n")
    assert outs == {here}


def test_hash_values_widths_nulls_and_lists():
    ids64 = hash_encode(pa.array([1, 2, 3, None], pa.int64()), 50).to_pylist()
    ids32 = hash_encode(pa.array([1, 2, 3, None], pa.int32()), 50).to_pylist()
    assert ids64 == ids32 and ids64[3] == 0 and all(1 <= i <= 50 for i in ids64[:3])
    # uint64 above 2**63 (bit pattern) and booleans (0/1) hash too; small uint64 as int64
    big = hash_encode(pa.array([2**63 + 1, 2**64 - 1, 7, None], pa.uint64()), 10**9).to_pylist()
    assert big[2] == hash_encode(pa.array([7]), 10**9).to_pylist()[0] and big[3] == 0
    assert len(set(big[:3])) == 3 and all(1 <= i <= 10**9 for i in big[:3])
    flags = hash_encode(pa.array([True, False, None]), 10**9).to_pylist()
    assert flags[:2] == hash_encode(pa.array([1, 0]), 10**9).to_pylist() and flags[2] == 0
    assert hash_encode(pa.array(["5"]), 10**9).to_pylist() != \
        hash_encode(pa.array([5]), 10**9).to_pylist()  # a string is not its number
    lists = pa.array([["a", "b"], [], None, ["a", None]], pa.list_(pa.string()))
    got = hash_encode(lists, 97)
    a, b = hash_encode(pa.array(["a", "b"]), 97).to_pylist()
    assert got.to_pylist() == [[a, b], [], [], [a, 0]]
    # 1000 distinct values into 64 buckets: every bucket-sharing value is counted once
    vals = pa.array([f"v{i}" for i in range(1000)])
    rep = hash_collisions(vals, 64)
    ids = pd.Series(hash_encode(vals, 64).to_numpy())
    assert rep == {"buckets": 64, "distinct_values": 1000, "ids_used": ids.nunique(),
                   "values_sharing_an_id": int(ids.duplicated().sum())}
    assert rep["ids_used"] == 64  # 1000 values fill 64 buckets
    assert hash_collisions(pa.array([1, 1, 2, None]), 10**9)["values_sharing_an_id"] == 0


def test_prepare_with_hashed_features_reports_collisions(tmp_path, ray_local):
    tables = tiny_tables(n_events=200)
    raw = tmp_path / "raw"
    for name in ("users", "items", "events"):
        (raw / name).mkdir(parents=True)
        pq.write_table(tables[name], raw / name / "part-0.parquet")
    job = tiny_job(str(tmp_path))
    for f in job["features"]:
        if f["name"] == "item_id":
            f.update(encoding="hash", hash_buckets=16)  # 50 items into 16 ids: collisions
        if f["name"] == "genres":
            f.update(encoding="hash", hash_buckets=1000)
    m = prepare(config_from_dict(job))
    item_ids = hash_encode(tables["items"]["item_id"], 16).to_numpy()
    assert m["tables"]["item"] == 17 and m["tables"]["genres"] == 1001
    assert m["hashing"]["item_id"] == {
        "buckets": 16, "distinct_values": N_ITEMS, "ids_used": len(np.unique(item_ids)),
        "values_sharing_an_id": N_ITEMS - len(np.unique(item_ids))}
    assert m["hashing"]["item_id"]["values_sharing_an_id"] >= N_ITEMS - 16
    assert "item_id" not in [p.stem for p in (tmp_path / "prepared" / "vocab").iterdir()]
    df = pa.concat_tables([pads.dataset(str(tmp_path / "prepared" / s)).to_table()
                           for s in ("train", "valid", "test")]).to_pandas()
    lookup = dict(zip(tables["items"]["item_id"].to_pylist(), item_ids.tolist()))
    assert (df["item_id"] == df["_item"].map(lookup)).all()
    # sequences hold the same hashed ids as the candidate item of earlier events
    df = df.sort_values(["_user", "_pos"])
    for _, g in df.groupby("_user"):
        prev = g["item_id"].tolist()
        for pos, h in zip(g["_pos"], g["hist_item_id"]):
            assert list(h) == prev[max(0, pos - 8):pos]
