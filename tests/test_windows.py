"""Time windows (issue 14): train on window N, valid/test on window N+1, sequences over all
earlier events, ids stable across windows through vocab_from."""

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from rectrain.config import config_from_dict
from rectrain.config.load import ConfigError
from rectrain.data.prepare.windows import parse_duration, split_codes, window_bounds
from tests.support.tiny import SEQ_LEN, tiny_job, tiny_tables

DAY = 86400


def test_durations_bounds_and_codes():
    assert [parse_duration(x) for x in ("7d", "12h", "30m", "45s", "2w", 90)] == \
        [7 * DAY, 12 * 3600, 1800, 45, 14 * DAY, 90]
    with pytest.raises(ValueError, match="dataset.windows.size: '7y'"):
        parse_duration("7y")
    spec = config_from_dict(tiny_job("/t", dataset={"windows": {"size": "7d", "start": 0},
                                                    "window": 1})).dataset
    b = window_bounds(spec, 5, 30 * DAY - 1)  # 5 windows: [0,7d) .. [28d,35d)
    assert b["num_windows"] == 5 and b["train"] == [7 * DAY, 14 * DAY]
    assert b["valid"] == [14 * DAY, 14 * DAY + 7 * DAY // 2]
    assert b["test"] == [b["valid"][1], 21 * DAY]
    ts = np.array([0, 7 * DAY - 1, 7 * DAY, 14 * DAY, 18 * DAY, 21 * DAY - 1, 21 * DAY])
    assert split_codes(ts, b).tolist() == [3, 3, 0, 1, 2, 2, 4]
    spec.windows.cumulative = True
    assert window_bounds(spec, 5, 30 * DAY - 1)["train"] == [0, 14 * DAY]
    spec.window = 4
    with pytest.raises(ValueError, match="dataset.window: 4 has no next window.*5 windows"):
        window_bounds(spec, 5, 30 * DAY - 1)
    with pytest.raises(ValueError, match="exactly one of size, boundaries"):
        config_from_dict(tiny_job("/t", dataset={"windows": {"size": "1d",
                                                             "boundaries": [0, 5]}}))
    explicit = config_from_dict(tiny_job("/t", dataset={
        "windows": {"boundaries": [0, 10, 20, 40], "valid_fraction": 0.0}, "window": 0}))
    assert window_bounds(explicit.dataset, 0, 39) == {
        "index": 0, "num_windows": 3, "boundaries": [0, 10, 20, 40], "cumulative": False,
        "train": [0, 10], "valid": [10, 10], "test": [10, 20]}


def _job(tmp, window, vocab_from=None):
    job = tiny_job(str(tmp), prepared_dir=str(tmp / f"w{window}"))
    for f in job["features"]:
        if f["name"] in ("user_id", "item_id", "age_bucket", "genres"):
            f["capacity"] = 60
    job["dataset"] = {**job["dataset"], "windows": {"size": "7d", "start": 0},
                      "window": window, "vocab_from": vocab_from}
    return config_from_dict(job)


def test_window_prepares_split_by_time_sequences_span_windows_ids_stay(tmp_path, ray_local):
    from rectrain.data.prepare import prepare

    t = tiny_tables(n_events=500)
    rng = np.random.default_rng(3)
    ts = rng.integers(0, 30 * DAY, 500)
    ev = t["events"].set_column(3, "timestamp", pa.array(ts, pa.int64()))
    for name, tb in (("users", t["users"]), ("items", t["items"]), ("events", ev)):
        (tmp_path / "raw" / name).mkdir(parents=True)
        pq.write_table(tb, tmp_path / "raw" / name / "part-0.parquet")
    m1 = prepare(_job(tmp_path, 1))
    w = m1["window"]
    assert (w["train"], w["test"][1]) == ([7 * DAY, 14 * DAY], 21 * DAY)
    counts = {"train": ((ts >= 7 * DAY) & (ts < 14 * DAY)).sum(),
              "valid": ((ts >= 14 * DAY) & (ts < w["valid"][1])).sum(),
              "test": ((ts >= w["valid"][1]) & (ts < 21 * DAY)).sum()}
    assert m1["rows_per_split"] == {k: int(v) for k, v in counts.items()}
    assert (w["rows_before"], w["rows_after"]) == (int((ts < 7 * DAY).sum()),
                                                   int((ts >= 21 * DAY).sum()))
    assert m1["rows_read"] == m1["rows_used"] + w["rows_before"] + w["rows_after"]
    got = pa.concat_tables([pads.dataset(str(tmp_path / "w1" / s)).to_table()
                            for s in ("train", "valid", "test")]).to_pandas()
    assert got["_ts"].between(7 * DAY, 21 * DAY - 1).all()
    # sequences: the user's strictly earlier events of every window (ties by row order)
    df = ev.to_pandas()
    df["row"] = np.arange(len(df))
    df = df.sort_values(["user_id", "timestamp", "row"])
    df["pos"] = df.groupby("user_id").cumcount()
    hist = {}
    for u, g in df.groupby("user_id"):
        items = (g["item_id"] - 99).tolist()  # items table 100..149 in sorted order
        for p in range(len(items)):
            hist[(u, p)] = items[max(0, p - SEQ_LEN):p]
    assert all(list(h) == hist[(u, p)] for u, p, h in
               zip(got["_user"], got["_pos"], got["hist_item_id"]))
    early = got[got["_ts"] < 8 * DAY]  # train events whose history lies in window 0
    assert (early["hist_item_id"].map(len) > 0).any()
    # the next window, extending window 1's vocabularies: every id keeps its row
    m2 = prepare(_job(tmp_path, 2, vocab_from=str(tmp_path / "w1")))
    assert m2["window"]["train"] == [14 * DAY, 21 * DAY] and m2["tables"] == m1["tables"]
    v1 = pq.read_table(tmp_path / "w1" / "vocab" / "item_id.parquet").to_pydict()
    v2 = pq.read_table(tmp_path / "w2" / "vocab" / "item_id.parquet").to_pydict()
    assert v2["value"][:len(v1["value"])] == v1["value"]
    from rectrain.data.schema import check_same_data, data_identity
    assert check_same_data(data_identity(m1), m2, "ck", str(tmp_path / "w2")) in ("same",
                                                                                  "extends")


def test_window_settings_that_match_no_events_are_named():
    with pytest.raises(ConfigError, match=r"dataset.window: 3 is set but dataset.windows is not"):
        config_from_dict(tiny_job("/t", dataset={"window": 3}))
    late = config_from_dict(tiny_job("/t", dataset={"windows": {"size": "1d", "start": 10**10},
                                                    "window": 0})).dataset
    with pytest.raises(ValueError, match=r"dataset.windows.start: 10000000000 is after the "
                                         r"last event \(1040"):
        window_bounds(late, 1000, 1040)
    one = config_from_dict(tiny_job("/t", dataset={"windows": {"size": "1d"}, "window": 0}))
    with pytest.raises(ValueError, match=r"dataset.windows: .* makes 1 window"):
        window_bounds(one.dataset, 1000, 1040)
