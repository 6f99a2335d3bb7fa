"""Warm start (issue 14): a run starts from another run's weights and optimiser state on
prepared data that equals or extends the checkpoint's vocabularies; renumbered data is refused.
In-process, one gloo rank (no Ray), like tests/test_reliability.py."""

import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rectrain.config import config_from_dict
from rectrain.data.schema import vocab_digest
from tests.support.prepared import write_prepared
from tests.support.tiny import tiny_job


def _run_inprocess(job: dict) -> dict:
    """``loop.run`` on one gloo rank in this process (no Ray)."""
    from tests.support.dist import run_one_rank

    return run_one_rank(job)


def _job(tmp, prepared, run, **over):
    return tiny_job(str(tmp), prepared_dir=str(prepared), run_dir=str(run),
                    train={"epochs": 1, "batch_size": 16, "eval_batch_size": 64,
                           "num_workers": 1, "log_every": 100}, **over)


def _with_vocab(src, dst, values, fp):
    """A copy of prepared folder ``src`` whose item_id vocabulary is ``values`` (id order)."""
    if src != dst:
        shutil.copytree(src, dst)
    os.makedirs(f"{dst}/vocab", exist_ok=True)
    v = pa.array(values, pa.int64())
    pq.write_table(pa.table({"value": v, "id": pa.array(range(1, len(v) + 1), pa.int64())}),
                   f"{dst}/vocab/item_id.parquet")
    m = json.load(open(f"{dst}/manifest.json"))
    m.update(fingerprint=fp, vocabularies={"item_id": {"size": len(v),
                                                       "digest": vocab_digest(v)}})
    json.dump(m, open(f"{dst}/manifest.json", "w"))


def _weights(run):
    from rectrain.serve.loading import load_model

    return {k: v.detach().clone() for k, v in load_model(str(run)).model.state_dict().items()
            if torch.is_tensor(v)}


def test_warm_start_loads_weights_on_extended_data_and_refuses_renumbered(tmp_path):
    a, b, c = tmp_path / "A", tmp_path / "B", tmp_path / "C"
    write_prepared(str(a), n_train=96, n_valid=48, n_test=48)
    _with_vocab(a, a, list(range(100, 145)), "a" * 64)  # window T: 45 of 50 rows used
    _with_vocab(a, b, list(range(100, 150)), "b" * 64)  # T+1: 5 new items in the free rows
    _with_vocab(a, c, list(range(149, 99, -1)), "c" * 64)  # renumbered
    m1 = _run_inprocess(_job(tmp_path, a, tmp_path / "run1"))
    assert "warm_start" not in m1
    tiny_lr = {"dense_lr": 1e-12, "sparse_lr": 1e-12}
    m2 = _run_inprocess(_job(tmp_path, b, tmp_path / "run2", optim=tiny_lr,
                             checkpoint={"warm_start": str(tmp_path / "run1")}))
    assert m2["warm_start"] == {"from": str(tmp_path / "run1" / "checkpoint"),
                                "data": "extends", "grown": {}}
    assert m2["epochs"][0]["epoch"] == 0 and m2["best_epoch"] == 0  # progress starts afresh
    w1, w2 = _weights(tmp_path / "run1"), _weights(tmp_path / "run2")
    assert w1.keys() == w2.keys()
    for k in w1:  # a step of 1e-12 moves nothing measurable: the weights are run 1's
        assert torch.allclose(w1[k].float(), w2[k].float(), atol=1e-6), k
    assert m2["test_auc"] == pytest.approx(m1["test_auc"], abs=1e-6)
    with pytest.raises(ValueError, match=r"changed since.*item_id: its first 45 values "
                                         r"differ \(renumbered\)"):
        _run_inprocess(_job(tmp_path, c, tmp_path / "run3",
                            checkpoint={"warm_start": str(tmp_path / "run1")}))


def test_warm_start_source_is_resolved_on_the_driver(tmp_path):
    from rectrain.train.resume import prepare_run, resolve_warm_start

    with pytest.raises(FileNotFoundError, match="checkpoint.warm_start: .*nowhere"):
        resolve_warm_start(str(tmp_path / "nowhere"))
    cfg = config_from_dict(_job(tmp_path, tmp_path / "p", tmp_path / "r",
                                checkpoint={"warm_start": str(tmp_path / "nowhere")}))
    with pytest.raises(FileNotFoundError):
        prepare_run(cfg)
    from rectrain import cli
    args = cli._overrides(type("A", (), {"warm_start": "rel/run"})())
    assert args["checkpoint"]["warm_start"] == os.path.join(os.getcwd(), "rel/run")


def test_warm_start_from_other_tables_stops_on_the_driver(tmp_path):
    """A warm start from a run whose embedding tables have other sizes fails in prepare_run
    (before Ray starts), naming the table, not in every worker after start-up."""
    from rectrain.train.resume import prepare_run
    from tests.support.recommend_runs import save_untrained

    write_prepared(str(tmp_path / "p1"))
    run1 = save_untrained(_job(tmp_path, tmp_path / "p1", tmp_path / "run1"),
                          str(tmp_path / "run1"))
    write_prepared(str(tmp_path / "p2"))
    m = json.loads((tmp_path / "p2" / "manifest.json").read_text())
    m["tables"]["item"] += 10
    (tmp_path / "p2" / "manifest.json").write_text(json.dumps(m))
    cfg = config_from_dict(_job(tmp_path, tmp_path / "p2", tmp_path / "run2",
                                checkpoint={"warm_start": run1}))
    with pytest.raises(ValueError, match=r"changed since.*table item: 51 rows at the checkpoint, "
                                         r"61 now.*--warm-start"):
        prepare_run(cfg)
    same = config_from_dict(_job(tmp_path, tmp_path / "p1", tmp_path / "run3",
                                 checkpoint={"warm_start": run1}))
    assert prepare_run(same).checkpoint.warm_start.endswith("checkpoint")
