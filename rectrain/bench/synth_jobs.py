"""Jobs on ``rectrain synth`` logs shared by the benchmarks at scale (``rectrain bench scale``,
``benchmarks/recommend_scale.py``): the job dict, untrained checkpoints of the real shapes, and
the recommend overrides.

The job: leave-last-out split (``{test: 1, valid: 1}``), ``sequence_length`` 20, features
``user_id``, ``item_id`` and ``hist_item_id`` (one ``item`` table), item ``category`` and user
``device``; DIN (``embedding_dim`` 16) on 2 Ray Train workers of 1 CPU, batch 1024 per worker.
"""

from __future__ import annotations

FEATURES = [
    {"name": "user_id", "kind": "sparse", "source": "user_id"},
    {"name": "item_id", "kind": "sparse", "source": "item_id", "table": "item"},
    {"name": "hist_item_id", "kind": "sequence", "source": "item_id", "table": "item"},
    {"name": "category", "kind": "sparse", "source": "category"},
    {"name": "device", "kind": "sparse", "source": "device"},
]
DIN = {"name": "din", "embedding_dim": 16, "sequence_features": ["hist_item_id"],
       "attention_hidden": [32, 16], "mlp_hidden": [64, 32]}
TWO_TOWER = {"name": "two_tower", "embedding_dim": 16, "sequence_features": ["hist_item_id"],
             "item_features": ["category"], "tower_hidden": [32], "temperature": 0.05}
#: faiss HNSW parameters of the recommend runs
HNSW = {"m": 16, "ef_construction": 40, "ef_search": 64}


def job_dict(work: str, users: int, items: int, events: int, seed: int = 0,
             name: str | None = None) -> dict:
    """The job (a dict for :func:`rectrain.config.config_from_dict`) over the synthetic log of
    ``events`` events, ``users`` users and ``items`` items under ``work/raw``; prepared samples
    in ``work/prepared``, the DIN run in ``work/din``."""
    return {
        "name": name or f"recommend_scale_u{users}", "prepared_dir": f"{work}/prepared",
        "run_dir": f"{work}/din",
        "dataset": {"source": "synth",
                    "synth": {"events": events, "users": users, "items": items, "seed": seed},
                    "events": f"{work}/raw/events",
                    "users": {"path": f"{work}/raw/users", "key": "user_id"},
                    "items": {"path": f"{work}/raw/items", "key": "item_id"},
                    "user_column": "user_id", "item_column": "item_id",
                    "timestamp_column": "timestamp", "label": {"column": "click"},
                    "sequence_length": 20, "split": {"test": 1, "valid": 1},
                    "on_invalid": "error"},
        "features": FEATURES, "model": DIN,
        "train": {"batch_size": 1024, "epochs": 1, "num_workers": 2, "cpus_per_worker": 1},
    }


def save_untrained(job: dict, run: str, model: dict, seed: int = 0) -> str:
    """Save a checkpoint of ``model`` (a ``model:`` section) with seeded *initial* weights, no
    training, under ``run/checkpoint`` (the cost of recommend, loading, index, scoring,
    writing, depends on the shapes, not on what the weights learnt). Needs the prepared samples
    of ``job``. Returns the checkpoint folder."""
    import torch

    from rectrain.checkpoint import save_checkpoint
    from rectrain.config import config_from_dict
    from rectrain.data.features import FeatureLayout
    from rectrain.data.schema import data_identity, load_manifest
    from rectrain.models import build_model

    c = config_from_dict({**job, "run_dir": run, "model": model})
    manifest = load_manifest(c.prepared_dir)
    torch.manual_seed(seed)
    net = build_model(FeatureLayout(c, manifest), c.model)
    url = f"{run}/checkpoint"
    save_checkpoint(url, net, meta={
        "epoch": 0, "config": c.model_dump(mode="json"), "data": data_identity(manifest)})
    return url


def rec_over(work: str, mode: str, candidates: int, actors: int, block: int,
             ranking_run: str | None = None) -> dict:
    """Keyword overrides of :func:`rectrain.launch.recommend_job.recommend_job`: top 10, train
    items excluded, no evaluation, HNSW over the two-tower run ``work/two_tower``.

    ``mode`` ``two_tower``: the retriever alone (``two_stage`` with the retriever as ranking
    run); ``two_stage``: HNSW top-``candidates``, then ``ranking_run`` (default ``work/din``)."""
    # in_process_pairs 0: the Ray Data actor pool at every size (what these benchmarks measure)
    common = {"k": 10, "exclude": "train", "evaluate": False, "actors": actors,
              "in_process_pairs": 0, "users_per_block": block, "index": "hnsw",
              "index_params": HNSW}
    if mode == "two_tower":
        return {**common, "mode": "two_stage", "ranking_run": f"{work}/two_tower",
                "retrieval_run": f"{work}/two_tower",
                "out": f"{work}/rec_two_tower"}
    return {**common, "mode": "two_stage", "ranking_run": ranking_run or f"{work}/din",
            "retrieval_run": f"{work}/two_tower", "candidates": candidates,
            "out": f"{work}/rec_two_stage_n{candidates}"}
