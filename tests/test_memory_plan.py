"""Memory-aware sharding plans (issue 15): a table larger than one worker's
``train.memory_per_worker_gb`` is split across 2 gloo ranks and trains; tables larger than the
total budget stop at planning with a PlanError naming the table, its bytes and the budget;
``rectrain plan`` plans for a GPU cluster that is not here."""

import json
import os

import numpy as np
import pytest
import torch

from rectrain.data.features import FeatureLayout
from rectrain.models import build_model
from tests.support.dist import spawn
from tests.support.prepared import batch_table, tiny_manifest
from tests.support.tiny import tiny_cfg, tiny_job

#: item table rows: 400k x dim 8 fp32 = 12.8 MB of weights (+ 1.6 MB row-wise Adagrad state)
ITEM_ROWS = 400_000
#: one worker's budget: less than the item table, more than half of it (after the reservation)
BUDGET_GB = 0.012


def _budget_cfg(tmp, gb=BUDGET_GB):
    return tiny_cfg(tmp, sharding={"types": ["table_wise", "row_wise"]},
                    train={"batch_size": 12, "num_workers": 2, "memory_per_worker_gb": gb},
                    optim={"sparse": "rowwise_adagrad", "dense": "sgd"})


def _layout(cfg):
    m = tiny_manifest()
    m["tables"]["item"] = ITEM_ROWS
    return FeatureLayout(cfg, m)


def _split_worker(rank, world, tmp):
    from rectrain.train.pipeline import Stepper
    from rectrain.train.sharding import shard_model

    torch.manual_seed(0)
    cfg = _budget_cfg(tmp)
    layout = _layout(cfg)
    model = build_model(layout, cfg.model, sparse_device=torch.device("meta"))
    # before DMP every table is on meta: no rank holds any table's rows yet
    meta_before = all(p.is_meta for n, p in model.named_parameters() if "embedding" in n)
    planned = []
    dmp, opt, plan = shard_model(model, cfg.sharding, cfg.optim, torch.device("cpu"), cfg.train,
                                 planned)
    rep = planned[0]
    local = {}  # table -> (rows held here, bytes held here)
    for key, t in dmp.state_dict().items():
        if hasattr(t, "local_shards"):
            table = key.split(".")[-2]
            for s in t.local_shards():
                r, b = local.get(table, (0, 0))
                local[table] = (r + s.tensor.shape[0], b + s.tensor.numel() * 4)
    stepper = Stepper(dmp, opt, torch.device("cpu"))
    batches = [layout.to_batch(batch_table(rank + 10 * i)) for i in range(3)]
    losses = [float(loss) for loss, _ in stepper.steps(iter(batches))]
    return {"meta_before": meta_before, "per_rank": rep.storage_per_rank(),
            "available": rep.available, "capacity": rep.capacity,
            "item_shards": [s for s in rep.shards if s["table"] == "item"],
            "local": local, "losses": losses, "text": rep.format()}


def test_table_over_one_worker_budget_is_split_and_trains(tmp_path):
    out = spawn(_split_worker, 2, str(tmp_path))
    r0 = out[0]
    item = r0["item_shards"]
    # the whole item table does not fit one worker's tables budget; the plan splits it
    whole = sum(s["ddr_bytes"] for s in item)
    assert whole > r0["available"][0][1]
    assert {s["sharding_type"] for s in item} == {"row_wise"}
    assert sorted(s["rank"] for s in item) == [0, 1]
    for rank, r in enumerate(out):
        used = r["per_rank"][rank]["ddr_bytes"]
        assert used <= r["available"][rank][1] < r["capacity"][rank][1] == int(BUDGET_GB * 2**30)
        # measured: this rank holds about half the item rows, never the whole table
        rows, _ = r["local"]["item"]
        assert 0 < rows < ITEM_ROWS and abs(rows - ITEM_ROWS / 2) <= 1
        assert r["meta_before"]
        assert len(r["losses"]) == 3 and all(np.isfinite(r["losses"]))
    assert "storage per rank" in r0["text"]
    assert sum(r["local"]["item"][0] for r in out) == ITEM_ROWS


def test_tables_over_total_budget_stop_at_planning(tmp_path):
    from rectrain.train.planning import PlanError, plan_tables
    from rectrain.train.sharding import apply_sparse_optimizer, budget_for

    cfg = _budget_cfg(str(tmp_path), gb=0.004)  # 2 x 4 MB < the 12.8 MB item table
    model = build_model(_layout(cfg), cfg.model, sparse_device=torch.device("meta"))
    apply_sparse_optimizer(model, cfg.optim)
    with pytest.raises(PlanError) as e:
        plan_tables(model, list(cfg.sharding.types), budget_for(cfg.train, 2, "cpu"))
    msg = str(e.value)
    assert "train.memory_per_worker_gb" in msg and "'item'" in msg
    assert f"{ITEM_ROWS * 8 * 4:,} bytes" in msg and "2 rank(s) x 0.004 GiB" in msg
    assert all(p.is_meta for n, p in model.named_parameters() if "embedding" in n)


def _hashed_job(tmp):
    """The tiny job with declared table sizes (every sparse feature hashed), no prepared data."""
    job = tiny_job(tmp, train={"batch_size": 256, "num_workers": 2},
                   sharding={"types": ["table_wise", "row_wise", "column_wise"]})
    for f in job["features"]:
        if f["kind"] in ("sparse", "multi_hot"):
            f.update(encoding="hash", hash_buckets=1_000_000 if f["name"] == "item_id" else 999)
    return job


def test_plan_cli_for_a_cluster_that_is_not_here(tmp_path, capsys):
    import yaml

    from rectrain.cli import main
    from rectrain.config import config_from_dict
    from rectrain.train.plan_cluster import alltoall_bytes, parse_topology, plan_job

    job = _hashed_job(str(tmp_path))
    path = os.path.join(tmp_path, "job.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(job, f)
    assert main(["plan", "--config", path, "--topology", "2x8:H100"]) == 0
    text = capsys.readouterr().out
    assert "storage per rank (GiB)" in text and " HBM " in text
    assert "estimated embedding step time" in text
    assert "all-to-all per step" in text
    cluster = parse_topology("2x8:H100")
    rep = plan_job(config_from_dict(job), cluster)
    assert rep.budget.world_size == 16 and rep.budget.local_world_size == 8
    assert {s["table"] for s in rep.shards} == {"user_id", "item", "age_bucket", "genres"}
    assert all(0 <= s["rank"] < 16 for s in rep.shards)
    for r in rep.storage_per_rank():
        assert r["hbm_bytes"] <= rep.available[r["rank"]][0] < 80 * 10 ** 9
    assert rep.step_ms() > 0
    t = alltoall_bytes(rep)
    assert t["total"] > 0 and t["per_rank"] == pytest.approx(t["total"] / 16)
    json.dumps({k: v for k, v in t.items()})


def test_plan_topology_and_declared_sizes_errors(tmp_path):
    from rectrain.config import config_from_dict
    from rectrain.train.plan_cluster import declared_manifest, parse_topology

    with pytest.raises(ValueError, match="NODESxGPUS:TYPE"):
        parse_topology("8:H100")
    with pytest.raises(ValueError, match="unknown device type 'X9'"):
        parse_topology("1x8:X9")
    c = parse_topology("1x4:X9", hbm_gb=24, intra_gbs=64, inter_gbs=12.5)
    assert (c.world, c.hbm_gb) == (4, 24)
    with pytest.raises(ValueError, match=r"features\.0: feature 'user_id' has encoding vocab"):
        declared_manifest(tiny_cfg(str(tmp_path)))
    m = declared_manifest(config_from_dict(_hashed_job(str(tmp_path))))
    assert m["tables"]["item"] == 1_000_001 and m["tables"]["user_id"] == 1000


def test_train_stops_at_planning_on_the_driver_before_ray(tmp_path, capsys, monkeypatch):
    import yaml

    import rectrain.launch.cluster as cluster
    from rectrain.cli import main

    def no_ray(*a, **k):
        raise AssertionError("Ray was started or joined before the plan was checked")

    monkeypatch.setattr(cluster, "connect", no_ray)  # the one ray.init of the package

    job = tiny_job(str(tmp_path), train={"num_workers": 2, "memory_per_worker_gb": 0.004})
    os.makedirs(job["prepared_dir"])
    m = tiny_manifest()
    m["tables"]["item"] = ITEM_ROWS
    with open(os.path.join(job["prepared_dir"], "manifest.json"), "w") as f:
        json.dump(m, f)
    path = os.path.join(tmp_path, "job.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(job, f)
    assert main(["train", "--config", path]) == 2
    err = capsys.readouterr().err
    assert "train.memory_per_worker_gb" in err and "'item'" in err


def _fp16_worker(rank, world, tmp):
    from rectrain.checkpoint import load_checkpoint, save_checkpoint
    from rectrain.train.pipeline import Stepper
    from rectrain.train.sharding import shard_model

    out = {}
    for dtype in ("fp32", "fp16"):
        torch.manual_seed(0)
        cfg = tiny_cfg(tmp, sharding={"types": ["table_wise", "row_wise"],
                                      "embedding_dtype": dtype},
                       optim={"sparse": "rowwise_adagrad", "sparse_lr": 0.5})
        layout = _layout(cfg)
        model = build_model(layout, cfg.model, sparse_device=torch.device("meta"))
        dmp, opt, _ = shard_model(model, cfg.sharding, cfg.optim, torch.device("cpu"), cfg.train)
        shards = {k.split(".")[-2]: t.local_shards()[0].tensor
                  for k, t in dmp.state_dict().items() if hasattr(t, "local_shards")}
        batch = layout.to_batch(batch_table(0))
        rows = batch.sparse["item_id"].values()
        before = shards["item"][rows].float().clone()
        losses = [float(loss) for loss, _ in Stepper(dmp, opt, torch.device("cpu")).steps(
            iter([batch, layout.to_batch(batch_table(1))]))]
        url = os.path.join(tmp, f"ckpt_{dtype}")
        save_checkpoint(url, dmp, opt, {"config": {}})
        # unsharded serving model: fp32 tables loaded from the checkpoint
        layout.table_dtype = "fp32"
        plain = build_model(layout, cfg.model)
        load_checkpoint(url, plain)
        w = plain.state_dict()["sparse.ec.embeddings.item.weight"]
        out[dtype] = {"dtype": str(shards["item"].dtype),
                      "bytes": shards["item"].numel() * shards["item"].element_size(),
                      "moved": float((shards["item"][rows].float() - before).abs().max()),
                      "losses": losses, "serve_dtype": str(w.dtype),
                      "serve_err": float((w - shards["item"].float()).abs().max()),
                      "logits_finite": bool(torch.isfinite(plain(batch)).all())}
    return out


def test_fp16_tables_halve_memory_train_and_serve_as_fp32(tmp_path):
    out = spawn(_fp16_worker, 1, str(tmp_path))[0]
    f32, f16 = out["fp32"], out["fp16"]
    assert (f32["dtype"], f16["dtype"]) == ("torch.float32", "torch.float16")
    assert f16["bytes"] * 2 == f32["bytes"] == ITEM_ROWS * 8 * 4
    for r in (f32, f16):
        assert r["moved"] > 0 and all(np.isfinite(r["losses"]))  # the fused update ran
        assert r["serve_dtype"] == "torch.float32" and r["serve_err"] == 0 and r["logits_finite"]
