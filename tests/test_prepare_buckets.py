"""Prepare's user-bucket count grows with the log, so a sequence task's memory follows the
bucket's events (about ``EVENTS_PER_BUCKET`` at most), not the log's (no Ray)."""

import pyarrow as pa
import pyarrow.parquet as pq

from rectrain.config import DatasetSpec
from rectrain.data.prepare import EVENTS_PER_BUCKET, MIN_BUCKETS, bucket_count
from rectrain.data.prepare.validate import check_event_schemas


def test_bucket_count_is_fixed_for_small_logs_and_grows_with_large_ones():
    assert bucket_count(0) == MIN_BUCKETS
    assert bucket_count(100_000) == MIN_BUCKETS
    assert bucket_count(MIN_BUCKETS * EVENTS_PER_BUCKET) == MIN_BUCKETS
    assert bucket_count(MIN_BUCKETS * EVENTS_PER_BUCKET + 1) == MIN_BUCKETS + 1
    for rows in (10_000_000, 50_000_000, 10**9):
        n = bucket_count(rows)
        assert rows / n <= EVENTS_PER_BUCKET < rows / (n - 1)


def test_check_event_schemas_counts_the_rows_from_the_footers(tmp_path):
    paths = []
    for i, n in enumerate((5, 0, 7)):
        t = pa.table({"user_id": pa.array(range(n), pa.int64()),
                      "item_id": pa.array(range(n), pa.int64()),
                      "timestamp": pa.array(range(n), pa.int64()),
                      "rating": pa.array([1.0] * n)})
        paths.append(str(tmp_path / f"e{i}.parquet"))
        pq.write_table(t, paths[-1])
    spec = DatasetSpec(events=str(tmp_path), user_column="user_id", item_column="item_id",
                       timestamp_column="timestamp", label={"column": "rating"})
    types, rows = check_event_schemas(paths, spec, [])
    assert rows == 12
    assert types["timestamp"] == pa.int64()
