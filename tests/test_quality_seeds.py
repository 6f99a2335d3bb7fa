"""The quality benchmark's seeds, noise rule and cold-item slices (benchmarks/quality.py,
rectrain/bench/slices.py): on written metrics and predictions, no training."""

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from benchmarks import quality
from rectrain.bench.slices import cold_item_metrics, item_train_events

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def test_cold_item_auc_is_the_auc_of_the_rows_whose_item_had_few_train_events(tmp_path):
    rng = np.random.default_rng(0)
    train = tmp_path / "prep" / "train"
    train.mkdir(parents=True)
    # item 1: 10 train events, item 2: 3, item 3: 1, item 4: none
    pq.write_table(pa.table({"_item": [1] * 6 + [2, 3]}), train / "p000.parquet")
    pq.write_table(pa.table({"_item": [1] * 4 + [2, 2]}), train / "p001.parquet")
    counts = item_train_events(str(tmp_path / "prep"))
    assert dict(zip(*counts.to_pydict().values())) == {1: 10, 2: 3, 3: 1}
    item = np.repeat([1, 2, 3, 4], 25)
    label = rng.integers(0, 2, 100).astype(np.float32)
    score = label * 0.3 + rng.random(100)
    m = cold_item_metrics(pa.table({"item_id": item, "label": label, "score": score}), counts)
    cold, unseen = item >= 2, item == 4
    assert (m["cold_rows"], m["unseen_rows"]) == (75, 25)
    assert m["test_auc_cold"] == pytest.approx(roc_auc_score(label[cold], score[cold]))
    assert m["test_auc_unseen"] == pytest.approx(roc_auc_score(label[unseen], score[unseen]))
    assert m["test_auc_all"] == pytest.approx(roc_auc_score(label, score))
    one_class = cold_item_metrics(pa.table({"item_id": [4, 4], "label": [1.0, 1.0],
                                            "score": [0.1, 0.2]}), counts)
    assert math.isnan(one_class["test_auc_unseen"])
    with pytest.raises(KeyError, match="retrieval run"):
        cold_item_metrics(pa.table({"item_id": [1], "score": [3.0]}), counts)
    # a retrieval run's predictions: HR@10 of the held-out items by slice
    r = cold_item_metrics(pa.table({"item_id": [1, 2, 3, 4], "rank": [1, 50, 3, 11]}), counts)
    assert (r["test_hr@10_all"], r["test_hr@10_cold"], r["test_hr@10_unseen"]) == (0.5, 1 / 3, 0.0)


def test_seeds_are_averaged_and_a_gain_must_clear_twice_the_larger_std(tmp_path, capsys):
    runs = tmp_path / "runs"
    jobs = []
    for name, aucs in (("base", [0.750, 0.752, 0.748]), ("better", [0.770, 0.771, 0.769]),
                       ("noisy", [0.740, 0.770, 0.755]),
                       ("worse", [0.730, 0.731, 0.729])):
        job = tmp_path / f"{name}.yaml"
        job.write_text(f"extends: {JOBS / 'movielens_din.yaml'}\nname: {name}\n"
                       f"run_dir: {runs / name}\n")
        jobs.append({"job": str(job), "metric": "test_auc", "label": name,
                     **({"baseline": "base"} if name != "base" else {})})
        for s, auc in enumerate(aucs):
            d = runs / name / f"seed-{s}"
            d.mkdir(parents=True)
            (d / "metrics.json").write_text(json.dumps(
                {"test_auc": auc, "test_logloss": 0.6, "seed": s, "train_wall_seconds": 10.0,
                 "train_samples_per_s": 1000.0}))
    (tmp_path / "jobs.yaml").write_text(json.dumps(jobs))
    out = tmp_path / "res" / "quality"
    assert quality.main(["--jobs", str(tmp_path / "jobs.yaml"), "--seeds", "3", "--collect",
                         "--out", str(out)]) == 0
    rows = {r["label"]: r for r in json.loads(Path(f"{out}.json").read_text())}
    assert rows["base"]["value"] == pytest.approx(0.750)
    assert rows["base"]["value_std"] == pytest.approx(0.002)
    assert rows["base"]["value_runs"] == [0.750, 0.752, 0.748]
    assert rows["better"]["compare"]["gain"] is True          # +0.020 > 2 × 0.002
    assert rows["noisy"]["compare"]["gain"] is False          # +0.005 < 2 × 0.015
    assert rows["noisy"]["compare"]["loss"] is False and rows["better"]["compare"]["loss"] is False
    assert rows["worse"]["compare"]["loss"] is True           # -0.020 < -2 × 0.002
    md = Path(f"{out}.md").read_text()
    assert "0.7700 ± 0.0010" in md and "within noise" in md and "over 3 seeds" in md
    assert "-0.0200 vs base: loss" in md
    with pytest.raises(SystemExit):
        quality.main(["--jobs", str(tmp_path / "jobs.yaml"), "--seeds", "0"])
