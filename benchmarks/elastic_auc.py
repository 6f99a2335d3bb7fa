"""Main job (jobs/movielens_din.yaml) on a two-node loopback cluster (tests/support/ray_cluster.py):
uninterrupted vs the worker node SIGKILLed mid-epoch 2 (train.min_workers 1, checkpoints every 20
steps). Prints both test AUCs and each epoch's row accounting as JSON (issue 12, kind 10).

Usage: python benchmarks/elastic_auc.py WORK_DIR [RAW_DIR]  (RAW_DIR: MovieLens-100K raw logs,
default data/movielens-100k/raw, as written by `rectrain prepare movielens-100k`)."""
import glob, json, os, shutil, signal, sys, time, uuid
import yaml
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ["RAY_AUTH_TOKEN"] = uuid.uuid4().hex
from rectrain.launch.submit import client, submit, wait
from tests.support.ray_cluster import ROOT, _signal_group, start_cluster

tmp = os.path.abspath(sys.argv[1])
RAW = os.path.abspath(sys.argv[2] if len(sys.argv) > 2 else "data/movielens-100k/raw")
PAUSE = 125  # epoch 2 is global steps 79..157 (~81k train rows / 1024); checkpoint at 120

def spec(name):
    job = {"extends": os.path.join(ROOT, "jobs/movielens_din.yaml"), "name": name,
           "prepared_dir": f"{tmp}/prepared", "run_dir": f"{tmp}/{name}",
           "dataset": {"source": None, "events": f"{RAW}/events",
                       "users": {"path": f"{RAW}/users", "key": "user_id"},
                       "items": {"path": f"{RAW}/items", "key": "item_id"}},
           "train": {"num_workers": 2, "min_workers": 1, "cpus_per_worker": 2},
           "checkpoint": {"every_n_steps": 20, "max_failures": 2}, "ray": {"data_cpus": 1}}
    p = f"{tmp}/{name}.yaml"
    yaml.safe_dump(job, open(p, "w"))
    return p

c = start_cluster(tmp)
out = {}
try:
    t0 = time.monotonic()
    for verb in ("prepare", "train"):  # a `run` job's driver dies importing torch after prepare
        j = submit(spec("ref"), verb=verb, address=c.job_address, working_dir=ROOT)
        assert wait(j, c.job_address, 3600) == "SUCCEEDED", client(c.job_address).get_job_logs(j)
    out["ref_s"] = time.monotonic() - t0
    t0 = time.monotonic()
    j = submit(spec("kill"), verb="train", address=c.job_address, working_dir=ROOT,
               env=[f"RECTRAIN_FAULT=0:{PAUSE}:pause"])
    while not glob.glob(f"{tmp}/kill/.attempts/*/faults/rank0-step{PAUSE}.json"):
        assert str(client(c.job_address).get_job_status(j).value) in ("PENDING", "RUNNING")
        time.sleep(1)
    _signal_group(c.procs[1], signal.SIGKILL)
    assert wait(j, c.job_address, 3600) == "SUCCEEDED", client(c.job_address).get_job_logs(j)
    out["kill_s"] = time.monotonic() - t0
finally:
    c.stop()
    shutil.rmtree(c.temp_dir, ignore_errors=True)
man = json.load(open(f"{tmp}/prepared/manifest.json"))
for name in ("ref", "kill"):
    m = json.load(open(f"{tmp}/{name}/metrics.json"))
    out[name] = {"test_auc": m["test_auc"], "world_size": m["world_size"],
                 "num_nodes": m["num_nodes"], "best_epoch": m["best_epoch"],
                 "epochs": [{k: e.get(k) for k in ("epoch", "train_rows", "train_rows_dropped",
                                                    "resumed_at_row", "valid_auc")}
                            for e in m["epochs"]]}
out["n_train"] = man["rows_per_split"]["train"]
out["auc_diff"] = out["kill"]["test_auc"] - out["ref"]["test_auc"]
print(json.dumps(out, indent=1))
