"""Two-stage recommend (rectrain/serve/, rectrain/launch/recommend_job.py) on the tiny job with
freshly initialised DIN and two-tower checkpoints: the indexes, two-stage against brute force,
exclusion policies, a job without users table, and a killed recommend actor resumed."""

import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from rectrain.config import config_from_dict
from rectrain.data.schema import ITEM, USER, read_split
from rectrain.launch.recommend_job import recommend_job
from rectrain.serve.blocks import FAULT_ENV
from rectrain.serve.context import RunContext
from rectrain.serve.index import ExactIndex, build_index
from tests.support.recommend_runs import tiny_recommend_runs
from tests.support.tiny import N_ITEMS


def test_exact_index_is_blockwise_topk_and_faiss_recalls_it():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(3000, 16)).astype(np.float32)
    q = rng.normal(size=(64, 16)).astype(np.float32)
    ref = torch.topk(torch.from_numpy(q) @ torch.from_numpy(v).t(), 10, dim=1)
    s, i = ExactIndex(v, items_per_block=256).search(q, 10)  # 12 blocks merged
    assert np.array_equal(i, ref.indices.numpy())
    np.testing.assert_allclose(s, ref.values.numpy(), rtol=1e-5)
    assert s.dtype == np.float32 and i.dtype == np.int64 and i.shape == (64, 10)
    for kind, params in (("ivf", {"nlist": 32, "nprobe": 8}), ("hnsw", {"m": 16})):
        index = build_index(v, kind, **params)
        _, got = index.search(q, 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, i)])
        assert recall >= 0.8, (kind, recall)
        # pickled (ray.put to the actors): the same index, the same answers
        assert np.array_equal(pickle.loads(pickle.dumps(index)).search(q, 10)[1], got), kind


def test_retrieval_searches_each_user_for_its_own_need_not_the_heaviest():
    from rectrain.serve import candidates as cand

    rng = np.random.default_rng(1)
    v = rng.normal(size=(500, 8)).astype(np.float32)
    q = rng.normal(size=(6, 8)).astype(np.float32)
    # user row 3 has 300 excluded items, the others 0..4
    lists = [rng.choice(500, size=c, replace=False) for c in (0, 2, 4, 300, 1, 3)]
    indptr = np.r_[0, np.cumsum([len(x) for x in lists])]
    excl = cand.Exclusion(indptr, np.concatenate([np.sort(x) for x in lists]), 500)
    asked = []

    class Recording(ExactIndex):
        def search(self, queries, n):
            asked.append((len(queries), n))
            return super().search(queries, n)

    users = np.arange(6)
    u, i, s = cand.retrieval(Recording(v), q, users, np.arange(500), 10, excl, 0, 6)
    full = q @ v.T
    for r in users:
        full[r, lists[r]] = -np.inf
    ref = np.argsort(-full, axis=1, kind="stable")[:, :10]
    assert np.array_equal(u, np.repeat(users, 10)) and np.array_equal(i, ref.reshape(-1))
    np.testing.assert_allclose(s, np.take_along_axis(full, ref, 1).reshape(-1), rtol=1e-5)
    # needs 10 + excluded: the 5 light users in one search of 14 items, user 3 alone for 310
    assert sorted(asked) == [(1, 310), (5, 14)]
    # above ann_max_k, user 3 is scored exactly against the vectors, not searched
    asked.clear()
    got = cand.retrieval(Recording(v), q, users, np.arange(500), 10, excl, 0, 6, 1.0, v,
                         ann_max_k=100)
    assert asked == [(5, 14)] and np.array_equal(got[1], i)
    np.testing.assert_allclose(got[2], s, rtol=1e-5)


def test_popular_skips_each_users_own_exclusions():
    from rectrain.serve import candidates as cand

    order = np.array([5, 3, 9, 0, 1, 2, 4, 6, 7, 8])  # item rows by popularity
    seen = [[5, 3, 9, 0, 1, 2, 4], [], [3]]  # user 0 has seen the 7 most popular
    indptr = np.r_[0, np.cumsum([len(x) for x in seen])]
    excl = cand.Exclusion(indptr, np.concatenate([np.sort(x) for x in seen]).astype(np.int64),
                          10)
    u, i = cand.popular(order, 2, excl, 0, 3)
    assert u.tolist() == [0, 0, 1, 1, 2, 2] and i.tolist() == [6, 7, 5, 3, 5, 9]
    u, i = cand.popular(order, 4, excl, 0, 1)  # fewer eligible items than n
    assert u.tolist() == [0, 0, 0] and i.tolist() == [6, 7, 8]


def test_serving_context_streamed_by_batches_equals_the_whole_table(tmp_path, monkeypatch):
    """The context's reductions (last events, users, train counts, exclusion CSR, recent items,
    items without catalog), read in batches of a few files and merged, against one sort of
    every event: 9 files, ties on position across files, ids outside the keys, negatives."""
    import json

    from rectrain.data.schema import LABEL, POS
    from rectrain.serve import context as ctx
    from rectrain.serve import reductions

    rng = np.random.default_rng(4)
    files = {"train": 5, "valid": 2, "test": 2}
    for s, k in files.items():
        for f in range(k):
            n = int(rng.integers(20, 60))
            t = pa.table({USER: rng.integers(0, 25, n) * 7 + 3, ITEM: rng.integers(0, 30, n) * 5,
                          POS: rng.integers(0, 12, n),  # ties within and across files
                          "hist_item_id": [rng.integers(0, 30, int(m)).tolist()
                                           for m in rng.integers(0, 4, n)],
                          "cat": rng.integers(0, 3, n),
                          LABEL: (rng.random(n) < (0.8 if s == "train" else 1.1)).astype(
                              np.float32)})  # sampled negatives (label 0) in train only
            (tmp_path / s).mkdir(exist_ok=True)
            pq.write_table(t, tmp_path / s / f"p{f}.parquet")
    (tmp_path / "manifest.json").write_text(json.dumps({"negatives": {"splits": ["train"]}}))
    monkeypatch.setattr(reductions, "BATCH_ROWS", 70)  # batches of 1-3 files
    monkeypatch.setattr(reductions, "MERGE_PAIRS", 16)  # the CSR merged in many user ranges
    p, splits = str(tmp_path), ("train", "valid", "test")
    cols = [USER, POS, "hist_item_id", ITEM, "cat", LABEL]
    whole = pa.concat_tables([pq.read_table(tmp_path / s / f"p{f}.parquet")
                              for s in splits for f in range(files[s])])
    whole = whole.append_column("_n", pa.array(np.arange(whole.num_rows)))
    # reference last event: one stable sort; a negative shares its position, never last
    lastpos = np.where(whole[LABEL].to_numpy() >= 0.5, whole[POS].to_numpy(), -1)
    order = np.lexsort((lastpos, whole[USER].to_numpy()))
    u = whole[USER].to_numpy()[order]
    ref = whole.take(pa.array(order[np.r_[u[1:] != u[:-1], True]])).select(cols)
    assert ctx._last_events(p, splits, cols).to_pylist() == ref.to_pylist()
    obs = whole.filter(pc.greater_equal(whole[LABEL], 0.5))  # what read_split reads
    users = ctx.serve_users(p)
    assert users.to_pylist() == sorted(set(obs[USER].to_pylist()))
    user_keys = pa.array(users.to_numpy()[::2])  # every other user: ids outside the keys
    item_keys = pa.array(np.arange(0, 120, 5))  # items 120..145 are not in the catalogue
    row_u = {x: r for r, x in enumerate(user_keys.to_pylist())}
    row_i = {x: r for r, x in enumerate(item_keys.to_pylist())}
    # (user row, item row, position, event number) of every observed event
    ev = [(row_u.get(a, -1), row_i.get(b, -1), q, n) for a, b, q, n in zip(
        *(obs[c].to_pylist() for c in (USER, ITEM, POS, "_n")))]
    train_n = sum(pq.read_metadata(tmp_path / "train" / f"p{f}.parquet").num_rows
                  for f in range(files["train"]))  # train's files come first
    train = [e for e in ev if e[3] < train_n]
    got_users, pop = ctx.train_counts(p, user_keys, item_keys)
    assert got_users.tolist() == [r in {e[0] for e in train} for r in range(len(user_keys))]
    assert pop.tolist() == [sum(e[1] == r for e in train) for r in range(len(item_keys))]
    for sp, evs in ((("train",), train), (splits, ev)):
        indptr, items = ctx.seen_csr(p, sp, user_keys, item_keys)
        assert items.dtype == np.int32 and indptr.dtype == np.int64
        seen = [sorted({e[1] for e in evs if e[0] == r and e[1] >= 0 and e[0] >= 0})
                for r in range(len(user_keys))]
        assert [items[indptr[r]:indptr[r + 1]].tolist() for r in range(len(user_keys))] == seen
    indptr, items = ctx.recent_csr(p, 3, user_keys, item_keys)
    for r in range(len(user_keys)):  # most recent first, equal positions in file order
        mine = sorted((e for e in train if e[0] == r and e[1] >= 0), key=lambda e: (-e[2], e[3]))
        want = list(dict.fromkeys(e[1] for e in mine))[:3]
        assert items[indptr[r]:indptr[r + 1]].tolist() == want
    # items without a catalogue: each item's first observed event, sorted by raw id
    from types import SimpleNamespace as NS

    fake = NS(prepared=p, cfg=NS(features=[NS(name="cat", source="item_id", kind="sparse")],
                                 dataset=NS(item_column="item_id")))
    got = ctx.RunContext._items(fake, str(tmp_path / "no_items.parquet"), ["cat"], [])
    first = {}
    for x, c in zip(obs[ITEM].to_pylist(), obs["cat"].to_pylist()):
        first.setdefault(x, c)
    assert got.to_pylist() == [{ITEM: x, "cat": first[x]} for x in sorted(first)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_local):
    return tiny_recommend_runs(str(tmp_path_factory.mktemp("rec")))


def _job(runs, tmp, **over):
    cfg = config_from_dict(runs["job"])
    kw = dict(ranking_run=runs["din"], retrieval_run=runs["two_tower"], users_per_block=7,
              actors=0, k=5, out=str(tmp), evaluate=False)
    kw.update(over)
    return cfg, kw


def _lists(summary):
    return pq.read_table(summary["lists"])


@pytest.mark.slow
def test_two_stage_with_the_whole_catalogue_equals_brute_force(runs, tmp_path):
    cfg, kw = _job(runs, tmp_path / "bf")
    bf = recommend_job(cfg, mode="brute_force", **kw)
    cfg, kw = _job(runs, tmp_path / "ts", explain=2)
    ts = recommend_job(cfg, mode="two_stage", candidates=N_ITEMS, **kw)
    a, b = _lists(bf), _lists(ts)
    assert bf["users"] == ts["users"] == len(set(a["user_id"].to_pylist())) == 30
    for c in ("user_id", "rank", "item_id", "score"):
        assert a[c].equals(b[c]), c
    assert set(pc.cast(b["source"], pa.string()).to_pylist()) == {"retrieval"}
    assert all(1 <= len(x) <= 2 for x in b["explain_item_ids"].to_pylist())  # DIN attention
    cands = pq.read_table(tmp_path / "ts" / "candidates.parquet")
    assert cands.num_rows == ts["candidates_per_user"] * 30


@pytest.mark.slow
def test_last_events_read_file_by_file_equal_the_whole_split_sorted(runs):
    from rectrain.data.schema import POS
    from rectrain.serve.context import _last_events

    prepared = config_from_dict(runs["job"]).prepared_dir
    cols = [USER, POS, "hist_item_id", ITEM]
    splits = ("train", "valid", "test")
    ev = pa.concat_tables([read_split(prepared, s, cols) for s in splits])
    ev = ev.take(pc.sort_indices(ev, [(USER, "ascending"), (POS, "ascending")]))
    u = ev[USER].to_numpy()
    ref = ev.take(pa.array(np.flatnonzero(np.r_[u[1:] != u[:-1], True])))
    got = _last_events(prepared, splits, cols)
    assert got.num_rows == 30 and got.to_pylist() == ref.to_pylist()


def _reference_retrieval_top_k(run: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The former single-process retrieval_top_k: the full [users, items] score matrix, every
    event's item excluded, torch.topk per user -> (user ids, item ids) [users, k]."""
    ctx = RunContext(run)
    with torch.no_grad():
        _, v = ctx.model(ctx.batch(np.zeros(ctx.n_items, np.int64), np.arange(ctx.n_items)),
                         n_queries=0)
        u, _ = ctx.model(ctx.batch(np.arange(ctx.n_users), np.zeros(ctx.n_users, np.int64)))
    scores = u @ v.t() / ctx.model.temperature
    ev = pa.concat_tables([read_split(ctx.prepared, s, [USER, ITEM])
                           for s in ("train", "valid", "test")])
    uu, ii = ctx.rows(ev[USER], ev[ITEM])
    scores[torch.from_numpy(uu), torch.from_numpy(ii)] = float("-inf")
    top = torch.topk(scores, k, dim=1).indices.numpy()
    return ctx.user_keys.to_numpy(), ctx.item_keys.to_numpy()[top]


@pytest.mark.slow
def test_retrieval_alone_by_the_exact_index_equals_the_full_score_matrix(runs, tmp_path):
    cfg, kw = _job(runs, tmp_path, ranking_run=runs["two_tower"], exclude="all_seen")
    rec = _lists(recommend_job(cfg, mode="brute_force", **kw))
    users, items = _reference_retrieval_top_k(runs["two_tower"], 5)
    assert np.array_equal(rec["user_id"].to_numpy(), np.repeat(users, 5))
    assert np.array_equal(rec["item_id"].to_numpy().reshape(-1, 5), items)
    # two_stage with the retriever as ranking run: the retriever alone through `index`
    cfg, kw = _job(runs, tmp_path / "ts", ranking_run=runs["two_tower"], exclude="all_seen")
    ts = recommend_job(cfg, mode="two_stage", index="exact", **kw)
    assert _lists(ts).select(["user_id", "rank", "item_id"]).equals(
        rec.select(["user_id", "rank", "item_id"]))
    assert not os.path.exists(tmp_path / "ts" / "candidates.parquet")
    assert ts["rows"] == rec.num_rows and ts["block_seconds"] >= 0


def _pairs(t, cols=("user_id", "item_id")):
    return set(zip(*(t[c].to_pylist() for c in cols)))


@pytest.mark.slow
def test_exclusion_policies_and_sources(runs, tmp_path):
    prepared = config_from_dict(runs["job"]).prepared_dir
    ev = {s: read_split(prepared, s, [USER, ITEM]) for s in ("train", "valid", "test")}
    train = _pairs(ev["train"], (USER, ITEM))
    every = train | _pairs(ev["valid"], (USER, ITEM)) | _pairs(ev["test"], (USER, ITEM))
    sources = [{"name": "retrieval", "count": 10}, {"name": "popular", "count": 5},
               {"name": "recent", "count": 3}]
    got = {}
    for policy in ("none", "train", "all_seen"):
        cfg, kw = _job(runs, tmp_path / policy, exclude=policy, sources=sources)
        s = recommend_job(cfg, mode="two_stage", **kw)
        got[policy] = (_pairs(_lists(s)), pq.read_table(tmp_path / policy / "candidates.parquet"))
        assert s["exclude"] == policy and s["users"] == 30
    assert not got["train"][0] & train and not _pairs(got["train"][1]) & train
    assert not got["all_seen"][0] & every and not _pairs(got["all_seen"][1]) & every
    none_cands = got["none"][1]
    recent = pc.equal(pc.cast(none_cands["source"], pa.string()), "recent")
    assert 0 < pc.sum(recent).as_py() <= 3 * 30 and _pairs(none_cands.filter(recent)) <= train
    # per user: de-duplicated, at most 10 + 5 + 3 candidates
    n = pc.value_counts(none_cands["user_id"]).field("counts").to_numpy()
    assert n.max() <= 18 and len(_pairs(none_cands)) == none_cands.num_rows


@pytest.mark.slow
def test_no_users_table_users_from_events_and_fallback(tmp_path, ray_local, monkeypatch):
    import tests.support.recommend_runs as rr
    from tests.support.tiny import tiny_tables

    def tables(*a, **k):  # user 5 keeps 2 events: valid and test, no train rows
        t = tiny_tables(*a, **k)
        ev = t["events"]
        five = np.flatnonzero(ev["user_id"].to_numpy() == 5)
        drop = np.zeros(ev.num_rows, bool)
        drop[five[2:]] = True
        t["events"] = ev.filter(pa.array(~drop))
        return t

    monkeypatch.setattr(rr, "tiny_tables", tables)
    r = rr.tiny_recommend_runs(str(tmp_path), users_table=False)
    assert not os.path.exists(tmp_path / "prepared" / "catalog" / "users.parquet")
    cfg, kw = _job(r, tmp_path / "out")
    s = recommend_job(cfg, mode="two_stage", **kw)
    rec = _lists(s)
    users = sorted(set(tables()["events"]["user_id"].to_pylist()))
    assert s["users"] == len(users) and sorted(set(rec["user_id"].to_pylist())) == users
    assert s["fallback_users"] == 1
    five = rec.filter(pc.equal(rec["user_id"], 5))
    assert set(pc.cast(five["source"], pa.string()).to_pylist()) == {"fallback"}
    train = read_split(cfg.prepared_dir, "train", [ITEM])
    counts = np.sort(pc.value_counts(train[ITEM]).field("counts").to_numpy())[::-1]
    assert five["score"].to_pylist() == counts[:5].astype(float).tolist()  # most popular


@pytest.mark.slow
def test_killed_recommend_actor_resumes_every_user_once(runs, tmp_path, monkeypatch):
    """An actor exits (os._exit) in block 2 of 5 with Ray restarts off: the job fails, the
    blocks written so far stay; the rerun skips them and its lists equal an uninterrupted
    in-process run."""
    kw2 = dict(mode="two_stage", candidates=20, users_per_block=6)
    cfg, kw = _job(runs, tmp_path / "ref", actors=2, **kw2)
    ref = recommend_job(cfg, **kw)  # 30 users x 20 candidates: small, in this process
    assert ref["path"] == "in_process" and "600 pairs" in ref["path_reason"]
    ref = _lists(ref)
    cfg, kw = _job(runs, tmp_path / "ray", actors=2, in_process_pairs=0, **kw2)
    monkeypatch.setenv(FAULT_ENV, "block:2:exit")
    with pytest.raises(Exception):
        recommend_job(cfg, actor_max_restarts=0, **kw)
    assert os.path.exists(tmp_path / "ray" / "_faults" / "block-2.json")
    # complete block files only: a sibling actor stopped mid-write leaves a .tmp-PID file
    done = len([f for f in os.listdir(tmp_path / "ray" / "blocks") if f.endswith(".parquet")])
    assert done < 5
    monkeypatch.delenv(FAULT_ENV)
    s = recommend_job(cfg, **kw)
    assert s["blocks"] == 5 and s["blocks_skipped"] == done
    assert s["path"] == "ray_data" and s["timings"]["actor_load_s"] >= 0  # a shared Recommender
    assert s["timings"]["blocks_s"] <= s["timings"]["total_s"]
    rec = _lists(s)
    assert rec.equals(ref)
    n = pc.value_counts(rec["user_id"]).field("counts").to_numpy()
    assert len(n) == 30 and set(n) == {5}  # every user exactly once, k rows each


@pytest.mark.slow
def test_evaluate_holds_the_test_split_out_and_scores_the_lists(runs, tmp_path):
    """recommend.evaluate: each user's history ends at their valid event (the test event is
    not shown to the models), all_seen excludes train + valid only, and recommend_metrics.json
    holds the list metrics of the written lists, most-popular and stage 1's recall."""
    import json

    from rectrain.serve.list_metrics import evaluate_lists, events_from_prepared, \
        truth_from_prepared

    prepared = config_from_dict(runs["job"]).prepared_dir
    held, full = RunContext(runs["din"], holdout=True), RunContext(runs["din"])
    valid = read_split(prepared, "valid", [USER, ITEM])
    last = {u: seq[-1] for u, seq in zip(held.user_keys.to_pylist(),
                                         held.state["hist_item_id"].to_pylist())}
    enc = read_split(prepared, "valid", [USER, "item_id"])  # encoded ids, as in the sequences
    assert {u: i for u, i in zip(enc[USER].to_pylist(), enc["item_id"].to_pylist())} == last
    assert held.state["hist_item_id"] != full.state["hist_item_id"]
    cfg, kw = _job(runs, tmp_path, evaluate=True, exclude="all_seen", positives="all",
                   sources=[{"name": "retrieval", "count": 8}, {"name": "popular", "count": 4}])
    s = recommend_job(cfg, mode="two_stage", **kw)
    lists = _lists(s)
    seen = events_from_prepared(prepared, ("train", "valid"))
    assert not _pairs(lists) & _pairs(seen)
    m = json.load(open(tmp_path / "recommend_metrics.json"))
    assert m.keys() == s["list_metrics"].keys() == {"model", "most_popular", "positives", "stage1"}
    truth = truth_from_prepared(prepared, "test", "all")
    train = events_from_prepared(prepared, ("train",))
    direct = evaluate_lists(lists, truth, train, N_ITEMS, 5, "all_seen", seen)
    assert m["model"]["hr@5"] == pytest.approx(direct["hr@5"])
    assert m["model"]["ndcg@5"] == pytest.approx(direct["ndcg@5"])
    assert m["model"]["users_evaluated"] == 30 and m["model"]["recommended_excluded"] == 0
    assert 0 <= m["most_popular"]["hr@5"] <= 1 and m["most_popular"]["users_evaluated"] == 30
    assert 8 < m["stage1"]["candidates_per_user"] <= 12  # 8 retrieval + 4 popular, de-duplicated
    assert m["model"]["hr@5"] <= m["stage1"]["truth_recall"] <= 1  # the lists' ceiling


@pytest.mark.slow
def test_sharded_scoring_on_two_ranks_gives_the_unsharded_lists(runs, tmp_path):
    """scoring: sharded: a 2-rank gloo worker group (Ray Train) holding DIN's tables sharded
    by the training's plan; 5 blocks, 3 on rank 0 and 2 on rank 1, so rank 1 steps on padding
    while rank 0 finishes; the lists and candidates equal the unsharded ones."""
    kw2 = dict(mode="two_stage", candidates=20, users_per_block=6,
               sources=[{"name": "retrieval", "count": 12}, {"name": "popular", "count": 8}])
    cfg, kw = _job(runs, tmp_path / "one", **kw2)
    ref = recommend_job(cfg, **kw)
    assert ref["path"] == "in_process" and "<= actor_memory_gb 8" in ref["path_reason"]
    cfg, kw = _job(runs, tmp_path / "sh", actor_memory_gb=1e-6, **kw2)  # auto: over budget
    s = recommend_job(cfg, **kw)
    assert s["path"] == "sharded" and "> actor_memory_gb 1e-06; 2 workers" in s["path_reason"]
    assert [r["blocks"] for r in s["ranks"]] == [3, 2]
    assert len({r["forwards"] for r in s["ranks"]}) == 1  # the same collective steps
    assert s["ranks"][1]["padding_forwards"] >= 1
    a, b = _lists(ref), _lists(s)
    for c in ("user_id", "rank", "item_id", "source"):
        assert a[c].equals(b[c]), c
    np.testing.assert_allclose(b["score"].to_numpy(), a["score"].to_numpy(), rtol=0, atol=1e-5)
    assert pq.read_table(tmp_path / "one" / "candidates.parquet").equals(
        pq.read_table(tmp_path / "sh" / "candidates.parquet"))
    assert not os.path.exists(tmp_path / "sh" / "_sharded")
    assert s["users"] == 30 and s["blocks_skipped"] == 0
