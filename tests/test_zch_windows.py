"""``encoding: zch`` end to end over two consecutive windows (issue 14): prepare writes raw ids,
the model of window 1 is warm-started on window 2, and a raw id keeps its embedding row; the
epochs report admitted, evicted and colliding ids. Prepare on the session's local Ray, training
on one gloo rank in this process. The users of window 2 outgrow the ``user_id`` vocabulary (no
capacity): the warm start grows that table in place (old rows kept, new rows fresh)."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

from rectrain.config import config_from_dict
from rectrain.data.prepare.rawids import raw_id_encode
from tests.support.tiny import tiny_job, tiny_tables

CAP = 60  # rows of the item table: every one of the 50 items fits


def _write(root, tables):
    for name in ("users", "items", "events"):
        (root / name).mkdir(parents=True)
        pq.write_table(tables[name], root / name / "part-0.parquet")


def _job(tmp, raw, prepared, run, vocab_from=None, **over):
    job = tiny_job(str(tmp), prepared_dir=str(prepared), run_dir=str(run),
                   train={"epochs": 1, "batch_size": 16, "eval_batch_size": 64,
                          "num_workers": 1, "log_every": 100}, **over)
    for f in job["features"]:
        if f["name"] == "item_id":
            f.update(encoding="zch", capacity=CAP, zch={"policy": "lfu"})
    job["dataset"] = {**job["dataset"], "events": str(raw / "events"),
                      "users": {"path": str(raw / "users"), "key": "user_id"},
                      "items": {"path": str(raw / "items"), "key": "item_id"},
                      "vocab_from": vocab_from}
    return job


def _samples(prepared):
    return pa.concat_tables([pads.dataset(str(prepared / s)).to_table()
                             for s in ("train", "valid", "test")])


def _rows_and_vectors(run):
    from rectrain.models.zch import held_ids
    from rectrain.serve.loading import load_model

    model = load_model(str(run)).model
    (w,) = [v for k, v in model.state_dict().items() if k.endswith("embeddings.item.weight")]
    held = held_ids(model)["item"]
    return held, {raw: w[row].detach().clone() for raw, row in held.items()}


def _load_spy(monkeypatch):
    """Snapshots of the ``user_id`` table just before and after the warm start's load."""
    from rectrain.train import resume

    seen, load = {}, resume.load_checkpoint

    def user_rows(dmp):
        (w,) = [v for k, v in dmp.state_dict().items()
                if k.endswith("embedding_bags.user_id.weight")]
        return w.local_shards()[0].tensor.detach().clone()

    def spy(url, dmp, optimizer=None, grow=None):
        seen["before"] = user_rows(dmp)
        meta = load(url, dmp, optimizer, grow=grow)
        seen["after"], seen["grow"] = user_rows(dmp), grow
        return meta

    monkeypatch.setattr(resume, "load_checkpoint", spy)
    return seen


def test_a_raw_id_keeps_its_row_across_two_windows(tmp_path, ray_local, monkeypatch):
    from rectrain.data.prepare import prepare
    from rectrain.serve.loading import load_model
    from tests.support.dist import run_one_rank

    t = tiny_tables(n_events=400)
    ev, us = t["events"], t["users"]
    early = pc.and_(pc.less(ev["item_id"], 140), pc.less_equal(ev["user_id"], 20))
    _write(tmp_path / "raw1", {**t, "users": us.filter(pc.less_equal(us["user_id"], 20)),
                               "events": ev.filter(early)})
    _write(tmp_path / "raw2", t)  # window 2: items 140..149 and users 21..30 appear
    p1, p2 = tmp_path / "p1", tmp_path / "p2"
    m1 = prepare(config_from_dict(_job(tmp_path, tmp_path / "raw1", p1, tmp_path / "run1")))
    m2 = prepare(config_from_dict(_job(tmp_path, tmp_path / "raw2", p2, tmp_path / "run2",
                                       vocab_from=str(p1))))
    assert m1["tables"]["item"] == m2["tables"]["item"] == CAP  # fixed: a checkpoint fits
    assert (m1["tables"]["user_id"], m2["tables"]["user_id"]) == (21, 31)  # vocab, no capacity
    assert m1["hashing"]["item_id"]["encoding"] == "zch"
    assert m2["hashing"]["item_id"]["distinct_values"] == 50
    # the samples carry raw ids, the same in both prepares, without a vocabulary
    s1, s2 = _samples(p1), _samples(p2)
    for s in (s1, s2):
        assert s["item_id"].to_pylist() == raw_id_encode(s["_item"]).to_pylist()
    assert not (p2 / "vocab" / "item_id.parquet").exists()
    run1 = run_one_rank(_job(tmp_path, tmp_path / "raw1", p1, tmp_path / "run1"))
    e1 = run1["epochs"][0]
    assert e1["zch_item_evicted"] == 0 and e1["zch_item_colliding"] == 0
    seen1 = set(s1["item_id"].to_pylist())  # train rows and histories of window 1
    assert 0 < e1["zch_item_held"] == e1["zch_item_admitted"] <= len(seen1)
    tiny_lr = {"dense_lr": 1e-12, "sparse_lr": 1e-12}
    seen = _load_spy(monkeypatch)
    run2 = run_one_rank(_job(tmp_path, tmp_path / "raw2", p2, tmp_path / "run2", optim=tiny_lr,
                             checkpoint={"warm_start": str(tmp_path / "run1")}))
    assert run2["warm_start"]["data"] == "extends"
    assert run2["warm_start"]["grown"] == {"user_id": [21, 31]} == \
        {k: list(v) for k, v in seen["grow"].items()}
    (u1,) = [v for k, v in load_model(str(tmp_path / "run1")).model.state_dict().items()
             if k.endswith("embedding_bags.user_id.weight")]
    assert seen["after"].shape == (31, u1.shape[1])
    assert torch.equal(seen["after"][:21], u1)  # old users: their rows, exactly
    assert torch.equal(seen["after"][21:], seen["before"][21:])  # new users: fresh rows
    assert not torch.equal(seen["before"][:21], u1)
    e2 = run2["epochs"][0]
    assert e2["zch_item_admitted"] > 0  # the new items of window 2
    assert e2["zch_item_held"] == e1["zch_item_held"] + e2["zch_item_admitted"]
    rows1, vec1 = _rows_and_vectors(tmp_path / "run1")
    rows2, vec2 = _rows_and_vectors(tmp_path / "run2")
    assert set(rows1) <= set(rows2)
    for raw, row in rows1.items():  # same row, and (lr 1e-12) the same vector
        assert rows2[raw] == row
        assert torch.allclose(vec1[raw], vec2[raw], atol=1e-6)
    new = set(rows2) - set(rows1)
    assert new and not {rows2[r] for r in new} & set(rows1.values())  # new ids, free rows
    new_raw = set(raw_id_encode(pa.array(np.arange(140, 150))).to_pylist())
    assert new & new_raw  # the items born in window 2 hold rows now
