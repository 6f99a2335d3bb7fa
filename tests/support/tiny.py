"""Shared test fixtures: a tiny synthetic job whose data has every feature kind."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from rectrain.config import MODEL_SPECS, RETRIEVAL_MODELS, config_from_dict, model_fields

N_USERS, N_ITEMS, N_GENRES, SEQ_LEN = 30, 50, 6, 8


def tiny_job(tmp: str, **over) -> dict:
    """A job dict over raw logs under ``tmp`` (see :func:`write_tiny_raw`)."""
    job = {
        "name": "tiny",
        "prepared_dir": f"{tmp}/prepared",
        "run_dir": f"{tmp}/run",
        "dataset": {
            "events": f"{tmp}/raw/events",
            "users": {"path": f"{tmp}/raw/users", "key": "user_id"},
            "items": {"path": f"{tmp}/raw/items", "key": "item_id"},
            "label": {"column": "rating", "threshold": 4},
            "sequence_length": SEQ_LEN,
            "split": {"test": 2, "valid": 2},
        },
        "features": [
            {"name": "user_id", "kind": "sparse", "source": "user_id"},
            {"name": "item_id", "kind": "sparse", "source": "item_id", "table": "item"},
            {"name": "hist_item_id", "kind": "sequence", "source": "item_id", "table": "item"},
            {"name": "age_bucket", "kind": "sparse", "source": "age",
             "transform": {"floor_div": 10}},
            {"name": "genres", "kind": "multi_hot", "source": "genres", "pooling": "mean"},
            {"name": "age", "kind": "dense", "source": "age"},
        ],
        "model": {"embedding_dim": 8, "attention_hidden": [16], "mlp_hidden": [16],
                  "dropout": 0.0},
        "train": {"batch_size": 16, "eval_batch_size": 32, "epochs": 1, "num_workers": 2},
    }
    name = over.get("model", {}).get("name", "din")
    if name in MODEL_SPECS:  # the din settings above that model `name` has no field for go
        job["model"] = {k: v for k, v in job["model"].items() if k in model_fields(name)}
    if name in RETRIEVAL_MODELS:  # full-ranking evaluation needs leave-last-out
        job["dataset"]["split"] = {"test": 1, "valid": 1}
    for k, v in over.items():
        job[k] = {**job[k], **v} if isinstance(v, dict) and isinstance(job.get(k), dict) else v
    return job


def tiny_cfg(tmp: str, **over):
    return config_from_dict(tiny_job(tmp, **over))


def tiny_tables(seed: int = 0, n_events: int = 600) -> dict[str, pa.Table]:
    rng = np.random.default_rng(seed)
    users = pa.table({"user_id": pa.array(np.arange(1, N_USERS + 1), pa.int64()),
                      "age": pa.array(rng.integers(15, 70, N_USERS), pa.int64())})
    genres = [[f"g{j}" for j in rng.choice(N_GENRES, rng.integers(0, 3), replace=False)]
              for _ in range(N_ITEMS)]
    items = pa.table({"item_id": pa.array(np.arange(100, 100 + N_ITEMS), pa.int64()),
                      "genres": pa.array(genres, pa.list_(pa.string()))})
    events = pa.table({
        "user_id": pa.array(rng.integers(1, N_USERS + 1, n_events), pa.int64()),
        "item_id": pa.array(rng.integers(100, 100 + N_ITEMS, n_events), pa.int64()),
        "rating": pa.array(rng.integers(1, 6, n_events), pa.int64()),
        # few distinct timestamps, so ties are broken by the original row order
        "timestamp": pa.array(rng.integers(1_000, 1_040, n_events), pa.int64()),
    })
    return {"events": events, "users": users, "items": items}
