"""Many small events files (issue 12, kind 8): grouped into few read tasks by bytes, the
grouping stated in the manifest, the prepared samples the same as from one file."""

import logging

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from rectrain.config import config_from_dict
from rectrain.data.prepare import prepare
from rectrain.data.prepare.readtasks import TASK_FILES, group_files
from tests.support.tiny import tiny_job, tiny_tables


def test_group_files_keeps_order_and_bounds_bytes_and_count():
    sizes = [10] * 7 + [100] + [10] * 3
    groups = group_files(sizes, task_bytes=35, task_files=3)
    assert [i for g in groups for i in g] == list(range(len(sizes)))  # each once, in order
    assert groups == [[0, 1, 2], [3, 4, 5], [6], [7], [8, 9, 10]]
    assert group_files([5] * 1000, task_bytes=10**9, task_files=256)[-1] == list(range(768, 1000))
    assert group_files([]) == []


def _write(tmp, events, n_files):
    t = tiny_tables(seed=3)
    for name in ("users", "items"):
        (tmp / "raw" / name).mkdir(parents=True)
        pq.write_table(t[name], tmp / "raw" / name / "part-0.parquet")
    (tmp / "raw" / "events").mkdir(parents=True)
    per = -(-events.num_rows // n_files)
    for i in range(n_files):
        pq.write_table(events.slice(i * per, per), tmp / "raw" / "events" / f"part-{i:04d}.parquet")


def test_tiny_files_share_read_tasks_and_prepare_the_same_samples(tmp_path, ray_local, caplog):
    events = tiny_tables(seed=3, n_events=600)["events"]
    out = {}
    for name, n_files in (("one", 1), ("many", 300)):
        _write(tmp_path / name, events, n_files)
        with caplog.at_level(logging.WARNING, logger="rectrain.data.prepare.readtasks"):
            out[name] = prepare(config_from_dict(tiny_job(str(tmp_path / name))))
    rt = out["many"]["read_tasks"]
    assert rt["files"] == 300 and rt["small_files"] == 300
    assert rt["tasks"] == -(-300 // TASK_FILES) == 2  # not 300
    assert rt["files_per_task"] == {"min": 300 - TASK_FILES, "max": TASK_FILES, "mean": 150.0}
    assert out["one"]["read_tasks"]["tasks"] == 1
    assert "300 of 300 events files are under 1024 KiB" in caplog.text
    assert len(out["many"]["input_files"]) == 300  # counts stay per file
    assert sum(f["rows_read"] for f in out["many"]["input_files"].values()) == 600
    for k in ("rows_read", "rows_used", "rows_per_split", "tables", "fingerprint", "schema"):
        assert out["many"][k] == out["one"][k], k
    for split in ("train", "valid", "test"):
        a, b = (pads.dataset(str(tmp_path / n / "prepared" / split)).to_table()
                for n in ("one", "many"))
        assert a.equals(b), split  # same rows, same order (train: the same seeded shuffle)


def test_a_bad_row_in_a_grouped_file_is_counted_against_that_file(tmp_path, ray_local):
    """A group with a rejected row is redone file by file: the counts name the file."""
    events = tiny_tables(seed=3, n_events=600)["events"]
    ts = events["timestamp"].to_numpy().copy()
    ts[301] = -5  # file 150 (2 rows per file), its row 1
    events = events.set_column(events.schema.get_field_index("timestamp"), "timestamp",
                               pa.array(ts))
    _write(tmp_path, events, 300)
    job = tiny_job(str(tmp_path))
    job["dataset"]["on_invalid"] = "skip"
    m = prepare(config_from_dict(job))
    bad = [f for f, s in m["input_files"].items() if s["rejected"]]
    assert len(bad) == 1 and bad[0].endswith("part-0150.parquet")
    assert m["input_files"][bad[0]] == {"rows_read": 2, "rows_used": 1,
                                        "rejected": {"bad_timestamp": 1}, "remapped": {}}
    assert m["rows_rejected"] == 1 and m["rows_used"] == 599 and m["read_tasks"]["tasks"] == 2


def test_file_sizes_from_one_listing_local_and_remote(tmp_path):
    """Sizes for the grouping: local paths and fsspec URLs (memory:// stands in for s3://:
    same code path, protocol stripped, one `find` with details)."""
    import fsspec

    from rectrain.data import storage

    local = []
    for i, n in enumerate((3, 70, 0)):
        p = tmp_path / "ev" / f"part-{i}.parquet"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"x" * n)
        local.append(str(p))
    assert storage.file_sizes(local) == [3, 70, 0]
    assert storage.file_sizes(local[1:2]) == [70]
    fs = fsspec.filesystem("memory")
    urls = [f"memory://sizes-test/ev/sub/part-{i}.parquet" for i in range(2)]
    for u, n in zip(urls, (11, 5)):
        fs.pipe(u, b"y" * n)
    assert storage.file_sizes(storage.list_parquet_files("memory://sizes-test/ev")[0]) == [11, 5]
    assert storage.file_sizes([]) == []
