"""Two gloo ranks with very uneven shards (files of 103, 97 | 55, 9, 1 rows): training takes the
same number of steps on both ranks, and evaluation with the sharded model scores every row exactly
once (the short rank runs padding batches so the model's collectives stay matched)."""

import os

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rectrain.data.features import FeatureLayout
from rectrain.data.loader import collective_batches, rebatch
from rectrain.models import build_model
from rectrain.train.loop import evaluate
from rectrain.train.sharding import shard_model
from tests.helpers import N_GENRES, N_ITEMS, N_USERS, SEQ_LEN, tiny_cfg
from tests.test_distributed import _free_port, _manifest

FILES = {0: [103, 97], 1: [55, 9, 1]}


def _file(start: int, n: int) -> pa.Table:
    rng = np.random.default_rng(start)
    return pa.table({
        "rid": np.arange(start, start + n),
        "user_id": rng.integers(0, N_USERS + 1, n),
        "item_id": rng.integers(1, N_ITEMS + 1, n),
        "hist_item_id": pa.array([list(rng.integers(1, N_ITEMS + 1, k))
                                  for k in rng.integers(0, SEQ_LEN + 1, n)], pa.list_(pa.int64())),
        "age_bucket": rng.integers(0, 8, n),
        "genres": pa.array([list(rng.integers(1, N_GENRES + 1, k))
                            for k in rng.integers(0, 3, n)], pa.list_(pa.int64())),
        "age": rng.uniform(15, 70, n),
        "label": rng.integers(0, 2, n).astype(np.float32),
    })


class _Source:
    def __init__(self, rank):
        starts = {0: 0, 1: 200}
        self.parts, off = [], starts[rank]
        for n in FILES[rank]:
            self.parts.append(_file(off, n))
            off += n

    def tables(self, epoch=0):
        return iter(self.parts)


def _worker(rank, world, port, tmp, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        cfg = tiny_cfg(tmp)
        layout = FeatureLayout(cfg, _manifest())
        dmp, _, _ = shard_model(build_model(layout, cfg.model, sparse_device=torch.device("meta")),
                                cfg.sharding, cfg.optim, torch.device("cpu"))
        steps = 0
        for t, n in collective_batches(rebatch(_Source(rank).tables(), 16, True), "train"):
            dmp(layout.to_batch(t.select(layout.columns)))  # a real sharded step
            steps += 1
        out = evaluate(dmp, layout, _Source(rank), 32, torch.device("cpu"), keep=("rid",))
        q.put((rank, steps, out["rid"].tolist(), len(out["logits"]),
               bool(np.isfinite(out["logits"]).all())))
    finally:
        dist.destroy_process_group()


def test_uneven_shards_equal_steps_and_exact_eval(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(tmp_path), q)) for r in range(2)]
    for p in procs:
        p.start()
    res = {}
    for _ in procs:
        rank, steps, rids, n_logits, finite = q.get(timeout=240)
        res[rank] = (steps, rids, n_logits, finite)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # rank 1 has 65 rows = 4 full batches of 16; rank 0 has 200 rows = 12: both take 4 steps
    assert res[0][0] == res[1][0] == 65 // 16
    for rank in (0, 1):
        steps, rids, n_logits, finite = res[rank]
        assert sorted(rids) == list(range(265)) and n_logits == 265 and finite
