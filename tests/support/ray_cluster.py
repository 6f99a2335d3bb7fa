"""A real two-node Ray cluster on loopback for the job-submission and multi-node tests.

``ray start --head`` and ``ray start --address`` run as ``--block`` subprocesses, each in its own
process group with its own free ports (the machine is shared: never ``ray stop``); at the end
only those two process groups are killed. The nodes carry custom resources ``rectrain_head`` and
``rectrain_worker`` so tests can tell them apart, and get the venv's ``bin`` first on ``PATH``
(the job entrypoint runs ``python``) but NOT this checkout on ``PYTHONPATH``: jobs import
rectrain from the uploaded working dir, as on a real cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field

import pyarrow.parquet as pq
import pytest
import yaml

from tests.support.ports import free_port

#: the repository root (uploaded as the jobs' working dir)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


@dataclass
class LoopbackCluster:
    """Handles on the started cluster: ``job_address`` (http://127.0.0.1:PORT of the Ray Jobs
    API), ``gcs_address``, ``tmp`` (a scratch dir for tests), and the node processes."""

    job_address: str
    gcs_address: str
    tmp: str
    procs: list = field(default_factory=list)

    def nodes(self) -> list[dict]:
        """Alive nodes from the state API (``/api/v0/nodes``): node_id, resources_total, ..."""
        body = _get(f"{self.job_address}/api/v0/nodes?limit=100&detail=1")
        return [n for n in body["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def stop(self) -> None:
        """SIGTERM the node process groups (worker node first), SIGKILL what is left after 15 s
        (a node drains for up to 30 s otherwise)."""
        for p in reversed(self.procs):
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in reversed(self.procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(p, signal.SIGKILL)
            p.wait()


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)  # the group this test started (start_new_session), nothing else
    except ProcessLookupError:
        pass


def _node_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_AUTH_MODE"] = "token"  # `ray start --address` does not turn it on by itself
    # the test machine is shared: Ray's OOM killer looks at the whole machine's memory and
    # would kill this cluster's tiny workers for what other processes use
    env["RAY_memory_monitor_refresh_ms"] = "0"
    # on SIGTERM a node first drains (up to 30 s, Ray's default for Kubernetes pods); these
    # nodes have nothing to hand over, and LoopbackCluster.stop would wait 15 s for it
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    return env


def _ports() -> list[str]:
    return ["--ray-client-server-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()),
            "--object-store-memory", str(150 * 2**20)]


def _get(url: str, timeout: float = 30):
    from rectrain.launch.submit import auth_token

    req = urllib.request.Request(url)
    tok = auth_token()
    if tok:
        req.add_header("Authorization", f"Bearer {tok}")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _ready(job_address: str) -> bool:
    try:
        _get(f"{job_address}/api/version", timeout=2)
        return True
    except (OSError, ValueError):
        return False


def _alive_nodes(c: LoopbackCluster) -> int:
    try:
        return len(c.nodes())
    except (OSError, ValueError):  # the dashboard is still starting (a loaded machine)
        return 0


def start_cluster(tmp: str, worker_node: bool = True, timeout_s: float = 600,
                  env: dict | None = None) -> LoopbackCluster:
    """Start the head (3 logical CPUs) and, with ``worker_node``, a second node (2 CPUs), with
    Ray's token authentication on: the token is ``$RAY_AUTH_TOKEN`` (set by the caller).
    ``env``: extra environment of both nodes (e.g. Ray's ``RAY_health_check_*`` settings)."""
    assert os.environ.get("RAY_AUTH_TOKEN"), "set RAY_AUTH_TOKEN first"
    port, dash = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rtc", dir="/tmp")  # short: unix socket paths
    env = {**_node_env(), **(env or {})}
    log = open(os.path.join(tmp, "head.log"), "wb")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--temp-dir", temp_dir,
         "--num-cpus", "3", "--resources", json.dumps({"rectrain_head": 1}),
         "--disable-usage-stats", "--block", *_ports()],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp)
    c = LoopbackCluster(job_address=f"http://127.0.0.1:{dash}",
                        gcs_address=f"127.0.0.1:{port}", tmp=tmp, procs=[head])
    c.temp_dir = temp_dir
    deadline = time.monotonic() + timeout_s
    while not _ready(c.job_address):
        if head.poll() is not None or time.monotonic() > deadline:
            c.stop()
            raise RuntimeError(f"ray head did not start: {open(log.name).read()[-3000:]}")
        time.sleep(1)
    if worker_node:
        wlog = open(os.path.join(tmp, "worker.log"), "wb")
        # its own temp dir: on one machine, a shared one lets the worker node's runtime-env
        # agent delete and unpack again the job's working dir under the running driver
        # (its cache does not know the head's copy), whose cwd then no longer exists
        c.worker_temp_dir = tempfile.mkdtemp(prefix="rtw", dir="/tmp")
        c.procs.append(subprocess.Popen(
            [RAY, "start", "--address", c.gcs_address, "--node-ip-address", "127.0.0.1",
             "--temp-dir", c.worker_temp_dir,
             "--num-cpus", "2", "--resources", json.dumps({"rectrain_worker": 1}),
             "--disable-usage-stats", "--block", *_ports()],
            env=env, stdout=wlog, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp))
        while _alive_nodes(c) < 2:
            if head.poll() is not None or c.procs[1].poll() is not None \
                    or time.monotonic() > deadline:
                c.stop()
                raise RuntimeError(f"worker node did not join: {open(wlog.name).read()[-3000:]}"
                                   f"\nhead: {open(log.name).read()[-3000:]}")
            time.sleep(1)
    return c


def write_tiny_job(tmp: str, name: str = "tiny", **over) -> str:
    """Raw logs (tests.support.tiny.tiny_tables) and a job YAML under ``tmp``; returns the YAML
    path."""
    from tests.support.tiny import tiny_job, tiny_tables

    for table_name, table in tiny_tables(n_events=900).items():
        os.makedirs(os.path.join(tmp, "raw", table_name), exist_ok=True)
        pq.write_table(table, os.path.join(tmp, "raw", table_name, "part-0.parquet"))
    job = tiny_job(tmp, name=name, **over)
    path = os.path.join(tmp, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(job, f)
    return path


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One two-node loopback cluster for the whole session."""
    tmp = str(tmp_path_factory.mktemp("cluster"))
    before = os.environ.get("RAY_AUTH_TOKEN")
    os.environ["RAY_AUTH_TOKEN"] = uuid.uuid4().hex  # this cluster's own token
    try:
        c = start_cluster(tmp)
        yield c
        c.stop()
    finally:
        if before is None:
            os.environ.pop("RAY_AUTH_TOKEN", None)
        else:
            os.environ["RAY_AUTH_TOKEN"] = before
    shutil.rmtree(c.temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster_prepared(ray_cluster):
    """The tiny job prepared by a ``prepare`` job submitted to the cluster. The job folder's
    name holds shell metacharacters: quoting is exercised on every submission. Returns
    ``(spec_path, job_id)``."""
    from rectrain.launch.submit import submit, wait

    tmp = os.path.join(ray_cluster.tmp, "job $(touch PWNED); echo x")
    os.makedirs(tmp)
    spec = write_tiny_job(tmp)
    job_id = submit(spec, verb="prepare", address=ray_cluster.job_address, working_dir=ROOT)
    status = wait(job_id, ray_cluster.job_address, timeout_s=1500)
    if status != "SUCCEEDED":
        from rectrain.launch.submit import client
        pytest.fail(f"prepare job {status}:\n{client(ray_cluster.job_address).get_job_logs(job_id)}")
    return spec, job_id
