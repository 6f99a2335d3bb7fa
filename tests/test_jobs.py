"""Every file in jobs/ loads; every training job trains a few steps in-process (one gloo rank, no
Ray) on a small hand-written prepared folder with its own features."""

from __future__ import annotations

import argparse
import glob
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)
import pyarrow.parquet as pq
import pytest
import torch.distributed as dist
import yaml

from rectrain.config import RETRIEVAL_MODELS, load_config
from rectrain.data import storage
from rectrain.data.schema import needs_event_times
from tests.support.ports import free_port
from tests.support.prepared import write_prepared
from tests.support.tiny import N_ITEMS, N_USERS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "jobs", "*.yaml")))
BASES = sorted(os.path.relpath(p, ROOT)
               for p in glob.glob(os.path.join(ROOT, "jobs", "*", "*.yaml")))
#: jobs that cannot train on hand-written samples, and why
NO_INPROCESS = {
    "jobs/movielens_din_text.yaml": "its text_embedding feature needs the title-embedding matrix "
                                    "that `rectrain prepare` computes with a sentence-embedding "
                                    "model (the [text] extra)",
    "jobs/movielens_two_tower_text.yaml": "the same title-embedding matrix as movielens_din_text",
    "jobs/synth_churn_din_text.yaml": "the same title-embedding matrix as movielens_din_text",
}


def _is_bench(path: str) -> bool:
    with open(os.path.join(ROOT, path)) as f:
        return "bench" in (yaml.safe_load(f) or {})


def test_jobs_found():
    assert len(JOBS) >= 15 and "jobs/movielens_din.yaml" in JOBS


@pytest.mark.parametrize("path", BASES)
def test_every_base_is_extended(path):
    """Files under jobs/*/ are fragments: each is extended by a job (and loads through it)."""
    name = os.path.basename(path)
    texts = [open(os.path.join(ROOT, p)).read() for p in JOBS + BASES if p != path]
    assert any(f"extends: {os.path.relpath(path, os.path.dirname(p))}" in t
               or f"extends: {name}" in t for p, t in zip(JOBS + BASES, texts) if p != path)


@pytest.mark.parametrize("path", [p for p in JOBS if _is_bench(p)])
def test_bench_job_loads(path):
    from rectrain.bench.cli import _apply_config

    with open(os.path.join(ROOT, path)) as f:
        name = yaml.safe_load(f)["bench"]["name"]
    args = argparse.Namespace(config=os.path.join(ROOT, path), name=name)
    _apply_config(args)  # raises on an unknown key or a wrong bench name
    assert args.name == name


def _fill(col: str, kind: str, n: int, rng) -> pa.Array:
    """Random prepared values for a feature the tiny samples lack (ids 1..4)."""
    if kind == "sparse":
        return pa.array(rng.integers(1, 5, n), pa.int64())
    if kind == "multi_hot":
        return pa.array([list(rng.integers(1, 5, k)) for k in rng.integers(0, 3, n)],
                        pa.list_(pa.int64()))
    return pa.array(rng.normal(size=n))  # dense


def _prepared_for(cfg, prepared: str) -> None:
    """``tests.support.prepared.write_prepared`` plus the job's other features (random ids / values),
    ``label_value`` and, for retrieval jobs, one valid and one test row per user (leave-last-out)."""
    manifest = write_prepared(prepared, n_train=192, n_valid=N_USERS, n_test=N_USERS)
    rng = np.random.default_rng(0)
    for path in glob.glob(f"{prepared}/*/*.parquet"):
        t = pq.read_table(path)
        for f in cfg.features:
            if f.name not in t.column_names:
                t = t.append_column(f.name, _fill(f.name, f.kind, len(t), rng))
        if needs_event_times(cfg):  # history times (match features, time bias), a minute apart
            lengths = pa.compute.list_value_length(t["hist_item_id"]).to_numpy()
            ts = [list(range(int(e) - 60 * int(k), int(e), 60))
                  for e, k in zip(t["_ts"].to_numpy(), lengths)]
            t = t.append_column("_hist_ts", pa.array(ts, pa.list_(pa.int64())))
        # the raw label (a rating 1-5) for auxiliary heads and mse jobs
        t = t.append_column("label_value", pa.array(rng.integers(1, 6, len(t)), pa.float32()))
        if cfg.model.name in RETRIEVAL_MODELS and "/train/" not in path:
            t = t.set_column(t.column_names.index("_user"), "_user",
                             pa.array(np.arange(1, len(t) + 1), pa.int64()))
        pq.write_table(t, path)
    for f in cfg.features:
        if f.kind in ("sparse", "multi_hot") and f.table_name not in manifest["tables"]:
            manifest["tables"][f.table_name] = 5
        if f.kind == "dense" and f.name not in manifest["dense_stats"]:
            manifest["dense_stats"][f.name] = {"mean": 0.0, "std": 1.0}
    cats = {f.category for f in cfg.features if f.kind == "match" and f.category}
    if cats:  # the items catalog the match features look categories up in
        by_name = {f.name: f for f in cfg.features}
        items = {"item_id": pa.array(np.arange(1, N_ITEMS + 1), pa.int64())}
        items.update({c: _fill(c, by_name[c].kind, N_ITEMS, rng) for c in cats})
        storage.write_parquet(pa.table(items), f"{prepared}/catalog/items.parquet")
    storage.write_json(manifest, f"{prepared}/manifest.json")


@pytest.fixture(scope="module")
def gloo_rank():
    """One gloo process group of world size 1 in this process, as the loop expects."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("path", [p for p in JOBS if not _is_bench(p)])
def test_job_trains_a_few_steps(path, tmp_path, gloo_rank):
    if path in NO_INPROCESS:
        pytest.skip(NO_INPROCESS[path])
    from rectrain.train import loop
    from rectrain.train.env import file_env

    tmp = str(tmp_path)
    cfg = load_config(os.path.join(ROOT, path), {
        "prepared_dir": f"{tmp}/prepared", "run_dir": f"{tmp}/run",
        "train": {"epochs": 1, "max_train_rows": 64, "batch_size": 32, "eval_batch_size": 64,
                  "num_workers": 1, "log_every": 1000}})
    _prepared_for(cfg, cfg.prepared_dir)
    m = loop.run(cfg, file_env(cfg, 0, 1))
    assert len(m["epochs"]) == 1 and m["model"] == cfg.model.name
    assert storage.exists(storage.join(cfg.run_dir, "metrics.json"))


def test_bench_flags_on_the_command_line_win_over_the_config(tmp_path):
    """`rectrain bench scale --config jobs/bench_scale.yaml --out DIR` writes to DIR: the
    file's `bench:` values fill only the options left at their defaults."""
    from rectrain.bench import cli as bench_cli

    parser = argparse.ArgumentParser()
    bench_cli.add_parser(parser.add_subparsers(dest="verb"))
    spec = os.path.join(ROOT, "jobs", "bench_scale.yaml")
    args = parser.parse_args(["bench", "scale", "--config", spec, "--out", str(tmp_path),
                              "--budget-s", "60"])
    bench_cli._apply_config(args)
    assert args.out == str(tmp_path) and args.budget_s == 60
    assert args.events == "1000000,10000000,50000000"  # not given: from the file
    args = parser.parse_args(["bench", "scale", "--config", spec])
    bench_cli._apply_config(args)
    assert args.out == "benchmarks/results" and args.budget_s == 900
