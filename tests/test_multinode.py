"""A training run whose two Ray Train workers sit on two different Ray nodes (a head and a
worker node on loopback, tests/support/ray_cluster.py), and the per-worker resources of the job config."""

import json
import os

import pytest
import yaml

from rectrain.config import config_from_dict
from rectrain.launch.ray_launch import worker_resources
from rectrain.launch.submit import client, submit, wait
from tests.support.tiny import tiny_job
from tests.support.ray_cluster import ROOT


def test_worker_resources_from_config(tmp_path):
    cfg = config_from_dict(tiny_job(str(tmp_path), train={
        "cpus_per_worker": 2, "gpus_per_worker": 0.5, "memory_per_worker_gb": 1.5,
        "resources_per_worker": {"trainer_node": 1}, "placement_strategy": "STRICT_SPREAD"}))
    assert worker_resources(cfg, use_gpu=True) == {
        "CPU": 2.0, "GPU": 0.5, "memory": int(1.5 * 2**30), "trainer_node": 1.0}
    assert worker_resources(cfg, use_gpu=False) == {
        "CPU": 2.0, "memory": int(1.5 * 2**30), "trainer_node": 1.0}
    assert config_from_dict(tiny_job(str(tmp_path))).train.placement_strategy == "PACK"
    with pytest.raises(ValueError, match="train.placement_strategy"):
        config_from_dict(tiny_job(str(tmp_path), train={"placement_strategy": "ANYWHERE"}))


@pytest.mark.slow
@pytest.mark.timeout(3000)  # may start the session's two-node cluster and run two jobs
def test_two_workers_on_two_nodes(ray_cluster, cluster_prepared):
    spec, _ = cluster_prepared
    job = yaml.safe_load(open(spec))
    job["run_dir"] = os.path.join(os.path.dirname(spec), "run_spread")
    job["train"]["placement_strategy"] = "STRICT_SPREAD"  # one worker per node
    spread = os.path.join(os.path.dirname(spec), "spread.yaml")
    with open(spread, "w") as f:
        yaml.safe_dump(job, f)
    job_id = submit(spread, verb="train", address=ray_cluster.job_address, working_dir=ROOT)
    status = wait(job_id, ray_cluster.job_address, timeout_s=1500)
    assert status == "SUCCEEDED", client(ray_cluster.job_address).get_job_logs(job_id)

    metrics = json.load(open(os.path.join(job["run_dir"], "metrics.json")))
    workers = metrics["workers"]
    assert [w["rank"] for w in workers] == [0, 1] and metrics["num_nodes"] == 2
    nodes = {n["node_id"]: n["resources_total"] for n in ray_cluster.nodes()}
    # distinct node ids, one the head (custom resource rectrain_head), one the worker node
    assert len({w["node_id"] for w in workers}) == 2
    assert sorted("rectrain_head" in nodes[w["node_id"]] for w in workers) == [False, True]
    # (local_rank/node_rank are not checked: Ray Train groups workers by node IP, and both
    # raylets of this test share the machine's IP)
    # and the run is sane: every test row scored once, a real AUC, the same rows as prepared
    manifest = json.load(open(os.path.join(os.path.dirname(spec), "prepared", "manifest.json")))
    assert metrics["world_size"] == 2
    assert metrics["test_rows"] == manifest["rows_per_split"]["test"]
    assert 0.0 < metrics["test_auc"] < 1.0 and metrics["test_logloss"] > 0


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_cluster_the_workers_fill_stops_before_training(ray_cluster, cluster_prepared):
    """Issue 12, kind 3: 2 workers x 2.5 CPUs take all 5 CPUs of the two nodes; the job stops
    before Ray Train starts, saying what it needs and what to change, instead of waiting
    forever for Ray Data's read."""
    spec, _ = cluster_prepared
    job = yaml.safe_load(open(spec))
    job["run_dir"] = os.path.join(os.path.dirname(spec), "run_full")
    job["train"]["cpus_per_worker"] = 2.5
    full = os.path.join(os.path.dirname(spec), "full.yaml")
    with open(full, "w") as f:
        yaml.safe_dump(job, f)
    job_id = submit(full, verb="train", address=ray_cluster.job_address, working_dir=ROOT)
    status = wait(job_id, ray_cluster.job_address, timeout_s=1200)
    logs = client(ray_cluster.job_address).get_job_logs(job_id)
    assert status == "FAILED", logs
    assert ("the job needs 7 CPUs (train.num_workers 2 x train.cpus_per_worker 2.5 for the "
            "training workers + ray.data_cpus 2 for Ray Data's read) but the cluster has 5") \
        in logs, logs
    assert "Lower train.num_workers or train.cpus_per_worker, or add nodes" in logs
    assert not os.path.exists(os.path.join(job["run_dir"], "metrics.json"))
