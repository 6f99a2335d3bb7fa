"""The per-worker resources of the job config, and a cluster (a head and a worker node on
loopback, tests/support/ray_cluster.py) whose CPUs the workers would fill. A run with its two
workers on two nodes is in tests/test_submit.py (the end-to-end submission trains that way)."""

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
@pytest.mark.timeout(3000)  # may start the session's two-node cluster and its prepare job
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
