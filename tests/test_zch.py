"""``encoding: zch`` (issue 14): TorchRec's managed-collision tables with eviction.

Unit tests of the module (no Ray, no process group), a 2-rank gloo training whose checkpoint is
resumed on 1 and 3 ranks with the remapping state equal, and the CPU limits pinned."""

import numpy as np
import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from rectrain.config.sections import FeatureSpec
from rectrain.models.zch import FREE, epoch_stats, held_ids, make_sequence_ec, zch_modules
from tests.support.dist import spawn


def _spec(capacity, **zch):
    return FeatureSpec(name="item_id", kind="sparse", source="item_id", encoding="zch",
                       capacity=capacity, zch=zch or None)


def _ec(capacity, device=torch.device("cpu"), **zch):
    t = [EmbeddingConfig(name="item", embedding_dim=4, num_embeddings=capacity,
                         feature_names=["item_id", "hist_item_id"])]
    return make_sequence_ec(t, {"item": _spec(capacity, **zch)}, device)


def _kjt(item, hist=()):
    """A batch of len(item) rows: one candidate id each, and one history id each (or none)."""
    assert not len(hist) or len(hist) == len(item)
    ids = torch.tensor(list(item) + list(hist), dtype=torch.int64)
    return KeyedJaggedTensor.from_lengths_sync(
        ["item_id", "hist_item_id"], ids,
        torch.tensor([1] * len(item) + [1 if len(hist) else 0] * len(item), dtype=torch.int32))


def _no_shared_rows(ec):
    held = held_ids(ec)["item"]
    assert len(set(held.values())) == len(held)  # two held ids never share a row
    (m,) = zch_modules(ec)
    assert m._zch_size - 1 not in held.values()  # the miss row is nobody's
    return held


def test_lfu_evicts_the_least_counted_ids_counts_and_never_shares_a_row():
    ec = _ec(9)  # 8 rows for ids + the miss row
    ec.train()
    big = 2 ** 62  # raw 63-bit ids
    ids = [big + 10] * 5 + [big + 11] * 4 + [big + 12] * 3 + [big + k for k in range(13, 19)]
    emb, _ = ec(_kjt(ids))
    assert emb["item_id"].values().shape == (len(ids), 4)
    s = epoch_stats(ec)
    # 9 distinct ids, 8 rows: the 8 most counted are admitted, the last one shares the miss row
    assert s == {"zch_item_admitted": 8, "zch_item_evicted": 0, "zch_item_colliding": 1,
                 "zch_item_held": 8}
    held1 = _no_shared_rows(ec)
    assert big + 10 in held1 and len(held1) == 8
    ec(_kjt([big + 100] * 9, [big + 101] * 9))  # two ids counted 9 times each
    s = epoch_stats(ec)  # counts since the last call
    assert (s["zch_item_admitted"], s["zch_item_evicted"], s["zch_item_held"]) == (2, 2, 8)
    held2 = _no_shared_rows(ec)
    evicted = set(held1) - set(held2)
    # LFU: the two evicted ones are among those counted once; the counted ones keep their rows
    assert len(evicted) == 2 and evicted <= {big + k for k in range(13, 19)}
    assert {big + 100, big + 101} <= set(held2)
    assert all(held2[k] == held1[k] for k in set(held1) & set(held2))
    ec.eval()  # evaluation maps without admitting or counting
    ec(_kjt([big + 555]))
    assert epoch_stats(ec)["zch_item_admitted"] == 0 and big + 555 not in held_ids(ec)["item"]


def test_lru_evicts_the_least_recently_seen():
    ec = _ec(5, policy="lru")  # 4 rows for ids
    ec.train()
    for step in ([1, 2], [3, 4], [1, 3]):  # last seen: 1, 3 at step 2; 4 at 1; 2 at 0
        ec(_kjt(step))
    ec(_kjt([7]))  # one newcomer: the least recently seen id (2, step 0) gives up its row
    held = _no_shared_rows(ec)
    assert set(held) == {1, 3, 4, 7}
    assert epoch_stats(ec)["zch_item_evicted"] == 1


def test_a_pooled_zch_table_and_a_capacity_not_divisible_by_the_world_are_refused(tmp_path):
    from rectrain.data.features import FeatureLayout
    from rectrain.models.sparse_arch import SparseArch
    from rectrain.models.zch import set_world
    from tests.support.tiny import tiny_cfg

    cfg = tiny_cfg(str(tmp_path))
    cfg.features[0] = cfg.features[0].model_copy(update={"encoding": "zch", "capacity": 60})
    manifest = {"tables": {"user_id": 60, "item": 51, "age_bucket": 8, "genres": 7}}
    with pytest.raises(ValueError, match=r"zch tables \['user_id'\] are pooled"):
        SparseArch(FeatureLayout(cfg, manifest), ["hist_item_id"], torch.device("meta"))
    with pytest.raises(ValueError, match="capacity 9, not a multiple of train.num_workers = 2"):
        set_world(_ec(9, torch.device("meta")), 2)
    with pytest.raises(ValueError, match="encoding zch is for sparse features and needs capacity"):
        FeatureSpec(name="x", kind="sparse", source="x", encoding="zch")


def test_torchrec_hash_zch_cannot_insert_on_cpu():
    """Why rectrain uses MCH, not TorchRec's newer multi-probe HashZch, on CPU: fbgemm's CPU
    ``zero_collision_hash`` only looks ids up (fbgemm-gpu-cpu 1.8); it never inserts."""
    import fbgemm_gpu  # noqa: F401 -- registers torch.ops.fbgemm

    identities = torch.full((16, 1), -1, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="Expected readonly to be true"):
        torch.ops.fbgemm.zero_collision_hash(torch.tensor([5, 7, 9]), identities, 16, True)


# ---- sharded: 2 ranks train, 1 and 3 ranks resume ------------------------------------------

CAP = 48  # a multiple of 1, 2 and 3 (TorchRec shards need equal sizes)


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ec = _ec(CAP, torch.device("meta"))
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, kjt):
        e = self.ec(kjt)[0]
        return self.lin(e["item_id"].values()).sum() + self.lin(e["hist_item_id"].values()).sum()


def _pool():
    return torch.randint(1, 2 ** 63 - 1, (30,), generator=torch.Generator().manual_seed(0))


def _state(dmp, optimizer):
    """This rank's ``{raw id: (weight row, LFU count, row-wise Adagrad state)}``."""
    sd = dmp.state_dict()
    (wkey,) = [k for k in sd if k.endswith("item.weight")]
    w = sd[wkey].local_shards()[0]
    off = w.metadata.shard_offsets[0]
    (st,) = [v for k, v in optimizer.state_dict()["state"].items()
             if str(k).endswith("embeddings.item.weight")]
    (mom,) = [t.local_shards()[0].tensor for t in st.values() if hasattr(t, "local_shards")]
    (m,) = zch_modules(dmp)
    raw, rows, counts = m._mch_sorted_raw_ids, m._mch_remapped_ids_mapping, m._mch_counts
    out = {}
    for i in torch.nonzero(raw != FREE).flatten().tolist():
        r = int(rows[i]) - off
        out[int(raw[i])] = (w.tensor[r].tolist(), int(counts[i]), mom[r].flatten().tolist())
    return out


def _worker(rank, world, ckpt, mode):
    from rectrain.checkpoint import load_checkpoint, save_checkpoint
    from rectrain.config import OptimSpec, ShardingSpec
    from rectrain.train.sharding import shard_model

    dmp, opt, plan = shard_model(_Model(), ShardingSpec(types=["table_wise"]), OptimSpec(),
                                 torch.device("cpu"))
    types = {p.sharding_type for m in plan.plan.values() for p in m.values()}
    pool, g = _pool(), torch.Generator().manual_seed(rank)
    if mode == "train":
        for _ in range(5):
            dmp(_kjt(pool[torch.randint(0, 30, (8,), generator=g)],
                     pool[torch.randint(0, 30, (8,), generator=g)])).backward()
            opt.step()
            opt.zero_grad()
        stats = epoch_stats(dmp)
        save_checkpoint(ckpt, dmp, opt, {})
    else:
        load_checkpoint(ckpt, dmp, opt)
        stats = {}
    state = _state(dmp, opt)
    # the lookups of the held ids go to the rank that holds them now: their saved vectors
    dmp.eval()
    held = torch.tensor(sorted(state), dtype=torch.int64)[:4]
    emb = dmp.module.ec(_kjt(held))[0]["item_id"].values().detach().tolist()
    return {"types": types, "stats": stats, "state": state, "held": held.tolist(), "emb": emb}


def _in_process(ckpt):
    """:func:`_worker` resuming on one gloo rank in this process (one process start less)."""
    import os

    import torch.distributed as dist

    from tests.support.ports import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        return _worker(0, 1, ckpt, "resume")
    finally:
        dist.destroy_process_group()


def test_zch_trained_on_2_ranks_resumes_on_1_and_3_with_its_remapping_state(tmp_path):
    ckpt = str(tmp_path / "ck")
    saved = spawn(_worker, 2, ckpt, "train")
    assert all(r["types"] == {"row_wise"} for r in saved)
    stats = saved[0]["stats"]
    assert stats["zch_item_admitted"] == stats["zch_item_held"] == 30  # room for all 30 ids
    assert stats["zch_item_evicted"] == 0
    want = {k: v for r in saved for k, v in r["state"].items()}
    assert len(want) == 30 and all(c > 0 for _, c, _ in want.values())
    for world in (1, 3):
        got_ranks = spawn(_worker, 3, ckpt, "resume") if world == 3 else [_in_process(ckpt)]
        got = {k: v for r in got_ranks for k, v in r["state"].items()}
        assert got.keys() == want.keys(), world  # every id held, each on one rank
        for k in want:  # same vector, LFU count and optimiser state per raw id
            assert np.allclose(got[k][0], want[k][0]) and got[k][1] == want[k][1], (world, k)
            assert np.allclose(got[k][2], want[k][2]), (world, k)
        for r in got_ranks:  # each rank's lookups of its held ids return the saved vectors
            for raw, vec in zip(r["held"], np.array(r["emb"]).reshape(-1, 4)):
                assert np.allclose(vec, want[raw][0]), (world, raw)
