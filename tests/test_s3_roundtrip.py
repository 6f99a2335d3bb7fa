"""Every job path on S3: raw logs on an S3-compatible server (moto's server mode on loopback,
started by the test) → `rectrain run` (prepare → train with 2 Ray Train workers → checkpoint →
recommend), all paths ``s3://``. The CLI runs in this process on the session's local Ray
(``ray_local``), whose processes were started with the S3 endpoint and fake credentials in their
environment (tests/support/s3.py), as a user's shell would give them; the server listens there.
Also: ``memory://`` is rejected with a clear message where Ray processes would need it."""

import io
import os
import socket
import subprocess
import sys
import time

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from rectrain.data import storage
from tests.support import s3
from tests.support.tiny import N_ITEMS, N_USERS, tiny_job, tiny_tables


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on the port the session's Ray processes know (tests/support/s3.py),
    in its own process group; yields the env to talk to it, set in this process too."""
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(s3.PORT)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    with s3.environ(s3.ENV):
        try:
            deadline = time.time() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", s3.PORT), 0.5).close()
                    break
                except OSError:
                    if time.time() > deadline or proc.poll() is not None:
                        raise RuntimeError(f"moto server did not start on port {s3.PORT}")
                    time.sleep(0.2)
            fsspec.filesystem("s3", skip_instance_cache=True).mkdir("rectrain-test")
            yield dict(s3.ENV)
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)


def _put(table, url):
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs, path = storage.url_to_fs(url)
    fs.pipe(path, buf.getvalue())


def test_s3_roundtrip_prepare_train_checkpoint_recommend(s3_env, ray_local, tmp_path,
                                                         monkeypatch):
    from rectrain import cli

    @ray_local.remote
    def worker_env():
        return os.environ.get("AWS_ENDPOINT_URL"), os.getcwd()

    endpoint, worker_cwd = ray_local.get(worker_env.remote())
    assert endpoint == s3_env["AWS_ENDPOINT_URL"], \
        "the session's Ray was started outside the ray_local fixture (tests/conftest.py)"
    worker_files = sorted(os.listdir(worker_cwd))
    root = "s3://rectrain-test/job"
    tables = tiny_tables(n_events=400)
    for name in ("users", "items"):
        _put(tables[name], f"{root}/raw/{name}/part-0.parquet")
    _put(tables["events"].slice(0, 250), f"{root}/raw/events/part-0.parquet")
    _put(tables["events"].slice(250), f"{root}/raw/events/part-1.parquet")
    fs, _ = storage.url_to_fs(root)
    fs.pipe("rectrain-test/job/raw/events/_SUCCESS", b"")
    job = tiny_job(root)
    job["train"] = {**job["train"], "num_workers": 2, "epochs": 1}
    job["ray"] = {"data_cpus": 1}
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(job))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "--config", str(cfg_path), "--k", "5"]) == 0
    # everything was written to the bucket, nothing to the local working directory (the
    # driver's, and that of Ray's task workers)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]
    assert sorted(os.listdir(worker_cwd)) == worker_files
    assert fs.glob("rectrain-test/job/run/tensorboard/*tfevents*")
    m = storage.read_json(f"{root}/prepared/manifest.json")
    assert m["rows_read"] == 400 == m["rows_used"] and m["skipped_markers"] == [
        f"{root}/raw/events/_SUCCESS"]
    assert all(k.startswith("s3://") for k in m["input_files"])
    metrics = storage.read_json(f"{root}/run/metrics.json")
    assert metrics["test_rows"] == m["rows_per_split"]["test"] and metrics["world_size"] == 2
    assert 0.0 <= metrics["test_auc"] <= 1.0 or np.isnan(metrics["test_auc"])
    assert fs.exists("rectrain-test/job/run/checkpoint/meta.json")
    assert fs.exists("rectrain-test/job/run/checkpoint/.metadata")
    assert not fs.exists("rectrain-test/job/run/checkpoint.tmp")
    pred = storage.read_parquet(f"{root}/run/predictions/test.parquet")
    assert pred.num_rows == m["rows_per_split"]["test"]
    top = storage.read_parquet(f"{root}/run/recommendations/top_k.parquet").to_pandas()
    assert len(top) == N_USERS * 5 and top.groupby("user_id").size().eq(5).all()
    assert top["item_id"].between(100, 100 + N_ITEMS - 1).all()


def test_memory_urls_rejected_where_ray_processes_need_them(tmp_path):
    from rectrain.config import config_from_dict
    from rectrain.data.prepare import prepare
    from rectrain.launch.ray_launch import train

    job = tiny_job(str(tmp_path))
    job["dataset"]["events"] = "memory://raw/events"
    with pytest.raises(ValueError, match=r"dataset.events memory://raw/events: memory:// lives "
                                         r"in one process's memory"):
        prepare(config_from_dict(job))
    job = tiny_job(str(tmp_path), run_dir="memory://run")
    with pytest.raises(ValueError, match="run_dir memory://run: memory://"):
        train(config_from_dict(job))
    # single-process helpers work on memory:// (e.g. writing a small file)
    storage.write_json({"a": 1}, "memory://x/m.json")
    assert storage.read_json("memory://x/m.json") == {"a": 1}
