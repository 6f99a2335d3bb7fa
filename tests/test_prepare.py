"""The Ray prepare stage on small synthetic logs: counts, sequences, errors, rejected rows."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from rectrain.config import config_from_dict
from rectrain.data.prepare import DataValidationError, prepare
from rectrain.data.schema import Manifest, load_manifest
from tests.support.tiny import tiny_job, tiny_tables


def _write_raw(tmp, tables, event_parts=(103, 97, 0, 55, 9, 1)):
    root = tmp / "raw"
    for name in ("users", "items"):
        (root / name).mkdir(parents=True)
        pq.write_table(tables[name], root / name / "part-0.parquet")
    ev = tables["events"]
    (root / "events").mkdir(parents=True)
    off = 0
    for i, n in enumerate(event_parts):
        pq.write_table(ev.slice(off, n), root / "events" / f"part-{i}.parquet")
        off += n
    (root / "events" / "_SUCCESS").write_text("")
    (root / "events" / ".part-0.parquet.crc").write_bytes(b"\x00")
    return off


def _read(prepared, split):
    return pads.dataset(str(prepared / split)).to_table()


def test_prepare_counts_sequences_and_manifest(tmp_path, ray_local):
    tables = tiny_tables(n_events=265)
    n = _write_raw(tmp_path, tables)
    cfg = config_from_dict(tiny_job(str(tmp_path)))
    m = prepare(cfg)
    assert m["rows_read"] == n == m["rows_used"] and m["rows_rejected"] == 0
    assert len(m["skipped_markers"]) == 2
    # per-user chronological split: last 2 test, 2 before valid, rest train
    ev = tables["events"].slice(0, n).to_pandas()
    ev["row"] = np.arange(n)
    per_user = ev.groupby("user_id").size()
    exp_test = int(np.minimum(per_user, 2).sum())
    exp_valid = int(np.clip(per_user - 2, 0, 2).sum())
    assert m["rows_per_split"] == {"train": n - exp_test - exp_valid, "valid": exp_valid,
                                   "test": exp_test}
    got = pa.concat_tables([_read(tmp_path / "prepared", s) for s in ("train", "valid", "test")])
    assert got.num_rows == n
    assert sum(sum(f.values()) for f in m["files_per_split"].values()) == n
    # sequences: previous items (encoded id = raw - 99 since item ids are 100..149), ties by row
    ev = ev.sort_values(["user_id", "timestamp", "row"])
    ev["pos"] = ev.groupby("user_id").cumcount()
    expected = {}
    for u, g in ev.groupby("user_id"):
        items = (g["item_id"] - 99).tolist()
        for p in range(len(items)):
            expected[(u, p)] = items[max(0, p - 8):p]
    df = got.to_pandas()
    for u, p, h in zip(df["_user"], df["_pos"], df["hist_item_id"]):
        assert list(h) == expected[(u, p)]
    # labels: rating >= 4
    assert set(df["label"].unique()) <= {0.0, 1.0}
    manifest = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    assert manifest["tables"]["item"] == 51 and manifest["tables"]["user_id"] == 31
    assert manifest["dense_stats"]["age"]["std"] > 0
    assert len(manifest["fingerprint"]) == 64  # schema + tables + vocabularies (issue 12)
    # dense stats over the train split (sample std, as Ray Data's std), summed over buckets
    train = _read(tmp_path / "prepared", "train").to_pandas()
    assert manifest["dense_stats"]["age"]["mean"] == pytest.approx(train["age"].mean())
    assert manifest["dense_stats"]["age"]["std"] == pytest.approx(train["age"].std(ddof=1))
    # train is shuffled globally: neither grouped by user nor in time order within a user
    runs = int((train["_user"].to_numpy()[1:] != train["_user"].to_numpy()[:-1]).sum())
    assert runs > 0.8 * len(train)
    assert (tmp_path / "prepared" / "catalog" / "items.parquet").exists()
    # the typed manifest reads back what prepare returned and wrote, field for field
    typed = Manifest.load(str(tmp_path / "prepared"))
    assert typed.rows_per_split == m["rows_per_split"] and typed.tables == manifest["tables"]
    on_disk = load_manifest(str(tmp_path / "prepared"))
    assert typed.to_dict() == on_disk == json.loads(json.dumps(m, default=str))


def test_bad_row_error_names_file_column_row_value(tmp_path, ray_local):
    tables = tiny_tables(n_events=120)
    ev = tables["events"].to_pandas()
    ev["user_id"] = ev["user_id"].astype("Int64")
    ev.loc[63, "user_id"] = None  # file part-1 (rows 60..119), row 3
    tables["events"] = pa.Table.from_pandas(ev, preserve_index=False)
    _write_raw(tmp_path, tables, event_parts=(60, 60))
    cfg = config_from_dict(tiny_job(str(tmp_path)))
    with pytest.raises(Exception) as e:
        prepare(cfg)
    msg = str(e.value)
    assert "part-1.parquet" in msg and "'user_id'" in msg and "row 3" in msg and "None" in msg


def test_skip_policy_counts_every_rejected_row(tmp_path, ray_local):
    tables = tiny_tables(n_events=200)
    ev = tables["events"].to_pandas()
    ev["rating"] = ev["rating"].astype("float64")
    ev.loc[[5, 6], "rating"] = np.nan          # 2 null labels
    ev.loc[[10, 11, 12], "item_id"] = 999      # 3 unknown items
    ev.loc[[20], "timestamp"] = -5             # 1 bad timestamp
    tables["events"] = pa.Table.from_pandas(ev, preserve_index=False)
    _write_raw(tmp_path, tables, event_parts=(100, 100))
    job = tiny_job(str(tmp_path))
    job["dataset"]["on_invalid"] = "skip"
    m = prepare(config_from_dict(job))
    assert m["rejected_by_reason"] == {"null_rating": 2, "unknown_item": 3, "bad_timestamp": 1}
    assert m["rows_read"] == 200 and m["rows_used"] == 194
    assert sum(m["rows_per_split"].values()) == 194


def _set(t, name, arr):
    return t.set_column(t.schema.get_field_index(name), name, arr)


@pytest.mark.parametrize("case, expected", [
    ("string_ids_in_one_file", ["part-0.parquet", "'user_id'", "string", "int64"]),
    ("missing_feature_source", ["missing column 'city'", "a feature's source"]),
    ("floor_div_on_list", ["'genres'", "feature 'g_bucket'", "floor_div"]),
    ("sparse_on_list", ["'genres'", "feature 'g_sparse'", "scalar"]),
    ("corrupt_file", ["part-1.parquet", "cannot read as Parquet"]),
])
def test_bad_input_errors_before_any_work(tmp_path, ray_local, case, expected):
    """Found by an adversarial run: each of these used to end in a raw traceback."""
    tables = tiny_tables(n_events=200)
    job = tiny_job(str(tmp_path))
    parts = None
    ev = tables["events"]
    if case == "string_ids_in_one_file":
        parts = [ev.slice(100), _set(ev.slice(0, 100), "user_id",
                                     pa.array([str(x) for x in ev["user_id"].to_pylist()[:100]]))]
    elif case == "missing_feature_source":
        job["features"].append({"name": "city", "kind": "sparse", "source": "city"})
    elif case == "floor_div_on_list":
        job["features"].append({"name": "g_bucket", "kind": "sparse", "source": "genres",
                                "transform": {"floor_div": 10}})
    elif case == "sparse_on_list":
        job["features"].append({"name": "g_sparse", "kind": "sparse", "source": "genres"})
    root = tmp_path / "raw"
    _write_raw(tmp_path, tables, event_parts=(100, 100))
    if parts is not None:
        for i, p in enumerate(parts):
            pq.write_table(p, root / "events" / f"part-{i}.parquet")
    if case == "corrupt_file":
        f = root / "events" / "part-1.parquet"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "keep.txt").write_text("last good output")
    with pytest.raises(DataValidationError) as e:
        prepare(config_from_dict(job))
    for s in expected:
        assert s in str(e.value)
    assert "ray::" not in str(e.value) and "Traceback" not in str(e.value)
    assert (tmp_path / "prepared" / "keep.txt").exists()  # a failed run leaves the old output


def test_skip_counts_staging_dirs_nan_dense_and_wide_ids(tmp_path, ray_local):
    tables = tiny_tables(n_events=200)
    users = tables["users"]
    ages = [float(a) for a in users["age"].to_pylist()]
    ages[3], ages[5] = float("nan"), float("inf")
    tables["users"] = _set(users, "age", pa.array(ages))
    tables["items"] = _set(tables["items"], "item_id", tables["items"]["item_id"].cast(pa.int32()))
    ev = tables["events"]
    ids = ev["item_id"].to_pylist()
    ids[7] = 2**40  # does not fit the int32 key: an unknown item, not a type error
    tables["events"] = _set(ev, "item_id", pa.array(ids, pa.int64()))
    _write_raw(tmp_path, tables, event_parts=(100, 100))
    ev_dir = tmp_path / "raw" / "events"
    for sub in ("_temporary/0/task_1", ".hive-staging"):
        (ev_dir / sub).mkdir(parents=True)
        pq.write_table(tables["events"].slice(0, 50), ev_dir / sub / "part-9.parquet")
    job = tiny_job(str(tmp_path))
    job["dataset"]["on_invalid"] = "skip"
    job["features"] = [f for f in job["features"] if f["name"] != "age_bucket"]
    m = prepare(config_from_dict(job))
    assert m["rows_read"] == 200  # the staging folders' 100 rows are not data
    assert sum("_temporary" in p or ".hive-staging" in p for p in m["skipped_markers"]) == 2
    assert m["rejected_by_reason"] == {"unknown_item": 1} and m["rows_used"] == 199
    users_df = tables["users"].to_pandas()
    ev_df = tables["events"].to_pandas()
    bad_users = set(users_df["user_id"][~np.isfinite(users_df["age"])])
    n_bad_events = int(ev_df.drop(index=7)["user_id"].isin(bad_users).sum())  # row 7: rejected
    assert m["dense_stats"]["age"]["missing_imputed"] == n_bad_events > 0
    assert np.isfinite(m["dense_stats"]["age"]["mean"])


def test_mixed_int_widths_uint_timestamps_and_offset_dense_stats(tmp_path, ray_local):
    """Files of different integer widths give one schema in every output file; uint32
    timestamps are read; the std of a dense feature with a large offset (1.6e9 + N(0, 1),
    e.g. a timestamp-like value) is exact, not lost to cancellation."""
    tables = tiny_tables(n_events=400)
    ev = tables["events"]
    rng = np.random.default_rng(1)
    ev = ev.append_column("score", pa.array(1.6e9 + rng.normal(0, 1.0, ev.num_rows)))
    narrow = pa.schema([(f.name, pa.int32() if f.name != "score" else pa.float64())
                        for f in ev.schema])
    a = ev.filter(pc.less_equal(ev["user_id"], 15)).cast(narrow)
    b = ev.filter(pc.greater(ev["user_id"], 15))
    for name in ("users", "items"):
        (tmp_path / "raw" / name).mkdir(parents=True)
        pq.write_table(tables[name], tmp_path / "raw" / name / "part-0.parquet")
    (tmp_path / "raw" / "events").mkdir(parents=True)
    pq.write_table(a, tmp_path / "raw" / "events" / "part-0.parquet")
    pq.write_table(b, tmp_path / "raw" / "events" / "part-1.parquet")
    job = tiny_job(str(tmp_path))
    job["features"].append({"name": "score", "kind": "dense", "source": "score"})
    m = prepare(config_from_dict(job))
    assert m["rows_used"] == ev.num_rows
    for split in ("train", "valid", "test"):
        schemas = {str(pq.read_schema(f)) for f in (tmp_path / "prepared" / split).iterdir()}
        assert len(schemas) == 1, split
        assert pq.read_schema(next((tmp_path / "prepared" / split).iterdir())).field(
            "_user").type == pa.int64()
    train = _read(tmp_path / "prepared", "train").to_pandas()
    assert m["dense_stats"]["score"]["std"] == pytest.approx(train["score"].std(ddof=1),
                                                             rel=1e-6)
    assert 0.8 < m["dense_stats"]["score"]["std"] < 1.2

    # unsigned timestamps narrower than 64 bits
    ts = ev.drop_columns(["score"])
    ts = ts.set_column(3, "timestamp", pc.cast(ts["timestamp"], pa.uint32()))
    for f in (tmp_path / "raw" / "events").iterdir():
        f.unlink()
    pq.write_table(ts, tmp_path / "raw" / "events" / "part-0.parquet")
    job["features"] = job["features"][:-1]
    m = prepare(config_from_dict(job))
    assert m["rows_used"] == ts.num_rows and m["rows_rejected"] == 0


def test_workers_import_pandas_before_any_task(ray_local):
    """Every worker of the local Ray has pandas fully imported before its first task runs (the
    ``worker_process_setup_hook``), so a task Ray interrupts with ``ray.cancel`` (as Ray Data
    stops a failed dataset's tasks) can never leave pandas half imported in a worker Ray reuses:
    CI once failed a later Ray Data task with ``module 'pandas' has no attribute 'core'``."""
    @ray_local.remote
    def pandas_state():
        import os
        import sys
        pd = sys.modules.get("pandas")
        return os.getpid(), pd is not None and hasattr(pd, "core") and hasattr(pd, "DataFrame")

    states = ray_local.get([pandas_state.remote() for _ in range(6)])
    assert all(ok for _, ok in states), states


def test_event_distincts_merge_files_of_mixed_widths_lists_and_nulls(tmp_path, ray_local):
    """The event-level vocabulary pass (a Ray task per file) returns every distinct value over
    all files: int32 and int64 files merged as int64, uint64 above 2**63 kept, list columns as
    one list row of their distinct elements, dictionary-encoded strings decoded, one null kept
    (a transform such as ``year`` maps it to a value of its own), an empty file without the
    columns skipped."""
    from rectrain.data.prepare.vocab import event_distincts

    big = 2**63 + 5
    a = pa.table({"item": pa.array([3, 1, 3, None], pa.int32()),
                  "tags": pa.array([[1, 2], None, [2, None], []], pa.list_(pa.int32())),
                  "cat": pa.array(["x", "y", None, "x"]).dictionary_encode(),
                  "big": pa.array([[big], [], [1], [big]], pa.list_(pa.uint64()))})
    b = pa.table({"item": pa.array([2**40, 1], pa.int64()),
                  "tags": pa.array([[7], [1]], pa.list_(pa.int64())),
                  "cat": pa.array(["z", "x"]).dictionary_encode(),
                  "big": pa.array([[2], [big + 1]], pa.list_(pa.uint64()))})
    c = pa.table({"item": pa.array([5], pa.int64()), "tags": pa.array([[9]], pa.list_(pa.int64())),
                  "cat": pa.nulls(1), "big": pa.array([[3]], pa.list_(pa.uint64()))})
    empty = pa.table({"other": pa.array([], pa.int64())})
    files = []
    for i, t in enumerate((a, b, c, empty)):
        files.append(str(tmp_path / f"part-{i}.parquet"))
        pq.write_table(t, files[-1])
    types = {"item": pa.int32(), "tags": pa.list_(pa.int32()), "cat": a["cat"].type,
             "big": pa.list_(pa.uint64())}
    d = event_distincts(files, ["item", "tags", "cat", "big"], types)

    def values(arr):
        return sorted(arr.to_pylist(), key=lambda v: (v is None, v))

    assert d["item"].type == pa.int64() and values(d["item"]) == [1, 3, 5, 2**40, None]
    assert len(d["tags"]) == 1 and values(d["tags"].values) == [1, 2, 7, 9, None]
    assert d["cat"].type == pa.string() and values(d["cat"]) == ["x", "y", "z", None]
    assert values(d["big"].values) == [1, 2, 3, big, big + 1]


@pytest.mark.parametrize("first, second, row, value", [
    (pa.array([1, 2], pa.int64()), pa.array([3, 2**63 + 9, 4], pa.uint64()), 1, 2**63 + 9),
    (pa.array([1, 2**63 + 1], pa.uint64()), pa.array([5, 6, -3], pa.int64()), 2, -3)])
def test_event_distincts_name_a_value_no_merged_type_holds(tmp_path, ray_local, first, second,
                                                           row, value):
    """A value that the merged integer type cannot hold (uint64 above 2**63 beside int64 files,
    a negative id beside uint64 files) stops prepare naming file, column, row and value."""
    from rectrain.data.prepare.vocab import event_distincts

    files = []
    for i, arr in enumerate((first, second)):
        files.append(str(tmp_path / f"part-{i}.parquet"))
        pq.write_table(pa.table({"user_id": arr}), files[-1])
    with pytest.raises(DataValidationError) as e:
        event_distincts(files, ["user_id"], {"user_id": first.type})
    msg = str(e.value)
    assert all(s in msg for s in (files[1], "'user_id'", f"row {row}", f"value {value}")), msg


def test_an_empty_split_stops_prepare_with_the_reason(tmp_path, ray_local):
    """``dataset.split.valid: 0`` prepares no valid rows: prepare stops at its end naming the
    field (before, it succeeded and train failed later on a bare path); the manifest with the
    counts is still written."""
    _write_raw(tmp_path, tiny_tables(n_events=265))
    cfg = config_from_dict(tiny_job(str(tmp_path), dataset={
        **tiny_job(str(tmp_path))["dataset"], "split": {"test": 2, "valid": 0}}))
    with pytest.raises(ValueError, match=r"valid split is empty.*dataset\.split\.valid is 0"):
        prepare(cfg)
    assert load_manifest(str(tmp_path / "prepared"))["rows_per_split"]["valid"] == 0


def test_sentinel_timestamps_rejected_and_nulls_counted(tmp_path, ray_local):
    """A 9999-12-31 "unknown" timestamp is rejected by default (before: it passed and became a
    test row), naming dataset.max_timestamp; null side-table scalars (id 0) and null lists
    (empty) are counted in the manifest (before: silently encoded, uncounted)."""
    tables = tiny_tables(n_events=200)
    ev = tables["events"].to_pandas()
    ev.loc[[7], "timestamp"] = 253_402_214_400  # 9999-12-31T00:00:00Z
    tables["events"] = pa.Table.from_pandas(ev, preserve_index=False)
    users, items = tables["users"].to_pylist(), tables["items"].to_pylist()
    users[0]["age"] = users[3]["age"] = None
    items[2]["genres"] = None
    tables["users"] = pa.Table.from_pylist(users, tables["users"].schema)
    tables["items"] = pa.Table.from_pylist(items, tables["items"].schema)
    _write_raw(tmp_path, tables, event_parts=(100, 100))
    with pytest.raises(DataValidationError, match=r"part-0.parquet: column 'timestamp' row 7: "
                                                  r"timestamp outside \[0, 4102444800\].*"
                                                  r"dataset\.max_timestamp.*253402214400"):
        prepare(config_from_dict(tiny_job(str(tmp_path))))
    job = tiny_job(str(tmp_path))
    job["dataset"]["on_invalid"] = "skip"
    m = prepare(config_from_dict(job))
    assert m["rejected_by_reason"] == {"bad_timestamp": 1}
    assert m["null_values"] == {"users.age_bucket": 2, "items.genres": 1}
