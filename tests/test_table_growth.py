"""Tables grown in place (issue 14, ``vocab`` growth): a checkpoint of a 20-row table saved on
one gloo rank (in this process) loads into a 30-row table table-wise on 1 rank and row-wise on
2 ranks (rank 1's shard holds saved rows 15..19 and fresh rows 20..29): rows 0..19 keep their
saved values and fused-optimiser state (row-wise Adagrad's ``momentum1`` [rows], Adagrad's
[rows, D]), rows 20..29 keep their fresh values, the other table and the dense parameters load
as before; any other size difference is refused. No Ray."""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.support.dist import assemble, local_shards, spawn
from tests.support.ports import free_port

OLD, NEW, USERS = 20, 30, 12
OPTIMS = ("rowwise_adagrad", "adagrad")


class _Model(torch.nn.Module):
    """``item`` in an EC (row-wise on CPU; FBGEMM's CPU EBC is table-wise only), ``user`` in
    an EBC."""

    def __init__(self, items: int):
        super().__init__()
        meta = torch.device("meta")
        self.ec = EmbeddingCollection([EmbeddingConfig(
            name="item", embedding_dim=4, num_embeddings=items, feature_names=["item_id"])],
            device=meta)
        self.ebc = EmbeddingBagCollection([EmbeddingBagConfig(
            name="user", embedding_dim=4, num_embeddings=USERS, feature_names=["user_id"])],
            device=meta)
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, batch):
        item, user = batch
        return self.lin(self.ec(item)["item_id"].values()).sum() + \
            self.lin(self.ebc(user)["user_id"]).sum()


def _batch(g):
    def kjt(key, n):
        return KeyedJaggedTensor.from_lengths_sync(
            [key], torch.randint(0, n, (6,), generator=g), torch.ones(6, dtype=torch.int32))
    return kjt("item_id", OLD), kjt("user_id", USERS)


def _dense(dmp):
    return {k: v.detach().numpy().copy() for k, v in dmp.state_dict().items()
            if not hasattr(v, "local_shards")}


def _build(rows, sharding, sparse):
    from rectrain.config import OptimSpec, ShardingSpec
    from rectrain.train.sharding import shard_model

    dmp, opt, plan = shard_model(_Model(rows), ShardingSpec(types=[sharding]),
                                 OptimSpec(sparse=sparse), torch.device("cpu"))
    return dmp, opt, {p.sharding_type for m in plan.plan.values() for p in m.values()}


def _grow(rank, world, ckpt, sharding):
    """Per optimiser: this rank's shards before and after loading ``ckpt`` into 30 rows."""
    from rectrain.checkpoint import load_checkpoint

    out = {}
    for sparse in OPTIMS:
        torch.manual_seed(7 + rank)
        dmp, opt, types = _build(NEW, sharding, sparse)
        before = local_shards(dmp, opt)
        load_checkpoint(f"{ckpt}/{sparse}", dmp, opt, grow={"item": (OLD, NEW)})
        out[sparse] = {"types": types, "before": before, "after": local_shards(dmp, opt),
                       "dense": _dense(dmp)}
    return out


def _train_save_grow_in_process(ckpt):
    """Train 3 steps and save (20 rows) per optimiser, then grow on this one rank."""
    from rectrain.checkpoint import load_checkpoint, save_checkpoint

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        saved = {}
        for sparse in OPTIMS:
            torch.manual_seed(0)
            dmp, opt, _ = _build(OLD, "table_wise", sparse)
            g = torch.Generator().manual_seed(0)
            for _ in range(3):
                dmp(_batch(g)).backward()
                opt.step()
                opt.zero_grad()
            save_checkpoint(f"{ckpt}/{sparse}", dmp, opt, {})
            saved[sparse] = {"after": local_shards(dmp, opt), "dense": _dense(dmp)}
        grown = _grow(0, 1, ckpt, "table_wise")
        dmp, opt, _ = _build(25, "table_wise", "rowwise_adagrad")
        with pytest.raises(ValueError, match=r"item.weight has size \(20, 4\) in the checkpoint "
                                             r"and \(25, 4\) now, which is no growth"):
            load_checkpoint(f"{ckpt}/rowwise_adagrad", dmp, opt, grow={"item": (OLD, NEW)})
        return saved, [grown]
    finally:
        dist.destroy_process_group()


def test_a_checkpoint_loads_into_grown_tables_at_other_world_sizes_and_plans(tmp_path):
    ckpt = str(tmp_path / "ck")
    saved, one = _train_save_grow_in_process(ckpt)
    for world, got in ((1, one), (2, spawn(_grow, 2, ckpt, "row_wise"))):
        for sparse in OPTIMS:
            types = set().union(*(r[sparse]["types"] for r in got))
            assert ("row_wise" in types) == (world == 2), (world, types)
            want = assemble([saved[sparse]["after"]])
            before = assemble([r[sparse]["before"] for r in got])
            after = assemble([r[sparse]["after"] for r in got])
            assert want.keys() == after.keys() and len(want) == 4, (world, sparse)
            for k in want:  # weights and optimiser state of both tables
                if ".item." in k:
                    assert after[k].shape[0] == NEW, (world, k)
                    assert np.array_equal(after[k][:OLD], want[k]), (world, k)  # old rows kept
                    assert np.array_equal(after[k][OLD:], before[k][OLD:]), (world, k)  # fresh
                else:
                    assert np.array_equal(after[k], want[k]), (world, k)
            (mom,) = [k for k in want if k.startswith("optim/") and ".item." in k]
            assert (want[mom] > 0).any() and not after[mom][OLD:].any()  # fresh state: 0
            for k, v in saved[sparse]["dense"].items():
                assert np.array_equal(got[0][sparse]["dense"][k], v), (world, k)
