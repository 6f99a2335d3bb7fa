"""End to end on tiny synthetic logs: prepare (leave-last-out) -> train SASRec with 2 Ray Train
workers (sharded item table), one of which dies mid-epoch -> full-ranking metrics with the
most-popular baseline -> recommend, checking the outputs a user reads."""

import json

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from rectrain.data.prepare import prepare
from rectrain.launch.ray_launch import train
from rectrain.serve.recommend import recommend
from tests.support.tiny import N_ITEMS, N_USERS, tiny_cfg, tiny_tables


@pytest.mark.slow
def test_sasrec_killed_worker_resumes_and_the_run_reads_right(tmp_path, ray_local, monkeypatch):
    """The ranking jobs' fault-tolerance check for a retrieval model: one of 2 workers kills
    itself (``os._exit``) after step 5 of the epoch; Ray Train restarts the worker group, which
    resumes from the step-4 checkpoint and finishes with every row of the epoch trained once and
    every test user ranked once. Then what a user reads: metrics.json, the predictions (ranks
    agree with the metrics), and recommend's lists (no seen item, scores descending)."""
    from rectrain.data.sources.movielens import write_raw_logs
    from rectrain.train.faults import FAULT_ENV, marker_url

    tables = tiny_tables(n_events=1200)
    write_raw_logs(tables, str(tmp_path / "raw"))
    cfg = tiny_cfg(str(tmp_path),
                   model={"name": "sasrec", "embedding_dim": 8, "seq_layers": 1,
                          "retrieval_loss": "in_batch"},
                   train={"batch_size": 16, "eval_batch_size": 8, "epochs": 1,
                          "num_workers": 2, "log_every": 100},
                   checkpoint={"every_n_steps": 2, "max_failures": 1})
    m = prepare(cfg)
    n_train = m["rows_per_split"]["train"]
    n_users = len(set(tables["events"]["user_id"].to_pylist()))
    assert m["rows_per_split"]["test"] == n_users == m["rows_per_split"]["valid"]
    steps = n_train // (2 * 16)
    assert steps > 6  # the fault is mid-epoch
    monkeypatch.setenv(FAULT_ENV, "1:5:exit")
    metrics = train(cfg)
    assert storage_json(marker_url(str(tmp_path / "run"), 1, 5)) == {"step": 5, "rank": 1}
    ep = metrics["epochs"][0]
    assert ep["resumed_at_row"] == 4 * 2 * 16
    assert ep["train_rows"] == steps * 2 * 16
    assert ep["train_rows"] + ep["train_rows_dropped"] == n_train
    assert metrics["test"]["users"] == n_users

    run = tmp_path / "run"
    assert json.loads((run / "metrics.json").read_text())["test"] == metrics["test"]
    test, pop = metrics["test"], metrics["baseline_most_popular"]["test"]
    assert test["users"] == pop["users"] == n_users  # every user exactly once, both gathered
    assert metrics["world_size"] == 2 and metrics["protocol"]["items_ranked"] == N_ITEMS
    pred = pq.read_table(run / "predictions" / "test.parquet").to_pandas()
    assert sorted(pred["user_id"]) == sorted(pads.dataset(str(tmp_path / "prepared" / "test"))
                                             .to_table()["_user"].to_pylist())
    # the metrics are the ranks' averages; ranks lie in [1, items - seen]
    assert test["hr@10"] == pytest.approx(float(np.mean(pred["rank"] <= 10)))
    assert pop["hr@20"] == pytest.approx(float(np.mean(pred["most_popular_rank"] <= 20)))
    assert pred["rank"].between(1, N_ITEMS).all()

    path, n = recommend(str(run), k=5)
    rec = pq.read_table(path)
    assert n == N_USERS and rec.num_rows == 5 * N_USERS
    events = tables["events"]
    seen = set(zip(events["user_id"].to_pylist(), events["item_id"].to_pylist()))
    pairs = list(zip(rec["user_id"].to_pylist(), rec["item_id"].to_pylist()))
    assert not seen.intersection(pairs) and len(set(pairs)) == len(pairs)
    assert np.all(np.diff(rec["score"].to_numpy().reshape(N_USERS, 5), axis=1) <= 0)


def storage_json(url):
    from rectrain.data import storage
    return storage.read_json(url)
