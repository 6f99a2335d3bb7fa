"""Bad input to the ninth session's additions: recommend's scoring / actor_memory_gb / workers
and the table sizes they are computed from, prepare's bucket count and footer checks, the
options of `rectrain bench scale` against its --config file, and the process-tree sampler.
Each fails before Ray (none starts here) with a message naming the file and dotted field, or
the argument and value."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rectrain.config import ConfigError, DatasetSpec, config_from_dict
from rectrain.config.sections import RecommendSpec
from rectrain.data.prepare import bucket_count
from rectrain.data.prepare.validate import DataValidationError, check_event_schemas
from tests.support.prepared import tiny_manifest
from tests.support.tiny import tiny_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------- recommend: fields
@pytest.mark.parametrize("over, msg", [
    ({"workers": 0}, r"recommend\.workers: Input should be greater than or equal to 1"),
    ({"workers": -2}, r"recommend\.workers: Input should be greater than or equal to 1"),
    ({"workers": 1.5}, r"recommend\.workers: Input should be a valid integer"),
    ({"workers": True}, r"recommend\.workers: expected a number, not a boolean"),
    ({"actor_memory_gb": 0}, r"recommend\.actor_memory_gb: Input should be greater than 0"),
    ({"actor_memory_gb": float("nan")}, r"recommend\.actor_memory_gb: .*finite number"),
    ({"actor_memory_gb": float("inf")}, r"recommend\.actor_memory_gb: .*finite number"),
    ({"actor_memory_gb": "big"}, r"recommend\.actor_memory_gb: Input should be a valid number"),
    ({"actor_memory_gb": False}, r"recommend\.actor_memory_gb: expected a number, not a bool"),
    ({"scoring": "Sharded"}, r"recommend\.scoring: Input should be 'auto', 'unsharded' or"),
    ({"scoring": "sharded", "explain": 2}, r"^\S+: recommend\.explain: explanations read the "
                                           r"unsharded model"),
    ({"scoring": "unsharded", "workers": 2}, r"^\S+: recommend\.workers: 2 sizes the sharded"),
])
def test_recommend_scoring_fields_rejected_at_load(tmp_path, over, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        config_from_dict(tiny_job(str(tmp_path), recommend=over), source="job.yaml")
    assert str(e.value).startswith("job.yaml: ")
    assert "Value error" not in str(e.value)  # not "recommend: Value error, recommend.x: ..."


def test_recommend_flag_overrides_name_the_field_and_value(tmp_path):
    from rectrain.launch.recommend_job import resolve_spec

    cfg = config_from_dict(tiny_job(str(tmp_path)))
    with pytest.raises(ValueError, match=r"recommend\.workers: Input should be greater than or "
                                         r"equal to 1, got 0"):
        resolve_spec(cfg, workers=0)
    with pytest.raises(ValueError, match=r"recommend\.actor_memory_gb: .*finite.*got inf"):
        resolve_spec(cfg, actor_memory_gb=float("inf"))
    with pytest.raises(ValueError, match=r"recommend\.workers: expected a number, not a "
                                         r"boolean, got True"):
        resolve_spec(cfg, workers=True)


# ----------------------------------------------------------------------- recommend: runs
def _run(tmp_path, name="run", manifest=None, meta=None, **job_over) -> str:
    """A hand-built run folder: ``checkpoint/meta.json`` with a tiny job's config (no
    fingerprint) and its prepared folder's ``manifest.json``."""
    run = tmp_path / name
    job = tiny_job(str(tmp_path / name), **job_over)
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "meta.json").write_text(json.dumps(
        meta if meta is not None else {"config": job}))
    os.makedirs(job["prepared_dir"])
    if manifest is not False:
        with open(os.path.join(job["prepared_dir"], "manifest.json"), "w") as f:
            json.dump(tiny_manifest() if manifest is None else manifest, f)
    return str(run)


def test_choose_scoring_of_a_hand_built_run(tmp_path):
    from rectrain.serve.sharded import choose_scoring

    run = _run(tmp_path)
    assert choose_scoring(RecommendSpec(ranking_run=run))[0] == "unsharded"
    how, why = choose_scoring(RecommendSpec(ranking_run=run, actor_memory_gb=1e-9))
    assert how == "sharded" and "2 workers" in why
    with pytest.raises(ValueError, match=r"recommend\.explain: .* exceed actor_memory_gb 1e-09"):
        choose_scoring(RecommendSpec(ranking_run=run, actor_memory_gb=1e-9, explain=1))


def test_sharded_scoring_of_a_retrieval_run_is_refused(tmp_path):
    from rectrain.serve.sharded import choose_scoring

    run = _run(tmp_path, model={"name": "two_tower"})
    with pytest.raises(ValueError, match=r"recommend\.scoring: sharded .* recommend\.ranking_run "
                                         r"\S+ is a two_tower run"):
        choose_scoring(RecommendSpec(ranking_run=run, scoring="sharded"))
    assert choose_scoring(RecommendSpec(ranking_run=run))[0] == "unsharded"


def _without(key):
    m = tiny_manifest()
    m.pop(key)
    return m


def _table(value):
    m = tiny_manifest()
    m["tables"]["item"] = value
    return m


@pytest.mark.parametrize("manifest, msg", [
    (_without("tables"), r"manifest\.json: tables: missing or not a mapping"),
    ({**tiny_manifest(), "tables": [1, 2]}, r"manifest\.json: tables: missing or not a mapping"),
    ({"tables": {"user_id": 31, "age_bucket": 8, "genres": 7}},
     r"manifest\.json: tables\.item: missing \(the table of feature 'item_id'"),
    (_table("51"), r"manifest\.json: tables\.item: '51' is not a row count"),
    (_table(-5), r"manifest\.json: tables\.item: -5 is not a row count"),
    (_table(0), r"manifest\.json: tables\.item: 0 is not a row count"),
    (_table(None), r"manifest\.json: tables\.item: None is not a row count"),
    (_table(51.5), r"manifest\.json: tables\.item: 51\.5 is not a row count"),
    (_table(True), r"manifest\.json: tables\.item: True is not a row count"),
])
def test_table_sizes_missing_or_bad_in_the_manifest(tmp_path, manifest, msg):
    # before: KeyError 'tables' / 'item', TypeError or "math domain error" from TorchRec
    from rectrain.serve.sharded import choose_scoring

    run = _run(tmp_path, manifest=manifest)
    for scoring in ("auto", "sharded"):
        with pytest.raises(ValueError, match=msg) as e:
            choose_scoring(RecommendSpec(ranking_run=run, scoring=scoring))
        assert str(e.value).startswith(str(tmp_path / "run" / "prepared" / "manifest.json"))


def test_auto_scoring_when_the_run_has_no_manifest(tmp_path):
    from rectrain.serve.sharded import choose_scoring

    run = _run(tmp_path, manifest=False)
    with pytest.raises(FileNotFoundError, match=r"prepared: no manifest\.json"):
        choose_scoring(RecommendSpec(ranking_run=run))


def test_stored_config_missing_or_invalid_names_meta_json(tmp_path):
    from rectrain.serve.recommend import run_config
    from rectrain.serve.sharded import choose_scoring

    run = _run(tmp_path, meta={"step": 3})  # before: KeyError 'config'
    for f in (run_config, lambda r: choose_scoring(RecommendSpec(ranking_run=r))):
        with pytest.raises(ValueError, match=r"checkpoint/meta\.json: config: missing or not a "
                                             r"mapping"):
            f(run)
    job = tiny_job(str(tmp_path / "bad"))
    job.pop("features")
    run = _run(tmp_path, name="bad", meta={"config": job})
    with pytest.raises(ConfigError, match=r"bad/checkpoint/meta\.json \(stored config\): "
                                          r"features: Field required"):  # before: "<dict>: ..."
        run_config(run)


def test_serve_users_without_catalog_or_samples_names_the_folder(tmp_path):
    from rectrain.serve.context import serve_users

    (tmp_path / "prepared").mkdir()
    with pytest.raises(FileNotFoundError, match=r"prepared: no users to recommend for"):
        serve_users(str(tmp_path / "prepared"))  # before: "Must pass at least one table"


# ----------------------------------------------------------------------- prepare
@pytest.mark.parametrize("kw, msg", [
    ({"rows": -1}, r"rows must be an integer >= 0, got -1"),
    ({"rows": 1e7}, r"rows must be an integer >= 0, got 10000000\.0"),  # before: 20.0 buckets
    ({"rows": True}, r"rows must be an integer >= 0, got True"),
    ({"rows": "100"}, r"rows must be an integer >= 0, got '100'"),
    ({"rows": 10, "per_bucket": 0}, r"per_bucket must be an integer >= 1, got 0"),  # ZeroDivision
    ({"rows": 10**7, "per_bucket": -1}, r"per_bucket must be an integer >= 1, got -1"),
    ({"rows": 0, "minimum": 0}, r"minimum must be an integer >= 1, got 0"),  # before: 0 buckets
])
def test_bucket_count_bad_arguments(kw, msg):
    with pytest.raises(ValueError, match=r"bucket_count: " + msg):
        bucket_count(**kw)


def test_bucket_count_extremes():
    assert bucket_count(0) == 16
    assert bucket_count(np.int64(10**9)) == 2000 and type(bucket_count(np.int64(10**9))) is int
    assert bucket_count(10**18) == 2 * 10**12


def _spec(d):
    return DatasetSpec(events=str(d), user_column="user_id", item_column="item_id",
                       timestamp_column="timestamp", label={"column": "rating"})


def _events(path, n):
    pq.write_table(pa.table({"user_id": pa.array(range(n), pa.int64()),
                             "item_id": pa.array(range(n), pa.int64()),
                             "timestamp": pa.array(range(n), pa.int64()),
                             "rating": pa.array([1.0] * n)}), path)
    return str(path)


def test_check_event_schemas_rejects_a_log_without_events(tmp_path):
    files = [_events(tmp_path / f"e{i}.parquet", 0) for i in range(2)]
    with pytest.raises(DataValidationError, match=r"dataset\.events \S+: no events: every events "
                                                  r"file has 0 rows \(2 file\(s\): \S+e0\.parquet"):
        check_event_schemas(files, _spec(tmp_path), [])
    with pytest.raises(DataValidationError, match=r"no events: no events file"):
        check_event_schemas([], _spec(tmp_path), [])
    files.append(_events(tmp_path / "e2.parquet", 3))  # one file with rows is enough
    assert check_event_schemas(files, _spec(tmp_path), [])[1] == 3


def test_check_event_schemas_unreadable_files_name_the_file(tmp_path):
    (tmp_path / "zero.parquet").write_bytes(b"")
    (tmp_path / "text.parquet").write_text("user_id,item_id\n1,2\n")
    for name in ("zero.parquet", "text.parquet", "missing.parquet"):
        with pytest.raises(DataValidationError, match=rf"{name}: cannot read as Parquet"):
            check_event_schemas([str(tmp_path / name)], _spec(tmp_path), [])


# ----------------------------------------------------------------------- bench scale options
def _parser():
    from rectrain.bench import cli as bench_cli

    p = argparse.ArgumentParser()
    bench_cli.add_parser(p.add_subparsers(dest="verb"))
    return p


def _bench(argv, text=None, tmp_path=None):
    from rectrain.bench import cli as bench_cli

    config = os.path.join(ROOT, "jobs", "bench_scale.yaml")
    if text is not None:
        config = str(tmp_path / "bench.yaml")
        with open(config, "w") as f:
            f.write(text)
    args = _parser().parse_args(["bench", "scale", "--config", config, *argv])
    bench_cli._apply_config(args)
    return args


def test_bench_flags_win_even_at_their_default_value(tmp_path):
    # before: a flag equal to its default (--workers 2, --size quick) lost to the file
    text = "bench: {name: scale, size: tiny, workers: 4, recommend: two_stage, out: elsewhere}\n"
    a = _bench(["--size", "quick", "--workers", "2", "--recommend", "two_tower"], text, tmp_path)
    assert (a.size, a.workers, a.recommend, a.out) == ("quick", 2, "two_tower", "elsewhere")
    a = _bench([], text, tmp_path)
    assert (a.size, a.workers, a.recommend) == ("tiny", 4, "two_stage")
    assert a.data == "data/bench" and a.bf16 is False  # set by neither: the defaults
    a = _bench(["--out", str(tmp_path), "--budget-s", "60", "--events", "20000"])
    assert (a.out, a.budget_s, a.events) == (str(tmp_path), 60.0, "20000")


def test_bench_bad_flag_values_are_named():
    from rectrain.bench.cli import budget_seconds, scale_events

    with pytest.raises(ValueError, match=r"--budget-s: must be a number of seconds > 0, got 0"):
        budget_seconds(_bench(["--budget-s", "0"]).budget_s)
    with pytest.raises(ValueError, match=r"--budget-s: .* got True"):
        budget_seconds(True)
    with pytest.raises(ValueError, match=r"--events: 0 is not a whole number of events >= 1"):
        scale_events(_bench(["--events", "0"]).events)
    with pytest.raises(ValueError, match=r"--events: 1,000,000 is listed twice"):
        scale_events(_bench(["--events", "1e6,1e6"]).events)


def test_bench_run_rejects_bad_flags_before_any_folder(tmp_path):
    from rectrain.bench.cli import run

    for argv, msg in ((["--budget-s", "0"], r"--budget-s"), (["--events", ""], r"--events: ''"),
                      (["--events", "1e6,1e6"], r"listed twice")):
        args = _parser().parse_args(["bench", "scale", "--config",
                                     os.path.join(ROOT, "jobs", "bench_scale.yaml"),
                                     "--out", str(tmp_path / "out"), *argv])
        with pytest.raises(ValueError, match=msg):
            run(args)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, msg", [
    ("bench: {name: scale, budgets: 5}", r"bench\.budgets: unknown key; known: name, size"),
    ("bench: {name: scale, budget_s: 0}", r"bench\.budget_s: must be a number of seconds > 0"),
    ("bench: {name: scale, budget_s: .nan}", r"bench\.budget_s: must be a number of seconds"),
    ("bench: {name: scale, events: [1e6, 1e6]}", r"bench\.events: 1,000,000 is listed twice"),
    ("bench: {name: scale, events: [0]}", r"bench\.events: 0 is not a whole number"),
    ("bench: {name: scale, events: []}", r"bench\.events: empty list"),
    ("bench: {name: scale, workloads: 3}", r"bench\.workloads: expected a string, got 3"),
    ("bench: {name: scale, size: huge}", r"bench\.size: 'huge' is not one of full, quick, tiny"),
    ("bench: {name: scale, workers: two}", r"bench\.workers: expected an integer >= 1, got 'two'"),
    ("bench: {name: scale, workers: 0}", r"bench\.workers: expected an integer >= 1, got 0"),
    ("bench: {name: scale, recommend: bogus}", r"bench\.recommend: 'bogus' is not one of"),
    ("bench: {name: scale, bf16: 1}", r"bench\.bf16: expected true or false, got 1"),
    ("bench: {name: ingest}", r"bench\.name is 'ingest', not 'scale'"),
    ("bench: scale", r"bench: expected a mapping of options, got 'scale'"),
    ("- a\n- b\n", r"top level must be a mapping, got list"),
    ("bench: {name: scale", r"not valid YAML"),
])
def test_bench_config_file_bad_values_name_file_and_field(tmp_path, text, msg):
    with pytest.raises(ValueError, match=msg) as e:
        _bench([], text, tmp_path)
    assert str(e.value).startswith(str(tmp_path / "bench.yaml"))


def test_bench_config_value_shadowed_by_a_flag_is_not_checked(tmp_path):
    a = _bench(["--budget-s", "30"], "bench: {name: scale, budget_s: 0}", tmp_path)
    assert a.budget_s == 30.0


# ----------------------------------------------------------------------- process tree
def _gone_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_proctree_on_a_pid_that_does_not_exist():
    # before: psutil.NoSuchProcess from rss_by_title / cpu_snapshot / TreeSampler
    from rectrain.bench.proctree import TreeSampler, cpu_snapshot, rss_by_title

    pid = _gone_pid()
    assert rss_by_title(pid) == {} and rss_by_title(pid, private=True) == {}
    assert cpu_snapshot(pid) == {}
    with pytest.raises(ValueError, match=rf"TreeSampler: no process with pid {pid}"):
        TreeSampler(pid)


@pytest.mark.parametrize("pid", [None, True, 0, -1, "123", 1.0])
def test_proctree_pid_must_be_a_process_id(pid):
    # before: None sampled this process (psutil's default), True was read as pid 1
    from rectrain.bench.proctree import TreeSampler, rss_by_title

    with pytest.raises(ValueError, match=r"pid must be a process id \(an integer >= 1\), got"):
        rss_by_title(pid)
    with pytest.raises(ValueError, match=r"pid must be a process id"):
        TreeSampler(pid)


@pytest.mark.parametrize("interval", [0, -1, float("nan"), float("inf"), "0.5"])
def test_tree_sampler_interval_must_be_positive(interval):
    from rectrain.bench.proctree import TreeSampler

    with pytest.raises(ValueError, match=r"interval_s must be a number of seconds > 0"):
        TreeSampler(os.getpid(), interval)  # before: 0 spun a core


def test_tree_sampler_survives_the_process_exiting_mid_sample():
    from rectrain.bench.proctree import TreeSampler

    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    with TreeSampler(p.pid, 0.05) as s:
        p.wait()
        s.sample()  # the process is gone (reaped): skipped, no error
    r = s.result()
    assert r["samples"] >= 1 and r["processes"]["driver"] == 1
