"""The Ray prepare stage on small synthetic logs: counts, sequences, errors, rejected rows."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from rectrain.config import config_from_dict
from rectrain.data.prepare import DataValidationError, prepare
from tests.helpers import tiny_job, tiny_tables


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
    assert (tmp_path / "prepared" / "catalog" / "items.parquet").exists()


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
