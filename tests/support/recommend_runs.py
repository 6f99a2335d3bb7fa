"""Runs for the recommend tests without Ray Train: the tiny job prepared once (Ray Data), and
DIN / two-tower checkpoints of freshly initialised models (seeded) saved by one process, so the
tests check the serving code, not what a model learnt."""

from __future__ import annotations

import torch

from rectrain.checkpoint import save_checkpoint
from rectrain.config import config_from_dict
from rectrain.data.features import FeatureLayout
from rectrain.data.schema import data_identity, load_manifest
from rectrain.models import build_model
from tests.support.tiny import tiny_job, tiny_tables


def save_untrained(job: dict, run_dir: str, seed: int = 0) -> str:
    """A checkpoint of ``job``'s model with seeded initial weights under ``run_dir``."""
    job = {**job, "run_dir": run_dir}
    cfg = config_from_dict(job)
    manifest = load_manifest(cfg.prepared_dir)
    torch.manual_seed(seed)
    model = build_model(FeatureLayout(cfg, manifest), cfg.model)
    save_checkpoint(f"{run_dir}/checkpoint", model, meta={
        "epoch": 0, "config": cfg.model_dump(mode="json"), "data": data_identity(manifest)})
    return run_dir


def tiny_recommend_runs(tmp: str, users_table: bool = True) -> dict:
    """``{"job": dict, "din": run dir, "two_tower": run dir}`` over tiny data prepared under
    ``tmp`` (leave-last-out split, so both models accept it). Without ``users_table`` the job
    has no users table (and no user side features)."""
    import os

    import pyarrow.parquet as pq

    from rectrain.data.prepare import prepare

    for name, t in tiny_tables().items():
        if name != "users" or users_table:
            os.makedirs(f"{tmp}/raw/{name}", exist_ok=True)
            pq.write_table(t, f"{tmp}/raw/{name}/part-0.parquet")
    job = tiny_job(tmp, dataset={"split": {"test": 1, "valid": 1}})
    if not users_table:
        job["dataset"].pop("users")
        job["features"] = [f for f in job["features"] if f["source"] != "age"]
    prepare(config_from_dict(job))
    tt = {**job, "model": {"name": "two_tower", "embedding_dim": 8,
                           "sequence_features": ["hist_item_id"], "item_features": ["genres"],
                           "tower_hidden": [8], "temperature": 0.5}}
    return {"job": job, "din": save_untrained(job, f"{tmp}/din"),
            "two_tower": save_untrained(tt, f"{tmp}/two_tower")}
