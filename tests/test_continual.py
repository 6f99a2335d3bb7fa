"""``rectrain continual`` (issue 14): the window loop with the warm and never policies, prepares
under the session's Ray, training in this process (one gloo rank) in place of Ray Train."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rectrain.config import config_from_dict
from tests.support.tiny import tiny_job, tiny_tables

DAY = 86400


def test_continual_warm_and_never_over_windows(tmp_path, ray_local, monkeypatch):
    from rectrain.launch import continual as cont
    from rectrain.launch import ray_launch
    from tests.test_warm_start import _run_inprocess

    t = tiny_tables(n_events=600)
    ts = np.random.default_rng(5).integers(0, 21 * DAY, 600)
    ev = t["events"].set_column(3, "timestamp", pa.array(ts, pa.int64()))
    for name, tb in (("users", t["users"]), ("items", t["items"]), ("events", ev)):
        (tmp_path / "raw" / name).mkdir(parents=True)
        pq.write_table(tb, tmp_path / "raw" / name / "part-0.parquet")
    job = tiny_job(str(tmp_path), train={"epochs": 1, "batch_size": 16, "eval_batch_size": 64,
                                         "num_workers": 1, "log_every": 100})
    for f in job["features"]:
        if f["name"] in ("user_id", "item_id", "age_bucket", "genres"):
            f["capacity"] = 60
    job["dataset"]["windows"] = {"size": "7d", "start": 0}
    trained = []

    def fake_train(c, address=None):
        trained.append((c.dataset.window, c.checkpoint.warm_start))
        return _run_inprocess(c.model_dump(mode="json"))

    monkeypatch.setattr(ray_launch, "train", fake_train)
    with pytest.raises(ValueError, match="unknown policy 'sometimes'"):
        cont.continual(config_from_dict(job), ["sometimes"])
    rows = cont.continual(config_from_dict(job), ["warm", "never"])
    warm0 = str(tmp_path / "run" / "warm" / "window-000")
    assert trained == [(0, None), (1, warm0)]  # window 2 has no successor
    assert [(r["window"], r["policy"]) for r in rows] == [(0, "warm"), (0, "never"),
                                                          (1, "warm"), (1, "never")]
    assert rows[0]["test_auc"] == rows[1]["test_auc"]  # the same model at window 0
    assert rows[3]["train_rows"] == 0 and 0 < rows[3]["test_auc"] < 1
    assert rows[2]["train_rows"] > 0 and rows[2]["train_seconds"] > 0
    import json
    saved = json.load(open(tmp_path / "run" / "continual.json"))
    assert saved["rows"] == json.loads(json.dumps(rows))
    png = tmp_path / "run" / "continual.png"  # the curve (matplotlib: the [bench] extra)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    w1 = json.load(open(tmp_path / "prepared" / "window-001" / "manifest.json"))
    assert w1["vocab_growth"]["vocab_from"] == str(tmp_path / "prepared" / "window-000")
    # a second call finds every window done: nothing is trained again
    trained.clear()
    again = cont.continual(config_from_dict(job), ["warm", "never"])
    assert trained == [] and [r["test_auc"] for r in again] == [r["test_auc"] for r in rows]
    assert "window" in cont.table_text(rows)


def test_a_partial_last_window_ends_the_loop_and_an_empty_middle_window_does_not(
        tmp_path, monkeypatch):
    """The log's last window is often partial: when the second-to-last window's prepare finds
    its successor's valid or test split empty, ``rectrain continual`` stops there (no Ray)."""
    import json
    import types

    import pytest

    from rectrain.launch import continual, jobs

    def manifest(index, test_rows):
        return {"window": {"index": index, "num_windows": 7},
                "rows_per_split": {"train": 100, "valid": 10, "test": test_rows}}

    assert continual._short_tail(manifest(5, 0))
    assert not continual._short_tail(manifest(5, 3))
    assert not continual._short_tail(manifest(2, 0))
    assert not continual._short_tail({})

    def failing_prepare(written):  # prepare saves its manifest, then raises on empty splits
        def prepare(c, address=None):
            if written is not None:
                (tmp_path / c.prepared_dir).mkdir()
                (tmp_path / c.prepared_dir / "manifest.json").write_text(json.dumps(written))
            raise ValueError("the test split of window 6 is empty")
        return prepare

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(jobs, "prepare_job", failing_prepare(manifest(5, 0)))
    got = continual._prepared(types.SimpleNamespace(prepared_dir="tail"), None)
    assert got["window"]["index"] == 5 and continual._short_tail(got)
    for name, written in (("middle", manifest(2, 0)), ("none", None)):
        monkeypatch.setattr(jobs, "prepare_job", failing_prepare(written))
        with pytest.raises(ValueError, match="is empty"):
            continual._prepared(types.SimpleNamespace(prepared_dir=name), None)


def test_a_windows_zch_counts_sum_its_epochs_and_keep_the_last_held():
    from rectrain.launch.continual import _zch_counts

    epochs = [{"zch_item_admitted": 30, "zch_item_evicted": 5, "zch_item_held": 25, "loss": 1},
              {"zch_item_admitted": 4, "zch_item_evicted": 4, "zch_item_held": 25}]
    assert _zch_counts(epochs) == {"zch_item_admitted": 34, "zch_item_evicted": 9,
                                   "zch_item_held": 25}
    assert _zch_counts([]) == {}
