"""Periodic atomic checkpoints and exact resume (multi-process gloo, no Ray).

A 2-worker job (1 epoch of 12 global steps of 2 x 16 rows, a checkpoint every 5 steps, row-wise
item table) saves at steps 5, 10 and 12 (epoch end) and keeps the newest 2. Its mid-epoch
checkpoint at step 10 is resumed with 1 and with 3 workers: right after the restore, the resharded
embedding tables and the fused row-wise Adagrad momentum equal, element for element, the shards
the 2 workers saved, and the epoch's row accounting continues at row 320 without skipping or
repeating a row. With one rank, a run resumed from its own mid-epoch checkpoint reproduces the
uninterrupted run exactly."""

import pickle
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch

from rectrain.data import storage
from rectrain.checkpoint import is_complete, load_checkpoint, save_checkpoint
from rectrain.train.resume import list_checkpoints, resolve_resume
from tests.support.dist import assemble, in_process, local_shards, spawn
from tests.support.prepared import write_prepared
from tests.support.tiny import tiny_job

N_TRAIN, B, EVERY, RESUME_STEP = 400, 16, 5, 10


def _job(tmp, run_dir, world, resume=None):
    return tiny_job(tmp, prepared_dir=f"{tmp}/prepared", run_dir=run_dir,
                    sharding={"types": ["row_wise"]},
                    train={"epochs": 1, "batch_size": B, "eval_batch_size": 64,
                           "num_workers": world, "log_every": 100},
                    checkpoint={"every_n_steps": EVERY, "keep_last": 2, "resume": resume})


def _train(rank, world, job, dump_step):
    """Run the training loop on this rank; also return the local shards written at
    ``dump_step`` and those present right after a restore."""
    from rectrain.config import config_from_dict
    from rectrain.train import loop, resume
    from rectrain.train.env import file_env

    dumps = {}
    save, restore = resume.Checkpointer._save_periodic, resume.Checkpointer.restore

    def _save(self, state):
        url = save(self, state)
        if state.step == dump_step:
            dumps["saved"] = local_shards(self.dmp, self.optimizer)
        return url

    def _restore(self, state):
        out = restore(self, state)
        if out:
            dumps["restored"] = local_shards(self.dmp, self.optimizer)
        return out

    resume.Checkpointer._save_periodic, resume.Checkpointer.restore = _save, _restore
    try:  # undone: world 1 runs in the test's own process
        cfg = config_from_dict(job)
        metrics = loop.run(cfg, file_env(cfg, rank, world))
    finally:
        resume.Checkpointer._save_periodic, resume.Checkpointer.restore = save, restore
    return {"metrics": metrics, **dumps}


def _resumed_copy(tmp, ref_run, name):
    run = f"{tmp}/{name}"
    shutil.copytree(ref_run, run)
    storage.remove(f"{run}/metrics.json")
    return run, f"{run}/checkpoints/step-{RESUME_STEP:08d}"


def test_resume_exact_and_reshard(tmp_path):
    tmp = str(tmp_path)
    write_prepared(f"{tmp}/prepared", n_train=N_TRAIN)
    ref_run = f"{tmp}/ref"
    ref = spawn(_train, 2, _job(tmp, ref_run, 2), RESUME_STEP)
    m_ref = ref[0]["metrics"]
    # 12 steps: saves at 5, 10 and 12 (epoch end); the newest 2 kept
    assert [s for s, _ in list_checkpoints(ref_run)] == [10, 12]
    assert m_ref["epochs"][0]["train_rows"] == 384
    assert m_ref["epochs"][0]["train_rows_dropped"] == 16
    meta = storage.read_json(f"{ref_run}/checkpoints/step-{RESUME_STEP:08d}/meta.json")
    assert meta["progress"]["epoch"] == 0 and meta["progress"]["rows_done"] == 10 * 2 * B
    assert "row_wise" in meta["plan"] and meta["config"]["train"]["num_workers"] == 2
    assert 0.5 < m_ref["test_auc"] <= 1.0

    # other world sizes: tables and fused optimiser state resharded exactly
    saved = assemble([r["saved"] for r in ref])
    assert any("momentum1" in k for k in saved)
    assert all(np.abs(v).sum() > 0 for k, v in saved.items() if "momentum1" in k)
    for world in (1, 3):
        run, ckpt = _resumed_copy(tmp, ref_run, f"w{world}")
        job = _job(tmp, run, world, resume=ckpt)
        res = [in_process(_train, job, None)] if world == 1 else spawn(_train, world, job, None)
        restored = assemble([r["restored"] for r in res])
        assert restored.keys() == saved.keys()
        for k in saved:
            assert not np.isnan(restored[k]).any(), k
            assert np.array_equal(restored[k], saved[k]), (world, k)
        e0 = res[0]["metrics"]["epochs"][0]
        # rows 0..319 of the epoch's permutation were trained before step 10; the rest now, in
        # windows of world * B rows; the tail no full window covers is counted as dropped
        assert e0["resumed_at_row"] == 320
        assert e0["train_rows"] == 320 + (N_TRAIN - 320) // (world * B) * world * B
        assert e0["train_rows"] + e0["train_rows_dropped"] == N_TRAIN
        assert 0.0 <= res[0]["metrics"]["test_auc"] <= 1.0


def test_incomplete_checkpoints_are_ignored_and_loading_never_unpickles(tmp_path):
    run = str(tmp_path / "run")
    model = torch.nn.Linear(3, 2)
    for step in (3, 7):
        save_checkpoint(f"{run}/checkpoints/step-{step:08d}", model, meta={"step": step})
    # a crash after the shards were renamed but before meta.json (the commit marker) was written
    shutil.copytree(f"{run}/checkpoints/step-00000007", f"{run}/checkpoints/step-00000009")
    (tmp_path / "run/checkpoints/step-00000009/meta.json").unlink()
    assert not is_complete(f"{run}/checkpoints/step-00000009")
    assert resolve_resume(run, "latest").endswith("step-00000007")
    assert resolve_resume(run, "auto").endswith("step-00000007")
    assert resolve_resume(str(tmp_path / "empty"), "auto") is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_resume(str(tmp_path / "empty"), "latest")
    with pytest.raises(FileNotFoundError, match="meta.json missing"):
        load_checkpoint(f"{run}/checkpoints/step-00000009", model)

    # DCP's pickled .metadata index: anything but DCP metadata classes is refused
    target = torch.nn.Linear(3, 2)
    assert load_checkpoint(f"{run}/checkpoints/step-00000007", target)["step"] == 7
    assert torch.equal(target.weight, model.weight)

    class Evil:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "run"),))

    with open(f"{run}/checkpoints/step-00000007/.metadata", "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(pickle.UnpicklingError, match="shutil.rmtree"):
        load_checkpoint(f"{run}/checkpoints/step-00000007", target)
    assert (tmp_path / "run").exists()


def test_fsspec_url_checkpoint(tmp_path):
    """Any fsspec URL: memory:// (one process) and file:// go through DCP's FsspecWriter."""
    model = torch.nn.Linear(4, 3)
    for url in ("memory://rectrain-test/ckpt", f"file://{tmp_path}/ckpt"):
        save_checkpoint(url, model, meta={"epoch": 1})
        assert is_complete(url) and not storage.exists(url + ".tmp")
        other = torch.nn.Linear(4, 3)
        assert load_checkpoint(url, other) == {"epoch": 1}
        assert torch.equal(other.weight, model.weight) and torch.equal(other.bias, model.bias)


def test_same_world_resume_reproduces_the_uninterrupted_run(tmp_path):
    """One gloo rank in this process: a run resumed from its own mid-epoch checkpoint ends with
    the same weights-derived metrics as the run that never stopped (RNG, optimiser state, step
    counter and data position all restored)."""
    import os

    import torch.distributed as dist

    from rectrain.config import config_from_dict
    from rectrain.train import loop
    from rectrain.train.env import file_env
    from tests.support.ports import free_port

    tmp = str(tmp_path)
    write_prepared(f"{tmp}/prepared", n_train=240)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        def run(run_dir, resume=None):
            job = _job(tmp, run_dir, 1, resume=resume)
            job["model"] = {**job["model"], "dropout": 0.3}  # RNG state matters
            cfg = config_from_dict(job)
            return loop.run(cfg, file_env(cfg, 0, 1))

        ref = run(f"{tmp}/ref")
        run_dir, ckpt = _resumed_copy(tmp, f"{tmp}/ref", "again")
        ckpt = ckpt.replace(f"step-{RESUME_STEP:08d}", "step-00000010")
        assert is_complete(ckpt)
        m = run(run_dir, resume=ckpt)
    finally:
        dist.destroy_process_group()
    assert m["epochs"][0]["resumed_at_row"] == 10 * B
    assert m["epochs"][0]["train_rows"] == ref["epochs"][0]["train_rows"] == 240 // B * B
    assert m["epochs"][0]["train_loss"] == pytest.approx(ref["epochs"][0]["train_loss"], rel=1e-6)
    assert m["epochs"][0]["valid_auc"] == ref["epochs"][0]["valid_auc"]
    assert m["test_auc"] == ref["test_auc"] and m["test_logloss"] == ref["test_logloss"]


def test_mse_resume_keeps_replacing_the_best_checkpoint(tmp_path):
    """An mse job resumed after its first epoch still selects its best epoch by -RMSE: the
    resumed run's best epoch is the argmax of -valid_rmse over the whole history, and the best
    checkpoint holds that epoch (a resume used to re-score the saved best by AUC, which no later
    -RMSE could beat)."""
    import os

    import pyarrow.parquet as pq
    import torch.distributed as dist

    from rectrain.config import config_from_dict
    from rectrain.train import loop
    from rectrain.train.env import file_env
    from tests.support.ports import free_port

    tmp = str(tmp_path)
    write_prepared(f"{tmp}/prepared", n_train=240)
    for split in ("train", "valid", "test"):  # a rating that depends on the item
        for f in sorted(os.listdir(f"{tmp}/prepared/{split}")):
            path = f"{tmp}/prepared/{split}/{f}"
            t = pq.read_table(path)
            value = (1.0 + (t["item_id"].to_numpy() % 5)).astype(np.float32)
            pq.write_table(t.append_column("label_value", pa.array(value)), path)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        def run(epochs, resume=None):
            job = tiny_job(tmp, prepared_dir=f"{tmp}/prepared", run_dir=f"{tmp}/run",
                           model={"loss": "mse"},
                           train={"epochs": epochs, "batch_size": B, "eval_batch_size": 64,
                                  "num_workers": 1, "log_every": 100},
                           checkpoint={"resume": resume})
            cfg = config_from_dict(job)
            return loop.run(cfg, file_env(cfg, 0, 1))

        first = run(1)
        m = run(4, resume="latest")
    finally:
        dist.destroy_process_group()
    assert first["best_epoch"] == 0
    rmse = [e["valid_rmse"] for e in m["epochs"]]
    assert [e["epoch"] for e in m["epochs"]] == [0, 1, 2, 3]
    assert m["best_epoch"] == int(np.argmin(rmse)) > 0, rmse
    best = storage.read_json(f"{tmp}/run/checkpoint/meta.json")
    assert best["epoch"] == m["best_epoch"]
    assert best["score"] == pytest.approx(-min(rmse))
