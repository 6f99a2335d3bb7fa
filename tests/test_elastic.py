"""Elastic recovery (issue 12, kind 10): a two-node loopback cluster of its own (it loses a
node), 2 Ray Train workers of 2 CPUs each (one per node: the head has 3 CPUs, the worker node
2) with ``train.min_workers: 1``. Rank 0 pauses before step 5 (``RECTRAIN_FAULT=0:5:pause``,
after the step-4 checkpoint); the test then SIGKILLs the worker node's process group (its
raylet and the Ray workers on it). Ray Train V2's elastic policy restarts the run on the one
worker the head still fits, which resumes at row 4 * 2 * B of the epoch and finishes."""

import glob
import json
import os
import shutil
import signal
import time
import uuid

import pytest

from rectrain.launch.submit import client, submit, wait
from tests.support.ray_cluster import ROOT, _signal_group, start_cluster, write_tiny_job

B, EVERY, PAUSE_STEP = 16, 2, 5


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(os.environ.get("RECTRAIN_TEST_ELASTIC") != "1",
                    reason="own two-node cluster, 100-150 s: the suite's 15-minute budget on 2 "
                           "cores; run with RECTRAIN_TEST_ELASTIC=1 (docs/reliability.md)")
def test_losing_the_worker_node_finishes_on_the_head(tmp_path, monkeypatch, ray_local):
    from rectrain.config import load_config
    from rectrain.data.prepare import prepare

    tmp = str(tmp_path)
    spec = write_tiny_job(tmp, name="elastic", train={
        "batch_size": B, "epochs": 1, "num_workers": 2, "min_workers": 1, "cpus_per_worker": 2},
        checkpoint={"every_n_steps": EVERY, "max_failures": 2}, ray={"data_cpus": 1})
    run_dir = os.path.join(tmp, "run")
    prepare(load_config(spec))  # on the session's local Ray: the cluster shares this disk
    monkeypatch.setenv("RAY_AUTH_TOKEN", uuid.uuid4().hex)  # this cluster's own token
    # a lost node is declared dead after 3 missed 1 s health checks (Ray's default: 5 x 3 s)
    c = start_cluster(tmp, env={"RAY_health_check_period_ms": "1000",
                                "RAY_health_check_failure_threshold": "3"})
    try:
        job_id = submit(spec, verb="train", address=c.job_address, working_dir=ROOT,
                        env=[f"RECTRAIN_FAULT=0:{PAUSE_STEP}:pause", "RECTRAIN_VERBOSE=1"])
        deadline = time.monotonic() + 1200
        marker = os.path.join(run_dir, ".attempts", "*", "faults", f"rank0-step{PAUSE_STEP}.json")
        while not glob.glob(marker):  # the whole group stands before step 5
            status = str(client(c.job_address).get_job_status(job_id).value)
            assert status in ("PENDING", "RUNNING") and time.monotonic() < deadline, \
                client(c.job_address).get_job_logs(job_id)
            time.sleep(1)
        _signal_group(c.procs[1], signal.SIGKILL)  # the worker node: raylet and its workers
        status = wait(job_id, c.job_address, timeout_s=1200)
        logs = client(c.job_address).get_job_logs(job_id)
        assert status == "SUCCEEDED", logs
    finally:
        c.stop()
        shutil.rmtree(c.temp_dir, ignore_errors=True)
        shutil.rmtree(c.worker_temp_dir, ignore_errors=True)

    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    manifest = json.load(open(os.path.join(tmp, "prepared", "manifest.json")))
    n_train = manifest["rows_per_split"]["train"]
    assert json.load(open(os.path.join(run_dir, "faults", f"rank0-step{PAUSE_STEP}.json"))) \
        == {"step": PAUSE_STEP, "rank": 0}  # it did stop there
    # finished on one worker, on the head, without a person acting
    assert metrics["world_size"] == 1 and metrics["num_nodes"] == 1
    assert [w["rank"] for w in metrics["workers"]] == [0]
    # resumed mid-epoch at the step-4 checkpoint; every row of the epoch trained once or dropped
    ep = metrics["epochs"][0]
    assert ep["resumed_at_row"] == 4 * 2 * B
    assert ep["train_rows"] + ep["train_rows_dropped"] == n_train
    assert ep["train_rows_dropped"] < B  # only the last partial window of 1 x B
    # the run's metrics exist and every valid/test row was scored once
    assert ep["valid_rows"] == manifest["rows_per_split"]["valid"]
    assert metrics["test_rows"] == manifest["rows_per_split"]["test"]
    assert 0.0 < metrics["test_auc"] < 1.0 and metrics["test_logloss"] > 0
