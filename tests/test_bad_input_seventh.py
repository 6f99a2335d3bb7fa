"""Bad input to the seventh session's features (negatives, match, zch, synth churn, quality and
scale benchmarks): each is refused early with one line naming the field, file or flag. No Ray."""

import pytest

from rectrain.config import ConfigError, config_from_dict
from tests.support.tiny import tiny_job


def _zch_job(tmp_path, capacity=60, model=None, **train):
    job = tiny_job(str(tmp_path), **({"model": {"name": model}} if model else {}))
    job["features"][1].update(encoding="zch", capacity=capacity)
    job["train"].update(train)
    return job


def test_zch_rules_fail_when_the_config_loads_not_on_the_workers(tmp_path):
    config_from_dict(_zch_job(tmp_path))  # item_id zch, 60 rows, 2 workers: fine
    with pytest.raises(ConfigError, match=r"features\.1\.capacity: 51 is not a multiple of 2, "
                                          r"train\.num_workers = 2 .* e\.g\. capacity: 50"):
        config_from_dict(_zch_job(tmp_path, capacity=51))
    with pytest.raises(ConfigError, match=r"features\.1\.capacity: 62 is not a multiple of 3, a "
                                          r"world size of train\.min_workers\.\.num_workers"):
        job = _zch_job(tmp_path, capacity=62, num_workers=4, min_workers=2)
        job["checkpoint"] = {"max_failures": 1}
        config_from_dict(job)
    with pytest.raises(ConfigError, match=r"model\.name: two_tower ranks every item row"):
        config_from_dict(_zch_job(tmp_path, model="two_tower"))
    job = _zch_job(tmp_path)
    job["features"][0].update(encoding="zch", capacity=60)  # user_id: pooled, no sequence
    with pytest.raises(ConfigError, match=r"features\.0\.encoding: zch on 'user_id', whose "
                                          r"table 'user_id' no sequence feature shares"):
        config_from_dict(job)
    job = _zch_job(tmp_path)
    job["features"] += [{"name": "genre1", "kind": "sparse", "source": "genres", "table": "g",
                         "transform": {"first": True}},
                        {"name": "hist_genre1", "kind": "sequence", "source": "genre1",
                         "table": "g"}]
    with pytest.raises(ConfigError, match=r"sequence tables \['g'\] are not zch"):
        config_from_dict(job)
    job = _zch_job(tmp_path)
    job["features"].append({"name": "m", "kind": "match", "source": "hist_item_id",
                            "category": "genres"})
    with pytest.raises(ConfigError, match=r"features\.6\.category: a category match looks "
                                          r"categories up by item row"):
        config_from_dict(job)


def test_encoding_settings_of_another_encoding_are_refused_not_ignored(tmp_path):
    job = _zch_job(tmp_path)
    job["features"][1]["hash_buckets"] = 10
    with pytest.raises(ConfigError, match="hash_buckets is for encoding hash, not zch"):
        config_from_dict(job)
    job = tiny_job(str(tmp_path))
    job["features"][1]["zch"] = {"policy": "lru"}
    with pytest.raises(ConfigError, match="zch settings are for encoding zch, not vocab"):
        config_from_dict(job)


@pytest.mark.parametrize("kw, msg", [
    ({"item_churn": 1.5}, r"item_churn must be in \[0, 1\], got 1.5 \(--item-churn\)"),
    ({"item_churn": float("nan")}, r"item_churn must be in \[0, 1\], got nan"),
    ({"item_churn": 0.5, "item_half_life_days": 0}, r"item_half_life_days must be > 0, got 0"),
    # NaN passed `<= 0` and zeroed every born item's weight: the log silently used one item
    ({"item_churn": 0.5, "item_half_life_days": float("nan")},
     r"item_half_life_days must be > 0, got nan \(--item-half-life-days\)"),
    ({"repeat": -0.1}, r"repeat must be in \[0, 1\]"),
])
def test_synth_churn_and_repeat_are_checked_in_the_spec_before_ray_starts(kw, msg):
    from rectrain.data.sources.synth import SynthSpec

    with pytest.raises(ValueError, match=msg):
        SynthSpec(events=100, users=10, items=20, **kw)  # `rectrain synth` builds it pre-Ray


def test_rectrain_synth_rejects_a_bad_churn_in_one_line_without_starting_ray(capsys,
                                                                             monkeypatch):
    from rectrain import cli
    from rectrain.launch import jobs

    monkeypatch.setattr(jobs, "connect", lambda *a, **k: pytest.fail("Ray started"))
    assert cli.main(["synth", "--events", "10", "--out", "/nonexistent", "--item-churn",
                     "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rectrain: error: synth: item_churn must be in [0, 1], got 2.0 "
                   "(--item-churn)"]


@pytest.mark.parametrize("argv, msg", [
    (["--events", "0"], "--events: 0 is not a whole number of events >= 1"),
    (["--events", "1000,-5"], "--events: -5 is not a whole number of events >= 1"),
    (["--events", "1e6,lots"], "--events: 'lots' is not a number of events"),
    (["--events", "1000,,2000"], "--events: '' is not a number of events"),
    (["--events", "1500.5"], "--events: 1500.5 is not a whole number"),
    (["--events", "inf"], "--events: inf is not a whole number"),
    (["--events", "1e3,1000"], "--events: 1,000 is listed twice"),
    (["--budget-s", "0"], "--budget-s: must be a number of seconds > 0, got 0.0"),
    (["--budget-s", "-1"], "--budget-s: must be a number of seconds > 0, got -1.0"),
])
def test_bench_scale_sizes_and_budget_fail_in_one_line_before_any_stage(tmp_path, capsys, argv,
                                                                        msg):
    from rectrain import cli

    out = tmp_path / "out"
    assert cli.main(["bench", "scale", "--size", "tiny", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"rectrain: error: {msg}"), err
    assert not out.exists()  # nothing started


def test_bench_scale_events_parse():
    from rectrain.bench.cli import budget_seconds, scale_events

    assert scale_events("1e6,20000") == [1_000_000, 20_000]
    assert budget_seconds("90") == 90.0
    with pytest.raises(ValueError, match=r"--budget-s: .* got 'abc'"):
        budget_seconds("abc")  # bench.budget_s of a jobs/bench_*.yaml is not parsed by argparse


def _quality_jobs(tmp_path, entries):
    import json
    from pathlib import Path

    jobs = Path(__file__).resolve().parents[1] / "jobs"
    for e in entries:
        p = tmp_path / f"{e['job']}.yaml"
        p.write_text(f"extends: {jobs / 'movielens_din.yaml'}\nname: {e['job']}\n"
                     f"run_dir: {tmp_path / 'runs' / e['job']}\n")
        e["job"] = str(p)
    (tmp_path / "jobs.yaml").write_text(json.dumps(entries))
    return str(tmp_path / "jobs.yaml")


@pytest.mark.parametrize("entries, msg", [
    ([{"job": "a", "metric": "test_auc", "label": "A", "baseline": "B"},
      {"job": "b", "metric": "test_auc", "label": "B"}],
     r"entry 0 \(A\): baseline 'B' is not the label of an earlier entry \(entry 1 comes after"),
    ([{"job": "a", "metric": "test_auc", "label": "A"},
      {"job": "b", "metric": "test_auc", "label": "B", "baseline": "DIN"}],
     r"entry 1 \(B\): baseline 'DIN' is not the label of an earlier entry \(earlier labels: "
     r"\['A'\]\)"),
    ([{"job": "a", "metric": "test_auc"},  # default label: the model name
      {"job": "b", "metric": "test_logloss", "label": "B", "baseline": "din"}],
     r"baseline 'din' reports test_auc, this entry test_logloss"),
    ([{"job": "a", "metric": "test_auc", "slices": ["cold_item"]}],
     r"entry 0 \(.*\): slices: expected a list of \['cold_items'\], got \['cold_item'\]"),
    ([{"job": "a", "metric": "test_auc", "baselne": "x"}], r"unknown keys \['baselne'\]"),
])
def test_quality_entries_with_a_bad_baseline_or_slice_are_refused_naming_the_entry(
        tmp_path, entries, msg):
    from benchmarks import quality

    with pytest.raises(ValueError, match=msg):
        quality.load_entries(_quality_jobs(tmp_path, entries))


def test_quality_only_takes_whole_labels_with_commas_and_semicolon_lists(tmp_path, capsys):
    from benchmarks import quality

    path = _quality_jobs(tmp_path, [
        {"job": "dcn", "metric": "test_auc", "label": "DCNv2 (parallel, full rank)"},
        {"job": "din", "metric": "test_auc", "label": "DIN"},
        {"job": "din_x", "metric": "test_auc", "label": "DIN x", "baseline": "DIN"}])
    entries = quality.load_entries(path)
    labels = lambda only: [e["label"] for e in quality.select(entries, only)]  # noqa: E731
    assert labels("DCNv2 (parallel, full rank)") == ["DCNv2 (parallel, full rank)"]
    assert labels("DCNv2 (parallel, full rank); din_x") == ["DCNv2 (parallel, full rank)",
                                                            "DIN x"]
    assert labels("DIN,din_x") == ["DIN", "DIN x"]
    with pytest.raises(ValueError, match=r"--only: \['DCNv2 \(parallel', 'full rank\)'\] match "
                                         r"no entry.*separate items with ';'"):
        quality.select(entries, "DIN,DCNv2 (parallel, full rank)")
    with pytest.raises(SystemExit):  # one argparse line, not an empty table
        quality.main(["--jobs", path, "--only", "nonesuch", "--collect",
                      "--out", str(tmp_path / "q")])
    assert "--only: ['nonesuch'] match no entry" in capsys.readouterr().err
    quality.main(["--jobs", path, "--only", "din_x", "--collect", "--out", str(tmp_path / "q")])
    assert "its baseline 'DIN' is not selected by --only" in capsys.readouterr().out


TABLES = {"user_id": 31, "item": 51, "age_bucket": 8, "genres": 7}


def test_a_match_category_that_is_no_item_feature_names_the_field_not_a_parquet_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rectrain.data.features import FeatureLayout

    (tmp_path / "prepared" / "catalog").mkdir(parents=True)
    pq.write_table(pa.table({"item_id": [1, 2], "genres": [[1], [2, 3]]}),
                   tmp_path / "prepared" / "catalog" / "items.parquet")
    job = tiny_job(str(tmp_path))
    job["features"].append({"name": "m", "kind": "match", "source": "hist_item_id",
                            "category": "genres"})
    FeatureLayout(config_from_dict(job), {"tables": TABLES})  # an item-side category: fine
    # age_bucket is a sparse feature of dataset.users: the config cannot tell its side
    job["features"][-1]["category"] = "age_bucket"
    with pytest.raises(ValueError, match=r"features\.6\.category: 'age_bucket' is not an "
                                         r"item-side feature \(.*items\.parquet has \['item_id', "
                                         r"'genres'\]\)"):
        FeatureLayout(config_from_dict(job), {"tables": TABLES})


@pytest.mark.parametrize("job_kind", ["match", "hstu_time_bias"])
def test_a_match_job_on_a_folder_prepared_without_hist_ts_fails_on_the_driver_before_ray(
        tmp_path, monkeypatch, job_kind):
    """Ray Data's read_parquet(columns=...) drops a missing column without a word, so the
    workers failed on _hist_ts; the driver's footer check now names the file first. The same
    for HSTU's model.time_bias, which reads _hist_ts too."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from rectrain.data.door import PreparedDataError
    from rectrain.launch import ray_launch

    prep = tmp_path / "prepared"
    cols = {"user_id": [1], "item_id": [1], "age_bucket": [1], "genres": [[1]], "age": [30.0],
            "_user": [1], "_item": [100], "_ts": [1000], "label": pa.array([1.0], pa.float32()),
            "label_value": pa.array([4.0], pa.float32()), "hist_item_id": [[2]], "_pos": [1]}
    for s in ("train", "valid", "test"):
        (prep / s).mkdir(parents=True)
        pq.write_table(pa.table(cols), prep / s / "part-0.parquet")
    (prep / "manifest.json").write_text(json.dumps(
        {"tables": TABLES, "rows_per_split": {"train": 1, "valid": 1, "test": 1},
         "rows_used": 3}))
    if job_kind == "match":
        job = tiny_job(str(tmp_path))
        job["features"].append({"name": "m", "kind": "match", "source": "hist_item_id"})
    else:
        job = tiny_job(str(tmp_path), model={"name": "hstu", "time_bias": True})
    monkeypatch.setattr(ray_launch, "init_ray", lambda *a: pytest.fail("Ray started"))
    with pytest.raises(PreparedDataError, match=r"train/part-0\.parquet: no column \['_hist_ts'\]"
                                                r", which this job reads; run `rectrain prepare` "
                                                r"with this job's features \(match features and "
                                                r"model.time_bias: true read .*; .*prepared was "
                                                r"prepared without them\)"):
        ray_launch.train(config_from_dict(job))


def test_more_negatives_per_event_than_items_to_sample_is_refused(tmp_path):
    import numpy as np
    import pyarrow as pa

    from rectrain.data.prepare.negatives import check_pool
    from rectrain.data.schema import ITEM

    job = tiny_job(str(tmp_path))
    job["dataset"]["label"]["aux_thresholds"] = []
    job["dataset"]["negatives"] = {"count": 50}
    pool = pa.table({ITEM: np.arange(100, 150)})  # 50 items with events
    with pytest.raises(ValueError, match=r"dataset\.negatives\.count: 50 negatives per event, "
                                         r"but .*raw/events has 50 distinct items"):
        check_pool(config_from_dict(job), pool)  # was: 100 per event, duplicates, no word
    job["dataset"]["negatives"] = {"count": 49}
    check_pool(config_from_dict(job), pool)


def test_rectrain_plan_plans_a_zch_job_row_wise(tmp_path):
    """Before: TorchRec's planner refused 'uneven buckets per rank (1 buckets across 2 ranks)'
    (plan_job never set the zch tables' buckets as the workers do)."""
    from rectrain.train.plan_cluster import plan_job

    job = _zch_job(tmp_path)  # no prepared folder: sizes from the config
    for f in job["features"]:
        if f["kind"] in ("sparse", "multi_hot") and f["name"] != "item_id":
            f.update(encoding="hash", hash_buckets=10)
    report = plan_job(config_from_dict(job))
    item = [s for s in report.shards if s["table"] == "item"]
    assert {s["sharding_type"] for s in item} == {"row_wise"} and len(item) == 2
