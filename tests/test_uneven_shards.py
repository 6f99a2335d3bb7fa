"""Two gloo ranks with very uneven shards (files of 103, 97 | 55, 9, 1 rows): training takes the
same number of steps on both ranks, and evaluation with the sharded model scores every row exactly
once (the short rank runs padding batches so the model's collectives stay matched). The same under
Ray Train with 2 workers on prepared splits rewritten as awkward files; that run goes into a
folder an earlier run left and replaces its outputs (the failing half is in test_reliability)."""

import os

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rectrain.data.features import FeatureLayout
from rectrain.data.loader import collective_batches, rebatch
from rectrain.models import build_model
from rectrain.train.ranking import evaluate
from rectrain.train.sharding import shard_model
from tests.support.tiny import N_GENRES, N_ITEMS, N_USERS, SEQ_LEN, tiny_cfg
from tests.support.ports import free_port as _free_port
from tests.support.prepared import tiny_manifest as _manifest

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


# --------------------------------------------------------------------- the same under Ray Train
AWKWARD = [103, 97, 55, 9, 1]


def _rewrite(split_dir, sizes):
    """Rewrite a prepared split as files of ``sizes`` rows (plus one with the rest, if any)."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq
    import shutil

    t = pads.dataset(str(split_dir)).to_table()
    shutil.rmtree(split_dir)
    split_dir.mkdir()
    rest = t.num_rows - sum(sizes)
    off = 0
    for i, n in enumerate(sizes + ([rest] if rest > 0 else [])):
        pq.write_table(t.slice(off, n), split_dir / f"part-{i:02d}.parquet")
        off += n
    return t


@pytest.fixture(scope="module")
def awkward_prepared(tmp_path_factory, ray_local):
    """Prepared tiny samples whose train split is files of 103, 97, 55, 9 and 1 rows and whose
    valid/test splits are files of 31, 17, 9, 2 and 1 rows."""
    import pyarrow.parquet as pq

    from rectrain.config import config_from_dict
    from rectrain.data.prepare import prepare
    from tests.support.tiny import tiny_job, tiny_tables

    tmp = tmp_path_factory.mktemp("awkward")
    tables = tiny_tables(n_events=385)
    for name in ("users", "items", "events"):
        (tmp / "raw" / name).mkdir(parents=True)
        pq.write_table(tables[name], tmp / "raw" / name / "part-0.parquet")
    m = prepare(config_from_dict(tiny_job(str(tmp))))
    assert m["rows_per_split"] == {"train": 265, "valid": 60, "test": 60}
    tests = {"train": _rewrite(tmp / "prepared" / "train", AWKWARD),
             "valid": _rewrite(tmp / "prepared" / "valid", [31, 17, 9, 2, 1]),
             "test": _rewrite(tmp / "prepared" / "test", [31, 17, 9, 2, 1])}
    return tmp, tests


def _job(tmp, run):
    from rectrain.config import config_from_dict
    from tests.support.tiny import tiny_job

    job = tiny_job(str(tmp), run_dir=str(tmp / run))
    job["train"] = {**job["train"], "epochs": 2, "num_workers": 2}
    return config_from_dict(job)


def test_read_blocks_large_blocks_but_four_per_worker_for_evaluation():
    from rectrain.launch.ray_launch import MIN_BLOCK_ROWS, read_blocks

    assert read_blocks(265, 16, 2, "valid") == 8  # a tiny split still spreads over both workers
    assert read_blocks(409_600, 1024, 2, "test") == 8
    assert read_blocks(2_048_000, 1024, 2, "valid") == 2_048_000 // MIN_BLOCK_ROWS
    assert read_blocks(10_000_000, 16_384, 2, "valid") == 10_000_000 // (8 * 16_384)
    assert read_blocks(0, 1024, 1, "valid") == 4


def test_read_blocks_train_larger_blocks_two_per_worker():
    from rectrain.launch.ray_launch import TRAIN_BLOCK_ROWS, read_blocks

    assert read_blocks(265, 16, 2) == 4 == read_blocks(265, 16, 2, "train")
    assert read_blocks(409_600, 1024, 2) == 4  # 3 blocks of 131,072 would leave one worker 1
    assert read_blocks(2_048_000, 1024, 2) == 2_048_000 // TRAIN_BLOCK_ROWS == 15
    assert read_blocks(10_000_000, 32_768, 2) == 10_000_000 // (8 * 32_768)
    assert read_blocks(0, 1024, 3) == 6


def test_ray_train_awkward_files_equal_steps_and_every_row_once(awkward_prepared):
    """Also the successful half of tests/test_reliability.py's "a failed run keeps the last
    good one": the run goes into a folder holding an earlier run's outputs, a failed attempt
    and a file of the user's, and replaces every run output, keeping the user's file."""
    from rectrain.data import storage
    from rectrain.launch.ray_launch import train
    from tests.support.run_dirs import assert_replaced_by_a_new_run, old_run

    tmp, splits = awkward_prepared
    old_run(tmp / "run_ok")
    failed = tmp / "run_ok" / ".attempts" / "20260101-000000-0badf00d"  # a failed attempt
    (failed / "checkpoints" / "step-00000002").mkdir(parents=True)
    (failed / "checkpoints" / "step-00000002" / "meta.json").write_text('{"step": 2}')
    m = train(_job(tmp, "run_ok"))
    assert_replaced_by_a_new_run(tmp / "run_ok", m)
    # train: streaming_split(equal=True) gives each rank 132 of the 265 rows, i.e. 8 full batches
    # of 16 on both ranks whatever the file sizes
    for ep in m["epochs"]:
        assert ep["train_rows"] == 2 * 16 * ((265 // 2) // 16)
        assert ep["valid_rows"] == 60
    assert m["test_rows"] == 60
    pred = storage.read_parquet(str(tmp / "run_ok" / "predictions" / "test.parquet")).to_pandas()
    want = splits["test"].select(["_user", "_item", "_ts"]).to_pandas()
    key = ["user_id", "item_id", "timestamp"]
    got = pred[key].sort_values(key).to_numpy()
    exp = want.sort_values(["_user", "_item", "_ts"]).to_numpy()
    assert (got == exp).all() and len(got) == 60  # each test row scored exactly once


def test_ray_train_input_files_each_worker_reads_its_share(awkward_prepared):
    """train.input: files (rectrain.data.file_stream): no Ray Dataset for train; each worker
    reads its own contiguous share of the awkward files (132 and 133 of the 265 rows), so both
    take the same 8 batches of 16 per epoch, and evaluation still goes through Ray Data."""
    from rectrain.config import config_from_dict
    from rectrain.launch.ray_launch import train
    from tests.support.tiny import tiny_job

    tmp, _ = awkward_prepared
    job = tiny_job(str(tmp), run_dir=str(tmp / "run_files"))
    job["train"] = {**job["train"], "epochs": 2, "num_workers": 2, "input": "files"}
    m = train(config_from_dict(job))
    for ep in m["epochs"]:
        assert ep["train_rows"] == 2 * 16 * ((265 // 2) // 16)
        assert ep["valid_rows"] == 60 and np.isfinite(ep["train_loss"])
    assert m["test_rows"] == 60
