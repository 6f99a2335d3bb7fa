"""Sharded (DMP, 2 gloo ranks) forward/backward equals the unsharded model on the same batches.
One pair of spawned ranks checks every sharding type in turn (a module fixture), the
parametrized test asserts on each type's results."""

import os
import queue
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rectrain.data.features import FeatureLayout
from rectrain.models import build_model
from rectrain.train.sharding import shard_model
from tests.support.ports import free_port as _free_port
from tests.support.prepared import batch_table as _batch_table
from tests.support.prepared import tiny_manifest as _manifest
from tests.support.dist import copy_into_shards
from tests.support.tiny import tiny_cfg

LR = 0.5
B = 12
SHARDINGS = ["table_wise", "row_wise", "column_wise"]


def _worker(rank, world, port, tmp, q):
    """This rank's results for each sharding type in turn, in one process group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        q.put((rank, {sharding: _step(rank, world, sharding, tmp) for sharding in SHARDINGS}))
    finally:
        dist.destroy_process_group()


def _step(rank, world, sharding, tmp):
    """One sharded step with ``sharding`` on this rank and what the test compares."""
    torch.manual_seed(0)
    cfg = tiny_cfg(tmp, sharding={"types": [sharding]},
                   optim={"sparse": "sgd", "sparse_lr": LR, "dense": "sgd", "dense_lr": LR})
    layout = FeatureLayout(cfg, _manifest())
    ref = build_model(layout, cfg.model)
    full = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    dmp, opt, plan = shard_model(build_model(layout, cfg.model,
                                             sparse_device=torch.device("meta")),
                                 cfg.sharding, cfg.optim, torch.device("cpu"))
    copy_into_shards(dmp, full)  # the reference weights into the shards
    batches = [layout.to_batch(_batch_table(r)) for r in range(world)]
    loss_fn = torch.nn.BCEWithLogitsLoss()
    # sharded step on this rank's batch
    logits = dmp(batches[rank])
    loss = loss_fn(logits, batches[rank].labels)
    loss.backward()
    dense_grads = {n.replace("_dmp_wrapped_module.", "").replace("module.", ""): p.grad
                   for n, p in dmp.named_parameters() if p.grad is not None}
    # reference: the sharded step equals one unsharded step on the global batch with the loss
    # averaged over ranks (DDP averages dense grads; TorchRec scales the embedding grads alike)
    ref_logits = ref(batches[rank])
    ref.zero_grad()
    sum(loss_fn(ref(b), b.labels) for b in batches).backward()
    out = {"plan_types": sorted({ps.sharding_type for mod in plan.plan.values()
                                 for ps in mod.values()}),
           "item_type": next(mod["item"].sharding_type for mod in plan.plan.values()
                             if "item" in mod),
           "logit_err": float((logits - ref_logits).abs().max()), "dense_err": 0.0,
           "emb_err": 0.0, "n_dense": 0, "n_shards": 0, "empty_finite":
           bool(torch.isfinite(logits[0]))}
    ref_params = dict(ref.named_parameters())
    for name, g in dense_grads.items():
        if name in ref_params and "embedding" not in name:
            out["dense_err"] = max(out["dense_err"],
                                   float((g - ref_params[name].grad / world).abs().max()))
            out["n_dense"] += 1
    # fused SGD already ran in backward: w_new = w - LR * mean_r grad_r
    with torch.no_grad():
        for key, t in dmp.state_dict().items():
            if hasattr(t, "local_shards"):
                pname = key
                expected = full[key] - LR * ref_params[pname].grad / world
                for s in t.local_shards():
                    (r0, c0), (nr, nc) = s.metadata.shard_offsets, s.metadata.shard_sizes
                    err = (s.tensor - expected[r0:r0 + nr, c0:c0 + nc]).abs().max()
                    out["emb_err"] = max(out["emb_err"], float(err))
                    out["n_shards"] += 1
    return out


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory):
    """``{rank: {sharding: results}}`` of 2 spawned gloo ranks (one spawn for all types)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    world = 2
    port = _free_port()
    tmp = str(tmp_path_factory.mktemp("dist"))
    procs = [ctx.Process(target=_worker, args=(r, world, port, tmp, q)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    deadline = time.monotonic() + 240
    while len(results) < world:
        try:
            rank, r = q.get(timeout=2)
            results[rank] = r
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not dead and time.monotonic() < deadline, f"worker failed: exit codes {dead}"
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_sharded_equals_unsharded(sharding, per_rank):
    results = {rank: r[sharding] for rank, r in per_rank.items()}
    for rank, r in results.items():
        assert r["empty_finite"], "empty behaviour sequence gave a non-finite logit"
        assert r["logit_err"] < 1e-5, (rank, r)
        assert r["n_dense"] > 5 and r["dense_err"] < 1e-5, (rank, r)
        assert r["emb_err"] < 1e-5, (rank, r)
    # the requested type was really used (the item table is an EmbeddingCollection, which
    # supports every type on CPU; pooled tables fall back to table_wise where unsupported)
    assert results[0]["item_type"] == sharding
    # every table's shards were checked somewhere
    assert sum(r["n_shards"] for r in results.values()) >= 4
