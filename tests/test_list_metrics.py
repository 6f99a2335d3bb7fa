"""List quality (rectrain/serve/list_metrics.py): HR/NDCG/recall against torchmetrics and
scikit-learn, the Gini index against the mean-absolute-difference formula, the most-popular
baseline and stage-1 recall against brute force, edge cases, the prepared-folder readers and
the report helpers. No Ray."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from sklearn.metrics import ndcg_score
from torchmetrics.retrieval import RetrievalHitRate, RetrievalNormalizedDCG, RetrievalRecall

from rectrain.serve import list_metrics as lm
from rectrain.serve import list_report

K = 5


def lists_of(rows: dict) -> pa.Table:
    """``{user: [item, ...] best first}`` -> a lists table (rank 1 = best)."""
    u = [x for x, items in rows.items() for _ in items]
    r = [j + 1 for items in rows.values() for j in range(len(items))]
    i = [x for items in rows.values() for x in items]
    return pa.table({"user_id": pa.array(u, pa.int64()), "rank": pa.array(r, pa.int32()),
                     "item_id": pa.array(i, pa.int64()),
                     "score": pa.array(-np.arange(len(u), dtype=np.float32))})


def pairs(rows: dict) -> pa.Table:
    u = [x for x, items in rows.items() for _ in items]
    return pa.table({"user_id": pa.array(u, pa.int64()),
                     "item_id": pa.array([x for v in rows.values() for x in v], pa.int64())})


def random_case(seed: int, n_users: int = 25, n_items: int = 30):
    rng = np.random.default_rng(seed)
    lists = {u: list(rng.permutation(n_items)[:K] + 1000) for u in range(n_users)}
    truth = {u: list(rng.choice(n_items, rng.integers(0, 8), replace=False) + 1000)
             for u in range(n_users)}
    train = {u: list(rng.integers(0, n_items, 6) + 1000) for u in range(n_users)}
    return lists, truth, train


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hr_ndcg_recall_match_torchmetrics_and_sklearn(seed):
    lists, truth, train = random_case(seed)
    n_items = 30
    m = lm.evaluate_lists(lists_of(lists), pairs(truth), pairs(train), n_items, K, "none")
    # every item scored: list items above the rest in list order, the rest tied far below
    idx, preds, target, sk = [], [], [], []
    for u in lists:
        s = np.zeros(n_items)
        s[np.array(lists[u]) - 1000] = np.arange(K, 0, -1) + 10.0
        t = np.zeros(n_items, bool)
        t[np.array(truth[u], dtype=np.int64) - 1000] = True
        idx.append(np.full(n_items, u)), preds.append(s), target.append(t)
        if t.any():
            sk.append(ndcg_score(t[None].astype(float), s[None], k=K))
    args = [torch.tensor(np.concatenate(x)) for x in (preds, target, idx)]
    for name, metric in ((f"hr@{K}", RetrievalHitRate), (f"ndcg@{K}", RetrievalNormalizedDCG),
                         (f"recall@{K}", RetrievalRecall)):
        ref = metric(top_k=K, empty_target_action="skip")(*args).item()
        assert m[name] == pytest.approx(ref, abs=1e-6), name
    assert m[f"ndcg@{K}"] == pytest.approx(np.mean(sk), abs=1e-9)
    rr = [next((1 / (j + 1) for j, x in enumerate(lists[u]) if x in truth[u]), 0.0)
          for u in lists if truth[u]]
    assert m[f"mrr@{K}"] == pytest.approx(np.mean(rr))
    assert m["users_evaluated"] == sum(1 for u in truth if truth[u])
    assert m["users_without_truth"] == sum(1 for u in truth if not truth[u])


def test_gini_matches_mean_absolute_difference_and_bounds():
    rng = np.random.default_rng(3)
    for n in (1, 7, 40):
        x = rng.integers(1, 20, rng.integers(1, n + 1))
        full = np.r_[x, np.zeros(n - len(x))]
        direct = np.abs(full[:, None] - full[None, :]).sum() / (2 * n * n * full.mean())
        assert lm.gini_index(x, n) == pytest.approx(direct)
    assert lm.gini_index(np.full(10, 3), 10) == pytest.approx(0.0)
    assert lm.gini_index(np.array([5]), 10) == pytest.approx(1 - 1 / 10)
    assert np.isnan(lm.gini_index(np.array([]), 10))
    with pytest.raises(ValueError, match="n_items=2"):
        lm.gini_index(np.ones(3), 2)
    gx, gy = lm.lorenz_curve(np.array([1, 1, 2]), 4, points=5)  # exposure 0, 1, 1, 2
    assert np.allclose(gy, [0, 0, 0.25, 0.5, 1.0]) and gx[-1] == 1.0


def test_hand_case_coverage_popularity_exclusion_and_counts():
    lists = lists_of({1: [10, 11, 12], 2: [10, 13], 3: [14]})
    truth = pairs({1: [11, 15, 15], 2: [16], 4: [10]})  # user 3 has no truth, 4 no list
    train = pairs({1: [10, 15], 2: [10, 11], 3: [10]})
    m = lm.evaluate_lists(lists, truth, train, n_items=20, k=3, exclude="train")
    assert m["users_evaluated"] == 3 and m["users_without_truth"] == 1
    assert m["users_without_list"] == 1 and m["users_with_short_list"] == 1
    assert m["truth_pairs"] == 4  # the repeated (1, 15) once
    assert m["hr@3"] == pytest.approx(1 / 3)
    assert m["recall@3"] == pytest.approx((1 / 2) / 3)
    idcg2 = 1 + 1 / np.log2(3)
    assert m["ndcg@3"] == pytest.approx((1 / np.log2(3)) / idcg2 / 3)
    assert m["mrr@3"] == pytest.approx(0.5 / 3)
    # (1, 15) is in train: never recommendable under exclude=train; (1, 10), (2, 10) listed
    assert m["truth_pairs_excluded"] == 1 and m["users_truth_all_excluded"] == 0
    assert m["recommended_excluded"] == 2
    assert m["coverage"] == pytest.approx(5 / 20) and m["distinct_items"] == 5
    # train popularity: 10 -> 3, 11 -> 1, 15 -> 1, others 0; evaluated users 1, 2 have lists
    assert m["popularity_recommended"] == pytest.approx(((3 + 1 + 0) / 3 + (3 + 0) / 2) / 2)
    assert m["popularity_test"] == pytest.approx(((1 + 1) / 2 + 0 + 3) / 3)
    assert m["popularity_ratio"] == pytest.approx(m["popularity_recommended"]
                                                  / m["popularity_test"])
    assert m["gini"] == pytest.approx(lm.gini_index(np.array([2, 1, 1, 1, 1]), 20))
    none = lm.evaluate_lists(lists, truth, train, 20, 3, "none")
    assert none["truth_pairs_excluded"] == 0 and none["recommended_excluded"] == 0


def test_k_cuts_longer_lists_by_rank_not_row_order():
    lists = lists_of({1: [10, 11, 12]}).take(pa.array([2, 0, 1]))  # rows shuffled
    m = lm.evaluate_lists(lists, pairs({1: [12]}), pairs({}), 10, k=2, exclude="none")
    assert m["hr@2"] == 0.0 and m["distinct_items"] == 2
    assert lm.evaluate_lists(lists, pairs({1: [11]}), pairs({}), 10, 2, "none")["mrr@2"] == 0.5


def test_duplicates_and_bad_input_name_the_user():
    dup = pa.concat_tables([lists_of({7: [10, 11]}),
                            lists_of({7: [0, 0, 10]}).slice(2)])  # item 10 again at rank 3
    with pytest.raises(ValueError, match="user 7 has item 10 more than once"):
        lm.evaluate_lists(dup, pairs({7: [10]}), pairs({}), 10, 3, "none")
    same_rank = pa.concat_tables([lists_of({8: [10]}), lists_of({8: [12]})])
    with pytest.raises(ValueError, match="user 8 has rank 1 twice"):
        lm.evaluate_lists(same_rank, pairs({8: [10]}), pairs({}), 10, 3, "none")
    with pytest.raises(ValueError, match="all_seen.*needs `seen`"):
        lm.evaluate_lists(lists_of({1: [1]}), pairs({1: [1]}), pairs({}), 10, 3, "all_seen")
    with pytest.raises(ValueError, match="'everything'"):
        lm.evaluate_lists(lists_of({1: [1]}), pairs({1: [1]}), pairs({}), 10, 3, "everything")
    with pytest.raises(ValueError, match="no column 'rank'"):
        lm.evaluate_lists(pairs({1: [1]}), pairs({1: [1]}), pairs({}), 10, 3, "none")
    nulls = pa.table({"user_id": pa.array([1, None], pa.int64()), "item_id": [1, 2]})
    with pytest.raises(ValueError, match="truth: column 'user_id' row 1: null"):
        lm.evaluate_lists(lists_of({1: [1]}), nulls, pairs({}), 10, 3, "none")
    strs = pa.table({"user_id": ["a"], "item_id": [1]})
    with pytest.raises(ValueError, match="different types"):
        lm.evaluate_lists(lists_of({1: [1]}), strs, pairs({}), 10, 3, "none")


def test_string_ids_and_no_truth_at_all():
    lists = pa.table({"user_id": ["u1", "u1", "u2"], "rank": [1, 2, 1],
                      "item_id": ["a", "b", "a"]})
    truth = pa.table({"user_id": ["u1"], "item_id": ["b"]})
    train = pa.table({"user_id": ["u2"], "item_id": ["a"]})
    m = lm.evaluate_lists(lists, truth, train, 3, 2, "none")
    assert m["hr@2"] == 1.0 and m["ndcg@2"] == pytest.approx(1 / np.log2(3))
    assert m["users_without_truth"] == 1
    empty = lm.evaluate_lists(lists, truth.slice(0, 0), train, 3, 2, "none")
    assert empty["users_evaluated"] == 0 and np.isnan(empty["hr@2"])


def brute_popular(train: dict, users, k, excluded: dict):
    counts: dict = {}
    for items in train.values():
        for x in items:
            counts[x] = counts.get(x, 0) + 1
    order = sorted(counts, key=lambda x: (-counts[x], x))
    return {u: [x for x in order if x not in set(excluded.get(u, []))][:k] for u in users}


@pytest.mark.parametrize("exclude", ["none", "train", "all_seen"])
def test_most_popular_matches_brute_force(exclude):
    rng = np.random.default_rng(5)
    train = {u: list(rng.integers(0, 12, rng.integers(0, 9)) + 100) for u in range(1, 15)}
    seen = {u: list(rng.integers(0, 12, 4) + 100) for u in range(1, 15)}
    users = pa.array([3, 1, 99, 7], pa.int64())  # 99 has no train row: the plain top-k
    out = lm.most_popular_lists(pairs(train), users, 4, exclude,
                                pairs(seen) if exclude == "all_seen" else None)
    assert out.column_names == ["user_id", "rank", "item_id", "score"]
    excluded = {"none": {}, "train": train, "all_seen": seen}[exclude]
    want = brute_popular(train, users.to_pylist(), 4, excluded)
    got = {u: [] for u in want}
    for row in out.to_pylist():
        got[row["user_id"]].append(row["item_id"])
        assert row["rank"] == len(got[row["user_id"]])
    assert got == want
    with pytest.raises(ValueError, match="more than once"):
        lm.most_popular_lists(pairs(train), pa.array([1, 1]), 4, "none")


def test_stage_recall():
    ref = lists_of({1: [10, 11, 12, 13], 2: [20, 21]})
    cand = pa.table({"user_id": pa.array([1, 1, 1, 1, 3], pa.int64()),
                     "item_id": pa.array([10, 12, 12, 99, 10], pa.int64()),
                     "score": [1.0] * 5, "source": ["retrieval", "retrieval", "popular",
                                                    "recent", "popular"]})
    assert lm.stage_recall(cand, ref) == pytest.approx((2 / 4 + 0) / 2)
    assert lm.stage_recall(cand, ref, k=1) == pytest.approx((1 + 0) / 2)
    assert lm.stage_recall(ref, ref) == 1.0


def test_prepared_readers_and_report(tmp_path):
    from rectrain.data.schema import ITEM, LABEL, USER, read_split
    from tests.support.prepared import write_prepared

    prepared = str(tmp_path / "prepared")
    write_prepared(prepared)
    test = read_split(prepared, "test", [USER, ITEM, LABEL])
    truth = lm.truth_from_prepared(prepared)
    assert truth.column_names == ["user_id", "item_id"]
    assert truth.num_rows == int(np.sum(test[LABEL].to_numpy() == 1)) > 0
    assert lm.truth_from_prepared(prepared, positives="all").num_rows == test.num_rows
    train = lm.events_from_prepared(prepared)
    assert train.num_rows == 400
    assert lm.events_from_prepared(prepared, ("train", "valid")).num_rows == 496
    n_items = lm.catalog_size(prepared)  # no num_items in this manifest: distinct items
    assert 0 < n_items <= 50
    with pytest.raises(FileNotFoundError, match="no nope/ split"):
        lm.events_from_prepared(prepared, ("nope",))

    users = pa.array(sorted(set(truth["user_id"].to_pylist())), pa.int64())
    pop = lm.most_popular_lists(train, users, 10, "train")
    m = lm.evaluate_lists(pop, truth, train, n_items, 10, "train")
    assert m["recommended_excluded"] == 0 and m["users_evaluated"] == len(users)
    results = {"most_popular": m, "again": m}
    text = list_report.format_metrics(results)
    assert "most_popular" in text and "hr@10" in text and len(text.splitlines()) == 3
    md = list_report.format_metrics(results, markdown=True)
    assert md.startswith("| method | hr@10 |") and f"{m['hr@10']:.4f}" in md
    path = list_report.write_metrics(str(tmp_path / "run" / "recommend_metrics.json"), results)
    assert json.load(open(path))["most_popular"]["k"] == 10
    png = list_report.plot_exposure(str(tmp_path / "exposure.png"),
                                    {"most_popular": lm.item_exposure(pop, 10)}, n_items)
    assert png is None or (tmp_path / "exposure.png").stat().st_size > 0


def test_truth_all_excluded_and_all_seen():
    lists = lists_of({1: [10, 11], 2: [12]})
    truth = pairs({1: [20], 2: [12]})
    seen = pairs({1: [20], 2: [13]})  # user 1's only truth item was seen: never listable
    m = lm.evaluate_lists(lists, truth, pairs({}), 30, 2, "all_seen", seen)
    assert m["users_truth_all_excluded"] == 1 and m["truth_pairs_excluded"] == 1
    assert m["hr@2"] == 0.5 and m["recommended_excluded"] == 0


def test_recommend_quality_benchmark(tmp_path, capsys):
    from benchmarks import recommend_quality
    from tests.support.prepared import write_prepared

    prepared = str(tmp_path / "prepared")
    write_prepared(prepared)
    train = lm.events_from_prepared(prepared)
    users = pa.array(np.arange(1, 31), pa.int64())
    pop = lm.most_popular_lists(train, users, 10, "train")
    os_dir = tmp_path / "two_stage"
    os_dir.mkdir()  # a partitioned output: two files
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pop.slice(0, 100), str(os_dir / "part-0.parquet"))
    pq.write_table(pop.slice(100), str(os_dir / "part-1.parquet"))
    rng = np.random.default_rng(0)
    rand = lists_of({u: list(rng.permutation(50)[:10] + 100) for u in range(1, 31)})
    pq.write_table(pop, str(tmp_path / "bf.parquet"))
    pq.write_table(rand, str(tmp_path / "random.parquet"))
    pq.write_table(rand.slice(0, 150).select(["user_id", "item_id"]),
                   str(tmp_path / "cand.parquet"))
    out = str(tmp_path / "res" / "quality")
    res = recommend_quality.main([
        "--prepared", prepared, "--lists", f"brute_force={tmp_path}/bf.parquet",
        "--lists", f"two_stage={os_dir}", "--lists", f"random={tmp_path}/random.parquet",
        "--candidates", f"{tmp_path}/cand.parquet", "--reference", "random", "--out", out])
    m = res["methods"]
    assert list(m) == ["brute_force", "two_stage", "random", "most_popular"]
    assert m["brute_force"] == m["two_stage"] == m["most_popular"]  # the same lists
    assert m["random"]["coverage"] > m["most_popular"]["coverage"]
    assert res["stage_recall"]["recall_of_top10"] == pytest.approx(0.5)  # 15 of 30 users
    saved = json.load(open(f"{out}.json"))
    assert saved["methods"]["random"]["hr@10"] == pytest.approx(m["random"]["hr@10"])
    md = open(f"{out}.md").read()
    assert md.count("\n| ") == 4 and "stage-1 recall of the random top-10: 0.5000" in md
    assert "| random |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="NAME=PATH"):
        recommend_quality.named_paths(["nope"])


def test_recommend_quality_reads_each_runs_wall_time(tmp_path):
    from benchmarks import recommend_quality

    for name, wall in (("bf", 60.0), ("ts", 12.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(
            {"mode": name, "wall_s": wall, "users_per_s": 943 / wall, "rows": 10,
             "block_seconds": wall / 2}))
    runs = {n: recommend_quality._summary(str(tmp_path / n / "top_k.parquet"))
            for n in ("bf", "ts")}
    assert runs["ts"] == {"mode": "ts", "wall_s": 12.0, "users_per_s": 943 / 12.0,
                          "block_seconds": 6.0}
    assert recommend_quality._summary(str(tmp_path / "none" / "top_k.parquet")) == {}
    note = recommend_quality.timing_note(runs, "bf")
    assert note.splitlines() == ["bf: wall 60.0 s, 16 users/s; blocks 30.0 s",
                                 "ts: wall 12.0 s, 79 users/s, 5.00x faster than bf; "
                                 "blocks 6.0 s, 5.00x"]
