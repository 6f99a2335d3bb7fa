"""Retrieval models through the one loop: SASRec resumed from its own mid-epoch checkpoint
reproduces the uninterrupted run (same-world, one gloo rank, no Ray), and SASRec and HSTU
train through TorchRec's sparse-dist pipeline with every-step targets
(``retrieval_loss: full``)."""

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch.distributed as dist

from rectrain.config import config_from_dict
from rectrain.data import storage
from rectrain.train import loop
from rectrain.train.env import file_env
from rectrain.train.resume import list_checkpoints
from tests.support.ports import free_port
from tests.support.prepared import write_prepared
from tests.support.tiny import tiny_job

B, EVERY = 16, 5


def _leave_last_out(prepared: str) -> None:
    """Make valid/test one row per user (full-ranking evaluation needs leave-last-out)."""
    for split in ("valid", "test"):
        for f in sorted(os.listdir(f"{prepared}/{split}")):
            path = f"{prepared}/{split}/{f}"
            t = pq.read_table(path)
            users = np.arange(1000, 1000 + t.num_rows, dtype=np.int64)
            pq.write_table(t.set_column(t.schema.get_field_index("_user"), "_user",
                                        pa.array(users)), path)


def _job(tmp, run_dir, resume=None, **model):
    return tiny_job(tmp, prepared_dir=f"{tmp}/prepared", run_dir=run_dir,
                    dataset={"split": {"test": 1, "valid": 1}},
                    model={"name": "sasrec", "embedding_dim": 8, "seq_layers": 1,
                           "seq_dropout": 0.3, **model},
                    train={"epochs": 1, "batch_size": B, "eval_batch_size": 32,
                           "num_workers": 1, "log_every": 100},
                    checkpoint={"every_n_steps": EVERY, "keep_last": 3, "resume": resume})


@pytest.fixture
def one_rank():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _run(job):
    cfg = config_from_dict(job)
    return loop.run(cfg, file_env(cfg, 0, 1))


def test_sasrec_resume_reproduces_the_uninterrupted_run(tmp_path, one_rank):
    tmp = str(tmp_path)
    write_prepared(f"{tmp}/prepared", n_train=240)
    _leave_last_out(f"{tmp}/prepared")
    ref = _run(_job(tmp, f"{tmp}/ref"))
    assert [s for s, _ in list_checkpoints(f"{tmp}/ref")] == [5, 10, 15]
    run = f"{tmp}/again"
    shutil.copytree(f"{tmp}/ref", run)
    storage.remove(f"{run}/metrics.json")
    m = _run(_job(tmp, run, resume=f"{run}/checkpoints/step-00000010"))
    ep, ep_ref = m["epochs"][0], ref["epochs"][0]
    assert ep["resumed_at_row"] == 10 * B
    assert ep["train_rows"] == ep_ref["train_rows"] == 240 // B * B
    assert ep["train_loss"] == pytest.approx(ep_ref["train_loss"], rel=1e-6)
    assert m["test"] == pytest.approx(ref["test"])
    assert m["test"]["users"] == 96


@pytest.mark.parametrize("name", ["sasrec", "hstu"])
def test_all_steps_through_the_sparse_dist_pipeline(tmp_path, one_rank, name):
    tmp = str(tmp_path)
    write_prepared(f"{tmp}/prepared", n_train=160)
    _leave_last_out(f"{tmp}/prepared")
    job = _job(tmp, f"{tmp}/run", retrieval_loss="full", name=name,
               **{f"{name}_all_steps": True})
    job["train"] = {**job["train"], "pipeline": "sparse_dist", "prefetch_batches": 2}
    m = _run(job)
    ep = m["epochs"][0]
    assert ep["train_rows"] == 160 // B * B and np.isfinite(ep["train_loss"])
    assert m["test"]["users"] == 96 and 0.0 <= m["test"]["hr@10"] <= 1.0
