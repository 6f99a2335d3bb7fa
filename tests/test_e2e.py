"""End to end on a slice of the real MovieLens-100K: prepare -> train (2 Ray Train workers,
1 epoch) -> recommend, checking the outputs a user reads. The job is the main DIN job plus match
features (jobs/movielens_din_match.yaml), so prepare, training and serving all cover them."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from rectrain.config import load_config
from rectrain.data.features import FeatureLayout
from rectrain.data.prepare import prepare
from rectrain.data.schema import load_manifest
from rectrain.data.sources.movielens import load_movielens_100k, write_raw_logs
from rectrain.launch.ray_launch import train
from rectrain.models import build_model
from rectrain.models.base import main_logits
from rectrain.serve.recommend import recommend
from rectrain.checkpoint import load_checkpoint
from rectrain.train.metrics import auc

N_USERS = 120


@pytest.mark.slow
def test_movielens_slice_end_to_end(tmp_path, ray_local):
    tables = load_movielens_100k()
    keep = pa.array(np.arange(1, N_USERS + 1))
    tables["events"] = tables["events"].filter(pc.is_in(tables["events"]["user_id"], keep))
    tables["users"] = tables["users"].filter(pc.is_in(tables["users"]["user_id"], keep))
    raw = tmp_path / "raw"
    write_raw_logs(tables, str(raw))
    cfg = load_config("jobs/movielens_din_match.yaml", {
        "prepared_dir": str(tmp_path / "prepared"), "run_dir": str(tmp_path / "run"),
        "dataset": {"source": None, "events": str(raw / "events"),
                    "users": {"path": str(raw / "users"), "key": "user_id"},
                    "items": {"path": str(raw / "items"), "key": "item_id"}},
        "train": {"epochs": 1, "batch_size": 256, "num_workers": 2, "log_every": 5}})
    m = prepare(cfg)
    n_events = tables["events"].num_rows
    assert m["rows_read"] == n_events and m["rows_rejected"] == 0
    assert m["rows_per_split"]["test"] == 10 * N_USERS == m["rows_per_split"]["valid"]

    metrics = train(cfg)
    run = tmp_path / "run"
    assert json.loads((run / "metrics.json").read_text())["test_auc"] == metrics["test_auc"]
    assert metrics["test_rows"] == 10 * N_USERS and 0.5 < metrics["test_auc"] < 1.0
    assert metrics["world_size"] == 2 and metrics["train_samples_per_s"] > 0
    assert metrics["rows_per_split"] == m["rows_per_split"]
    pred = pq.read_table(run / "predictions" / "test.parquet")
    assert pred.column_names == ["user_id", "item_id", "timestamp", "label", "score"]
    assert pred.num_rows == 10 * N_USERS  # every test row scored exactly once
    test = pads.dataset(str(tmp_path / "prepared" / "test")).to_table()
    assert sorted(zip(pred["user_id"].to_pylist(), pred["item_id"].to_pylist(),
                      pred["timestamp"].to_pylist())) == \
        sorted(zip(test["_user"].to_pylist(), test["_item"].to_pylist(), test["_ts"].to_pylist()))
    assert auc(pred["score"].to_numpy(), pred["label"].to_numpy()) == \
        pytest.approx(metrics["test_auc"], abs=1e-6)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    # the DCP checkpoint loads into an unsharded model that reproduces the sharded test AUC
    layout = FeatureLayout(cfg, load_manifest(cfg.prepared_dir))
    assert [f.name for f in layout.match] == ["match_item", "match_genre"]
    assert layout.dense_dim == 6 and "_hist_ts" in test.column_names
    model = build_model(layout, cfg.model)
    meta = load_checkpoint(str(run / "checkpoint"), model)
    assert meta["epoch"] == metrics["best_epoch"] and "table_wise" in meta["plan"]
    model.eval()
    with torch.no_grad():
        logits = main_logits(model(layout.to_batch(test.select(layout.columns)))).numpy()
    assert auc(logits, test["label"].to_numpy()) == pytest.approx(metrics["test_auc"], abs=1e-5)

    path, n_users = recommend(str(run), k=10, explain=3)
    rec = pq.read_table(path)
    assert n_users == N_USERS and rec.num_rows == 10 * N_USERS
    assert rec["rank"].to_pylist()[:10] == list(range(1, 11))
    train_split = pads.dataset(str(tmp_path / "prepared" / "train")).to_table()
    seen = set(zip(train_split["_user"].to_pylist(), train_split["_item"].to_pylist()))
    pairs = list(zip(rec["user_id"].to_pylist(), rec["item_id"].to_pylist()))
    assert not seen.intersection(pairs)
    assert len(set(pairs)) == len(pairs)
    scores = rec["score"].to_numpy().reshape(N_USERS, 10)
    assert np.all(np.diff(scores, axis=1) <= 0)  # ranked best first
    # --explain: up to 3 past items of that user, by decreasing attention weight
    rated = set(zip(tables["events"]["user_id"].to_pylist(), tables["events"]["item_id"].to_pylist()))
    for u, ids, ws in zip(rec["user_id"].to_pylist(), rec["explain_item_ids"].to_pylist(),
                          rec["explain_weights"].to_pylist()):
        assert 1 <= len(ids) <= 3 and all((u, i) in rated for i in ids)
        assert ws == sorted(ws, reverse=True)
