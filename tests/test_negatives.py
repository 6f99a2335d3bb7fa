"""Sampled negatives (dataset.negatives, rectrain/data/prepare/negatives.py): the sampler on
hand-made tables (no Ray), then one prepare of the tiny job on the session's local Ray."""

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from rectrain.config import config_from_dict
from rectrain.data.prepare.negatives import COUNT, _items_of, add_negatives
from rectrain.data.prepare.vocab import UID
from rectrain.data.schema import ITEM, LABEL, LABEL_VALUE, SPLIT, read_split
from tests.support.tiny import tiny_job, tiny_tables

SPEC = {"count": 3, "sampling": "uniform", "alpha": 0.75, "splits": ["train", "valid", "test"]}


def _events(seed: int = 0, n_users: int = 20, n_items: int = 12, n: int = 150) -> pa.Table:
    """A bucket's table after build_sequences: whole users, sorted by user."""
    rng = np.random.default_rng(seed)
    uid = np.sort(rng.integers(1, n_users + 1, n))
    item = rng.integers(0, n_items, n)
    return pa.table({UID: uid, ITEM: item + 100, "item_id": item + 1,
                     "genres": pa.array([[int(i % 3) + 1] for i in item], pa.list_(pa.int64())),
                     "user_ctx": uid * 10, "hist_item_id": pa.array([[1, 2]] * n),
                     LABEL: pa.array(rng.integers(0, 2, n).astype(np.float32)),
                     LABEL_VALUE: pa.array(rng.integers(1, 6, n).astype(np.float32)),
                     SPLIT: pa.array(rng.integers(0, 3, n).astype(np.int8))})


def _pool(t: pa.Table) -> pa.Table:
    p = _items_of(t, [ITEM, "item_id", "genres"])
    return p.take(np.argsort(p[ITEM].to_numpy()))


@pytest.mark.parametrize("sampling", ["uniform", "popularity"])
def test_negatives_counts_labels_never_seen_and_seeded(sampling):
    t = _events()
    pool = _pool(t)
    assert pool[COUNT].to_numpy().sum() == t.num_rows and pool.num_rows == 12
    spec = {**SPEC, "sampling": sampling}
    out, st = add_negatives(t, pool, spec, seed=5, bucket=2)
    lab = out[LABEL].to_numpy()
    pos, neg = out.filter(pa.array(lab == 1.0)), out.filter(pa.array(lab == 0.0))
    assert pos.num_rows == t.num_rows and neg.num_rows == 3 * t.num_rows - st["dropped"]
    assert set(lab) == {0.0, 1.0}  # every observed event is a positive, whatever its rating
    assert (pos[LABEL_VALUE].to_numpy() == t[LABEL_VALUE].to_numpy()).all()
    assert (neg[LABEL_VALUE].to_numpy() == 0).all()
    assert sum(st["rows"].values()) == neg.num_rows
    # never an item of the user's history (any split); item columns follow the sampled item
    seen = set(zip(t[UID].to_pylist(), t[ITEM].to_pylist()))
    assert not seen & set(zip(neg[UID].to_pylist(), neg[ITEM].to_pylist()))
    assert (neg["item_id"].to_numpy() == neg[ITEM].to_numpy() - 99).all()
    assert [g[0] for g in neg["genres"].to_pylist()] == [(i - 100) % 3 + 1
                                                        for i in neg[ITEM].to_pylist()]
    # context, sequence and split are the event's: each event is followed by its negatives
    assert (neg["user_ctx"].to_numpy() == neg[UID].to_numpy() * 10).all()
    assert neg["hist_item_id"].to_pylist() == [[1, 2]] * neg.num_rows
    owner = np.cumsum(lab == 1.0) - 1
    assert (out[UID].to_numpy() == t[UID].to_numpy()[owner]).all()
    assert (out[SPLIT].to_numpy() == t[SPLIT].to_numpy()[owner]).all()
    again, _ = add_negatives(t, pool, spec, seed=5, bucket=2)
    assert again.equals(out)
    other, _ = add_negatives(t, pool, spec, seed=6, bucket=2)
    assert not other.equals(out)


def test_negatives_only_in_chosen_splits_and_dropped_when_nothing_is_left():
    t = _events()
    out, st = add_negatives(t, _pool(t), {**SPEC, "splits": ["train"]}, seed=0, bucket=0)
    neg = out.filter(pa.array(out[LABEL].to_numpy() == 0.0))
    assert set(neg[SPLIT].to_numpy()) == {0} and st["rows"]["valid"] == st["rows"]["test"] == 0
    # a user with events on every pool item has no negative to draw: dropped and counted
    full = pa.table({UID: np.ones(4, dtype=np.int64), ITEM: np.arange(100, 104),
                     "item_id": np.arange(1, 5), LABEL: np.ones(4, dtype=np.float32),
                     LABEL_VALUE: np.ones(4, dtype=np.float32),
                     SPLIT: np.zeros(4, dtype=np.int8)})
    out, st = add_negatives(full, _items_of(full, [ITEM, "item_id"]), SPEC, seed=0, bucket=0)
    assert out.num_rows == 4 and st["dropped"] == 12


def test_prepare_with_negatives_writes_them_and_serving_reads_events_only(tmp_path, ray_local):
    from rectrain.data.prepare import prepare
    from rectrain.serve.context import latest_state

    tables = tiny_tables(n_events=265)
    root = tmp_path / "raw"
    for name, t in tables.items():
        (root / name).mkdir(parents=True)
        pq.write_table(t, root / name / "part-0.parquet")
    job = tiny_job(str(tmp_path))
    job["dataset"]["negatives"] = {"count": 2, "sampling": "popularity", "seed": 3}
    m = prepare(config_from_dict(job))
    ev = tables["events"].to_pandas()
    assert m["rows_used"] == m["rows_read"] == len(ev)
    neg = m["negatives"]
    assert neg["count"] == 2 and neg["seed"] == 3 and neg["pool_items"] == ev.item_id.nunique()
    assert sum(neg["rows_per_split"].values()) == 2 * len(ev) - neg["dropped"]
    for s in ("train", "valid", "test"):
        got = pads.dataset(str(tmp_path / "prepared" / s)).to_table()
        assert got.num_rows == m["rows_per_split"][s]
        lab = got[LABEL].to_numpy()
        assert (lab == 0).sum() == neg["rows_per_split"][s] and set(lab) == {0.0, 1.0}
        pairs = set(zip(got["_user"].to_pylist(), got["_item"].to_pylist()))
        negs = got.filter(pa.array(lab == 0))
        assert not set(zip(negs["_user"].to_pylist(), negs["_item"].to_pylist())) & \
            set(zip(ev.user_id, ev.item_id))
        assert len(pairs) > 0
        # readers of histories, exclusions and truth see the observed events only
        observed = read_split(str(tmp_path / "prepared"), s, ["_user", LABEL])
        assert observed.num_rows == got.num_rows - neg["rows_per_split"][s]
        assert read_split(str(tmp_path / "prepared"), s, [LABEL],
                          negatives=True).num_rows == got.num_rows
    # the latest state is the last observed event's, never a negative sharing its position
    last = ev.sort_values(["user_id", "timestamp"], kind="stable").groupby("user_id").tail(1)
    users = pa.array(np.sort(ev.user_id.unique()))
    state = latest_state(str(tmp_path / "prepared"), users, [("hist_item_id", "item_id")], 8,
                         [])
    got_last = [h[-1] + 99 for h in state["hist_item_id"].to_pylist()]
    assert got_last == last.sort_values("user_id").item_id.tolist()
    # stage 2 on this data: brute-force lists of an (untrained) DIN, scored against the
    # observed test events only; all_seen excludes observed items, not the sampled ones
    from rectrain.launch.recommend_job import recommend_job
    from rectrain.serve.list_metrics import events_from_prepared, truth_from_prepared
    from tests.support.recommend_runs import save_untrained

    din = save_untrained(job, str(tmp_path / "din"))
    s = recommend_job(config_from_dict(job), mode="brute_force", ranking_run=din, actors=0,
                      k=5, out=str(tmp_path / "rec"), evaluate=True, exclude="all_seen",
                      positives="all")
    prepared = str(tmp_path / "prepared")
    truth = truth_from_prepared(prepared, "test", "all")
    assert truth.num_rows == m["rows_per_split"]["test"] - neg["rows_per_split"]["test"]
    assert s["list_metrics"]["model"]["users_evaluated"] == ev.user_id.nunique()
    lists = pq.read_table(s["lists"])
    seen = events_from_prepared(prepared, ("train", "valid"))
    assert seen.num_rows == len(ev) - truth.num_rows
    assert not set(zip(lists["user_id"].to_pylist(), lists["item_id"].to_pylist())) & \
        set(zip(seen["user_id"].to_pylist(), seen["item_id"].to_pylist()))
    assert lists.num_rows == 5 * ev.user_id.nunique()


def test_negatives_config_rejects_aux_heads(tmp_path):
    from rectrain.config import ConfigError

    job = tiny_job(str(tmp_path))
    job["dataset"]["negatives"] = {"count": 2}
    job["dataset"]["label"]["aux_thresholds"] = [3]
    with pytest.raises(ConfigError, match="aux_thresholds"):
        config_from_dict(job)
    job["dataset"]["label"]["aux_thresholds"] = []
    spec = config_from_dict(job).dataset.negatives
    assert (spec.count, spec.sampling, spec.splits, spec.seed) == (
        2, "uniform", ["train", "valid", "test"], None)


def test_retrieval_models_refuse_negatives_in_their_config_and_in_a_prepared_folder(tmp_path):
    """A retrieval model's loader reads every row as a positive: sampled label-0 rows would be
    trained on as observed events, so both the config and a shared prepared folder stop it."""
    import json

    from rectrain.config import ConfigError
    from rectrain.train.resume import prepare_run

    job = tiny_job(str(tmp_path), model={"name": "two_tower", "item_features": ["genres"]})
    job["dataset"]["negatives"] = {"count": 2}
    with pytest.raises(ConfigError, match="dataset.negatives: two_tower trains on observed"):
        config_from_dict(job)
    del job["dataset"]["negatives"]
    cfg = config_from_dict(job)
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "manifest.json").write_text(json.dumps({"negatives": {"count": 2}}))
    with pytest.raises(ValueError, match="prepared with dataset.negatives"):
        prepare_run(cfg)
    (tmp_path / "prepared" / "manifest.json").write_text(json.dumps({"negatives": None}))
    assert prepare_run(cfg).model.name == "two_tower"
