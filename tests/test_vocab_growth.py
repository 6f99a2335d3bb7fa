"""Stable ids across prepares: ``dataset.vocab_from`` + ``capacity`` (issue 14, vocab growth)."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from rectrain.config import config_from_dict
from rectrain.data.encode import encode, grow_vocab, oov_count
from rectrain.data.schema import check_same_data, data_identity, extension_problems
from tests.support.tiny import tiny_job, tiny_tables


def test_grow_vocab_keeps_known_ids_appends_new_and_counts_overflow():
    prev = pa.array(["b", "d", "a"])  # id order, not sorted: never re-sorted
    v, rep = grow_vocab(pa.array(["z", "a", None, "c", "b", "y"]), prev, 5)
    assert v.to_pylist() == ["b", "d", "a", "c", "y"]  # c, y admitted (sorted); z has no room
    assert rep == {"known": 3, "seen": 5, "new": 2, "oov_values": 1, "capacity": 5, "size": 5}
    ids = encode(pa.array(["a", "z", None, "y"]), v)
    assert ids.to_pylist() == [3, 0, 0, 5]
    assert oov_count(pa.array(["a", "z", None, "y"]), ids) == 1  # null is not OOV
    lists = pa.array([["z", "b"], None, ["q", None]])
    assert oov_count(lists, encode(lists, v)) == 2
    first, rep1 = grow_vocab(pa.array([3, 1, 2, 9]), None, 3)
    assert first.to_pylist() == [1, 2, 3] and rep1["oov_values"] == 1
    with pytest.raises(ValueError, match="feature 'x': capacity 2 is below the 3 values"):
        grow_vocab(pa.array([1]), pa.array([1, 2, 3]), 2, "feature 'x'")


def _write(root, tables):
    for name in ("users", "items", "events"):
        (root / name).mkdir(parents=True)
        pq.write_table(tables[name], root / name / "part-0.parquet")


def _job(tmp, raw, prepared, vocab_from=None):
    job = tiny_job(str(tmp))
    job["prepared_dir"] = str(prepared)
    caps = {"user_id": 40, "item_id": 45, "age_bucket": 10, "genres": 10}
    for f in job["features"]:
        if f["name"] in caps:
            f["capacity"] = caps[f["name"]]
    job["dataset"] = {**job["dataset"], "events": str(raw / "events"),
                      "users": {"path": str(raw / "users"), "key": "user_id"},
                      "items": {"path": str(raw / "items"), "key": "item_id"},
                      "vocab_from": vocab_from}
    return config_from_dict(job)


def _vocab(prepared, name):
    t = pq.read_table(prepared / "vocab" / f"{name}.parquet")
    return dict(zip(t["value"].to_pylist(), t["id"].to_pylist()))


def test_ids_survive_two_prepares_new_ids_take_free_rows_overflow_is_counted(tmp_path,
                                                                              ray_local):
    from rectrain.data.prepare import prepare

    t = tiny_tables(n_events=400)
    items, ev = t["items"], t["events"]
    # window 1: items 100..139; window 2: 100..149 plus 98, 99 (sort before every old id)
    keep1 = pc.less(items["item_id"], 140)
    w1 = {"users": t["users"], "items": items.filter(keep1),
          "events": ev.filter(pc.less(ev["item_id"], 140))}
    extra = pa.table({"item_id": pa.array([98, 99], pa.int64()),
                      "genres": pa.array([["g0"], ["g9"]], pa.list_(pa.string()))})
    items2 = pa.concat_tables([items.take(pa.array(np.arange(len(items))[::-1])), extra])
    ev2 = pa.concat_tables([ev, ev.slice(0, 20).set_column(1, "item_id",
                                                             pa.array([98, 99] * 10))])
    w2 = {"users": t["users"], "items": items2, "events": ev2}
    _write(tmp_path / "raw1", w1)
    _write(tmp_path / "raw2", w2)
    m1 = prepare(_job(tmp_path, tmp_path / "raw1", tmp_path / "p1"))
    assert m1["tables"]["item"] == 46 and m1["tables"]["user_id"] == 41
    g1 = m1["vocab_growth"]["features"]["item_id"]
    assert g1["new"] == 40 and g1["oov_values"] == 0
    m2 = prepare(_job(tmp_path, tmp_path / "raw2", tmp_path / "p2", str(tmp_path / "p1")))
    assert m2["tables"] == m1["tables"]  # fixed by capacity: a checkpoint's tables fit
    v1, v2 = _vocab(tmp_path / "p1", "item_id"), _vocab(tmp_path / "p2", "item_id")
    assert all(v2[k] == i for k, i in v1.items())  # a raw id keeps its row
    # 12 new items (98, 99, 140..149) for 5 free rows: sorted, the first 5 get rows 41..45
    assert {k: v2[k] for k in set(v2) - set(v1)} == {98: 41, 99: 42, 140: 43, 141: 44,
                                                    142: 45}
    g2 = m2["vocab_growth"]["features"]["item_id"]
    assert (g2["known"], g2["new"], g2["oov_values"], g2["oov_rows"]) == (40, 5, 7, 7)
    assert m2["vocab_growth"]["vocab_from"] == str(tmp_path / "p1")
    # the samples carry the same ids; items without a row are id 0 (the counted OOV row)
    s2 = pa.concat_tables([pads.dataset(str(tmp_path / "p2" / s)).to_table()
                           for s in ("train", "valid", "test")])
    raw_item, enc = s2["_item"].to_numpy(), s2["item_id"].to_numpy()
    expect = np.array([v2.get(int(r), 0) for r in raw_item])
    assert (enc == expect).all() and (enc[raw_item >= 143] == 0).all()
    # continuity: the extended data is accepted for the window-1 checkpoint, a renumbered
    # prepare of the same window (no vocab_from: 98, 99 sort first) is refused
    saved = data_identity(m1)
    assert check_same_data(saved, m2, "ck", str(tmp_path / "p2")) == "extends"
    # the same ids in larger tables (capacity raised): a warm start grows them (grow=True),
    # serving does not; a table that shrank, or grew without a vocabulary, is refused
    assert _check_growth(saved, m2, str(tmp_path / "p2")) == "extends"
    m3 = prepare(_job(tmp_path, tmp_path / "raw2", tmp_path / "p3"))
    assert m3["tables"] == m1["tables"]
    assert any("item_id: its first 40 values differ" in p
               for p in extension_problems(saved, m3, str(tmp_path / "p3")))
    with pytest.raises(ValueError, match="renumbered"):
        check_same_data(saved, m3, "ck", str(tmp_path / "p3"))


def _resized(manifest: dict, table: str, rows: int) -> dict:
    import copy

    m = copy.deepcopy(manifest)
    m["tables"][table] = rows
    for f in m["features"]:
        if f["table"] == table:
            f["num_embeddings"] = rows
    return m


def _check_growth(saved: dict, m2: dict, p2: str) -> str:
    from rectrain.data.schema import grown_tables

    big = _resized(m2, "item", 56)
    with pytest.raises(ValueError, match=r"table item: 46 rows at the checkpoint, 56 now"):
        check_same_data(saved, big, "ck", p2)
    assert grown_tables(saved, big) == {"item": [46, 56]} and grown_tables(saved, m2) == {}
    with pytest.raises(ValueError, match=r"ck: .*table item: 46 rows at the checkpoint, 40 now "
                                         r"\(only growth continues the ids\)"):
        check_same_data(saved, _resized(m2, "item", 40), "ck", p2, grow=True)
    no_vocab = {**saved, "vocabularies": {k: v for k, v in saved["vocabularies"].items()
                                          if k != "user_id"}}
    with pytest.raises(ValueError, match=r"table user_id: 41 rows at the checkpoint, 50 now "
                                         r"\(grown, but user_id had no vocabulary"):
        check_same_data(no_vocab, _resized(m2, "user_id", 50), "ck", p2, grow=True)
    return check_same_data(saved, big, "ck", p2, grow=True)


def test_capacity_overflow_warns_and_vocab_from_a_run_whose_data_is_gone_stops(tmp_path, caplog):
    import json
    import logging

    from rectrain.data.prepare.vocab import Vocabularies, previous_vocabularies

    f = config_from_dict(tiny_job(str(tmp_path))).features[1].model_copy(update={"capacity": 2})
    with caplog.at_level(logging.WARNING, logger="rectrain.data.prepare.vocab"):
        assert len(Vocabularies().build(f, pa.array([5, 6, 7, 8]))) == 2
    assert "feature 'item_id': capacity 2 is full (2 values); 2 more distinct values go to " \
           "the OOV row 0" in caplog.text
    ck = tmp_path / "run" / "checkpoint"
    ck.mkdir(parents=True)
    (ck / "meta.json").write_text(json.dumps({"config": {"prepared_dir": str(tmp_path / "gone")}}))
    with pytest.raises(FileNotFoundError, match=r"dataset.vocab_from: .*run was prepared into "
                                                r".*gone, which is gone"):
        previous_vocabularies(str(tmp_path / "run"), ["item_id"])
