"""Malformed raw logs: every case either stops prepare with a message naming the file, column,
row and value, or (under ``on_invalid: skip`` / ``oov``) is counted in the manifest by reason,
with ``rows_read == rows_used + rows_rejected`` always. One embedded Ray for the whole session
(``ray_local``), two events files of 30 rows each (``part-0``, ``part-1``)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from rectrain.config import config_from_dict
from rectrain.data.prepare import DataValidationError, prepare
from tests.support.tiny import tiny_job, tiny_tables

N = 60  # events rows, written as part-0 (rows 0..29) and part-1 (rows 30..59)


def _set(t: pa.Table, name: str, values, ty=None) -> pa.Table:
    arr = pa.array(values, ty) if not isinstance(values, (pa.Array, pa.ChunkedArray)) else values
    i = t.schema.get_field_index(name)
    return t.set_column(i, name, arr) if i >= 0 else t.append_column(name, arr)


def _col(t, name, row, value, ty=None):
    v = t[name].to_pylist()
    v[row] = value
    return _set(t, name, v, ty or t[name].type)


def _with_tags(state):
    """An events-level multi-hot feature ``tags`` (a list<int64> column)."""
    rng = np.random.default_rng(1)
    for i, p in enumerate(state["parts"]):
        tags = [list(rng.integers(1, 5, k)) for k in rng.integers(0, 3, p.num_rows)]
        state["parts"][i] = _set(p, "tags", tags, pa.list_(pa.int64()))
    state["job"]["features"].append({"name": "tags", "kind": "multi_hot", "source": "tags"})


def _mutate(case: str, s: dict) -> None:
    p0, p1 = s["parts"]
    ds = s["job"]["dataset"]
    if case == "string_ids_in_one_file":
        s["parts"][1] = _set(p1, "user_id", [str(x) for x in p1["user_id"].to_pylist()])
    elif case == "float_ids_in_one_file":
        s["parts"][1] = _set(p1, "item_id", p1["item_id"].cast(pa.float64()))
    elif case == "missing_column_in_one_file":
        s["parts"][1] = p1.drop_columns(["rating"])
    elif case == "null_user_id":
        s["parts"][1] = _col(p1, "user_id", 3, None)
    elif case == "column_all_null_in_one_file":
        s["parts"][1] = _set(p1, "rating", pa.nulls(p1.num_rows))
    elif case == "nan_label":
        s["parts"][0] = _col(p0.set_column(2, "rating", p0["rating"].cast(pa.float64())),
                             "rating", 7, float("nan"))
        s["parts"][1] = p1.set_column(2, "rating", p1["rating"].cast(pa.float64()))
    elif case == "label_not_binary":
        for i, p in enumerate(s["parts"]):
            s["parts"][i] = _set(p, "click", (p["rating"].to_numpy() >= 4).astype(np.int64))
        s["parts"][0] = _col(s["parts"][0], "click", 5, 2)
        ds["label"] = {"column": "click"}
    elif case == "negative_id":
        s["parts"][0] = _col(p0, "item_id", 4, -7)
    elif case == "unknown_item":
        s["parts"][0] = _col(p0, "item_id", 2, 999)
    elif case == "timestamp_after_max":
        ds["max_timestamp"] = 2000
        s["parts"][1] = _col(p1, "timestamp", 6, 99_999)
    elif case == "string_timestamps":
        for i, p in enumerate(s["parts"]):
            s["parts"][i] = _set(p, "timestamp", [str(x) for x in p["timestamp"].to_pylist()])
    elif case == "uint64_id_above_int64":
        s["parts"][1] = _col(_set(p1, "user_id", p1["user_id"].cast(pa.uint64())), "user_id", 5,
                             2**63 + 7, pa.uint64())
    elif case == "truncated_file":
        s["corrupt"] = "truncate"
    elif case == "zero_byte_file":
        s["corrupt"] = "empty"
    elif case == "null_element_in_event_list":
        _with_tags(s)
        s["parts"][1] = _col(s["parts"][1], "tags", 8, [3, None])
    elif case == "null_element_in_side_list":
        s["tables"]["items"] = _col(s["tables"]["items"], "genres", 10, ["g1", None])
    elif case == "duplicate_side_key":
        s["tables"]["items"] = _col(s["tables"]["items"], "item_id", 11, 100)
    elif case == "int32_ids_in_one_file":
        s["parts"][1] = _set(p1, "user_id", p1["user_id"].cast(pa.int32()))
    elif case == "added_column_in_one_file":
        s["parts"][1] = _set(p1, "extra", np.arange(p1.num_rows))
    elif case == "empty_file_and_markers":
        s["parts"].append(p0.slice(0, 0))
        s["markers"] = True
    elif case == "skip_every_reason":
        ds["on_invalid"] = "skip"
        ds["max_timestamp"] = 2000
        _with_tags(s)
        p0, p1 = s["parts"]
        p0 = _col(p0, "user_id", 1, None)                                   # null_user_id
        p0 = _col(p0, "item_id", 2, 999)                                    # unknown_item
        p0 = _col(p0, "item_id", 3, -1)                                     # id_out_of_range
        p1 = _col(p1, "timestamp", 4, -5)                                   # bad_timestamp
        p1 = _col(p1, "timestamp", 5, 99_999)                               # bad_timestamp
        p1 = _col(p1, "rating", 6, None)                                    # null_rating
        p1 = _col(p1, "tags", 7, [None])                                    # null element
        p1 = _col(p1, "user_id", 8, 77)                                     # unknown_user
        s["parts"] = [p0, p1]
    elif case == "oov_remaps_unknown_ids":
        ds["on_invalid"] = "oov"
        _with_tags(s)
        p0, p1 = s["parts"]
        p0 = _col(p0, "item_id", 2, 999)
        p0 = _col(p0, "item_id", 3, 998)
        p1 = _col(p1, "user_id", 4, 77)
        p1 = _col(p1, "user_id", 5, 77)
        p1 = _col(p1, "tags", 7, [1, None])
        p1 = _col(p1, "rating", 9, None)  # a null label cannot be remapped: skipped
        s["parts"] = [p0, p1]
    elif case == "skip_column_all_null_in_one_file":
        ds["on_invalid"] = "skip"
        s["parts"][1] = _set(p1, "rating", pa.nulls(p1.num_rows))
    else:
        raise AssertionError(case)


ERRORS = {
    "string_ids_in_one_file": ["part-1.parquet", "'user_id'", "type string", "part-0.parquet",
                               "int64"],
    "float_ids_in_one_file": ["part-1.parquet", "'item_id'", "type double", "int64"],
    "missing_column_in_one_file": ["part-1.parquet", "missing column 'rating'"],
    "null_user_id": ["part-1.parquet", "'user_id' row 3", "null value", "value None"],
    "column_all_null_in_one_file": ["part-1.parquet", "'rating' row 0", "null value",
                                    "value None", "30 such row(s)"],
    "nan_label": ["part-0.parquet", "'rating' row 7", "label not finite", "value nan"],
    "label_not_binary": ["part-0.parquet", "'click' row 5", "label not 0/1", "value 2"],
    "negative_id": ["part-0.parquet", "'item_id' row 4", "id outside [0, None]", "value -7"],
    "unknown_item": ["part-0.parquet", "'item_id' row 2", "not in the items table",
                     "value 999"],
    "timestamp_after_max": ["part-1.parquet", "'timestamp' row 6", "outside [0, 2000]",
                            "value 99999"],
    "string_timestamps": ["part-0.parquet", "'timestamp'", "expected integer unix seconds",
                          "string"],
    "uint64_id_above_int64": ["part-1.parquet", "'user_id' row 5", "id above 2**63-1",
                              "value 9223372036854775815"],
    "truncated_file": ["part-1.parquet", "cannot read as Parquet"],
    "zero_byte_file": ["part-1.parquet", "cannot read as Parquet"],
    "null_element_in_event_list": ["part-1.parquet", "'tags' row 8", "null element",
                                   "value [3, None]"],
    "null_element_in_side_list": ["items/part-0.parquet", "'genres' row 10", "null element",
                                  "'g1', None"],
    "duplicate_side_key": ["items", "'item_id' row", "duplicate key value 100"],
}

COUNTED = {
    # case: (rows_used, rejected_by_reason, remapped_by_reason)
    "int32_ids_in_one_file": (N, {}, {}),
    "added_column_in_one_file": (N, {}, {}),
    "empty_file_and_markers": (N, {}, {}),
    "skip_every_reason": (N - 8, {"null_user_id": 1, "unknown_item": 1, "id_out_of_range": 1,
                                  "bad_timestamp": 2, "null_rating": 1,
                                  "null_element_tags": 1, "unknown_user": 1}, {}),
    "oov_remaps_unknown_ids": (N - 1, {"null_rating": 1},
                               {"unknown_item": 2, "unknown_user": 2, "null_element_tags": 1}),
    "skip_column_all_null_in_one_file": (N - 30, {"null_rating": 30}, {}),
}


def _run(tmp_path, case):
    tables = tiny_tables(n_events=N)
    job = tiny_job(str(tmp_path))
    ev = tables["events"]
    s = {"tables": tables, "job": job, "parts": [ev.slice(0, 30), ev.slice(30)]}
    _mutate(case, s)
    raw = tmp_path / "raw"
    for name in ("users", "items"):
        (raw / name).mkdir(parents=True)
        pq.write_table(s["tables"][name], raw / name / "part-0.parquet")
    (raw / "events").mkdir()
    for i, p in enumerate(s["parts"]):
        pq.write_table(p, raw / "events" / f"part-{i}.parquet")
    f1 = raw / "events" / "part-1.parquet"
    if s.get("corrupt") == "truncate":
        f1.write_bytes(f1.read_bytes()[: f1.stat().st_size // 2])
    elif s.get("corrupt") == "empty":
        f1.write_bytes(b"")
    if s.get("markers"):
        (raw / "events" / "_SUCCESS").write_text("")
        (raw / "events" / ".part-0.parquet.crc").write_bytes(b"\x00")
        (raw / "events" / "part-0.parquet.crc").write_bytes(b"\x00")
    return prepare(config_from_dict(job)), s


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_malformed_input_stops_with_file_column_row_value(tmp_path, ray_local, case):
    with pytest.raises(DataValidationError) as e:
        _run(tmp_path, case)
    msg = str(e.value)
    for part in ERRORS[case]:
        assert part in msg, f"{part!r} not in {msg!r}"
    assert "Traceback" not in msg and "ray::" not in msg
    assert not (tmp_path / "prepared").exists()  # nothing written before validation passed


@pytest.mark.parametrize("case", sorted(COUNTED))
def test_malformed_input_counted_under_policy(tmp_path, ray_local, case):
    m, s = _run(tmp_path, case)
    used, rejected, remapped = COUNTED[case]
    assert m["rows_read"] == N
    assert m["rows_used"] == used == sum(m["rows_per_split"].values())
    assert m["rejected_by_reason"] == rejected and m["rows_rejected"] == sum(rejected.values())
    assert m["remapped_by_reason"] == remapped
    assert m["rows_read"] == m["rows_used"] + m["rows_rejected"]
    per_file = m["input_files"]
    assert sum(f["rows_read"] for f in per_file.values()) == N
    assert sum(f["rows_used"] for f in per_file.values()) == used
    samples = pa.concat_tables([pads.dataset(str(tmp_path / "prepared" / sp)).to_table()
                                for sp in ("train", "valid", "test")
                                if (tmp_path / "prepared" / sp).exists()])
    assert samples.num_rows == used
    if case == "empty_file_and_markers":
        assert [p.rsplit("/", 1)[-1] for p in m["empty_files"]] == ["part-2.parquet"]
        assert sorted(p.rsplit("/", 1)[-1] for p in m["skipped_markers"]) == [
            ".part-0.parquet.crc", "_SUCCESS", "part-0.parquet.crc"]
    if case == "oov_remaps_unknown_ids":
        df = samples.to_pandas()
        unknown_items = df[df["_item"].isin([999, 998])]
        assert len(unknown_items) == 2 and (unknown_items["item_id"] == 0).all()
        unknown_user = df[df["_user"] == 77]
        # an unknown user keeps its own history (one user, 2 events) with user feature id 0
        assert len(unknown_user) == 2 and (unknown_user["user_id"] == 0).all()
        assert sorted(unknown_user["_pos"]) == [0, 1]
        assert m["tables"]["item"] == 51  # the table is not grown by unknown ids
