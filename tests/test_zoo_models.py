"""Ranking model zoo: every registered model trains a step on a tiny Batch (unsharded), the MSE
objective, and one 2-process gloo check that a sharded zoo model (BST) equals the unsharded one."""

import os
import queue
import time

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rectrain.config import ConfigError
from rectrain.data.features import FeatureLayout
from rectrain.models import MODELS, build_model
from rectrain.models.base import main_logits
from rectrain.train.objectives import eval_metrics, init_regression_head, main_loss
from rectrain.train.sharding import shard_model
from tests.support.dist import copy_into_shards
from tests.support.tiny import tiny_cfg
from tests.support.ports import free_port as _free_port
from tests.support.prepared import batch_table as _batch_table
from tests.support.prepared import tiny_manifest as _manifest

ZOO = ["din", "dlrm", "dcnv2", "bst", "autoint"]
VARIANTS = [  # (model, extra model settings)
    ("dlrm", {}), ("dcnv2", {"cross_structure": "stacked", "cross_rank": 4}),
    ("dcnv2", {"cross_structure": "parallel"}), ("autoint", {}),
    ("bst", {}), ("bst", {"sequence_encoder": "cnn"}), ("bst", {"sequence_encoder": "gru"}),
    ("din", {"sequence_encoder": "cnn"}), ("din", {"sequence_encoder": "gru"}),
    ("din", {"sequence_encoder": "transformer"}), ("din", {"sequence_encoder": "lstm"}),
]


def _model(tmp, name, aux=(), **model):
    over = {"model": {"name": name, **model}}
    if aux:
        over["dataset"] = {"label": {"column": "rating", "threshold": 4,
                                     "aux_thresholds": list(aux)}}
    cfg = tiny_cfg(tmp, **over)
    layout = FeatureLayout(cfg, _manifest())
    return cfg, layout, build_model(layout, cfg.model)


def test_registry_has_the_zoo():
    assert set(ZOO) <= set(MODELS)


@pytest.mark.parametrize("name,extra", VARIANTS)
def test_forward_backward_step_lowers_loss(name, extra, tmp_path):
    torch.manual_seed(0)
    cfg, layout, model = _model(str(tmp_path), name, **extra)
    batch = layout.to_batch(_batch_table(0))  # row 0 has an empty history
    assert batch.sparse.to_dict()["hist_item_id"].lengths()[0] == 0
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    losses = []
    for _ in range(8):  # the model can fit 12 rows: the graph is wired end to end
        logits = model(batch)
        assert logits.shape == (12,) and torch.isfinite(logits).all()
        loss = loss_fn(logits, batch.labels)
        opt.zero_grad()
        loss.backward()
        losses.append(float(loss.detach()))
        opt.step()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if g is None]
    # the embedding tables receive gradient (they are TorchRec collections DMP can shard)
    assert any("embedding" in n and g.abs().sum() > 0 for n, g in grads.items())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("name", ["dlrm", "bst"])
def test_aux_heads_shape(name, tmp_path):
    _, layout, model = _model(str(tmp_path), name, aux=(2, 3))
    t = _batch_table(0).append_column("label_value", pa.array(np.arange(12) % 5 + 1.0, "float32"))
    assert model(layout.to_batch(t)).shape == (12, 3)


def test_history_padding_does_not_leak(tmp_path):
    """Changing items after a row's history length (beyond the sequence) changes nothing: the
    same row with a longer history in another row of the batch scores the same."""
    torch.manual_seed(0)
    for name, extra in [("bst", {}), ("din", {"sequence_encoder": "cnn"}),
                        ("dcnv2", {"sequence_encoder": "gru"})]:
        _, layout, model = _model(str(tmp_path), name, **extra)
        model.eval()
        t = _batch_table(0)
        full = model(layout.to_batch(t))
        alone = model(layout.to_batch(t.slice(0, 1)))  # row 0 (empty history) in its own batch
        torch.testing.assert_close(alone, full[:1], rtol=1e-5, atol=1e-5)


def test_mse_objective_trains_on_rating(tmp_path):
    torch.manual_seed(0)
    cfg, layout, model = _model(str(tmp_path), "dlrm", loss="mse")
    t = _batch_table(0)
    ratings = np.arange(12) % 5 + 1.0
    t = t.append_column("label_value", pa.array(ratings, "float32"))
    batch = layout.to_batch(t)
    assert batch.labels.tolist() == ratings.tolist()  # the regression target is label_value
    assert init_regression_head(model, batch.labels) == pytest.approx(ratings.mean())
    assert main_logits(model(batch)).mean().item() == pytest.approx(ratings.mean(), abs=0.5)
    loss_fn = main_loss(cfg)
    assert isinstance(loss_fn, torch.nn.MSELoss)
    m = eval_metrics(cfg, {"logits": np.full(12, 3.0), "labels": ratings})
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean((ratings - 3.0) ** 2)))
    assert m["mae"] == pytest.approx(np.mean(np.abs(ratings - 3.0)))


def test_unknown_encoder_and_model_named(tmp_path):
    with pytest.raises(ConfigError, match="model.sequence_encoder"):
        tiny_cfg(str(tmp_path), model={"sequence_encoder": "rnn"})
    with pytest.raises(ConfigError, match="model.name"):
        tiny_cfg(str(tmp_path), model={"name": "deepfm2"})


def _sharded_worker(rank, world, port, tmp, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        cfg = tiny_cfg(tmp, model={"name": "bst"}, sharding={"types": ["row_wise"]},
                       optim={"sparse": "sgd", "sparse_lr": 0.5, "dense": "sgd", "dense_lr": 0.5})
        layout = FeatureLayout(cfg, _manifest())
        ref = build_model(layout, cfg.model)
        full = {k: v.detach().clone() for k, v in ref.state_dict().items()}
        dmp, _, plan = shard_model(build_model(layout, cfg.model,
                                               sparse_device=torch.device("meta")),
                                   cfg.sharding, cfg.optim, torch.device("cpu"))
        copy_into_shards(dmp, full)
        batches = [layout.to_batch(_batch_table(r)) for r in range(world)]
        loss_fn = torch.nn.BCEWithLogitsLoss()
        logits = dmp(batches[rank])
        loss_fn(logits, batches[rank].labels).backward()
        ref_logits = ref(batches[rank])
        sum(loss_fn(ref(b), b.labels) for b in batches).backward()
        ref_params = dict(ref.named_parameters())
        dense_err, n_dense = 0.0, 0
        for n, p in dmp.named_parameters():
            name = n.replace("_dmp_wrapped_module.", "").replace("module.", "")
            if p.grad is not None and name in ref_params and "embedding" not in name:
                dense_err = max(dense_err, float((p.grad - ref_params[name].grad / world)
                                                 .abs().max()))
                n_dense += 1
        item_type = next(mod["item"].sharding_type for mod in plan.plan.values() if "item" in mod)
        q.put((rank, {"logit_err": float((logits - ref_logits).abs().max()),
                      "dense_err": dense_err, "n_dense": n_dense, "item_type": item_type}))
    finally:
        dist.destroy_process_group()


def test_bst_sharded_equals_unsharded(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_sharded_worker, args=(r, 2, port, str(tmp_path), q))
             for r in range(2)]
    for p in procs:
        p.start()
    results, deadline = {}, time.monotonic() + 240
    while len(results) < 2:
        try:
            rank, r = q.get(timeout=2)
            results[rank] = r
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not dead and time.monotonic() < deadline, f"worker failed: exit codes {dead}"
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, r in results.items():
        assert r["item_type"] == "row_wise"
        assert r["logit_err"] < 1e-5 and r["n_dense"] > 10 and r["dense_err"] < 1e-5, (rank, r)
